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
//! leader picks up where the old one stopped.

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
        for volume in volumes {
            if let Err(error) = step(&cluster, &volume).await {
                tracing::warn!(volume = %volume.name, %error, "automatic failover/rebuild step failed; retrying");
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

async fn step(cluster: &Cluster, volume: &ClusterVolume) -> Result<(), String> {
    let automation = cluster.automation();
    let health = &cluster.health;
    if let Some(after) = automation.failover_after {
        let report = if volume.coordinator == cluster.local.id {
            Some(health.local_report().await)
        } else {
            health.liveness(volume.coordinator).report
        };
        let disk_failed = report.is_some_and(|report| report.failed_volumes.contains(&volume.name));
        let silent = cluster
            .lease_silence(volume.coordinator)
            .is_some_and(|silence| silence > after);
        if disk_failed || silent {
            let heir = volume
                .in_sync
                .iter()
                .copied()
                .find(|id| *id != volume.coordinator && health.liveness(*id).up);
            if let Some(heir) = heir {
                let why = if disk_failed {
                    "the coordinator's disk failed"
                } else {
                    "coordinator silent"
                };
                tracing::warn!(volume = %volume.name, from = volume.coordinator, to = heir, "{why}; failing over");
                cluster
                    .change(Command::SetCoordinator {
                        name: volume.name.clone(),
                        node: heir,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
    }
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
