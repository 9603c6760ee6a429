//! Bringing an out-of-sync replica back (resync), under live writes: the
//! coordinator first copies every new mutation to it as well ("catching
//! up"), then walks the volume span by span, each span under the volume's
//! range lock so no write races the copy, sending allocated data as writes
//! of up to 1 MiB (`PIECES_IN_FLIGHT` of them at once: one is read while
//! another is written) and holes as zeroings; when the walk ends with the replica
//! still caught up, Raft takes it back into the in-sync set (epoch +1).
//!
//! Incremental when it can be: a coordinator that dropped the replica
//! itself tracked the 64 KiB regions mutated since (`VolumeReplication`,
//! durably in `dirty`, so also across its restarts), and copies only
//! those. Otherwise (it took over from another coordinator, or the replica
//! is a new one) it copies all allocated data of the volume.
//!
//! From every healthy copy: the spans are shared out between the
//! coordinator and each other in-sync replica that is up, one span at a
//! time each. For a replica's span the coordinator takes the range lock,
//! reads its pieces' data from that replica (`ReplicaRead`) and sends them on
//! to the one being resynced itself: the data still reaches it only over
//! the coordinator's one ordered link, after every mutation sent to it
//! before (a copy sent by another node could overtake an older mutation
//! still on the way and be overwritten by it: `repl_sim` found that). A
//! replica that fails a read hands its piece back to the coordinator, which
//! reads it locally and goes on without that replica.
//! `BALLAST_RESYNC_FROM=coordinator` reads from the coordinator alone and
//! `BALLAST_RESYNC_PIECES_IN_FLIGHT=N` sets the pieces in flight (for A/B runs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::wire::{self, OpKind, ReplicaOp};
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

/// Fastest a resync reads data from each copy it reads from (the
/// coordinator's, and each in-sync replica's that helps): it leaves each
/// source's disk and network room for clients. A resync from two copies
/// may so copy twice as fast into the replica it fills.
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
    /// Of `data_bytes`, read from an in-sync replica.
    pub from_replica_bytes: u64,
}

/// Where a resync reads a span's data from.
enum Source {
    /// This node, the coordinator.
    Local,
    /// An in-sync replica (`ReplicaRead`).
    Replica(u64, Arc<MuxLink>),
}

/// `PIECES_IN_FLIGHT`, or `BALLAST_RESYNC_PIECES_IN_FLIGHT` (1-64, for A/B runs).
fn pieces_in_flight() -> usize {
    static PIECES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PIECES.get_or_init(|| {
        std::env::var("BALLAST_RESYNC_PIECES_IN_FLIGHT")
            .ok()
            .and_then(|value| value.parse::<usize>().ok())
            .map_or(PIECES_IN_FLIGHT, |pieces| pieces.clamp(1, 64))
    })
}

/// Whether resyncs read from the coordinator alone (`BALLAST_RESYNC_FROM=coordinator`).
fn coordinator_only() -> bool {
    std::env::var("BALLAST_RESYNC_FROM").is_ok_and(|from| from == "coordinator")
}

/// The copies a resync of `node` reads from: this node, and each other
/// in-sync replica that is up.
fn sources(cluster: &Cluster, replication: &VolumeReplication, node: u64) -> Vec<Source> {
    let mut sources = vec![Source::Local];
    if coordinator_only() {
        return sources;
    }
    for (id, link) in replication.in_sync_links() {
        let liveness = cluster.health.liveness(id);
        if id != node && liveness.up {
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
            // The volume's link to it, the one its live writes take too.
            let link = cluster.link_for(&peer.peer_address, Some(&*local));
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
    let bytes_per_s = RESYNC_BYTES_PER_S_MAX * sources.len() as u64;
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
            let reader = match source {
                Source::Local => None,
                Source::Replica(id, source_link) => Some((*id, source_link.as_ref())),
            };
            // A span begun while clients have requests in flight goes one piece at a time.
            let depth = if volume.stats.in_flight() > 0 {
                1
            } else {
                pieces_in_flight()
            };
            let (sent, source_failed) =
                send_span(volume, &link, (lba, count), epoch, replication.timeout, reader, depth).await?;
            drop(held);
            let copied_bytes = {
                let mut status = shared.lock();
                status.copied_bytes += sent.data_bytes;
                status.zeroed_bytes += sent.zeroed_bytes;
                status.from_replicas_bytes += sent.from_replica_bytes;
                status.updated_unix_ms = unix_ms();
                cluster.note_resync(&volume.name, status.clone());
                status.copied_bytes
            };
            if source_failed {
                return Ok(());
            }
            let busy = volume.stats.in_flight() > 0;
            let pause = pause_after(copied_bytes, started.elapsed(), bytes_per_s, busy);
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

/// Pieces of one span a resync has in flight at once (each read, then
/// sent) while the volume's clients are idle: the next piece is read while
/// the one before is written, so the copy rate is not one read plus one
/// replica write per MiB, serially (two sources: 315-369 MiB/s serially,
/// 382-443 with 4 in flight, 401-437 with 8, 363-391 with 16, same hour).
/// A span begun while clients have requests in flight goes one piece at a
/// time.
pub const PIECES_IN_FLIGHT: usize = 4;

/// Sends the span to the replica being resynced (the caller holds the
/// volume's range lock over it): holes, as this node maps them, as
/// zeroings; data in writes of at most `CHUNK_BLOCKS`, read here or, with
/// `reader`, from that in-sync replica (`ReplicaRead`), up to `depth`
/// pieces at once (they cover disjoint blocks, and no
/// client write reaches the span while the lock is held, so their order
/// does not matter). A replica read that fails is made here instead; then
/// the second value is true (the caller stops reading from that replica).
async fn send_span(
    volume: &Volume,
    link: &MuxLink,
    (lba, count): (u64, u64),
    epoch: u64,
    timeout: std::time::Duration,
    reader: Option<(u64, &MuxLink)>,
    depth: usize,
) -> Result<(Sent, bool), String> {
    use futures::{StreamExt, TryStreamExt};
    let runs = volume
        .allocation(lba * BLOCK_BYTES, count * BLOCK_BYTES, usize::MAX)
        .await
        .map_err(|error| error.to_string())?;
    // (first block, blocks, allocated): a hole as one zeroing, data in
    // pieces of at most `CHUNK_BLOCKS`.
    let mut pieces = Vec::new();
    let mut at = lba;
    for (len_bytes, allocated) in runs {
        let run_end = at + len_bytes / BLOCK_BYTES;
        while at < run_end {
            let blocks = if allocated {
                CHUNK_BLOCKS.min(run_end - at)
            } else {
                run_end - at
            };
            pieces.push((at, blocks, allocated));
            at += blocks;
        }
    }
    // Set by the first failed replica read: later pieces are read here.
    let reader_failed = AtomicBool::new(false);
    let reader_failed = &reader_failed;
    let sent = futures::stream::iter(pieces)
        .map(|(at, blocks, allocated)| async move {
            let mut sent = Sent::default();
            let kind = if allocated {
                let replica = reader.filter(|_| !reader_failed.load(Ordering::Relaxed));
                let data = match read_from_replica(volume, replica, at, blocks, timeout, reader_failed).await {
                    Some(data) => {
                        sent.from_replica_bytes += blocks * BLOCK_BYTES;
                        data
                    }
                    None => volume
                        .read_stored_locked(at * BLOCK_BYTES, blocks * BLOCK_BYTES)
                        .await
                        .map_err(|e| e.to_string())?
                        .to_vec(),
                };
                sent.data_bytes += blocks * BLOCK_BYTES;
                OpKind::Write(data)
            } else {
                sent.zeroed_bytes += blocks * BLOCK_BYTES;
                OpKind::Zero
            };
            let op = ReplicaOp {
                volume_id: volume.id,
                epoch,
                lba: at,
                block_count: blocks,
                volume_sequence: volume.next_sequence(),
                kind,
            };
            send(link, &op, timeout).await?;
            Ok::<Sent, String>(sent)
        })
        .buffer_unordered(depth.max(1))
        .try_fold(Sent::default(), |mut total, piece| async move {
            total.data_bytes += piece.data_bytes;
            total.zeroed_bytes += piece.zeroed_bytes;
            total.from_replica_bytes += piece.from_replica_bytes;
            Ok(total)
        })
        .await?;
    Ok((sent, reader_failed.load(Ordering::Relaxed)))
}

/// A piece's data read from the in-sync replica `reader`, if it answers in
/// full; else None, and `failed` is set (the first failure is logged).
async fn read_from_replica(
    volume: &Volume,
    reader: Option<(u64, &MuxLink)>,
    lba: u64,
    blocks: u64,
    timeout: std::time::Duration,
    failed: &AtomicBool,
) -> Option<Vec<u8>> {
    let (source, source_link) = reader?;
    let len_bytes = blocks * BLOCK_BYTES;
    let request = wire::encode_read(volume.id, lba, blocks);
    let error = match source_link.call(FrameKind::ReplicaRead, &request, timeout).await {
        Ok(bytes) if bytes.len() as u64 == len_bytes => return Some(bytes),
        Ok(bytes) => format!("answered {} bytes for {len_bytes}", bytes.len()),
        Err(error) => error.to_string(),
    };
    if !failed.swap(true, Ordering::Relaxed) {
        tracing::warn!(volume = %volume.name, source, %error, "a resync read from a replica failed; the coordinator reads that piece itself and goes on without it");
    }
    None
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
