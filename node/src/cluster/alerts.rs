//! Alerts: what needs a person's attention, kept in the cluster state (so
//! every node can answer `ballast alerts`, and a new leader carries on)
//! and bounded (`ALERTS_KEPT`).
//!
//! The Raft leader evaluates the conditions once a second
//! (`evaluate`) and proposes one `Command::Alerts` only when something
//! starts or stops (and, while an alert stays active, at most once per
//! `LAST_SEEN_EVERY` to move its last-seen time), so an idle cluster writes
//! nothing. An optional webhook gets each change as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::health::NodeReport;
use super::state::{ClusterState, NodeAdmin};

/// Alerts kept at most; the oldest cleared ones go first.
pub const ALERTS_KEPT: usize = 256;
/// How often an active alert's last-seen time is moved forward.
pub const LAST_SEEN_EVERY_SECONDS: u64 = 60;
/// Disk use above which an alert is raised.
pub const DISK_FULL_RATIO: f64 = 0.85;
/// A node certificate this close to expiry raises an alert.
pub const CERT_EXPIRY_WARNING_SECONDS: u64 = 30 * 86_400;
/// Clock difference to the leader above which an alert is raised.
pub const CLOCK_SKEW_MS_MAX: i64 = 3000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

/// One alert, active or cleared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// `kind:subject`, e.g. `node_down:3`.
    pub key: String,
    /// node_down, volume_unavailable, volume_degraded, disk_full, disk_errors, clock_skew
    pub kind: String,
    pub severity: Severity,
    /// The node id or volume name it is about.
    pub subject: String,
    pub message: String,
    pub first_seen_unix: u64,
    pub last_seen_unix: u64,
    /// When the condition went away (None: active).
    pub cleared_unix: Option<u64>,
    /// How many times it started.
    pub times: u64,
}

impl Alert {
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.cleared_unix.is_none()
    }
}

/// A condition the leader found true now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Raised {
    pub kind: String,
    pub severity: Severity,
    pub subject: String,
    pub message: String,
}

impl Raised {
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.subject)
    }
}

/// What the leader knows of one node when it evaluates.
#[derive(Clone, Debug, Default)]
pub struct NodeSeen {
    pub up: bool,
    pub last_error: Option<String>,
    /// The node's last report and how long ago it came (ms).
    pub report: Option<(NodeReport, u64)>,
}

/// The conditions true now, from the state and what the leader sees.
#[must_use]
pub fn evaluate(state: &ClusterState, seen: &BTreeMap<u64, NodeSeen>, now_unix_ms: u64) -> Vec<Raised> {
    let mut raised = Vec::new();
    let up = |id: u64| seen.get(&id).is_some_and(|s| s.up);
    for node in state.nodes.values() {
        let subject = node.id.to_string();
        let Some(view) = seen.get(&node.id) else { continue };
        if !view.up && node.admin != NodeAdmin::Maintenance {
            let why = view
                .last_error
                .as_deref()
                .map_or_else(String::new, |error| format!(": {error}"));
            raised.push(Raised {
                kind: "node_down".into(),
                severity: Severity::Critical,
                subject: subject.clone(),
                message: format!("node {} ({}) does not answer{why}", node.id, node.name),
            });
        }
        let Some((report, age_ms)) = &view.report else { continue };
        if report.capacity_bytes > 0 {
            let ratio = report.used_bytes as f64 / report.capacity_bytes as f64;
            if ratio > DISK_FULL_RATIO {
                raised.push(Raised {
                    kind: "disk_full".into(),
                    severity: Severity::Warning,
                    subject: subject.clone(),
                    message: format!(
                        "node {} disks are over {:.0} % full; add disks or move volumes",
                        node.id,
                        DISK_FULL_RATIO * 100.0
                    ),
                });
            }
        }
        if report.failed_disks > 0 || report.checksum_errors > 0 {
            raised.push(Raised {
                kind: "disk_errors".into(),
                severity: if report.failed_disks > 0 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                subject: subject.clone(),
                message: format!(
                    "node {}: {} failed disk(s), {} block(s) failed their checksum since start (repaired from replicas where possible)",
                    node.id, report.failed_disks, report.checksum_errors
                ),
            });
        }
        if report.cert_expires_unix > 0 {
            let now_unix = now_unix_ms / 1000;
            let left = report.cert_expires_unix.saturating_sub(now_unix);
            if left < CERT_EXPIRY_WARNING_SECONDS {
                raised.push(Raised {
                    kind: "cert_expiry".into(),
                    severity: if left == 0 {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    },
                    subject: subject.clone(),
                    message: if left == 0 {
                        format!(
                            "node {}'s peer certificate has expired; run `ballast cluster rotate-certs`",
                            node.id
                        )
                    } else {
                        format!(
                            "node {}'s peer certificate expires in {} days; run `ballast cluster rotate-certs`",
                            node.id,
                            left / 86_400
                        )
                    },
                });
            }
        }
        if report.unix_millis > 0 {
            let sent_at = i64::try_from(now_unix_ms.saturating_sub(*age_ms)).unwrap_or(i64::MAX);
            let skew = i64::try_from(report.unix_millis).unwrap_or(i64::MAX) - sent_at;
            if skew.abs() > CLOCK_SKEW_MS_MAX {
                raised.push(Raised {
                    kind: "clock_skew".into(),
                    severity: Severity::Warning,
                    subject,
                    message: format!(
                        "node {}'s clock is more than {} s off the leader's; run NTP (join tokens and certificates expire by the clock)",
                        node.id,
                        CLOCK_SKEW_MS_MAX / 1000
                    ),
                });
            }
        }
    }
    for volume in state.volumes.values() {
        if !up(volume.coordinator) {
            raised.push(Raised {
                kind: "volume_unavailable".into(),
                severity: Severity::Critical,
                subject: volume.name.clone(),
                message: format!(
                    "volume {}: its coordinator, node {}, does not answer; clients cannot reach it until a failover",
                    volume.name, volume.coordinator
                ),
            });
            continue;
        }
        let out: Vec<u64> = volume
            .replica_nodes
            .iter()
            .copied()
            .filter(|id| !volume.in_sync.contains(id) || !up(*id))
            .collect();
        let missing = (volume.replicas as usize).saturating_sub(volume.replica_nodes.len());
        if !out.is_empty() || missing > 0 {
            raised.push(Raised {
                kind: "volume_degraded".into(),
                severity: Severity::Warning,
                subject: volume.name.clone(),
                message: format!(
                    "volume {}: {} of {} wanted replicas in sync and up (out of sync or down: {:?})",
                    volume.name,
                    volume.replica_nodes.len() - out.len(),
                    volume.replicas,
                    out
                ),
            });
        }
    }
    raised
}

/// The change to propose, if any: conditions that started, changed or are
/// due a last-seen update, and active alerts whose condition went away.
#[must_use]
pub fn diff(state: &ClusterState, now: &[Raised], now_unix: u64) -> Option<(Vec<Raised>, Vec<String>)> {
    let mut raise = Vec::new();
    for condition in now {
        match state.alerts.get(&condition.key()) {
            Some(alert)
                if alert.is_active()
                    && alert.message == condition.message
                    && alert.severity == condition.severity
                    && now_unix < alert.last_seen_unix + LAST_SEEN_EVERY_SECONDS => {}
            _ => raise.push(condition.clone()),
        }
    }
    let clear: Vec<String> = state
        .alerts
        .values()
        .filter(|alert| alert.is_active() && !now.iter().any(|c| c.key() == alert.key))
        .map(|alert| alert.key.clone())
        .collect();
    (!raise.is_empty() || !clear.is_empty()).then_some((raise, clear))
}

/// Applies a `Command::Alerts` to the alert table.
pub fn apply(alerts: &mut BTreeMap<String, Alert>, raise: Vec<Raised>, clear: &[String], now_unix: u64) {
    for condition in raise {
        let key = condition.key();
        match alerts.get_mut(&key) {
            Some(alert) if alert.is_active() => {
                alert.message = condition.message;
                alert.severity = condition.severity;
                alert.last_seen_unix = now_unix;
            }
            Some(alert) => {
                *alert = Alert {
                    times: alert.times + 1,
                    ..new_alert(key, condition, now_unix)
                };
            }
            None => {
                alerts.insert(key.clone(), new_alert(key, condition, now_unix));
            }
        }
    }
    for key in clear {
        if let Some(alert) = alerts.get_mut(key) {
            if alert.is_active() {
                alert.cleared_unix = Some(now_unix);
                alert.last_seen_unix = now_unix;
            }
        }
    }
    while alerts.len() > ALERTS_KEPT {
        let oldest = alerts
            .values()
            .filter(|alert| !alert.is_active())
            .min_by_key(|alert| alert.last_seen_unix)
            .or_else(|| alerts.values().min_by_key(|alert| alert.last_seen_unix))
            .map(|alert| alert.key.clone());
        match oldest {
            Some(key) => alerts.remove(&key),
            None => break,
        };
    }
}

fn new_alert(key: String, condition: Raised, now_unix: u64) -> Alert {
    Alert {
        key,
        kind: condition.kind,
        severity: condition.severity,
        subject: condition.subject,
        message: condition.message,
        first_seen_unix: now_unix,
        last_seen_unix: now_unix,
        cleared_unix: None,
        times: 1,
    }
}

/// Active alerts first (critical before warning), then cleared ones, newest first.
#[must_use]
pub fn sorted(alerts: &BTreeMap<String, Alert>) -> Vec<Alert> {
    let mut list: Vec<Alert> = alerts.values().cloned().collect();
    list.sort_by(|a, b| {
        b.is_active()
            .cmp(&a.is_active())
            .then(b.severity.cmp(&a.severity))
            .then(b.last_seen_unix.cmp(&a.last_seen_unix))
            .then(a.key.cmp(&b.key))
    });
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{Command, Outcome};

    fn state_with_volume() -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(Command::Init {
            cluster_id: uuid::Uuid::from_u128(1),
            node: crate::cluster::state::tests::node(1, None),
        });
        for id in [2, 3] {
            state.apply(Command::AddNode {
                node: crate::cluster::state::tests::node(id, None),
            });
        }
        let created = state.apply(Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
            replica_nodes: vec![1, 2, 3],
            created_unix_seconds: 0,
            encryption: None,
        });
        assert!(matches!(created, Outcome::Volume(_)));
        state
    }

    fn seen(up: &[u64], down: &[u64]) -> BTreeMap<u64, NodeSeen> {
        let report = NodeReport {
            capacity_bytes: 100,
            used_bytes: 10,
            unix_millis: 1_000_000,
            ..NodeReport::default()
        };
        up.iter()
            .map(|id| {
                (
                    *id,
                    NodeSeen {
                        up: true,
                        last_error: None,
                        report: Some((report.clone(), 0)),
                    },
                )
            })
            .chain(down.iter().map(|id| {
                (
                    *id,
                    NodeSeen {
                        up: false,
                        last_error: Some("connection refused".into()),
                        report: None,
                    },
                )
            }))
            .collect()
    }

    fn kinds(raised: &[Raised]) -> Vec<String> {
        raised.iter().map(Raised::key).collect()
    }

    #[test]
    fn a_down_replica_node_raises_node_down_and_volume_degraded_and_clears_when_back() {
        let mut state = state_with_volume();
        let now = evaluate(&state, &seen(&[1, 2], &[3]), 1_000_000);
        assert_eq!(kinds(&now), vec!["node_down:3", "volume_degraded:v"]);
        let (raise, clear) = diff(&state, &now, 1000).expect("a change");
        assert!(clear.is_empty());
        apply(&mut state.alerts, raise, &clear, 1000);
        assert!(diff(&state, &now, 1010).is_none(), "no change, no proposal");
        // Last seen moves once a minute while active.
        let (raise, _) = diff(&state, &now, 1000 + LAST_SEEN_EVERY_SECONDS).expect("a refresh");
        assert_eq!(raise.len(), 2);
        // Back: both clear, with their times kept.
        let back = evaluate(&state, &seen(&[1, 2, 3], &[]), 1_000_000);
        assert!(back.is_empty(), "{back:?}");
        let (raise, clear) = diff(&state, &back, 1100).expect("clears");
        assert!(raise.is_empty());
        apply(&mut state.alerts, raise, &clear, 1100);
        let alert = &state.alerts["node_down:3"];
        assert_eq!(
            (alert.first_seen_unix, alert.cleared_unix, alert.times),
            (1000, Some(1100), 1)
        );
        assert!(sorted(&state.alerts).iter().all(|alert| !alert.is_active()));
    }

    #[test]
    fn a_down_coordinator_makes_the_volume_unavailable_and_maintenance_mutes_node_down() {
        let mut state = state_with_volume();
        state.apply(Command::SetNodeAdmin {
            id: 1,
            admin: NodeAdmin::Maintenance,
        });
        let now = evaluate(&state, &seen(&[2, 3], &[1]), 1_000_000);
        assert_eq!(kinds(&now), vec!["volume_unavailable:v"]);
    }

    #[test]
    fn full_disks_errors_and_clock_skew_are_raised() {
        let state = state_with_volume();
        let mut seen = seen(&[1, 2, 3], &[]);
        if let Some((report, _)) = &mut seen.get_mut(&2).unwrap().report {
            report.used_bytes = 90;
            report.checksum_errors = 2;
        }
        if let Some((report, _)) = &mut seen.get_mut(&3).unwrap().report {
            report.unix_millis = 1_000_000 + 10_000;
            report.cert_expires_unix = 1000 + 86_400;
        }
        let now = evaluate(&state, &seen, 1_000_000);
        assert_eq!(
            kinds(&now),
            vec!["disk_full:2", "disk_errors:2", "cert_expiry:3", "clock_skew:3"]
        );
    }

    #[test]
    fn the_table_stays_bounded_dropping_the_oldest_cleared_first() {
        let mut alerts = BTreeMap::new();
        let condition = |n: usize| Raised {
            kind: "node_down".into(),
            severity: Severity::Critical,
            subject: n.to_string(),
            message: String::new(),
        };
        apply(&mut alerts, vec![condition(0)], &[], 1);
        for n in 1..=ALERTS_KEPT + 10 {
            apply(&mut alerts, vec![condition(n)], &[condition(n).key()], 10 + n as u64);
        }
        assert_eq!(alerts.len(), ALERTS_KEPT);
        assert!(alerts["node_down:0"].is_active(), "active alerts outlive cleared ones");
    }
}
