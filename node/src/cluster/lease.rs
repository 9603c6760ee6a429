//! Serving leases and how the leader tells a dead coordinator from a slow one.
//!
//! Every node asks the Raft leader every `LEASE_RENEW_INTERVAL` to confirm
//! it (`LeaseRequest`). The leader answers only after a quorum confirmed its
//! leadership (openraft's read index: heartbeats sent after the request
//! arrived) and sends the index the asker must have applied. The asker waits
//! until its metadata has reached that index, then extends the lease of
//! every volume the metadata still says it coordinates, to the time it
//! *sent* the request plus `LEASE_DURATION` (`volume::lease`). A coordinator
//! that was moved away learns it from that same metadata and extends
//! nothing, so its lease runs out at most `LEASE_DURATION` after the move
//! was committed; the new coordinator waits that long after it learns of the
//! move before it serves (`Cluster::takeover_ready_at`), unless every other
//! member answers that it does not serve the volume (`others_released`: a
//! graceful move, or the old coordinator already caught up). No clock is
//! compared between nodes, only durations on each node's monotonic clock.
//!
//! The leader counts how long each node has shown no sign of life: no
//! lease request it confirmed and no answer to its health ping
//! (`lease_silence`); that is what automatic failover waits on. A process
//! that is stopped, cut off or dead does neither; one that is merely busy
//! (CPU, a stalled data disk) does both, since neither touches its reactors
//! or its data disks. A leader elected because the old one died still has
//! its own pings' answers, so a coordinator that died with the old leader
//! is failed over as soon as one that died alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::peer::frame::FrameKind;
use crate::volume::lease::LEASE_DURATION;

/// How often every node asks the leader to confirm it.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_millis(250);
/// A renewal (the request, the leader's quorum round, catching up) gives up after this.
const LEASE_RENEW_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Serialize, Deserialize)]
struct LeaseRequest {
    node: u64,
    /// Not a renewal: the node upgrades in place and asks every member to
    /// wait this long before failing its volumes over (0: it is back).
    /// Members from before upgrades in place ignore it (and a non-leader
    /// among them refuses the request, which is harmless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upgrading_for_ms: Option<u64>,
}

/// How long an upgrade notice waits for each member.
const UPGRADE_NOTICE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Serialize, Deserialize)]
struct LeaseGrant {
    /// The asker's metadata must have applied this Raft index.
    read_index: u64,
}

#[derive(Serialize, Deserialize)]
struct ServingQuery {
    volume: String,
}

#[derive(Serialize, Deserialize)]
struct ServingAnswer {
    serving: bool,
}

/// How long a node taking a volume over waits for another's answer.
const SERVING_QUERY_TIMEOUT: Duration = Duration::from_millis(300);

/// The lease bookkeeping of one node.
#[derive(Default)]
pub struct Leases {
    /// As leader: when each node's last confirmed request arrived.
    granted: parking_lot::Mutex<HashMap<u64, Instant>>,
    /// When a Raft leader's append (or heartbeat) last arrived here, by
    /// leader: a sign of life of a node that led until it failed, for the
    /// next leader's `lease_silence` (it may not have pinged it yet).
    heard_from_leader: parking_lot::Mutex<HashMap<u64, Instant>>,
    /// The Raft term this node last saw itself lead, and since when.
    leading: parking_lot::Mutex<Option<(u64, Instant)>>,
    /// Nodes upgrading in place, and until when they may stay silent
    /// without their volumes failing over.
    upgrading: parking_lot::Mutex<HashMap<u64, Instant>>,
    /// Volumes this node takes over: (epoch, when it learned of it).
    taking_over: parking_lot::Mutex<HashMap<String, (u64, Instant)>>,
    /// Wakes the renewal loop at once (a volume starts being served here).
    pub kick: tokio::sync::Notify,
}

impl Cluster {
    /// While this node leads: since when it has led the current term.
    fn leading_since(&self) -> Option<Instant> {
        let (leader, term) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state == openraft::ServerState::Leader, metrics.current_term)
        };
        if !leader {
            return None;
        }
        let mut leading = self.leases.leading.lock();
        match *leading {
            Some((seen, since)) if seen == term => Some(since),
            _ => {
                let since = Instant::now();
                *leading = Some((term, since));
                Some(since)
            }
        }
    }

    /// As leader: how long `node` has shown no sign of life to this node:
    /// neither a lease request it confirmed nor an answer to its ping (from
    /// this leadership's start when it has seen neither); None when this
    /// node does not lead, and zero for itself. A stopped process does
    /// neither. This decides only when to fail over (a false failover costs
    /// availability); that a moved-away coordinator answers no read after the
    /// move rests on the leases alone.
    #[must_use]
    pub fn lease_silence(&self, node: u64) -> Option<Duration> {
        let since = self.leading_since()?;
        if node == self.local.id {
            return Some(Duration::ZERO);
        }
        if self
            .leases
            .upgrading
            .lock()
            .get(&node)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Some(Duration::ZERO);
        }
        let granted = self.leases.granted.lock().get(&node).copied();
        let pinged = self.health.last_answer_at(node);
        let heard = self.leases.heard_from_leader.lock().get(&node).copied();
        let last = granted.into_iter().chain(pinged).chain(heard).max().unwrap_or(since);
        Some(last.elapsed())
    }

    /// Notes that an append from leader `node` just arrived.
    pub(super) fn heard_from_leader(&self, node: u64) {
        self.leases.heard_from_leader.lock().insert(node, Instant::now());
    }

    /// Answers a `LeaseRequest` (as leader).
    pub(super) async fn grant_lease(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let arrived = Instant::now();
        let request: LeaseRequest =
            serde_json::from_slice(payload).map_err(|error| format!("unreadable lease request: {error}"))?;
        if let Some(window) = request.upgrading_for_ms {
            self.note_upgrading(request.node, Duration::from_millis(window));
            return serde_json::to_vec(&LeaseGrant { read_index: 0 }).map_err(|error| error.to_string());
        }
        let read_index = self.confirm_leadership().await?;
        self.leases
            .granted
            .lock()
            .entry(request.node)
            .and_modify(|at| *at = (*at).max(arrived))
            .or_insert(arrived);
        serde_json::to_vec(&LeaseGrant { read_index }).map_err(|error| error.to_string())
    }

    fn note_upgrading(&self, node: u64, window: Duration) {
        let mut upgrading = self.leases.upgrading.lock();
        if window.is_zero() {
            upgrading.remove(&node);
        } else {
            tracing::info!(
                node,
                ?window,
                "a member upgrades in place: its volumes stay with it meanwhile"
            );
            upgrading.insert(node, Instant::now() + window);
        }
    }

    /// Tells every member that this node upgrades in place and may be
    /// silent for `window` (its volumes do not fail over meanwhile), or,
    /// with zero, that it is back. Best effort: a member that does not
    /// answer within `UPGRADE_NOTICE_TIMEOUT` may fail them over after the
    /// usual silence.
    pub async fn announce_upgrade(&self, window: Duration) {
        let others = self.other_members();
        let Ok(notice) = serde_json::to_vec(&LeaseRequest {
            node: self.local.id,
            upgrading_for_ms: Some(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        }) else {
            return;
        };
        let told = others.iter().map(|address| async {
            self.client
                .call(address, FrameKind::LeaseRequest, &notice, UPGRADE_NOTICE_TIMEOUT)
                .await
                .is_ok()
        });
        let told = futures::future::join_all(told).await;
        let missed = told.iter().filter(|told| !**told).count();
        if missed > 0 {
            tracing::warn!(
                missed,
                members = others.len(),
                "some members did not hear of this node's upgrade in place"
            );
        }
    }

    /// A quorum confirmed this node leads (after the call began): the index
    /// a linearizable read must have applied.
    async fn confirm_leadership(&self) -> Result<u64, String> {
        let (read_log_id, _applied) = self
            .raft
            .get_read_log_id()
            .await
            .map_err(|error| format!("not confirmed as the Raft leader: {error}"))?;
        Ok(read_log_id.map_or(0, |id| id.index))
    }

    /// One renewal: confirmation from the leader, metadata caught up, then
    /// the lease of every volume this node still coordinates extended.
    async fn renew_leases(&self) -> Result<(), String> {
        let asked = Instant::now();
        let read_index = if self.is_leader() {
            self.confirm_leadership().await?
        } else {
            let leader = self.leader().ok_or("no Raft leader is known")?;
            let address = self
                .with_state(|state| state.nodes.get(&leader).map(|node| node.peer_address.clone()))
                .ok_or_else(|| format!("the leader {leader} is not in the node table yet"))?;
            let request = serde_json::to_vec(&LeaseRequest {
                node: self.local.id,
                upgrading_for_ms: None,
            })
            .map_err(|e| e.to_string())?;
            match self
                .client
                .call(&address, FrameKind::LeaseRequest, &request, LEASE_RENEW_TIMEOUT)
                .await
            {
                Ok((FrameKind::LeaseGrant, payload)) => {
                    serde_json::from_slice::<LeaseGrant>(&payload)
                        .map_err(|error| format!("unreadable lease grant: {error}"))?
                        .read_index
                }
                Ok((kind, _)) => return Err(format!("the leader answered a lease request with {kind:?}")),
                Err(error) => return Err(format!("leader {leader}: {error}")),
            }
        };
        let mut applied = self.applied_watch();
        applied
            .wait_for(|index| *index >= read_index)
            .await
            .map_err(|_| "the metadata store stopped")?;
        let Some(volumes) = self.volumes.get() else {
            return Ok(());
        };
        let local = self.local.id;
        let coordinated: Vec<String> = self.with_state(|state| {
            state
                .volumes
                .values()
                .filter(|volume| volume.coordinator == local)
                .map(|volume| volume.name.clone())
                .collect()
        });
        for name in coordinated {
            if let Some(volume) = volumes.get(&name) {
                volume.lease.extend_from(asked);
            }
        }
        Ok(())
    }

    /// Answers a `ServingQuery`: whether this node serves the volume now.
    /// Once it answered no, it answers no read of it (`Volume::read`
    /// checks after every read that it still serves the volume).
    pub(super) fn answer_serving(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let query: ServingQuery =
            serde_json::from_slice(payload).map_err(|error| format!("unreadable serving query: {error}"))?;
        let serving = self
            .volumes
            .get()
            .and_then(|volumes| volumes.get(&query.volume))
            .is_some_and(|volume| volume.is_served());
        serde_json::to_vec(&ServingAnswer { serving }).map_err(|error| error.to_string())
    }

    /// The peer addresses of every other member.
    fn other_members(&self) -> Vec<String> {
        self.with_state(|state| {
            state
                .nodes
                .values()
                .filter(|node| node.id != self.local.id)
                .map(|node| node.peer_address.clone())
                .collect()
        })
    }

    /// Whether every other member said it does not serve `name`: then a
    /// new coordinator need not wait out a lease (a graceful move, the old
    /// coordinator up). A member that does not answer may still hold one.
    pub async fn others_released(&self, name: &str) -> bool {
        let others = self.other_members();
        let Ok(query) = serde_json::to_vec(&ServingQuery {
            volume: name.to_owned(),
        }) else {
            return false;
        };
        let answers = others.iter().map(|address| async {
            match self
                .client
                .call(address, FrameKind::ServingQuery, &query, SERVING_QUERY_TIMEOUT)
                .await
            {
                Ok((FrameKind::ServingAnswer, payload)) => {
                    serde_json::from_slice::<ServingAnswer>(&payload).is_ok_and(|answer| !answer.serving)
                }
                _ => false,
            }
        });
        futures::future::join_all(answers)
            .await
            .into_iter()
            .all(|released| released)
    }

    /// When this node, newly `name`'s coordinator at `epoch`, may serve it:
    /// one lease after it learned of it, so the old coordinator's lease has
    /// run out.
    pub fn takeover_ready_at(&self, name: &str, epoch: u64) -> Instant {
        let mut taking_over = self.leases.taking_over.lock();
        let entry = taking_over
            .entry(name.to_owned())
            .or_insert_with(|| (epoch, Instant::now()));
        if entry.0 != epoch {
            *entry = (epoch, Instant::now());
        }
        entry.1 + LEASE_DURATION
    }
}

/// Renews this node's leases every `LEASE_RENEW_INTERVAL` until `stop`.
pub async fn lease_loop(cluster: Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(LEASE_RENEW_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = cluster.leases.kick.notified() => {}
            _ = stop.changed() => return,
        }
        if cluster.cluster_id().is_none() {
            continue;
        }
        let renewed = tokio::time::timeout(LEASE_RENEW_TIMEOUT, cluster.renew_leases())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {LEASE_RENEW_TIMEOUT:?}")));
        match (renewed, failing_since) {
            (Ok(()), Some(since)) => {
                tracing::info!(after = ?since.elapsed(), "serving leases renewed again");
                failing_since = None;
            }
            (Ok(()), None) => {}
            (Err(error), None) => {
                tracing::warn!(%error, "cannot renew the serving leases (reads of replicated volumes wait for a renewal)");
                failing_since = Some(Instant::now());
            }
            (Err(error), Some(_)) => tracing::debug!(%error, "serving leases still not renewed"),
        }
    }
}

// A live node renews several times within the failover timeout (no false
// failover), and a lease outlasts a renewal that takes its longest.
const _: () = assert!(
    super::automation::FAILOVER_AFTER_DEFAULT.as_millis()
        >= LEASE_DURATION.as_millis() + 2 * LEASE_RENEW_TIMEOUT.as_millis()
);
const _: () = assert!(LEASE_DURATION.as_millis() >= LEASE_RENEW_INTERVAL.as_millis() + LEASE_RENEW_TIMEOUT.as_millis());
