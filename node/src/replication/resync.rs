//! Bringing an out-of-sync replica back (resync), under live writes: the
//! coordinator first copies every new mutation to it as well ("catching
//! up"), then walks the volume 1 MiB at a time, each piece under the
//! volume's range lock so no write races the copy, sending allocated data
//! as writes and holes as zeroings; when the walk ends with the replica
//! still caught up, Raft takes it back into the in-sync set (epoch +1).
//!
//! Incremental when it can be: a coordinator that dropped the replica
//! itself tracked the 64 KiB regions mutated since (`VolumeReplication`,
//! durably in `dirty`, so also across its restarts), and copies only
//! those. Otherwise (it took over from another coordinator, or the replica
//! is a new one) it copies all allocated data of the volume.
//!
//! From every healthy copy: the pieces are shared out between the
//! coordinator and each other in-sync replica that is up, one piece at a
//! time each. For a replica's piece the coordinator takes the range lock
//! and asks that replica (`ReplicaCopy`) to send its own copy of the piece
//! straight to the one being resynced; a replica that fails a piece hands
//! it back to the coordinator, which copies it itself and goes on without
//! that replica. `BALLAST_RESYNC_FROM=coordinator` copies from the
//! coordinator alone (for A/B runs).

use std::sync::Arc;

use super::wire::{self, CopyRequest, OpKind, ReplicaOp};
use super::{VolumeReplication, DIRTY_REGION_BLOCKS};
use crate::cluster::state::{ClusterState, Command};
use crate::cluster::Cluster;
use crate::peer::frame::FrameKind;
use crate::peer::mux::MuxLink;
use crate::volume::{Volume, Volumes};

/// Blocks copied under one hold of the range lock.
/// Blocks copied under one hold of the range lock (dirty spans are merged
/// up to this; a full copy walks windows of `WINDOW_BLOCKS`).
const CHUNK_BLOCKS: u64 = 256;
/// A full copy looks at 64 MiB at a time: holes go as one zeroing each,
/// data in writes of at most `CHUNK_BLOCKS` (thin volumes are mostly holes).
const WINDOW_BLOCKS: u64 = 16384;
const BLOCK_BYTES: u64 = 4096;

/// Fastest a resync copies data (per replica): it leaves the disks and
/// the network room for clients.
pub const RESYNC_BYTES_PER_S_MAX: u64 = 256 << 20;
/// Pause after each piece a resync copies while the volume's clients have
/// requests in flight: foreground I/O first.
pub const RESYNC_BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// How long a resync waits after a piece: long enough to stay under
/// `bytes_per_s` on average, plus `RESYNC_BUSY_PAUSE` when clients are busy.
#[must_use]
pub fn pause_after(
    copied_bytes: u64,
    elapsed: std::time::Duration,
    bytes_per_s: u64,
    busy: bool,
) -> std::time::Duration {
    let due = std::time::Duration::from_secs_f64(copied_bytes as f64 / bytes_per_s.max(1) as f64);
    let ahead = due.saturating_sub(elapsed);
    if busy {
        ahead + RESYNC_BUSY_PAUSE
    } else {
        ahead
    }
}

/// A resync as `volume inspect` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncStatus {
    pub node: u64,
    /// running, done or failed
    pub state: String,
    /// incremental (dirty regions only) or full
    pub mode: String,
    /// Bytes of the regions dirtied while the replica was out (full: the volume's size).
    pub dirty_bytes: u64,
    /// Allocated data sent.
    pub copied_bytes: u64,
    /// Holes sent as zeroings.
    pub zeroed_bytes: u64,
    /// Of `copied_bytes`, what other in-sync replicas sent (not the coordinator).
    #[serde(default)]
    pub from_replicas_bytes: u64,
    /// Copies read from: the coordinator and the in-sync replicas that help.
    #[serde(default)]
    pub sources: u32,
    pub error: Option<String>,
    /// When it started and last moved (Unix ms; the ETA comes from these).
    #[serde(default)]
    pub started_unix_ms: u64,
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl ResyncStatus {
    /// Bytes still to look at while running (0 otherwise).
    #[must_use]
    pub fn remaining_bytes(&self) -> u64 {
        if self.state == "running" {
            self.dirty_bytes.saturating_sub(self.copied_bytes + self.zeroed_bytes)
        } else {
            0
        }
    }

    /// Data copied per second so far (None before any progress).
    #[must_use]
    pub fn copied_bytes_per_s(&self) -> Option<u64> {
        let elapsed_ms = self.updated_unix_ms.saturating_sub(self.started_unix_ms);
        (elapsed_ms > 0 && self.copied_bytes > 0).then(|| self.copied_bytes.saturating_mul(1000) / elapsed_ms)
    }

    /// Seconds left at the pace so far (None before any progress or when not running).
    #[must_use]
    pub fn eta_seconds(&self) -> Option<u64> {
        let moved = self.copied_bytes + self.zeroed_bytes;
        let elapsed_ms = self.updated_unix_ms.saturating_sub(self.started_unix_ms);
        if self.state != "running" || moved == 0 || elapsed_ms == 0 {
            return None;
        }
        Some(self.remaining_bytes().saturating_mul(elapsed_ms) / moved / 1000)
    }
}

/// Bytes a copy of a span sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub data_bytes: u64,
    pub zeroed_bytes: u64,
}

/// Where a resync reads a span from.
enum Source {
    /// This node, the coordinator.
    Local,
    /// An in-sync replica, which sends its own copy to the target.
    Replica(u64, Arc<MuxLink>),
}

/// Whether resyncs read from the coordinator alone (`BALLAST_RESYNC_FROM=coordinator`).
fn coordinator_only() -> bool {
    std::env::var("BALLAST_RESYNC_FROM").is_ok_and(|from| from == "coordinator")
}

/// The copies a resync of `node` reads from: this node, and each other
/// in-sync replica that is up and serves copy requests.
fn sources(cluster: &Cluster, replication: &VolumeReplication, node: u64) -> Vec<Source> {
    let mut sources = vec![Source::Local];
    if coordinator_only() {
        return sources;
    }
    for (id, link) in replication.in_sync_links() {
        let liveness = cluster.health.liveness(id);
        if id != node && liveness.up && liveness.report.is_some_and(|report| report.copies_spans) {
            sources.push(Source::Replica(id, link));
        }
    }
    sources
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// Starts a resync for every replica of a volume this node coordinates
/// that is out of sync, up, and not being resynced already.
pub fn start_needed(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Arc<Volumes>) {
    let local_id = cluster.local.id;
    for volume in state.volumes.values().filter(|v| v.coordinator == local_id) {
        let Some(replication) = cluster.replication(&volume.name) else {
            continue;
        };
        let Some(local) = volumes.get(&volume.name) else {
            continue;
        };
        for &node in volume.replica_nodes.iter().filter(|id| !volume.in_sync.contains(id)) {
            let Some(peer) = state.nodes.get(&node) else {
                continue;
            };
            // Only to a node that answered lately: client writes also go to a
            // replica being resynced and wait for it (up to the replica
            // time-out), so one that just went silent would stall them.
            let fresh_ms = u64::try_from(crate::cluster::health::PLACEMENT_FRESH.as_millis()).unwrap_or(u64::MAX);
            let fresh = cluster
                .health
                .liveness(node)
                .last_answer_ms
                .is_some_and(|ms| ms < fresh_ms);
            if !fresh || !cluster.begin_resync(&volume.name, node) {
                continue;
            }
            let link = cluster.link(&peer.peer_address);
            let identity = super::dirty::Identity {
                coordinator_since: volume.coordinator_since,
                replica_added: volume.replica_added.get(&node).copied().unwrap_or(0),
            };
            let (cluster, replication, local, name) = (
                Arc::clone(cluster),
                Arc::clone(&replication),
                Arc::clone(&local),
                volume.name.clone(),
            );
            tokio::spawn(async move {
                tracing::info!(volume = %name, replica = node, "resync starts");
                let mut status = ResyncStatus {
                    node,
                    state: "running".into(),
                    started_unix_ms: unix_ms(),
                    updated_unix_ms: unix_ms(),
                    ..ResyncStatus::default()
                };
                cluster.note_resync(&name, status.clone());
                match resync(&cluster, &local, &replication, node, identity, link, &mut status).await {
                    Ok(()) => {
                        status.state = "done".into();
                        tracing::info!(
                            volume = %name,
                            replica = node,
                            mode = %status.mode,
                            dirty_bytes = status.dirty_bytes,
                            copied_bytes = status.copied_bytes,
                            zeroed_bytes = status.zeroed_bytes,
                            "resync done; the replica is in sync again"
                        );
                    }
                    Err(error) => {
                        if let Err(stuck) = replication.stop_catching_up(node, &error).await {
                            tracing::error!(volume = %name, replica = node, error = %stuck, "the replica may be in sync and cannot be dropped; it keeps getting every write");
                        }
                        tracing::warn!(volume = %name, replica = node, %error, "resync failed; it is retried while the replica is up");
                        status.state = "failed".into();
                        status.error = Some(error);
                    }
                }
                status.updated_unix_ms = unix_ms();
                cluster.note_resync(&name, status);
                cluster.end_resync(&name, node);
            });
        }
    }
}

async fn resync(
    cluster: &Cluster,
    volume: &Volume,
    replication: &VolumeReplication,
    node: u64,
    identity: super::dirty::Identity,
    link: Arc<MuxLink>,
    status: &mut ResyncStatus,
) -> Result<(), String> {
    replication.start_catching_up(node, Arc::clone(&link));
    // Mutations sent before catching up started finish (and mark what they
    // dirtied) first; every later one reaches the replica live. So every
    // mutation is either in the regions read next or reaches the replica.
    replication.drain().await;
    let size_blocks = volume.size_bytes() / BLOCK_BYTES;
    let spans: Vec<(u64, u64)> = match replication.dirty_regions(node, identity) {
        Some(regions) => {
            status.mode = "incremental".into();
            status.dirty_bytes = regions.len() as u64 * DIRTY_REGION_BLOCKS * BLOCK_BYTES;
            merge_regions(&regions, size_blocks)
        }
        None => {
            status.mode = "full".into();
            status.dirty_bytes = size_blocks * BLOCK_BYTES;
            (0..size_blocks.div_ceil(WINDOW_BLOCKS))
                .map(|chunk| {
                    (
                        chunk * WINDOW_BLOCKS,
                        WINDOW_BLOCKS.min(size_blocks - chunk * WINDOW_BLOCKS),
                    )
                })
                .collect()
        }
    };
    // Copies carry the epoch this node serves at: if it is deposed while
    // copying, the replicas (fenced by the new coordinator) refuse them.
    let epoch = volume.serving_epoch();
    if epoch == 0 {
        return Err("this node does not serve the volume".into());
    }
    let sources = sources(cluster, replication, node);
    if sources.len() > 1 {
        tracing::info!(volume = %volume.name, replica = node, sources = sources.len(), "resync reads from every in-sync copy");
    }
    status.sources = u32::try_from(sources.len()).unwrap_or(u32::MAX);
    let started = std::time::Instant::now();
    let queue = parking_lot::Mutex::new(spans.into_iter());
    let shared = parking_lot::Mutex::new(status.clone());
    let workers = sources.iter().map(|source| async {
        loop {
            let Some((lba, count)) = queue.lock().next() else {
                return Ok(());
            };
            if !replication.is_catching_up(node) {
                return Err("the replica failed a live write during the resync".to_owned());
            }
            let held = volume.lock_range(lba, count).await;
            let (sent, source_failed) = match source {
                Source::Local => (
                    send_span(volume, &link, lba, count, epoch, replication.timeout, true).await?,
                    false,
                ),
                Source::Replica(id, source_link) => {
                    match ask_copy(volume, source_link, node, lba, count, epoch, replication.timeout).await {
                        Ok(sent) => (sent, false),
                        Err(error) => {
                            tracing::warn!(volume = %volume.name, replica = node, source = id, %error, "a copy from a replica failed; the coordinator copies that piece and goes on without it");
                            (
                                send_span(volume, &link, lba, count, epoch, replication.timeout, true).await?,
                                true,
                            )
                        }
                    }
                }
            };
            drop(held);
            let copied_bytes = {
                let mut status = shared.lock();
                status.copied_bytes += sent.data_bytes;
                status.zeroed_bytes += sent.zeroed_bytes;
                if matches!(source, Source::Replica(..)) && !source_failed {
                    status.from_replicas_bytes += sent.data_bytes;
                }
                status.updated_unix_ms = unix_ms();
                cluster.note_resync(&volume.name, status.clone());
                status.copied_bytes
            };
            if source_failed {
                return Ok(());
            }
            let busy = volume.stats.in_flight() > 0;
            let pause = pause_after(copied_bytes, started.elapsed(), RESYNC_BYTES_PER_S_MAX, busy);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    });
    let copied = futures::future::try_join_all(workers).await;
    *status = shared.into_inner();
    copied?;
    // From here on a failure of the replica drops it through Raft (it may be in sync).
    replication.set_joining(node);
    if !replication.is_catching_up(node) {
        return Err("the replica failed a live write during the resync".into());
    }
    let expect_epoch = cluster.state().volumes.get(&volume.name).map(|v| v.epoch);
    let outcome = cluster
        .change(Command::ReplicaIn {
            name: volume.name.clone(),
            node,
            by: cluster.local.id,
            expect_epoch,
        })
        .await
        .map_err(|error| error.to_string())?;
    if let crate::cluster::state::Outcome::Volume(changed) = &outcome {
        replication.note_change(changed.epoch);
    }
    replication.promote(node);
    Ok(())
}

/// Dirty regions as spans of at most `CHUNK_BLOCKS`, clipped to the volume.
fn merge_regions(regions: &[u64], size_blocks: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &region in regions {
        let lba = region * DIRTY_REGION_BLOCKS;
        if lba >= size_blocks {
            continue;
        }
        let count = DIRTY_REGION_BLOCKS.min(size_blocks - lba);
        match spans.last_mut() {
            Some((start, len)) if *start + *len == lba && *len + count <= CHUNK_BLOCKS => *len += count,
            _ => spans.push((lba, count)),
        }
    }
    spans
}

/// Asks an in-sync replica to send its copy of a span to `target` (the
/// caller holds the span's range lock).
async fn ask_copy(
    volume: &Volume,
    source: &MuxLink,
    target: u64,
    lba: u64,
    count: u64,
    epoch: u64,
    timeout: std::time::Duration,
) -> Result<Sent, String> {
    let request = CopyRequest {
        volume_id: volume.id,
        epoch,
        lba,
        block_count: count,
        volume_sequence: volume.next_sequence(),
        target,
    };
    // The source sends the span in pieces, each within the replica time-out.
    let pieces = u32::try_from(count.div_ceil(CHUNK_BLOCKS) + 1).unwrap_or(u32::MAX);
    let answer = source
        .call(FrameKind::ReplicaCopy, &wire::encode_copy(&request), timeout * pieces)
        .await
        .map_err(|error| error.to_string())?;
    let (data_bytes, zeroed_bytes) = wire::decode_copied(&answer).map_err(|error| error.to_string())?;
    Ok(Sent {
        data_bytes,
        zeroed_bytes,
    })
}

/// Serves a `ReplicaCopy` on an in-sync replica: sends this node's copy of
/// the span to the target, each mutation at the coordinator's epoch and
/// sequence; answers with the bytes sent once the target has them durable.
/// `tenure` gives the cluster's `coordinator_since` of a volume by name,
/// `link_to` the link to a node by id (None: not a member).
pub async fn serve_copy(
    volumes: &Volumes,
    payload: &[u8],
    tenure: impl Fn(&str) -> u64,
    link_to: impl Fn(u64) -> Option<Arc<MuxLink>>,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, String> {
    let request = wire::decode_copy(payload).map_err(|error| error.to_string())?;
    let volume = volumes
        .get_by_id(request.volume_id)
        .ok_or_else(|| format!("this node holds no replica of volume id {}", request.volume_id))?;
    // The same rule as a mutation: only the current coordinator may ask.
    let _admitted = volume.epoch_gate.read().await;
    let floor = volume.fence_floor().max(tenure(&volume.name));
    super::admit_mutation(request.epoch, floor, volume.is_served())
        .map_err(|refusal| refusal.describe(&volume.name))?;
    let link = link_to(request.target).ok_or_else(|| format!("node {} is not a member", request.target))?;
    let sequence = request.volume_sequence;
    let sent = send_span_at(
        &volume,
        &link,
        request.lba,
        request.block_count,
        request.epoch,
        timeout,
        false,
        &|| sequence,
    )
    .await?;
    Ok(wire::encode_copied(sent.data_bytes, sent.zeroed_bytes))
}

/// Sends this node's copy of a span to the replica: holes as zeroings,
/// data in writes of at most `CHUNK_BLOCKS`. `locked`: the caller holds
/// the volume's range lock over the span (the coordinator).
async fn send_span(
    volume: &Volume,
    link: &MuxLink,
    lba: u64,
    count: u64,
    epoch: u64,
    timeout: std::time::Duration,
    locked: bool,
) -> Result<Sent, String> {
    send_span_at(volume, link, lba, count, epoch, timeout, locked, &|| {
        volume.next_sequence()
    })
    .await
}

#[allow(clippy::too_many_arguments)] // one span, its epoch and its order: all needed
async fn send_span_at(
    volume: &Volume,
    link: &MuxLink,
    lba: u64,
    count: u64,
    epoch: u64,
    timeout: std::time::Duration,
    locked: bool,
    sequence: &(dyn Fn() -> u64 + Sync),
) -> Result<Sent, String> {
    let mut sent = Sent::default();
    let runs = volume
        .allocation(lba * BLOCK_BYTES, count * BLOCK_BYTES, usize::MAX)
        .await
        .map_err(|error| error.to_string())?;
    let mut at = lba;
    for (len_bytes, allocated) in runs {
        let run_end = at + len_bytes / BLOCK_BYTES;
        if !allocated {
            sent.zeroed_bytes += len_bytes;
            let op = ReplicaOp {
                volume_id: volume.id,
                epoch,
                lba: at,
                block_count: run_end - at,
                volume_sequence: sequence(),
                kind: OpKind::Zero,
            };
            send(link, &op, timeout).await?;
            at = run_end;
            continue;
        }
        while at < run_end {
            let blocks = CHUNK_BLOCKS.min(run_end - at);
            let (offset_bytes, len_bytes) = (at * BLOCK_BYTES, blocks * BLOCK_BYTES);
            let data = if locked {
                volume.read_stored_locked(offset_bytes, len_bytes).await
            } else {
                volume.read_stored(offset_bytes, len_bytes).await
            }
            .map_err(|e| e.to_string())?;
            sent.data_bytes += len_bytes;
            let op = ReplicaOp {
                volume_id: volume.id,
                epoch,
                lba: at,
                block_count: blocks,
                volume_sequence: sequence(),
                kind: OpKind::Write(data.to_vec()),
            };
            send(link, &op, timeout).await?;
            at += blocks;
        }
    }
    Ok(sent)
}

async fn send(link: &MuxLink, op: &ReplicaOp, timeout: std::time::Duration) -> Result<(), String> {
    link.call(FrameKind::ReplicaWrite, &wire::encode(op), timeout)
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resync_keeps_under_its_rate_and_yields_to_busy_clients() {
        use std::time::Duration;
        // 512 MiB copied in 1 s at 256 MiB/s: a second ahead of the allowance.
        assert_eq!(
            pause_after(512 << 20, Duration::from_secs(1), 256 << 20, false),
            Duration::from_secs(1)
        );
        // Behind the allowance: no pause, unless clients are busy.
        assert_eq!(
            pause_after(1 << 20, Duration::from_secs(1), 256 << 20, false),
            Duration::ZERO
        );
        assert_eq!(
            pause_after(1 << 20, Duration::from_secs(1), 256 << 20, true),
            RESYNC_BUSY_PAUSE
        );
    }

    #[test]
    fn the_eta_follows_the_pace_so_far_and_only_while_running() {
        let mut status = ResyncStatus {
            state: "running".into(),
            dirty_bytes: 1000,
            copied_bytes: 200,
            zeroed_bytes: 50,
            started_unix_ms: 10_000,
            updated_unix_ms: 15_000,
            ..ResyncStatus::default()
        };
        // 250 bytes in 5 s: 750 left take 15 s.
        assert_eq!((status.remaining_bytes(), status.eta_seconds()), (750, Some(15)));
        assert_eq!(status.copied_bytes_per_s(), Some(40), "200 bytes copied in 5 s");
        status.state = "done".into();
        assert_eq!((status.remaining_bytes(), status.eta_seconds()), (0, None));
    }

    #[test]
    fn dirty_regions_merge_into_bounded_spans_inside_the_volume() {
        let regions: Vec<u64> = (0..20).chain([40, 41, 1000]).collect();
        let spans = merge_regions(&regions, 700);
        assert_eq!(spans, vec![(0, 256), (256, 64), (640, 32)]);
        assert!(spans.iter().all(|(_, count)| *count <= CHUNK_BLOCKS));
    }
}
