//! The fleet at a glance, as this node sees it: Raft roles, node liveness
//! and space, volumes and the health of their replicas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::NodeAdmin;
use super::Cluster;

/// One node in `cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    /// leader, voter, learner, or none (not in the Raft membership yet)
    pub role: String,
    pub admin: NodeAdmin,
    pub up: bool,
    pub last_answer_ms: Option<u64>,
    pub last_error: Option<String>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub replicas: usize,
    pub peer_address: String,
    pub api_address: String,
    pub nbd_address: String,
    pub labels: BTreeMap<String, String>,
}

/// One volume in `cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub replicas: u32,
    pub coordinator: u64,
    pub replica_nodes: Vec<u64>,
    /// Replicas holding every acknowledged write.
    pub in_sync: Vec<u64>,
    /// Replica nodes that answer.
    pub replicas_up: usize,
    pub epoch: u64,
    /// healthy (every replica in sync and up), degraded (not), unavailable (coordinator down)
    pub health: String,
}

/// GET /v1/cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: Option<uuid::Uuid>,
    pub this_node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_applied_index: u64,
    pub nodes: Vec<NodeView>,
    pub volumes: Vec<VolumeView>,
    /// Active alerts, most severe first.
    #[serde(default)]
    pub alerts: Vec<super::alerts::Alert>,
}

impl Cluster {
    /// What this node knows of the cluster now.
    pub async fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let state = self.state();
        let held = state.replicas_per_node();
        let local_report = self.health.local_report().await;
        let nodes: Vec<NodeView> = state
            .nodes
            .values()
            .map(|node| {
                let liveness = self.health.liveness(node.id);
                let report = if node.id == self.local.id {
                    Some(local_report.clone())
                } else {
                    liveness.report.clone()
                };
                let role = if metrics.current_leader == Some(node.id) {
                    "leader"
                } else if voters.contains(&node.id) {
                    "voter"
                } else if learners.contains(&node.id) {
                    "learner"
                } else {
                    "none"
                };
                NodeView {
                    id: node.id,
                    name: node.name.clone(),
                    role: role.into(),
                    admin: node.admin,
                    up: liveness.up,
                    last_answer_ms: liveness.last_answer_ms,
                    last_error: if liveness.up { None } else { liveness.last_error },
                    capacity_bytes: report.as_ref().map_or(0, |r| r.capacity_bytes),
                    used_bytes: report.as_ref().map_or(0, |r| r.used_bytes),
                    replicas: held.get(&node.id).copied().unwrap_or(0),
                    peer_address: node.peer_address.clone(),
                    api_address: node.api_address.clone(),
                    nbd_address: node.nbd_address.clone(),
                    labels: node.labels.clone(),
                }
            })
            .collect();
        let up = |id: u64| nodes.iter().any(|node| node.id == id && node.up);
        let volumes = state
            .volumes
            .values()
            .map(|volume| {
                let replicas_up = volume.replica_nodes.iter().filter(|id| up(**id)).count();
                let health = if !up(volume.coordinator) {
                    "unavailable"
                } else if replicas_up < volume.replica_nodes.len() || volume.in_sync.len() < volume.replica_nodes.len()
                {
                    "degraded"
                } else {
                    "healthy"
                };
                VolumeView {
                    name: volume.name.clone(),
                    size_bytes: volume.size_bytes,
                    replicas: volume.replicas,
                    coordinator: volume.coordinator,
                    replica_nodes: volume.replica_nodes.clone(),
                    in_sync: volume.in_sync.clone(),
                    replicas_up,
                    epoch: volume.epoch,
                    health: health.into(),
                }
            })
            .collect();
        ClusterStatus {
            cluster_id: self.cluster_id(),
            this_node: self.local.id,
            leader: metrics.current_leader,
            term: metrics.current_term,
            last_applied_index: metrics.last_applied.map_or(0, |id| id.index),
            nodes,
            volumes,
            alerts: super::alerts::sorted(&state.alerts)
                .into_iter()
                .filter(super::alerts::Alert::is_active)
                .collect(),
        }
    }
}
