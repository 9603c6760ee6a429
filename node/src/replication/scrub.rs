//! Scrub: the coordinator of a volume walks it region by region, under the
//! volume's range lock (no write races the check), and
//!
//! - *verify* (`ballast scrub start`, and periodically): reads every data
//!   block of its own copy and asks each in-sync replica to do the same
//!   with its copy, checking each block against the crc kept in the index
//!   (bit rot, bad sectors);
//! - *compare* (every pass, and on its own whenever the volume's epoch
//!   moved: a new coordinator, a replica dropped or taken back): asks each
//!   in-sync replica for a digest of the region's block states (hole, or
//!   the data's crc) and, when it differs from its own, for the states.
//!
//! Then it repairs: a block bad in its own copy is fetched from a replica
//! holding the same data (same crc) and rewritten locally; every block a
//! replica holds differently (bad, stale, or a write that reached only
//! some replicas when the coordinator before it died) gets the
//! coordinator's version, written to that replica. The coordinator's copy
//! is the one clients read, so that is what every replica converges on.
//!
//! Comparing reads no data (the index has every block's crc), so it is
//! cheap enough to run after each failure. Verifying reads everything and
//! is held to `bytes_per_s` and yields to busy clients.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use disk_layout::BlockState;
use serde::{Deserialize, Serialize};

use super::wire::{self, OpKind, ReplicaOp, ScrubRequest};
use super::VolumeReplication;
use crate::cluster::state::{ClusterState, Command};
use crate::cluster::Cluster;
use crate::peer::frame::FrameKind;
use crate::peer::mux::MuxLink;
use crate::volume::{Volume, Volumes};

const BLOCK_BYTES: u64 = 4096;
/// Blocks verified under one hold of the range lock (4 MiB).
pub const VERIFY_REGION_BLOCKS: u64 = 1024;
/// Blocks compared under one hold of the range lock (64 MiB; no data is read).
pub const COMPARE_REGION_BLOCKS: u64 = wire::SCRUB_BLOCKS_MAX;
/// Most blocks pushed to a replica in one write while repairing.
const REPAIR_RUN_BLOCKS: u64 = 256;
/// Default of `scrub_mib_per_s`: the most data a verifying scrub reads per
/// second on each copy.
pub const SCRUB_BYTES_PER_S_DEFAULT: u64 = 64 << 20;
/// Default of `scrub_interval_hours`: how often every volume is verified.
pub const SCRUB_INTERVAL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What a pass does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read and check every data block of every in-sync copy, then compare.
    Verify,
    /// Compare the copies' block states only.
    Compare,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Compare => "compare",
        }
    }
}

/// A scrub pass as `scrub status` and `volume inspect` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// running, done or failed
    pub state: String,
    /// verify or compare
    pub mode: String,
    /// Why it ran: requested, periodic, epoch N (coordinator or in-sync set changed)
    pub reason: String,
    /// The volume's epoch when it started (the in-sync set it compared).
    #[serde(default)]
    pub epoch: u64,
    pub size_bytes: u64,
    /// How far the walk got.
    pub scanned_bytes: u64,
    /// Data read and checked, on this node's copy.
    pub verified_bytes: u64,
    /// Replicas compared with.
    pub replicas: Vec<u64>,
    /// Blocks that failed their crc (or could not be read), on any copy.
    pub checksum_errors: u64,
    /// Blocks a replica held differently from the coordinator.
    pub divergent_blocks: u64,
    /// Blocks rewritten from a good copy.
    pub repaired_blocks: u64,
    /// Bad blocks no copy could repair (reads of them fail).
    pub unrepairable_blocks: u64,
    pub error: Option<String>,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

/// Counts since the node started (`/metrics`).
#[derive(Debug, Default)]
pub struct ScrubTotals {
    pub passes: AtomicU64,
    pub verified_bytes: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub divergent_blocks: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub unrepairable_blocks: AtomicU64,
}

impl ScrubTotals {
    /// Adds what a pass found and did between `before` and `after`.
    fn add_progress(&self, before: &ScrubStatus, after: &ScrubStatus) {
        for (counter, then, now) in [
            (&self.checksum_errors, before.checksum_errors, after.checksum_errors),
            (&self.divergent_blocks, before.divergent_blocks, after.divergent_blocks),
            (&self.repaired_blocks, before.repaired_blocks, after.repaired_blocks),
            (
                &self.unrepairable_blocks,
                before.unrepairable_blocks,
                after.unrepairable_blocks,
            ),
            (&self.verified_bytes, before.verified_bytes, after.verified_bytes),
        ] {
            counter.fetch_add(now - then, Ordering::Relaxed);
        }
    }
}

/// This node's scrubs: running, last results, and what is due.
#[derive(Default)]
pub struct Scrubs {
    running: parking_lot::Mutex<std::collections::HashSet<String>>,
    last: parking_lot::Mutex<BTreeMap<String, ScrubStatus>>,
    /// The volume epoch the last compare (or verify) started at, by volume.
    compared_epoch: parking_lot::Mutex<HashMap<String, u64>>,
    pub totals: ScrubTotals,
    /// `scrub_mib_per_s` in bytes (0: the default).
    bytes_per_s: AtomicU64,
    /// `scrub_interval_hours` in seconds (0: never periodically).
    interval_s: AtomicU64,
}

impl Scrubs {
    #[must_use]
    pub fn new() -> Self {
        let scrubs = Self::default();
        scrubs.configure(SCRUB_BYTES_PER_S_DEFAULT, Some(SCRUB_INTERVAL_DEFAULT));
        scrubs
    }

    /// Sets the verify rate and the period (None: no periodic scrub).
    pub fn configure(&self, bytes_per_s: u64, interval: Option<std::time::Duration>) {
        self.bytes_per_s.store(bytes_per_s.max(1 << 20), Ordering::Relaxed);
        self.interval_s
            .store(interval.map_or(0, |i| i.as_secs().max(1)), Ordering::Relaxed);
    }

    /// The last pass of each volume this node ran or runs.
    #[must_use]
    pub fn all(&self) -> Vec<(String, ScrubStatus)> {
        self.last.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The last pass of `name` this node ran or runs.
    #[must_use]
    pub fn of(&self, name: &str) -> Option<ScrubStatus> {
        self.last.lock().get(name).cloned()
    }

    fn note(&self, name: &str, status: &ScrubStatus) {
        self.last.lock().insert(name.to_owned(), status.clone());
    }

    fn begin(&self, name: &str) -> bool {
        self.running.lock().insert(name.to_owned())
    }

    fn end(&self, name: &str) {
        self.running.lock().remove(name);
    }
}

/// What is due for a volume this node coordinates, if anything: a
/// requested verify, a compare after an epoch change, or a periodic verify.
#[must_use]
pub fn due(
    volume: &crate::cluster::state::ClusterVolume,
    compared_epoch: Option<u64>,
    now_unix: u64,
    interval_s: u64,
) -> Option<(Mode, String)> {
    if volume.scrub_requested > volume.scrub_done {
        return Some((Mode::Verify, "requested".into()));
    }
    if compared_epoch.is_none_or(|epoch| volume.epoch > epoch) {
        return Some((Mode::Compare, format!("epoch {}", volume.epoch)));
    }
    let last = volume.scrub_done_unix.max(volume.created_unix_seconds);
    if interval_s > 0 && now_unix.saturating_sub(last) >= interval_s {
        return Some((Mode::Verify, "periodic".into()));
    }
    None
}

/// Starts the pass due for each volume this node coordinates and serves
/// (one pass per volume at a time).
pub fn start_needed(cluster: &Arc<Cluster>, state: &ClusterState, volumes: &Arc<Volumes>) {
    let local_id = cluster.local.id;
    let now_unix = crate::audit::now_unix_ms() / 1000;
    for volume in state.volumes.values().filter(|v| v.coordinator == local_id) {
        let Some(local) = volumes.get(&volume.name) else {
            continue;
        };
        if !local.is_served() || local.serving_epoch() == 0 {
            continue;
        }
        let scrubs = &cluster.scrubs;
        let compared = scrubs.compared_epoch.lock().get(&volume.name).copied();
        let interval_s = scrubs.interval_s.load(Ordering::Relaxed);
        let Some((mode, reason)) = due(volume, compared, now_unix, interval_s) else {
            continue;
        };
        if !scrubs.begin(&volume.name) {
            continue;
        }
        scrubs.compared_epoch.lock().insert(volume.name.clone(), volume.epoch);
        let (generation, epoch) = (volume.scrub_requested, volume.epoch);
        let (cluster, name) = (Arc::clone(cluster), volume.name.clone());
        let replication = cluster.replication(&name);
        crate::engine::sched::spawn_background(crate::engine::Work::Scrub, async move {
            run(
                &cluster,
                &local,
                replication.as_deref(),
                mode,
                reason,
                (generation, epoch),
            )
            .await;
            cluster.scrubs.end(&name);
        });
    }
}

async fn run(
    cluster: &Cluster,
    volume: &Volume,
    replication: Option<&VolumeReplication>,
    mode: Mode,
    reason: String,
    (generation, epoch): (u64, u64),
) {
    let name = volume.name.clone();
    let mut status = ScrubStatus {
        state: "running".into(),
        mode: mode.name().into(),
        reason,
        epoch,
        size_bytes: volume.size_bytes(),
        replicas: replication
            .map(|r| r.targets.read().iter().map(|(id, _)| *id).collect())
            .unwrap_or_default(),
        started_unix_ms: crate::audit::now_unix_ms(),
        updated_unix_ms: crate::audit::now_unix_ms(),
        ..ScrubStatus::default()
    };
    tracing::info!(volume = %name, mode = mode.name(), reason = %status.reason, replicas = ?status.replicas, "scrub starts");
    cluster.scrubs.note(&name, &status);
    let totals = &cluster.scrubs.totals;
    totals.passes.fetch_add(1, Ordering::Relaxed);
    let outcome = scrub_volume(cluster, volume, replication, mode, &mut status).await;
    status.updated_unix_ms = crate::audit::now_unix_ms();
    match outcome {
        Ok(()) => {
            status.state = "done".into();
            let level_warn = status.checksum_errors + status.divergent_blocks + status.unrepairable_blocks > 0;
            if level_warn {
                tracing::warn!(volume = %name, mode = mode.name(), checksum_errors = status.checksum_errors, divergent_blocks = status.divergent_blocks, repaired_blocks = status.repaired_blocks, unrepairable_blocks = status.unrepairable_blocks, "scrub done: copies repaired");
            } else {
                tracing::info!(volume = %name, mode = mode.name(), verified_bytes = status.verified_bytes, "scrub done: every copy agrees");
            }
            if mode == Mode::Verify {
                let done = Command::ScrubDone {
                    name: name.clone(),
                    generation,
                    at_unix: status.updated_unix_ms / 1000,
                };
                if let Err(error) = cluster.change(done).await {
                    tracing::warn!(volume = %name, %error, "scrub done but not recorded; it runs again");
                }
            }
        }
        Err(error) => {
            tracing::warn!(volume = %name, %error, "scrub stopped");
            status.state = "failed".into();
            status.error = Some(error);
            // Compared again at the next pass of the reconciler.
            cluster.scrubs.compared_epoch.lock().remove(&name);
        }
    }
    cluster.scrubs.note(&name, &status);
}

async fn scrub_volume(
    cluster: &Cluster,
    volume: &Volume,
    replication: Option<&VolumeReplication>,
    mode: Mode,
    status: &mut ScrubStatus,
) -> Result<(), String> {
    let region_blocks = match mode {
        Mode::Verify => VERIFY_REGION_BLOCKS,
        Mode::Compare => COMPARE_REGION_BLOCKS,
    };
    let bytes_per_s = cluster.scrubs.bytes_per_s.load(Ordering::Relaxed);
    let timeout = replication.map_or(super::REPLICA_TIMEOUT_DEFAULT, |r| r.timeout);
    let started = std::time::Instant::now();
    let mut lba = 0;
    while lba < volume.size_bytes() / BLOCK_BYTES {
        if !volume.is_served() || volume.is_deleted() {
            return Err("this node stopped serving the volume".into());
        }
        let count = region_blocks.min(volume.size_bytes() / BLOCK_BYTES - lba);
        let targets = replication.map(|r| r.targets.read().clone()).unwrap_or_default();
        let before = status.clone();
        scrub_region(volume, &targets, lba, count, mode == Mode::Verify, timeout, status).await?;
        cluster.scrubs.totals.add_progress(&before, status);
        lba += count;
        status.scanned_bytes = lba * BLOCK_BYTES;
        status.updated_unix_ms = crate::audit::now_unix_ms();
        cluster.scrubs.note(&volume.name, status);
        let busy = volume.stats.in_flight() > 0;
        let pause = super::resync::pause_after(
            status.verified_bytes,
            started.elapsed(),
            bytes_per_s,
            busy && mode == Mode::Verify,
        );
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// One replica's copy of a region, when it differs from the coordinator's.
struct Theirs {
    node: u64,
    link: Arc<MuxLink>,
    states: Vec<BlockState>,
}

/// Checks and repairs one region under the range lock.
async fn scrub_region(
    volume: &Volume,
    targets: &[(u64, Arc<MuxLink>)],
    lba: u64,
    count: u64,
    verify: bool,
    timeout: std::time::Duration,
    status: &mut ScrubStatus,
) -> Result<(), String> {
    let _held = volume.lock_range(lba, count).await;
    let local = volume
        .check_region(lba, count, verify)
        .await
        .map_err(|error| error.to_string())?;
    status.verified_bytes += local.verified_bytes;
    status.checksum_errors += local.bad_blocks;
    let expected = if local.bad_blocks > 0 {
        // What the bad blocks should hold (their crc in the index).
        volume
            .check_region(lba, count, false)
            .await
            .map_err(|error| error.to_string())?
            .states
    } else {
        Vec::new()
    };
    let mut mine = local.states;
    let request = wire::encode_scrub(&ScrubRequest {
        volume_id: volume.id,
        lba,
        block_count: count,
        verify,
        digest: wire::digest(&mine),
    });
    let asks = targets.iter().map(|(node, link)| {
        let request = &request;
        async move { (*node, link, link.call(FrameKind::ReplicaScrub, request, timeout).await) }
    });
    let mut theirs = Vec::new();
    for (node, link, answer) in futures::future::join_all(asks).await {
        let decoded = answer
            .map_err(|error| error.to_string())
            .and_then(|bytes| wire::decode_scrub_reply(&bytes, count).map_err(|error| error.to_string()));
        match decoded {
            Ok(None) => {}
            Ok(Some(states)) => {
                status.checksum_errors += states.iter().filter(|s| **s == BlockState::Bad).count() as u64;
                theirs.push(Theirs {
                    node,
                    link: Arc::clone(link),
                    states,
                });
            }
            Err(error) => {
                tracing::warn!(volume = %volume.name, replica = node, lba, %error, "scrub: the replica did not answer; its copy of the region is not checked");
            }
        }
    }
    repair_local(volume, lba, &mut mine, &expected, &theirs, timeout, status).await;
    for replica in &theirs {
        repair_replica(volume, lba, &mine, replica, timeout, status).await;
    }
    Ok(())
}

/// Rewrites blocks bad in the coordinator's copy from a replica that has
/// them good: one with the same crc (the same data) first, else any
/// readable version (the coordinator's is lost).
async fn repair_local(
    volume: &Volume,
    lba: u64,
    mine: &mut [BlockState],
    expected: &[BlockState],
    theirs: &[Theirs],
    timeout: std::time::Duration,
    status: &mut ScrubStatus,
) {
    for (at, state) in mine.iter_mut().enumerate() {
        if *state != BlockState::Bad {
            continue;
        }
        let good = |replica: &&Theirs| replica.states[at] != BlockState::Bad;
        let source = theirs
            .iter()
            .find(|replica| Some(&replica.states[at]) == expected.get(at))
            .or_else(|| theirs.iter().find(good));
        let Some(source) = source else {
            status.unrepairable_blocks += 1;
            tracing::error!(volume = %volume.name, lba = lba + at as u64, "scrub: a block is bad on this copy and no in-sync replica has it; reads of it fail until it is rewritten");
            continue;
        };
        let block = lba + at as u64;
        let fixed = match source.states[at] {
            BlockState::Hole => volume.zero_local(block, 1).await.map_err(|e| e.to_string()),
            BlockState::Data { crc } => {
                let request = wire::encode_read(volume.id, block, 1);
                match source.link.call(FrameKind::ReplicaRead, &request, timeout).await {
                    Ok(data) if data.len() == 4096 && crc32c::crc32c(&data) == crc => {
                        volume.write_local(block, data).await.map_err(|e| e.to_string())
                    }
                    Ok(_) => Err("the replica sent other data than it described".into()),
                    Err(error) => Err(error.to_string()),
                }
            }
            BlockState::Bad => unreachable!("a good source"),
        };
        match fixed {
            Ok(()) => {
                *state = source.states[at];
                status.repaired_blocks += 1;
                tracing::warn!(volume = %volume.name, lba = block, replica = source.node, "scrub: repaired a bad block of this copy from a replica");
            }
            Err(error) => {
                status.unrepairable_blocks += 1;
                tracing::error!(volume = %volume.name, lba = block, replica = source.node, %error, "scrub: could not repair a bad block of this copy");
            }
        }
    }
}

/// Writes the coordinator's version of every block `replica` holds
/// differently (bad there, or other data), in runs.
async fn repair_replica(
    volume: &Volume,
    lba: u64,
    mine: &[BlockState],
    replica: &Theirs,
    timeout: std::time::Duration,
    status: &mut ScrubStatus,
) {
    let differs = |at: usize| replica.states[at] != mine[at] && mine[at] != BlockState::Bad;
    let epoch = volume.serving_epoch();
    let mut at = 0;
    while at < mine.len() {
        if !differs(at) {
            at += 1;
            continue;
        }
        let hole = mine[at] == BlockState::Hole;
        let mut end = at + 1;
        while end < mine.len()
            && differs(end)
            && (mine[end] == BlockState::Hole) == hole
            && ((end - at) as u64) < REPAIR_RUN_BLOCKS
        {
            end += 1;
        }
        let divergent = (at..end).filter(|i| replica.states[*i] != BlockState::Bad).count() as u64;
        status.divergent_blocks += divergent;
        let (first, blocks) = (lba + at as u64, (end - at) as u64);
        let kind = if hole {
            Ok(OpKind::Zero)
        } else {
            volume
                .read_local(first, blocks)
                .await
                .map(|data| OpKind::Write(data.into()))
                .map_err(|e| e.to_string())
        };
        let sent = match kind {
            Ok(kind) => {
                let op = ReplicaOp {
                    volume_id: volume.id,
                    epoch,
                    lba: first,
                    block_count: blocks,
                    volume_sequence: volume.next_sequence(),
                    kind,
                };
                let (header, data) = wire::encode_parts(&op);
                replica
                    .link
                    .call_parts(FrameKind::ReplicaWrite, &[&header, &data], timeout)
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string())
            }
            Err(error) => Err(error),
        };
        match sent {
            Ok(()) => {
                status.repaired_blocks += blocks;
                tracing::warn!(volume = %volume.name, replica = replica.node, lba = first, blocks, divergent, "scrub: rewrote blocks a replica held differently");
            }
            Err(error) => {
                tracing::warn!(volume = %volume.name, replica = replica.node, lba = first, blocks, %error, "scrub: could not repair the replica's blocks; the next pass tries again");
            }
        }
        at = end;
    }
}

/// Answers a coordinator's scrub request about this node's replica.
pub async fn answer(volumes: &Volumes, payload: &[u8]) -> Result<Vec<u8>, String> {
    let request = wire::decode_scrub(payload).map_err(|error| error.to_string())?;
    let volume = volumes
        .get_by_id(request.volume_id)
        .ok_or_else(|| format!("this node holds no replica of volume id {}", request.volume_id))?;
    let check = volume
        .check_region(request.lba, request.block_count, request.verify)
        .await
        .map_err(|error| error.to_string())?;
    if check.bad_blocks > 0 {
        tracing::warn!(volume = %volume.name, lba = request.lba, bad_blocks = check.bad_blocks, "scrub: blocks of this replica failed their check; the coordinator rewrites them");
    }
    if wire::digest(&check.states) == request.digest {
        Ok(wire::encode_scrub_reply(None))
    } else {
        Ok(wire::encode_scrub_reply(Some(&check.states)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(epoch: u64, requested: u64, done: u64, done_unix: u64) -> crate::cluster::state::ClusterVolume {
        let json = serde_json::json!({
            "name": "v", "id": 1, "size_bytes": 4096, "block_size_bytes": 4096, "replicas": 1,
            "replica_nodes": [1], "coordinator": 1, "epoch": epoch, "created_unix_seconds": 100,
            "scrub_requested": requested, "scrub_done": done, "scrub_done_unix": done_unix,
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_requested_scrub_verifies_an_epoch_change_compares_and_the_period_verifies_again() {
        let hour = 3600;
        assert_eq!(
            due(&volume(3, 2, 1, 0), Some(3), 200, hour).map(|d| d.0),
            Some(Mode::Verify)
        );
        assert_eq!(
            due(&volume(3, 1, 1, 150), None, 200, hour).map(|d| d.0),
            Some(Mode::Compare),
            "first look after start"
        );
        assert_eq!(
            due(&volume(4, 1, 1, 150), Some(3), 200, hour).map(|d| d.0),
            Some(Mode::Compare)
        );
        assert_eq!(due(&volume(4, 1, 1, 150), Some(4), 200, hour), None);
        assert_eq!(
            due(&volume(4, 1, 1, 150), Some(4), 150 + hour, hour).map(|d| d.1),
            Some("periodic".into())
        );
        assert_eq!(due(&volume(4, 1, 1, 150), Some(4), 150 + hour, 0), None, "no period");
    }
}
