//! `ballast node decommission ID`: moves every replica off a node, then
//! takes it out of the cluster. Per volume with a replica there: a new
//! replica is placed elsewhere and filled by the coordinator's resync; once
//! it is in sync, the volume's coordinator moves to it if it was the
//! leaving node (its NBD clients reconnect to the new export), and the
//! leaving node's replica is removed. Then the node leaves the Raft
//! membership (a learner is promoted to keep voters) and the node table.
//! Runs on the Raft leader; every step is idempotent, so a decommission
//! that failed half-way (leader change, time-out) can simply be run again.
//! A leader that decommissions itself steps down once it is out of the
//! membership and hears nothing from the next leader: its membership calls
//! are bounded in time (the new configuration is checked instead), and it
//! sends the node table's removal to the remaining members in turn until
//! the one that leads now commits it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use super::placement::place;
use super::state::{ClusterVolume, Command, NodeAdmin, Outcome, VOTERS_MAX};
use super::{Cluster, ClusterError};

/// Longest a membership change may take to answer (a leader removing
/// itself may never get the answer; the applied configuration says then).
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a node that left the membership keeps asking the others to
/// remove it from the node table (an election takes a few seconds).
const REMOVE_SELF_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one replica may take to be copied to its new node.
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(600);

impl Cluster {
    /// Moves every replica off `id`, then removes it from the cluster.
    pub async fn decommission(&self, id: u64) -> Result<(), ClusterError> {
        self.require_member()?;
        if !self.with_state(|state| state.nodes.contains_key(&id)) {
            return Err(ClusterError::Invalid(format!("node {id} is not a member")));
        }
        if !self.is_leader() {
            return Err(ClusterError::Invalid("decommission runs on the Raft leader".into()));
        }
        self.change(Command::SetNodeAdmin {
            id,
            admin: NodeAdmin::Decommissioning,
        })
        .await?;
        let volumes: Vec<ClusterVolume> = self.with_state(|state| {
            state
                .volumes
                .values()
                .filter(|v| v.replica_nodes.contains(&id))
                .cloned()
                .collect()
        });
        for volume in volumes {
            tracing::info!(node = id, volume = %volume.name, "decommission: moving a replica away");
            self.move_replica(&volume.name, id).await?;
        }
        self.leave_membership(id).await?;
        self.remove_node(id).await?;
        tracing::info!(node = id, "decommission: the node left the cluster");
        Ok(())
    }

    async fn move_replica(&self, name: &str, id: u64) -> Result<(), ClusterError> {
        let volume = self.current(name)?;
        let replacement = match volume
            .replica_nodes
            .iter()
            .copied()
            .find(|n| *n != id && !volume.in_sync.contains(n))
        {
            Some(pending) => pending,
            None => {
                let members: Vec<u64> = self.with_state(|state| state.nodes.keys().copied().collect());
                self.ping_all().await;
                let mut views = self.health.views(&members).await;
                for holder in volume.replica_nodes.iter().chain(std::iter::once(&id)) {
                    if let Some(view) = views.get_mut(holder) {
                        view.up = false;
                    }
                }
                let chosen = self
                    .with_state(|state| place(state, &views, 1, self.local.id))
                    .map_err(|error| {
                        ClusterError::Invalid(format!(
                            "no node can take the replica of {name} from node {id}: {error}"
                        ))
                    })?;
                self.change(Command::AddReplica {
                    name: name.to_owned(),
                    node: chosen[0],
                    grow: false,
                })
                .await?;
                chosen[0]
            }
        };
        let started = Instant::now();
        while !self.current(name)?.in_sync.contains(&replacement) {
            if started.elapsed() > MOVE_TIMEOUT {
                return Err(ClusterError::Internal(format!(
                    "the new replica of {name} on node {replacement} did not get in sync within {MOVE_TIMEOUT:?}; run the decommission again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if self.current(name)?.coordinator == id {
            self.change(Command::SetCoordinator {
                name: name.to_owned(),
                node: replacement,
            })
            .await?;
        }
        self.change(Command::RemoveReplica {
            name: name.to_owned(),
            node: id,
            shrink: false,
        })
        .await?;
        Ok(())
    }

    fn current(&self, name: &str) -> Result<ClusterVolume, ClusterError> {
        self.with_state(|state| state.volumes.get(name).cloned())
            .ok_or_else(|| ClusterError::Invalid(format!("volume {name} disappeared during the decommission")))
    }

    /// Takes `id` out of the Raft membership, promoting a learner to keep the voter count.
    async fn leave_membership(&self, id: u64) -> Result<(), ClusterError> {
        let (voters, learners) = self.roles();
        if voters.contains(&id) {
            if let Some(learner) = learners.iter().copied().find(|l| *l != id) {
                if voters.len() <= VOTERS_MAX {
                    let promoted = |(voters, _): (Vec<u64>, Vec<u64>)| voters.contains(&learner);
                    self.membership_change(ChangeMembers::AddVoterIds(BTreeSet::from([learner])), true, promoted)
                        .await?;
                }
            }
            let out = |(voters, _): (Vec<u64>, Vec<u64>)| !voters.contains(&id);
            self.membership_change(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false, out)
                .await?;
        }
        let (_, learners) = self.roles();
        if learners.contains(&id) {
            let gone = |(voters, learners): (Vec<u64>, Vec<u64>)| !voters.contains(&id) && !learners.contains(&id);
            self.membership_change(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false, gone)
                .await?;
        }
        Ok(())
    }

    /// One membership change, at most `MEMBERSHIP_TIMEOUT`; when it does not
    /// answer in time, `done` judges the configuration this node has now.
    async fn membership_change(
        &self,
        change: ChangeMembers<u64, openraft::BasicNode>,
        retain: bool,
        done: impl Fn((Vec<u64>, Vec<u64>)) -> bool,
    ) -> Result<(), ClusterError> {
        let internal = |error: String| ClusterError::Internal(format!("membership change: {error}"));
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, self.raft.change_membership(change, retain)).await {
            Ok(answer) => answer.map(drop).map_err(|e| internal(e.to_string())),
            Err(_) if done(self.roles()) => Ok(()),
            Err(_) => Err(internal(format!(
                "no answer within {MEMBERSHIP_TIMEOUT:?} and the configuration does not show it; run the decommission again"
            ))),
        }
    }

    /// Removes `id` from the node table. When `id` is this node (a leader
    /// that decommissioned itself) it is out of the membership and does not
    /// learn who leads now: the removal goes to each remaining member in
    /// turn until the leader commits it (one proposal id: applied once).
    async fn remove_node(&self, id: u64) -> Result<(), ClusterError> {
        let command = Command::Once {
            id: uuid::Uuid::new_v4(),
            command: Box::new(Command::RemoveNode { id }),
        };
        if id != self.local.id {
            return self.change(command).await.map(drop);
        }
        let others: Vec<openraft::BasicNode> = self.with_state(|state| {
            state
                .nodes
                .values()
                .filter(|node| node.id != id)
                .map(|node| openraft::BasicNode {
                    addr: node.peer_address.clone(),
                })
                .collect()
        });
        let started = Instant::now();
        let mut last_error = "no other member".to_owned();
        while started.elapsed() < REMOVE_SELF_TIMEOUT {
            for node in &others {
                match self.forward_proposal(node, &command).await {
                    Ok(Outcome::Rejected(rejection)) => return Err(ClusterError::Rejected(rejection)),
                    Ok(_) => return Ok(()),
                    Err(error) => last_error = format!("{}: {error}", node.addr),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(ClusterError::Internal(format!(
            "this node left the membership but no remaining member committed its removal within {REMOVE_SELF_TIMEOUT:?} (last: {last_error}); run the decommission again"
        )))
    }
}
