//! Bringing an out-of-sync replica back (resync), under live writes: the
//! coordinator first copies every new mutation to it as well ("catching
//! up"), then walks the volume span by span and each span piece by piece,
//! each piece (at most 1 MiB of data, or one hole) under the volume's range
//! lock so no write races its copy, sending allocated data as writes and
//! holes as zeroings, `PIECES_IN_FLIGHT` pieces at once while clients are
//! idle (one is read while another is written), one at a time and paused
//! after while they are busy: a client write waits at most for one piece,
//! never for a whole 64 MiB window. When the walk ends with the replica
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
/// Most data blocks copied under one hold of the range lock (one piece;
/// dirty spans are merged up to this).
const CHUNK_BLOCKS: u64 = 256;
/// A full copy plans 64 MiB at a time from the allocation map: holes go as
/// one zeroing each, data in pieces of at most `CHUNK_BLOCKS` (thin
/// volumes are mostly holes). Each piece takes the range lock on its own.
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

/// Fastest a resync copies data, from all its sources together, while the
/// volume's clients have requests in flight (a database under load): its
/// 1 MiB reads and writes would queue ahead of the clients' small ones on
/// the same disks (a QD1 client's write p99 went from 1-3 ms to 36 ms at
/// 240 MiB/s of rebuild). Under steady load a 1 GiB replica so takes about
/// 30 s; idle, it goes at `RESYNC_BYTES_PER_S_MAX` per source again.
pub const RESYNC_BUSY_BYTES_PER_S: u64 = 32 << 20;
/// Most data blocks of one piece copied while clients are busy (256 KiB):
/// a client write into it waits for no more.
pub const BUSY_CHUNK_BLOCKS: u64 = 64;

/// The pause after a piece of `data_bytes` copied while the volume's
/// clients are busy, by one of `sources` workers: the piece's share of
/// `RESYNC_BUSY_BYTES_PER_S`, at least `RESYNC_BUSY_PAUSE`.
#[must_use]
pub fn busy_pause(data_bytes: u64, sources: usize) -> std::time::Duration {
    let per_source = RESYNC_BUSY_BYTES_PER_S / (sources.max(1) as u64);
    std::time::Duration::from_secs_f64(data_bytes as f64 / per_source.max(1) as f64).max(RESYNC_BUSY_PAUSE)
}

/// The pause before a resync worker starts its next piece, after one of
/// `piece_data_bytes` brought the resync to `copied_bytes` in `elapsed`:
/// while clients are `busy`, the piece's share of the busy pace
/// (`busy_pause`, one of `sources` workers); else what keeps the whole copy
/// under `bytes_per_s` (`pause_after`).
#[must_use]
pub fn piece_pause(
    piece_data_bytes: u64,
    copied_bytes: u64,
    elapsed: std::time::Duration,
    bytes_per_s: u64,
    sources: usize,
    busy: bool,
) -> std::time::Duration {
    if busy {
        busy_pause(piece_data_bytes, sources)
    } else {
        pause_after(copied_bytes, elapsed, bytes_per_s, false)
    }
}

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
            crate::engine::sched::spawn_background(crate::engine::Work::Resync, async move {
                tracing::info!(volume = %name, replica = node, "resync starts");
                let mut status = ResyncStatus {
                    node,
                    state: "running".into(),
                    started_unix_ms: crate::audit::now_unix_ms(),
                    updated_unix_ms: crate::audit::now_unix_ms(),
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
                status.updated_unix_ms = crate::audit::now_unix_ms();
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
    let workers = sources.iter().map(|source| {
        let reader = match source {
            Source::Local => None,
            Source::Replica(id, source_link) => Some((*id, source_link.as_ref())),
        };
        let worker = Worker {
            cluster,
            volume,
            replication,
            node,
            link: &link,
            epoch,
            reader,
            reader_failed: AtomicBool::new(false),
            queue: &queue,
            shared: &shared,
            clients: parking_lot::Mutex::new(ClientActivity::new(volume)),
            started,
            bytes_per_s,
            sources: sources.len(),
        };
        async move { run_worker(&worker, reader.is_some()).await }
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
/// While clients have requests in flight the copy goes one piece at a
/// time, each followed by `RESYNC_BUSY_PAUSE`.
pub const PIECES_IN_FLIGHT: usize = 4;

/// Whether a volume's clients are busy, as a resync sees it: requests in
/// flight now, or begun since it last looked, or either within the last
/// `CLIENTS_QUIET` (a QD1 client has none in flight between a reply and
/// its next request, which an instant look often catches; a worker that
/// looks twice within one request would see nothing new and start four
/// 1 MiB pieces: measured, the busy copy ran at 44-59 MiB/s against its
/// 32 MiB/s pace).
pub struct ClientActivity {
    begun: u64,
    last_active: Option<std::time::Instant>,
}

/// How long clients count as busy after their last sign of activity.
const CLIENTS_QUIET: std::time::Duration = std::time::Duration::from_millis(100);

impl ClientActivity {
    #[must_use]
    pub fn new(volume: &Volume) -> Self {
        Self {
            begun: volume.stats.begun(),
            last_active: None,
        }
    }

    pub fn busy(&mut self, volume: &Volume) -> bool {
        let begun = volume.stats.begun();
        let changed = std::mem::replace(&mut self.begun, begun) != begun;
        let now = std::time::Instant::now();
        if changed || volume.stats.in_flight() > 0 {
            self.last_active = Some(now);
        }
        self.last_active
            .is_some_and(|at| now.duration_since(at) < CLIENTS_QUIET)
    }
}

/// The pieces of a span, from the allocation map as it is now (no lock):
/// `(first block, blocks, allocated)`, data runs cut at `CHUNK_BLOCKS`, each
/// hole whole. Each piece is looked at again under its lock (`copy_piece`).
async fn plan_pieces(volume: &Volume, (lba, count): (u64, u64)) -> Result<Vec<(u64, u64, bool)>, String> {
    let runs = volume
        .allocation(lba * BLOCK_BYTES, count * BLOCK_BYTES, usize::MAX)
        .await
        .map_err(|error| error.to_string())?;
    Ok(cut_pieces(lba, &runs))
}

/// Runs of `(bytes, allocated)` from `lba` on as `(first block, blocks,
/// allocated)` pieces: data cut at `CHUNK_BLOCKS`, a hole whole.
pub fn cut_pieces(lba: u64, runs: &[(u64, bool)]) -> Vec<(u64, u64, bool)> {
    let mut pieces = Vec::new();
    let mut at = lba;
    for &(len_bytes, allocated) in runs {
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
    pieces
}

/// The next piece to start, from the front of `planned`: whole while
/// clients are idle; while they are `busy`, at most `BUSY_CHUNK_BLOCKS` of
/// data (the rest of it stays planned).
pub fn take_piece(planned: &mut std::collections::VecDeque<(u64, u64, bool)>, busy: bool) -> Option<(u64, u64)> {
    let (at, blocks, allocated) = planned.pop_front()?;
    let head = if busy && allocated {
        blocks.min(BUSY_CHUNK_BLOCKS)
    } else {
        blocks
    };
    if head < blocks {
        planned.push_front((at + head, blocks - head, allocated));
    }
    Some((at, head))
}

/// Pieces a worker keeps in flight: `PIECES_IN_FLIGHT` while clients are
/// idle, one while they are busy.
#[must_use]
pub fn in_flight_limit(busy: bool) -> usize {
    if busy {
        1
    } else {
        pieces_in_flight()
    }
}

/// What one piece's copy did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Copied {
    pub sent: Sent,
    /// This worker's replica failed a read (this piece or an earlier one).
    pub reader_failed: bool,
}

/// The world of one resync worker, as `run_worker` drives it (the real
/// resync's `Worker`, and repl_sim's): `&self` only, since the copies in
/// flight hold it too.
pub trait PieceCopier {
    /// The next span nobody took yet.
    fn next_span(&self) -> Option<(u64, u64)>;
    /// A span's pieces `(first block, blocks, allocated)`, planned without the lock.
    fn plan(&self, span: (u64, u64)) -> impl std::future::Future<Output = Result<Vec<(u64, u64, bool)>, String>>;
    /// Copies one piece under its own range lock; `from_reader`: reads its
    /// data from this worker's in-sync replica (the coordinator's own copy
    /// otherwise, or when that read fails).
    fn copy(&self, piece: (u64, u64), from_reader: bool) -> impl std::future::Future<Output = Result<Copied, String>>;
    /// Whether the volume's clients are busy now (or were since the last look).
    fn clients_busy(&self) -> bool;
    /// An error once the replica is no longer being caught up.
    fn check(&self) -> Result<(), String>;
    /// Counts a copied piece; answers how long to wait before the next
    /// piece starts.
    fn copied(&self, copied: &Copied, busy: bool) -> std::time::Duration;
}

/// One resync worker: takes spans until none are left, plans each, and
/// keeps up to `in_flight_limit` pieces in flight, starting the next as
/// soon as one finishes (not a group at a time: the slowest piece of a
/// group held the others' successors back), each start paced by
/// `PieceCopier::copied`. While clients are busy: one small piece at a
/// time. A worker whose replica failed a read copies the rest of its span
/// from the coordinator and takes no more spans.
pub async fn run_worker(copier: &impl PieceCopier, has_reader: bool) -> Result<(), String> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use tokio::time::Instant;
    let mut from_reader = has_reader;
    let mut taking_spans = true;
    let mut planned = std::collections::VecDeque::new();
    let mut copies = FuturesUnordered::new();
    let mut not_before = Instant::now();
    loop {
        copier.check()?;
        let busy = copier.clients_busy();
        let limit = in_flight_limit(busy);
        while copies.len() < limit && Instant::now() >= not_before {
            if let Some(piece) = take_piece(&mut planned, busy) {
                copies.push(copier.copy(piece, from_reader));
                continue;
            }
            let span = if taking_spans { copier.next_span() } else { None };
            let Some(span) = span else {
                taking_spans = false;
                break;
            };
            planned = copier.plan(span).await?.into();
        }
        let more = !planned.is_empty() || taking_spans;
        if copies.is_empty() {
            if !more {
                return Ok(());
            }
            tokio::time::sleep_until(not_before).await;
            continue;
        }
        // Wait for a copy to finish, or for the pace to allow another start.
        let copied = if more && copies.len() < limit && not_before > Instant::now() {
            tokio::select! {
                copied = copies.next() => copied,
                () = tokio::time::sleep_until(not_before) => continue,
            }
        } else {
            copies.next().await
        };
        let copied = copied.expect("a copy was in flight")?;
        if copied.reader_failed && from_reader {
            from_reader = false;
            taking_spans = false;
        }
        let pause = copier.copied(&copied, busy || copier.clients_busy());
        not_before = Instant::now() + pause;
    }
}

/// The real resync's worker: one per source copy.
struct Worker<'a> {
    cluster: &'a Cluster,
    volume: &'a Volume,
    replication: &'a VolumeReplication,
    /// The replica being resynced.
    node: u64,
    link: &'a MuxLink,
    epoch: u64,
    reader: Option<(u64, &'a MuxLink)>,
    /// Set by the first failed read from `reader`.
    reader_failed: AtomicBool,
    queue: &'a parking_lot::Mutex<std::vec::IntoIter<(u64, u64)>>,
    shared: &'a parking_lot::Mutex<ResyncStatus>,
    clients: parking_lot::Mutex<ClientActivity>,
    started: std::time::Instant,
    bytes_per_s: u64,
    sources: usize,
}

impl PieceCopier for Worker<'_> {
    fn next_span(&self) -> Option<(u64, u64)> {
        self.queue.lock().next()
    }

    async fn plan(&self, span: (u64, u64)) -> Result<Vec<(u64, u64, bool)>, String> {
        plan_pieces(self.volume, span).await
    }

    async fn copy(&self, piece: (u64, u64), from_reader: bool) -> Result<Copied, String> {
        let reader = self.reader.filter(|_| from_reader);
        let timeout = self.replication.timeout;
        let sent = copy_piece(
            self.volume,
            self.link,
            piece,
            self.epoch,
            timeout,
            reader,
            &self.reader_failed,
        )
        .await?;
        Ok(Copied {
            sent,
            reader_failed: self.reader_failed.load(Ordering::Relaxed),
        })
    }

    fn clients_busy(&self) -> bool {
        self.clients.lock().busy(self.volume)
    }

    fn check(&self) -> Result<(), String> {
        if self.replication.is_catching_up(self.node) {
            Ok(())
        } else {
            Err("the replica failed a live write during the resync".to_owned())
        }
    }

    fn copied(&self, copied: &Copied, busy: bool) -> std::time::Duration {
        let copied_bytes = {
            let mut status = self.shared.lock();
            status.copied_bytes += copied.sent.data_bytes;
            status.zeroed_bytes += copied.sent.zeroed_bytes;
            status.from_replicas_bytes += copied.sent.from_replica_bytes;
            status.updated_unix_ms = crate::audit::now_unix_ms();
            self.cluster.note_resync(&self.volume.name, status.clone());
            status.copied_bytes
        };
        let elapsed = self.started.elapsed();
        piece_pause(
            copied.sent.data_bytes,
            copied_bytes,
            elapsed,
            self.bytes_per_s,
            self.sources,
            busy,
        )
    }
}

/// Copies one piece under the volume's range lock: its allocation is read
/// again under the lock (a client may have written into a hole, or
/// released data, since the plan), holes go as zeroings, data as writes of
/// at most `CHUNK_BLOCKS`. No client write reaches the piece while the lock
/// is held, on this node or on any replica (a write holds the lock until
/// every copy has it), so what is read, here or from a replica, is what the
/// replica must hold.
async fn copy_piece(
    volume: &Volume,
    link: &MuxLink,
    (lba, count): (u64, u64),
    epoch: u64,
    timeout: std::time::Duration,
    reader: Option<(u64, &MuxLink)>,
    reader_failed: &AtomicBool,
) -> Result<Sent, String> {
    let _held = volume.lock_range(lba, count).await;
    let runs = volume
        .allocation(lba * BLOCK_BYTES, count * BLOCK_BYTES, usize::MAX)
        .await
        .map_err(|error| error.to_string())?;
    let mut sent = Sent::default();
    for (at, blocks, allocated) in cut_pieces(lba, &runs) {
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
            OpKind::Write(data.into())
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
    }
    Ok(sent)
}

/// The peer protocol that reads `wire::FLAG_BACKGROUND`.
const BACKGROUND_FLAG_PROTOCOL: u16 = 4;

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
    let (mut header, data) = wire::encode_parts(op);
    // A peer of protocol 4 and up puts the copy below its disk's clients.
    if link
        .protocol()
        .await
        .is_ok_and(|protocol| protocol >= BACKGROUND_FLAG_PROTOCOL)
    {
        wire::mark_background(&mut header);
    }
    link.call_parts(FrameKind::ReplicaWrite, &[&header, &data], timeout)
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

    #[test]
    fn a_window_is_cut_into_pieces_of_at_most_a_chunk_of_data_and_whole_holes() {
        let block = BLOCK_BYTES;
        // 600 blocks of data, a 16,000-block hole, 10 blocks of data.
        let runs = [(600 * block, true), (16_000 * block, false), (10 * block, true)];
        let pieces = cut_pieces(1000, &runs);
        assert_eq!(
            pieces,
            vec![
                (1000, 256, true),
                (1256, 256, true),
                (1512, 88, true),
                (1600, 16_000, false),
                (17_600, 10, true)
            ]
        );
        // Contiguous, covering the window: no block skipped or copied twice.
        let mut at = 1000;
        for (lba, blocks, _) in &pieces {
            assert_eq!(*lba, at);
            at += blocks;
        }
        assert_eq!(at, 1000 + 16_610);
    }

    #[test]
    fn busy_clients_get_one_small_piece_at_a_time_and_a_paced_copy() {
        let mut planned: std::collections::VecDeque<_> =
            cut_pieces(0, &[(600 * BLOCK_BYTES, true), (100 * BLOCK_BYTES, false)]).into();
        // Busy: a 256 KiB head of the first piece; its rest stays first in line.
        assert_eq!(in_flight_limit(true), 1);
        assert_eq!(take_piece(&mut planned, true), Some((0, 64)));
        assert_eq!(planned.front(), Some(&(64, 192, true)));
        // Idle: whole pieces, PIECES_IN_FLIGHT of them at once.
        assert_eq!(in_flight_limit(false), PIECES_IN_FLIGHT);
        let idle: Vec<_> = std::iter::from_fn(|| take_piece(&mut planned, false)).collect();
        assert_eq!(idle, vec![(64, 192), (256, 256), (512, 88), (600, 100)]);
        assert!(planned.is_empty());
        // A hole is not cut while busy (zeroing it reads and writes no data).
        let mut hole: std::collections::VecDeque<_> = vec![(0, 16_000, false)].into();
        assert_eq!(take_piece(&mut hole, true), Some((0, 16_000)));
        // 256 KiB by one of two sources at 32 MiB/s together: 15.6 ms; a zeroing at least the busy pause.
        let pause = busy_pause(BUSY_CHUNK_BLOCKS * BLOCK_BYTES, 2);
        assert!((15..=16).contains(&pause.as_millis()), "{pause:?}");
        assert_eq!(busy_pause(0, 2), RESYNC_BUSY_PAUSE);
    }

    /// A `PieceCopier` over spans of one-block pieces: piece `lba` takes
    /// `lba == slow` ? 100 ms : 10 ms; records starts and finishes.
    struct FakeCopier {
        spans: std::cell::RefCell<std::vec::IntoIter<(u64, u64)>>,
        slow: u64,
        busy: std::cell::Cell<bool>,
        /// The reader fails on this piece.
        reader_fails_at: Option<u64>,
        events: std::cell::RefCell<Vec<(u64, &'static str, bool)>>,
        in_flight: std::cell::Cell<usize>,
        most_in_flight: std::cell::Cell<usize>,
    }

    impl FakeCopier {
        fn new(spans: Vec<(u64, u64)>, slow: u64) -> Self {
            Self {
                spans: std::cell::RefCell::new(spans.into_iter()),
                slow,
                busy: std::cell::Cell::new(false),
                reader_fails_at: None,
                events: std::cell::RefCell::new(Vec::new()),
                in_flight: std::cell::Cell::new(0),
                most_in_flight: std::cell::Cell::new(0),
            }
        }

        fn copied_lbas(&self) -> Vec<u64> {
            let mut lbas: Vec<u64> = self
                .events
                .borrow()
                .iter()
                .filter(|e| e.1 == "done")
                .map(|e| e.0)
                .collect();
            lbas.sort_unstable();
            lbas
        }
    }

    impl PieceCopier for FakeCopier {
        fn next_span(&self) -> Option<(u64, u64)> {
            self.spans.borrow_mut().next()
        }

        async fn plan(&self, (lba, count): (u64, u64)) -> Result<Vec<(u64, u64, bool)>, String> {
            Ok((lba..lba + count).map(|at| (at, 1, true)).collect())
        }

        async fn copy(&self, (lba, _): (u64, u64), from_reader: bool) -> Result<Copied, String> {
            self.events.borrow_mut().push((lba, "start", from_reader));
            self.in_flight.set(self.in_flight.get() + 1);
            self.most_in_flight
                .set(self.most_in_flight.get().max(self.in_flight.get()));
            let millis = if lba == self.slow { 100 } else { 10 };
            tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
            self.in_flight.set(self.in_flight.get() - 1);
            self.events.borrow_mut().push((lba, "done", from_reader));
            Ok(Copied {
                sent: Sent {
                    data_bytes: BLOCK_BYTES,
                    ..Sent::default()
                },
                reader_failed: from_reader && self.reader_fails_at.is_some_and(|at| lba >= at),
            })
        }

        fn clients_busy(&self) -> bool {
            self.busy.get()
        }

        fn check(&self) -> Result<(), String> {
            Ok(())
        }

        fn copied(&self, _: &Copied, busy: bool) -> std::time::Duration {
            if busy {
                RESYNC_BUSY_PAUSE
            } else {
                std::time::Duration::ZERO
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_a_worker_starts_the_next_piece_as_each_one_finishes_not_a_group_at_a_time() {
        // 12 one-block pieces over two spans; piece 0 is slow (100 ms).
        let copier = FakeCopier::new(vec![(0, 8), (8, 4)], 0);
        let started = tokio::time::Instant::now();
        run_worker(&copier, false).await.unwrap();
        assert_eq!(copier.copied_lbas(), (0..12).collect::<Vec<_>>(), "every piece once");
        assert_eq!(copier.most_in_flight.get(), PIECES_IN_FLIGHT);
        // The three fast slots copy the other 11 pieces while piece 0 runs
        // (a group at a time would wait 100 ms for it before piece 4).
        let events = copier.events.borrow();
        let zero_done = events.iter().position(|e| *e == (0, "done", false)).unwrap();
        let started_before: Vec<u64> = events[..zero_done]
            .iter()
            .filter(|e| e.1 == "start")
            .map(|e| e.0)
            .collect();
        assert_eq!(started_before.len(), 12, "{events:?}");
        assert!(
            started.elapsed() <= std::time::Duration::from_millis(101),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn busy_clients_see_one_piece_in_flight_and_a_pause_after_each() {
        let copier = FakeCopier::new(vec![(0, 6)], u64::MAX);
        copier.busy.set(true);
        let started = tokio::time::Instant::now();
        run_worker(&copier, false).await.unwrap();
        assert_eq!(copier.copied_lbas(), (0..6).collect::<Vec<_>>());
        assert_eq!(copier.most_in_flight.get(), 1);
        // Six copies of 10 ms, each followed by the busy pause (the last one's ends the worker).
        assert!(started.elapsed() >= 6 * std::time::Duration::from_millis(10) + 5 * RESYNC_BUSY_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_whose_replica_fails_a_read_finishes_its_span_from_the_coordinator_and_takes_no_more() {
        let mut copier = FakeCopier::new(vec![(0, 8), (8, 8)], u64::MAX);
        copier.reader_fails_at = Some(2);
        run_worker(&copier, true).await.unwrap();
        // The first span whole, the second left to the other workers.
        assert_eq!(copier.copied_lbas(), (0..8).collect::<Vec<_>>());
        assert_eq!(
            copier.spans.borrow_mut().next(),
            Some((8, 8)),
            "the next span stays for others"
        );
        // Once the worker saw the failure, the rest is read from the
        // coordinator (pieces started before it still went to the replica).
        let events = copier.events.borrow();
        let starts: Vec<bool> = events.iter().filter(|e| e.1 == "start").map(|e| e.2).collect();
        let first_local = starts
            .iter()
            .position(|from_reader| !from_reader)
            .expect("some read locally");
        assert!(first_local <= 2 + PIECES_IN_FLIGHT, "{events:?}");
        assert!(
            starts[first_local..].iter().all(|from_reader| !from_reader),
            "{events:?}"
        );
    }
}
