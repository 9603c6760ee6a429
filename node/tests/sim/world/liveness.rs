//! The end of a run: faults healed, crashed nodes restarted; within a
//! bounded simulated time every node is a member, a proposal commits and
//! all nodes converge on one state that agrees with every reply. Then every
//! node restarts and must reload that state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use node::cluster::state::{ClusterState, Command, TokenRecord};
use tokio::time::Instant;

use super::super::client::{self, MembershipChange, Reply};
use super::super::model::Pending;
use super::super::network::{Faults, NodeId};
use super::super::node::{config, SimNode};
use super::{Sim, LIVENESS_TIME_MAX, POLL_INTERVAL};

impl Sim {
    pub(super) async fn liveness_phase(&mut self) -> Result<(), String> {
        self.note("liveness phase: heal everything".into());
        self.net.set_faults(Faults::calm());
        let down: Vec<NodeId> = self.nodes.values().filter(|n| !n.is_running()).map(|n| n.id).collect();
        for id in down {
            let config = config(&mut self.rng, self.snapshots);
            self.nodes
                .get_mut(&id)
                .expect("exists")
                .start(&self.net, config)
                .await?;
        }
        let deadline = Instant::now() + LIVENESS_TIME_MAX;
        while let Some(joined) = self.join_next_client(deadline).await? {
            let (pending, reply) = joined;
            self.on_reply(pending, &reply)?;
        }
        if tokio::time::timeout_at(deadline, async {
            while let Some(joined) = self.membership.join_next().await {
                let result = joined.map_err(|error| format!("membership task failed: {error}"))?;
                self.note(format!("membership change: {result:?}"));
            }
            Ok::<(), String>(())
        })
        .await
        .is_err()
        {
            return Err("a membership change still runs after the faults healed".into());
        }
        assert_eq!(self.model.busy_names(), 0, "every client answered");
        self.recover(LIVENESS_TIME_MAX).await
    }

    async fn join_next_client(&mut self, deadline: Instant) -> Result<Option<(Pending, Reply)>, String> {
        match tokio::time::timeout_at(deadline, self.clients.join_next()).await {
            Err(_) => Err("a client still waits after the faults healed".into()),
            Ok(None) => Ok(None),
            Ok(Some(joined)) => joined.map(Some).map_err(|error| format!("client task failed: {error}")),
        }
    }

    /// Within `limit`: every node a member, a proposal commits, all nodes converge.
    pub(super) async fn recover(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        self.make_everyone_member(deadline).await?;
        self.probe(deadline).await?;
        self.wait_converged(deadline).await?;
        self.check_invariants()
    }

    async fn make_everyone_member(&mut self, deadline: Instant) -> Result<(), String> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            loop {
                let leader = self
                    .wait_for_leader(deadline.saturating_duration_since(Instant::now()))
                    .await?;
                let members = client::members(self.nodes[&leader].raft().expect("running"));
                if members.contains_key(&id) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("node {id} never became a member"));
                }
                let candidates = self.candidates();
                let result =
                    client::change_membership(Arc::clone(&self.net), candidates, MembershipChange::AddLearner(id))
                        .await;
                self.note(format!("liveness: add learner {id}: {result:?}"));
            }
        }
        Ok(())
    }

    /// A token proposal that must commit before `deadline`.
    async fn probe(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            self.probes += 1;
            let hash = format!("probe-{}", self.probes);
            let command = Command::CreateToken {
                hash: hash.clone(),
                record: TokenRecord {
                    expires_unix_seconds: u64::MAX,
                },
                now_unix_seconds: 1,
            };
            let candidates = self.candidates();
            let reply = client::propose(Arc::clone(&self.net), candidates, command).await;
            let committed = matches!(reply, Reply::Committed { .. });
            self.on_reply(Pending::Token { hash }, &reply)?;
            if committed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no proposal committed within {LIVENESS_TIME_MAX:?} of healing"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until one running node leads (and says so in its metrics).
    pub(super) async fn wait_for_leader(&mut self, limit: Duration) -> Result<NodeId, String> {
        let deadline = Instant::now() + limit;
        loop {
            self.sample()?;
            let leader = self.nodes.values().find(|node| {
                node.metrics()
                    .is_some_and(|metrics| metrics.state == openraft::ServerState::Leader)
            });
            if let Some(leader) = leader {
                return Ok(leader.id);
            }
            if Instant::now() >= deadline {
                return Err(format!("no leader within {limit:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until one leader is known to all and every node applied all of its log.
    async fn wait_converged(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            self.sample()?;
            let all: Vec<_> = self.nodes.values().filter_map(SimNode::metrics).collect();
            let leaders: Vec<_> = all
                .iter()
                .filter(|m| m.state == openraft::ServerState::Leader)
                .collect();
            if all.len() == self.nodes.len() && leaders.len() == 1 {
                let leader = leaders[0];
                let done = leader.last_applied.map(|id| id.index) == leader.last_log_index
                    && all.iter().all(|m| {
                        m.current_leader == Some(leader.id)
                            && m.last_applied == leader.last_applied
                            && m.membership_config == leader.membership_config
                    });
                if done {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let views: Vec<String> = all
                    .iter()
                    .map(|m| {
                        format!(
                            "node {} {:?} term {} leader {:?} log {:?} applied {:?}",
                            m.id, m.state, m.current_term, m.current_leader, m.last_log_index, m.last_applied
                        )
                    })
                    .collect();
                return Err(format!("no convergence after healing: {}", views.join("; ")));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// All nodes hold one state, and it agrees with every reply; returns it.
    pub(super) fn check_converged(&mut self) -> Result<ClusterState, String> {
        let states: BTreeMap<NodeId, ClusterState> = self
            .nodes
            .values()
            .map(|node| (node.id, node.state().expect("running after recovery")))
            .collect();
        let (first_id, first) = states.first_key_value().expect("nodes");
        for (id, state) in &states {
            if state != first {
                return Err(format!(
                    "nodes {first_id} and {id} differ:\n{}\n{}",
                    serde_json::to_string(first).expect("json"),
                    serde_json::to_string(state).expect("json")
                ));
            }
        }
        if first.cluster_id != Some(uuid::Uuid::from_u64_pair(self.seed, 0xba11a57)) {
            return Err(format!("cluster id is {:?}", first.cluster_id));
        }
        let errors = self.model.check_final(first);
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        self.note(format!(
            "converged: {} volumes, {} nodes, {} tokens",
            first.volumes.len(),
            first.nodes.len(),
            first.tokens.len()
        ));
        Ok(first.clone())
    }

    /// Crashes and restarts every node; each must reload the converged state.
    pub(super) async fn restart_all(&mut self, converged: &ClusterState) -> Result<(), String> {
        self.note("restart every node".into());
        for node in self.nodes.values_mut() {
            node.crash(&self.net).await?;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let config = config(&mut self.rng, self.snapshots);
            let node = self.nodes.get_mut(&id).expect("exists");
            node.start(&self.net, config).await?;
            if node.state().as_ref() != Some(converged) {
                return Err(format!("node {id} reloaded a state other than the one it had applied"));
            }
        }
        Ok(())
    }
}
