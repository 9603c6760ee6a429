//! Liveness and capacity of the other nodes, as this node sees them: every
//! node pings every other member once per `PING_INTERVAL` over the peer
//! protocol; the answer carries the peer's free space. A node unanswered
//! for `NODE_DOWN_AFTER` is down (placement skips it; status shows it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::placement::NodeView;
use super::Cluster;
use crate::peer::frame::FrameKind;

/// How often each peer is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(1000);
/// A ping unanswered this long fails.
pub const PING_TIMEOUT: Duration = Duration::from_millis(1000);
/// A node unanswered this long counts as down.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(5);
/// Placement only picks nodes that answered this recently (stricter than
/// `NODE_DOWN_AFTER`: a replica placed on a node that just died is wasted).
pub const PLACEMENT_FRESH: Duration = Duration::from_millis(2500);

/// What a node says about itself in a pong.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub disks: u32,
    pub replicas: u32,
    pub version: String,
    /// The peer protocol versions the node speaks (0: a build from before
    /// this field, which spoke only version 1).
    #[serde(default)]
    pub protocol_min: u16,
    #[serde(default)]
    pub protocol_max: u16,
    /// Disks whose store stopped after an I/O error.
    #[serde(default)]
    pub failed_disks: u32,
    /// Volumes whose copy here is on a failed disk.
    #[serde(default)]
    pub failed_volumes: Vec<String>,
    /// Blocks read back with a bad checksum since the node started.
    #[serde(default)]
    pub checksum_errors: u64,
    /// The node's clock when it made the report (clock-skew alerts).
    #[serde(default)]
    pub unix_millis: u64,
    /// CPU cores the node may use.
    #[serde(default)]
    pub cores: u32,
    /// Each enrolled disk.
    #[serde(default)]
    pub disk_list: Vec<DiskReport>,
    /// Volumes this node serves (coordinates).
    #[serde(default)]
    pub served: Vec<ServedReport>,
    /// When this node's peer certificate expires (Unix seconds; 0: unknown).
    #[serde(default)]
    pub cert_expires_unix: u64,
    /// Resyncs this node runs or ran as coordinator: (volume, status).
    #[serde(default)]
    pub resyncs: Vec<(String, crate::replication::resync::ResyncStatus)>,
    /// The last scrub of each volume this node coordinates.
    #[serde(default)]
    pub scrubs: Vec<(String, crate::replication::scrub::ScrubStatus)>,
}

/// One disk in a node's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub path: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub failed: bool,
    pub checksum_errors: u64,
}

/// A volume a node serves, in its report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedReport {
    pub name: String,
    /// Bytes of the coordinator's replica that hold data.
    pub used_bytes: u64,
    /// NBD connections open to it.
    pub connections: u64,
}

impl NodeReport {
    #[must_use]
    pub fn free_bytes(&self) -> u64 {
        self.capacity_bytes.saturating_sub(self.used_bytes)
    }
}

#[derive(Clone, Debug)]
struct Seen {
    /// When this node first tried to reach it.
    first_try: Instant,
    last_answer: Option<Instant>,
    report: Option<NodeReport>,
    last_error: Option<String>,
}

/// Liveness as seen from this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    pub up: bool,
    /// Milliseconds since the node last answered (None: never).
    pub last_answer_ms: Option<u64>,
    pub last_error: Option<String>,
    pub report: Option<NodeReport>,
}

/// The table of what this node has seen of the others.
pub struct Health {
    local_id: u64,
    report: Arc<dyn Fn() -> NodeReport + Send + Sync>,
    seen: Mutex<BTreeMap<u64, Seen>>,
}

impl Health {
    pub(super) fn new(local_id: u64, report: Box<dyn Fn() -> NodeReport + Send + Sync>) -> Self {
        Self {
            local_id,
            report: Arc::from(report),
            seen: Mutex::new(BTreeMap::new()),
        }
    }

    /// This node's own report (queries the storage engine off the async workers).
    /// This node's report (without resyncs; `Cluster::report` adds them).
    pub async fn local_report(&self) -> NodeReport {
        let report = Arc::clone(&self.report);
        tokio::task::spawn_blocking(move || report()).await.unwrap_or_default()
    }

    /// Liveness of `id` (this node is always up).
    pub fn liveness(&self, id: u64) -> Liveness {
        if id == self.local_id {
            return Liveness {
                up: true,
                last_answer_ms: Some(0),
                last_error: None,
                report: None,
            };
        }
        let seen = self.seen.lock().get(&id).cloned();
        let elapsed = seen.as_ref().and_then(|s| s.last_answer).map(|at| at.elapsed());
        Liveness {
            up: elapsed.is_some_and(|elapsed| elapsed < NODE_DOWN_AFTER),
            last_answer_ms: elapsed.map(|e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX)),
            last_error: seen.as_ref().and_then(|s| s.last_error.clone()),
            report: seen.and_then(|s| s.report),
        }
    }

    /// When `id` last answered a ping (None: never, or this node).
    #[must_use]
    pub fn last_answer_at(&self, id: u64) -> Option<Instant> {
        self.seen.lock().get(&id).and_then(|seen| seen.last_answer)
    }

    /// How long `id` has not answered (zero while it answers; this node never).
    pub fn down_for(&self, id: u64) -> Duration {
        if id == self.local_id {
            return Duration::ZERO;
        }
        match self.seen.lock().get(&id) {
            Some(seen) => {
                let silent = seen.last_answer.unwrap_or(seen.first_try).elapsed();
                if silent < NODE_DOWN_AFTER {
                    Duration::ZERO
                } else {
                    silent
                }
            }
            None => Duration::ZERO,
        }
    }

    /// What placement needs of every node, this node included.
    pub async fn views(&self, members: &[u64]) -> BTreeMap<u64, NodeView> {
        let local = self.local_report().await;
        members
            .iter()
            .map(|&id| {
                let view = if id == self.local_id {
                    NodeView {
                        up: true,
                        free_bytes: local.free_bytes(),
                    }
                } else {
                    let liveness = self.liveness(id);
                    let fresh_ms = u64::try_from(PLACEMENT_FRESH.as_millis()).unwrap_or(u64::MAX);
                    NodeView {
                        up: liveness.last_answer_ms.is_some_and(|ms| ms < fresh_ms),
                        free_bytes: liveness.report.map_or(0, |r| r.free_bytes()),
                    }
                };
                (id, view)
            })
            .collect()
    }

    fn record(&self, id: u64, answer: Result<NodeReport, String>) {
        let mut seen = self.seen.lock();
        let entry = seen.entry(id).or_insert(Seen {
            first_try: Instant::now(),
            last_answer: None,
            report: None,
            last_error: None,
        });
        match answer {
            Ok(report) => {
                entry.last_answer = Some(Instant::now());
                entry.report = Some(report);
                entry.last_error = None;
            }
            Err(error) => entry.last_error = Some(error),
        }
    }
}

/// Pings every other member each interval until `stop`.
pub async fn ping_loop(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if cluster.cluster_id().is_some() {
            cluster.ping_all().await;
        }
    }
}

impl Cluster {
    /// Pings every other member at once and records the answers.
    pub async fn ping_all(&self) {
        let peers: Vec<(u64, String)> = self.with_state(|state| {
            state
                .nodes
                .values()
                .filter(|node| node.id != self.local.id)
                .map(|node| (node.id, node.peer_address.clone()))
                .collect()
        });
        let pings = peers.into_iter().map(|(id, address)| async move {
            let answer = match self.client.call(&address, FrameKind::Ping, b"", PING_TIMEOUT).await {
                Ok((FrameKind::Pong, payload)) => {
                    serde_json::from_slice::<NodeReport>(&payload).map_err(|error| format!("unreadable pong: {error}"))
                }
                Ok((kind, _)) => Err(format!("answered a ping with {kind:?}")),
                Err(error) => Err(error.to_string()),
            };
            self.health.record(id, answer);
        });
        futures::future::join_all(pings).await;
    }
}
