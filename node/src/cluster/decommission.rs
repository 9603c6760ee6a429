//! `ballast node decommission ID`: moves every replica off a node, then
//! takes it out of the cluster. Per volume with a replica there: a new
//! replica is placed elsewhere and filled by the coordinator's resync; once
//! it is in sync, the volume's coordinator moves to it if it was the
//! leaving node (its NBD clients reconnect to the new export), and the
//! leaving node's replica is removed. Then the node leaves the Raft
//! membership (a learner is promoted to keep voters) and the node table.
//! Runs on the Raft leader; every step is idempotent, so a decommission
//! that failed half-way (leader change, time-out) can simply be run again.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use super::placement::place;
use super::state::{ClusterVolume, Command, NodeAdmin, VOTERS_MAX};
use super::{Cluster, ClusterError};

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
        self.change(Command::RemoveNode { id }).await?;
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
        let internal = |error: String| ClusterError::Internal(format!("membership change: {error}"));
        if voters.contains(&id) {
            if let Some(learner) = learners.iter().copied().find(|l| *l != id) {
                if voters.len() <= VOTERS_MAX {
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([learner])), true)
                        .await
                        .map_err(|e| internal(e.to_string()))?;
                }
            }
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| internal(e.to_string()))?;
        }
        let (_, learners) = self.roles();
        if learners.contains(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| internal(e.to_string()))?;
        }
        Ok(())
    }
}
