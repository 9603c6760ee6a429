//! The fleet at a glance, as this node sees it: Raft roles, node liveness
//! and space, volumes and the health of their replicas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::state::NodeAdmin;
use super::Cluster;
use crate::peer::handshake::reported_range;

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
    /// From the node's last report (empty/0 when it never answered).
    #[serde(default)]
    pub version: String,
    /// The peer protocol versions it speaks (0: unknown, it never answered).
    #[serde(default)]
    pub protocol_min: u16,
    #[serde(default)]
    pub protocol_max: u16,
    #[serde(default)]
    pub cores: u32,
    #[serde(default)]
    pub disks: Vec<super::health::DiskReport>,
    /// When the node's peer certificate expires (Unix seconds; 0: unknown).
    #[serde(default)]
    pub cert_expires_unix: u64,
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
    /// Data held by the coordinator's replica (from its report).
    #[serde(default)]
    pub used_bytes: u64,
    /// Where clients attach: the coordinator's NBD address, and how many are connected.
    #[serde(default)]
    pub nbd_address: String,
    #[serde(default)]
    pub connections: u64,
    /// Resyncs the coordinator runs or last ran, per replica.
    #[serde(default)]
    pub resyncs: Vec<crate::replication::resync::ResyncStatus>,
    /// The coordinator's last (or running) scrub pass.
    #[serde(default)]
    pub scrub: Option<crate::replication::scrub::ScrubStatus>,
    /// Verifying scrubs asked for and done (`scrub start --wait` follows these).
    #[serde(default)]
    pub scrub_requested: u64,
    #[serde(default)]
    pub scrub_done: u64,
    #[serde(default)]
    pub scrub_done_unix: u64,
    /// I/O priority class and limits (None: unlimited).
    #[serde(default)]
    pub io_priority: crate::volume::qos::IoPriority,
    #[serde(default)]
    pub iops_limit: Option<u64>,
    #[serde(default)]
    pub mib_per_s_limit: Option<u64>,
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

/// healthy (every replica in sync and up), degraded (not), or unavailable
/// (its coordinator does not answer), given which nodes answer.
#[must_use]
pub fn volume_health(volume: &super::state::ClusterVolume, up: impl Fn(u64) -> bool) -> &'static str {
    if !up(volume.coordinator) {
        "unavailable"
    } else if volume.replica_nodes.iter().any(|id| !up(*id)) || volume.in_sync.len() < volume.replica_nodes.len() {
        "degraded"
    } else {
        "healthy"
    }
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
        let local_report = self.report().await;
        let report_of = |id: u64| {
            if id == self.local.id {
                Some(local_report.clone())
            } else {
                self.health.liveness(id).report
            }
        };
        let nodes: Vec<NodeView> = state
            .nodes
            .values()
            .map(|node| {
                let liveness = self.health.liveness(node.id);
                let report = report_of(node.id);
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
                    version: report.as_ref().map(|r| r.version.clone()).unwrap_or_default(),
                    protocol_min: report
                        .as_ref()
                        .map_or(0, |r| reported_range(r.protocol_min, r.protocol_max).0),
                    protocol_max: report
                        .as_ref()
                        .map_or(0, |r| reported_range(r.protocol_min, r.protocol_max).1),
                    cores: report.as_ref().map_or(0, |r| r.cores),
                    disks: report.as_ref().map(|r| r.disk_list.clone()).unwrap_or_default(),
                    cert_expires_unix: report.as_ref().map_or(0, |r| r.cert_expires_unix),
                }
            })
            .collect();

        let up = |id: u64| nodes.iter().any(|node| node.id == id && node.up);
        let volumes = state
            .volumes
            .values()
            .map(|volume| {
                let replicas_up = volume.replica_nodes.iter().filter(|id| up(**id)).count();
                let health = volume_health(volume, up);
                let coordinator_report = report_of(volume.coordinator);
                let served = coordinator_report
                    .as_ref()
                    .and_then(|r| r.served.iter().find(|s| s.name == volume.name).cloned())
                    .unwrap_or_default();
                let scrub = coordinator_report.as_ref().and_then(|r| {
                    r.scrubs
                        .iter()
                        .find(|(name, _)| *name == volume.name)
                        .map(|(_, status)| status.clone())
                });
                let resyncs = coordinator_report
                    .map(|r| {
                        r.resyncs
                            .into_iter()
                            .filter(|(name, _)| *name == volume.name)
                            .map(|(_, status)| status)
                            .collect()
                    })
                    .unwrap_or_default();
                VolumeView {
                    used_bytes: served.used_bytes,
                    connections: served.connections,
                    nbd_address: state
                        .nodes
                        .get(&volume.coordinator)
                        .map(|n| n.nbd_address.clone())
                        .unwrap_or_default(),
                    resyncs,
                    scrub,
                    scrub_requested: volume.scrub_requested,
                    scrub_done: volume.scrub_done,
                    scrub_done_unix: volume.scrub_done_unix,
                    io_priority: volume.io_priority,
                    iops_limit: volume.iops_limit,
                    mib_per_s_limit: volume.mib_per_s_limit,
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
