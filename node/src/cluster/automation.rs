//! What the Raft leader does without being asked, four times a second:
//! - failover: a volume whose coordinator has shown no sign of life for
//!   `failover_after` (`lease::lease_silence`: no lease renewal, no ping
//!   answer), or reports the disk holding the volume failed, gets
//!   an in-sync replica that answers as its new coordinator (epoch up: the
//!   old one is fenced). Its NBD clients reconnect to the new node's export.
//! - rebuild: a replica on a node silent for `rebuild_after` is replaced:
//!   a new replica is placed (the wanted count stays), filled by the
//!   coordinator's resync, and once every other replica is in sync the
//!   silent node's replica is removed.
//!
//! One step per volume per pass; every step is a Raft change, so a new
//! leader picks up where the old one stopped. The failovers of a pass are
//! proposed together (up to `FAILOVERS_IN_FLIGHT` at once: a node that
//! coordinated hundreds of volumes hands them over in a few Raft rounds,
//! not one round per volume), each to the in-sync replica that answers and
//! coordinates the fewest volumes, counting the ones this pass gives it.
//! Rebuilds stay one at a time (each placement sees the one before).

use std::sync::Arc;
use std::time::Duration;

use super::placement::place;
use super::state::{ClusterVolume, Command};
use super::Cluster;

/// Defaults (the `failover_after_s` and `rebuild_after_s` settings).
pub const FAILOVER_AFTER_DEFAULT: Duration = Duration::from_secs(4);
pub const REBUILD_AFTER_DEFAULT: Duration = Duration::from_secs(600);
/// Failover and rebuild are checked this often; alerts every fourth pass.
const PASS_INTERVAL: Duration = Duration::from_millis(250);
const ALERT_PASSES: u64 = 4;
/// Failovers of one pass proposed at once.
const FAILOVERS_IN_FLIGHT: usize = 64;

/// When the leader acts on silent nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Automation {
    /// None: failover only by `volume attach`.
    pub failover_after: Option<Duration>,
    /// None: no automatic rebuild.
    pub rebuild_after: Option<Duration>,
}

impl Default for Automation {
    fn default() -> Self {
        Self {
            failover_after: Some(FAILOVER_AFTER_DEFAULT),
            rebuild_after: Some(REBUILD_AFTER_DEFAULT),
        }
    }
}

/// Runs the leader's passes until `stop`.
pub async fn automation_loop(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(PASS_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pass: u64 = 0;
    loop {
        pass += 1;
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if cluster.cluster_id().is_none() || !cluster.is_leader() {
            continue;
        }
        let volumes: Vec<ClusterVolume> = cluster.with_state(|state| state.volumes.values().cloned().collect());
        let (failovers, rest) = failovers_due(&cluster, volumes).await;
        use futures::StreamExt as _;
        futures::stream::iter(failovers)
            .for_each_concurrent(FAILOVERS_IN_FLIGHT, |failover| {
                let cluster = &cluster;
                async move {
                    if let Err(error) = failover.propose(cluster).await {
                        tracing::warn!(volume = %failover.name, %error, "automatic failover failed; retrying");
                    }
                }
            })
            .await;
        for volume in rest {
            if let Err(error) = rebuild_step(&cluster, &volume).await {
                tracing::warn!(volume = %volume.name, %error, "automatic rebuild step failed; retrying");
            }
        }
        if pass.is_multiple_of(ALERT_PASSES) {
            alerts_pass(&cluster).await;
        }
    }
}

/// Evaluates the alert conditions and proposes what changed (leader only).
async fn alerts_pass(cluster: &Arc<Cluster>) {
    use super::alerts::{diff, evaluate, NodeSeen};
    let local_report = cluster.health.local_report().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (now_ms, now_unix) = (u64::try_from(now.as_millis()).unwrap_or(0), now.as_secs());
    let ids: Vec<u64> = cluster.with_state(|state| state.nodes.keys().copied().collect());
    let seen = ids
        .into_iter()
        .map(|id| {
            if id == cluster.local.id {
                let seen = NodeSeen {
                    up: true,
                    last_error: None,
                    report: Some((local_report.clone(), 0)),
                };
                return (id, seen);
            }
            let liveness = cluster.health.liveness(id);
            let age = liveness.last_answer_ms.unwrap_or(0);
            // Down for alerts only once silent past the threshold (a node just
            // joined, or a leader just elected, has not been asked yet).
            let seen = NodeSeen {
                up: cluster.health.down_for(id).is_zero(),
                last_error: liveness.last_error,
                report: liveness.report.map(|report| (report, age)),
            };
            (id, seen)
        })
        .collect();
    let Some((raise, clear)) = cluster.with_state(|state| diff(state, &evaluate(state, &seen, now_ms), now_unix))
    else {
        return;
    };
    let started: Vec<super::alerts::Raised> = cluster.with_state(|state| {
        raise
            .iter()
            .filter(|c| !state.alerts.get(&c.key()).is_some_and(super::alerts::Alert::is_active))
            .cloned()
            .collect()
    });
    let command = Command::Alerts {
        raise,
        clear: clear.clone(),
        now_unix,
    };
    if let Err(error) = cluster.change(command).await {
        tracing::warn!(%error, "cannot record alerts; retrying");
        return;
    }
    for alert in &started {
        tracing::warn!(alert = %alert.key(), severity = ?alert.severity, message = %alert.message, "alert raised");
    }
    for key in &clear {
        tracing::info!(alert = %key, "alert cleared");
    }
    if let Some(url) = cluster.alert_webhook() {
        if !started.is_empty() || !clear.is_empty() {
            let body = serde_json::json!({
                "cluster_id": cluster.cluster_id(),
                "raised": started,
                "cleared": clear,
                "at_unix": now_unix,
            });
            tokio::task::spawn_blocking(move || {
                let sent = ureq::post(&url).timeout(Duration::from_secs(5)).send_json(body);
                if let Err(error) = sent {
                    tracing::warn!(%url, %error, "alert webhook failed");
                }
            });
        }
    }
}

/// One volume moving to a new coordinator.
struct Failover {
    name: String,
    from: u64,
    to: u64,
    why: &'static str,
}

impl Failover {
    async fn propose(&self, cluster: &Cluster) -> Result<(), String> {
        tracing::warn!(volume = %self.name, from = self.from, to = self.to, "{}; failing over", self.why);
        cluster
            .change(Command::SetCoordinator {
                name: self.name.clone(),
                node: self.to,
            })
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// The failovers due in this pass, and the volumes left for a rebuild
/// step (a volume whose coordinator is gone but has no heir that answers
/// waits: neither).
async fn failovers_due(cluster: &Cluster, volumes: Vec<ClusterVolume>) -> (Vec<Failover>, Vec<ClusterVolume>) {
    let Some(after) = cluster.automation().failover_after else {
        return (Vec::new(), volumes);
    };
    let health = &cluster.health;
    let local_report = if volumes.iter().any(|volume| volume.coordinator == cluster.local.id) {
        Some(health.local_report().await)
    } else {
        None
    };
    // Volumes each node coordinates, and those this pass hands it.
    let mut coordinated: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for volume in &volumes {
        *coordinated.entry(volume.coordinator).or_default() += 1;
    }
    let (mut failovers, mut rest) = (Vec::new(), Vec::new());
    for volume in volumes {
        let report = if volume.coordinator == cluster.local.id {
            local_report.clone()
        } else {
            health.liveness(volume.coordinator).report
        };
        let disk_failed = report.is_some_and(|report| report.failed_volumes.contains(&volume.name));
        let silent = cluster
            .lease_silence(volume.coordinator)
            .is_some_and(|silence| silence > after);
        if !disk_failed && !silent {
            rest.push(volume);
            continue;
        }
        if let Some(heir) = choose_heir(&volume, |id| health.liveness(id).up, &mut coordinated) {
            failovers.push(Failover {
                name: volume.name.clone(),
                from: volume.coordinator,
                to: heir,
                why: if disk_failed {
                    "the coordinator's disk failed"
                } else {
                    "coordinator silent"
                },
            });
        }
    }
    (failovers, rest)
}

/// The in-sync replica that answers and coordinates the fewest volumes
/// (`coordinated`, which counts it one more), lowest id on a tie.
fn choose_heir(
    volume: &ClusterVolume,
    up: impl Fn(u64) -> bool,
    coordinated: &mut std::collections::HashMap<u64, usize>,
) -> Option<u64> {
    let heir = volume
        .in_sync
        .iter()
        .copied()
        .filter(|id| *id != volume.coordinator && up(*id))
        .min_by_key(|id| (coordinated.get(id).copied().unwrap_or(0), *id))?;
    *coordinated.entry(heir).or_default() += 1;
    Some(heir)
}

/// Replaces a replica on a node silent for `rebuild_after`, one step.
async fn rebuild_step(cluster: &Cluster, volume: &ClusterVolume) -> Result<(), String> {
    let automation = cluster.automation();
    let health = &cluster.health;
    let Some(after) = automation.rebuild_after else {
        return Ok(());
    };
    let Some(silent) = volume
        .replica_nodes
        .iter()
        .copied()
        .find(|id| *id != volume.coordinator && health.down_for(*id) > after)
    else {
        return Ok(());
    };
    let others: Vec<u64> = volume
        .replica_nodes
        .iter()
        .copied()
        .filter(|id| *id != silent)
        .collect();
    let resyncing = others
        .iter()
        .any(|id| !volume.in_sync.contains(id) && health.liveness(*id).up);
    if resyncing {
        return Ok(());
    }
    let wanted = volume.replicas as usize;
    let command = if others.len() < wanted {
        let members: Vec<u64> = cluster.with_state(|state| state.nodes.keys().copied().collect());
        let mut views = health.views(&members).await;
        for holder in &volume.replica_nodes {
            if let Some(view) = views.get_mut(holder) {
                view.up = false;
            }
        }
        let chosen = cluster
            .with_state(|state| place(state, &views, 1, volume.coordinator))
            .map_err(|error| format!("no node can take a rebuilt replica: {error}"))?;
        tracing::warn!(volume = %volume.name, silent, to = chosen[0], "rebuilding a replica of a silent node elsewhere");
        Command::AddReplica {
            name: volume.name.clone(),
            node: chosen[0],
            grow: false,
        }
    } else {
        tracing::warn!(volume = %volume.name, silent, "rebuilt; removing the silent node's replica");
        Command::RemoveReplica {
            name: volume.name.clone(),
            node: silent,
            shrink: false,
        }
    };
    cluster.change(command).await.map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(coordinator: u64, in_sync: &[u64]) -> ClusterVolume {
        serde_json::from_value(serde_json::json!({
            "name": "v", "id": 1, "size_bytes": 4096, "block_size_bytes": 4096, "replicas": in_sync.len(),
            "coordinator": coordinator, "replica_nodes": in_sync, "in_sync": in_sync, "epoch": 2,
            "created_unix_seconds": 0
        }))
        .expect("a volume record")
    }

    #[test]
    fn the_volumes_of_a_failed_node_are_spread_over_the_heirs_that_answer() {
        let mut coordinated = std::collections::HashMap::from([(1, 4), (2, 1), (3, 0)]);
        let up = |id: u64| id != 1 && id != 4;
        let heirs: Vec<Option<u64>> = (0..4)
            .map(|_| choose_heir(&volume(1, &[1, 2, 3, 4]), up, &mut coordinated))
            .collect();
        // Node 3 first (it coordinates none), then both in turn; node 4 does not answer.
        assert_eq!(heirs, vec![Some(3), Some(2), Some(3), Some(2)]);
        assert_eq!(choose_heir(&volume(1, &[1, 4]), up, &mut coordinated), None);
    }
}
