//! The log-structured store of one disk.
//!
//! Single-threaded and I/O-agnostic: it submits requests to a `BlockIo` and
//! is told of their completion through `on_completion`. Results of user
//! requests are collected with `drain_done`.
//!
//! Durability contract: a write, zero or delete is reported done only when
//! its batch and every batch before it are durable (written and flushed).
//! So every acknowledged write survives a crash; `flush` only waits for
//! requests already accepted.
//!
//! Ordering: the index is updated when a record is placed in a batch, so
//! requests take effect in call order. A read of data whose batch is not yet
//! on the disk waits for that batch's write to complete.

mod background;
mod checkpoint;
mod clean;
mod discard;
mod open;
mod read;
mod segments;
mod write;

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::buf::IoBuf;
use crate::error::{IoFault, StoreError};
use crate::geometry::{Geometry, BLOCK_SIZE_BYTES};
use crate::index::Index;
use crate::io::{BlockIo, IoCompletion, TOKEN_BITS};
use crate::record::BATCH_DATA_BLOCKS_MAX;
use crate::superblock::Superblock;

pub use checkpoint::CHECKPOINT_LOG_RATIO;
pub use open::{CheckpointEncoding, FormatParams, StoreConfig, DISCARD_BYTES_PER_INTERVAL_DEFAULT};
pub use segments::SegmentState;

use background::Background;
use checkpoint::CheckpointState;
use clean::Cleaner;
use discard::Discards;
use read::ReadOp;
use segments::SegmentTable;
use write::{InflightBatch, OpenBatch, PendingWrite};

/// Largest single read or write, in blocks (1 MiB).
pub const REQUEST_BLOCKS_MAX: u32 = BATCH_DATA_BLOCKS_MAX;
/// Segments kept free for the cleaner: user records are placed only while
/// this many are free, so a victim the cleaner has started can always be
/// moved completely (two whole segments; a victim holds less than one).
pub const USER_RESERVE_SEGMENTS: usize = 2;
/// Whole segments of dead space kept beyond the reserve (open segment, its
/// successor, and room for the emptiest segment to be worth cleaning).
const CLEANER_SLACK_SEGMENTS: u64 = 4;

/// What a finished request returns.
#[derive(Debug)]
pub enum Reply {
    Written,
    Zeroed,
    Deleted,
    /// A `clone_volume` is durable.
    Cloned,
    Flushed,
    /// The data read, `block_count * 4096` bytes.
    Read(IoBuf),
}

/// A finished request: the caller's tag and its outcome.
#[derive(Debug)]
pub struct Done {
    pub tag: u64,
    pub result: Result<Reply, StoreError>,
}

/// Counters, for write amplification and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub user_blocks_written: u64,
    pub relocated_blocks_written: u64,
    /// Blocks a scattered read wrote back in order (`Store::resequence`).
    pub resequenced_blocks_written: u64,
    pub header_blocks_written: u64,
    pub checkpoint_blocks_written: u64,
    pub batches_written: u64,
    pub flushes: u64,
    pub checkpoints: u64,
    pub segments_cleaned: u64,
    pub checksum_errors: u64,
    pub read_requests: u64,
    pub write_requests: u64,
    /// Reads the background pass made of scattered ranges clients had read
    /// in large pieces (`background`), to re-sequence them.
    pub background_resequence_reads: u64,
    /// Bytes of freed segments the device was told to discard.
    pub discarded_bytes: u64,
    /// Discards the device failed or refused.
    pub discard_failures: u64,
    /// Checkpoints not written because the index outgrew the slot.
    pub checkpoints_refused: u64,
}

impl StoreStats {
    /// Blocks written to the device per block of user data: log headers,
    /// relocations by the cleaner, re-sequenced reads and checkpoints all count.
    #[must_use]
    pub fn write_amplification(&self) -> f64 {
        if self.user_blocks_written == 0 {
            return 1.0;
        }
        let total = self.user_blocks_written
            + self.relocated_blocks_written
            + self.resequenced_blocks_written
            + self.header_blocks_written
            + self.checkpoint_blocks_written;
        total as f64 / self.user_blocks_written as f64
    }
}

/// A volume block as the index holds it: what scrub compares between
/// replicas without reading data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Never written, zeroed, or written with zeroes (all read as zeroes).
    Hole,
    /// Data whose 4 KiB have this crc32c.
    Data { crc: u32 },
    /// Found corrupt; reads fail until it is rewritten.
    Bad,
}

/// Space of one disk, in 4 KiB blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaceReport {
    /// Blocks user data may occupy (the fill limit of all segment space).
    pub capacity_blocks: u64,
    /// Blocks holding live data.
    pub used_blocks: u64,
    pub segment_count: u32,
    pub free_segments: u32,
}

// Token kinds, in the bits just below the backend's 8 bits.
const KIND_SHIFT: u32 = TOKEN_BITS - 8;
const KIND_BATCH: u64 = 1;
const KIND_FLUSH: u64 = 2;
const KIND_READ: u64 = 3;
const KIND_CLEAN: u64 = 4;
const KIND_CHECKPOINT: u64 = 5;
const KIND_DISCARD: u64 = 6;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

fn token(kind: u64, id: u64) -> u64 {
    debug_assert!(id <= ID_MASK);
    (kind << KIND_SHIFT) | (id & ID_MASK)
}

/// Where the next batch goes and how it chains to the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogHead {
    segment: u32,
    offset_blocks: u32,
    next_segment: u32,
    sequence: u64,
    previous_crc: u32,
}

/// The store of one disk.
pub struct Store {
    config: StoreConfig,
    superblock: Superblock,
    geometry: Geometry,
    index: Index,
    segments: SegmentTable,
    log: LogHead,
    open: Option<OpenBatch>,
    /// Sealed batches waiting for a pipeline slot, in sequence order.
    sealed: VecDeque<InflightBatch>,
    /// Submitted batches not yet durable, by sequence.
    inflight: BTreeMap<u64, InflightBatch>,
    flush_in_flight: Option<u64>,
    flush_count: u64,
    durable_sequence: u64,
    flush_waiters: Vec<(u64, u64)>,
    free_buffers: Vec<IoBuf>,
    user_backlog: VecDeque<PendingWrite>,
    relocation_backlog: VecDeque<PendingWrite>,
    /// Re-sequencing moves that found no batch buffer or segment at once
    /// (bounded: `read::RESEQUENCE_BACKLOG_BLOCKS_MAX`).
    resequence_backlog: VecDeque<PendingWrite>,
    reads: HashMap<u64, ReadOp>,
    next_read_id: u64,
    deferred_reads: Vec<ReadOp>,
    cleaner: Cleaner,
    background: Background,
    discards: Discards,
    checkpoint: CheckpointState,
    failed: Option<String>,
    /// Replay ended at a batch whose header continued the log but whose
    /// data was damaged.
    damaged_tail: bool,
    stats: StoreStats,
    done: Vec<Done>,
}

impl Store {
    /// Name of the disk, for messages.
    #[must_use]
    pub fn disk_name(&self) -> &str {
        &self.config.disk_name
    }

    /// The superblock the store was opened with.
    #[must_use]
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Space use of the disk.
    #[must_use]
    pub fn space(&self) -> SpaceReport {
        SpaceReport {
            capacity_blocks: self.capacity_blocks(),
            used_blocks: self.segments.live_blocks_total(),
            segment_count: self.geometry.segment_count,
            free_segments: u32::try_from(self.segments.free_or_discarding_count()).expect("u32"),
        }
    }

    /// Memory the in-memory index holds, in bytes (`Index::memory_bytes`).
    #[must_use]
    pub fn index_memory_bytes(&self) -> u64 {
        self.index.memory_bytes()
    }

    /// Blocks of `volume_id` that hold data (thin provisioning: written only).
    #[must_use]
    pub fn volume_used_blocks(&self, volume_id: u64) -> u64 {
        self.index.volume(volume_id).map_or(0, |v| v.used_blocks())
    }

    /// Highest epoch and volume sequence applied to `volume_id`.
    #[must_use]
    pub fn volume_epoch(&self, volume_id: u64) -> (u64, u64) {
        self.index
            .volume(volume_id)
            .map_or((0, 0), |v| (v.epoch_max, v.volume_sequence_max))
    }

    /// Volume ids with data on this disk.
    #[must_use]
    pub fn volume_ids(&self) -> Vec<u64> {
        self.index.volume_ids()
    }

    /// Allocation map of a range: `(lba, block_count, allocated)` runs.
    #[must_use]
    pub fn block_status(&self, volume_id: u64, lba: u64, block_count: u64) -> Vec<(u64, u64, bool)> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |start: u64, count: u64, allocated: bool| {
            if count == 0 {
                return;
            }
            match runs.last_mut() {
                Some(last) if last.2 == allocated && last.0 + last.1 == start => last.1 += count,
                _ => runs.push((start, count, allocated)),
            }
        };
        let end = lba.saturating_add(block_count);
        let mut cursor = lba;
        if let Some(volume) = self.index.volume(volume_id) {
            for (block, _) in volume.range(lba, end) {
                push(cursor, block - cursor, false);
                push(block, 1, true);
                cursor = block + 1;
            }
        }
        push(cursor, end - cursor, false);
        runs
    }

    /// The runs `(lba, block_count)` of `lba..lba + block_count` where
    /// volume `volume_id` maps other data than `base_id` (an earlier
    /// snapshot of it; None: nothing, so every mapped block): the blocks
    /// written, zeroed or trimmed in between. Memory only, no I/O; chunks
    /// the two still share are skipped whole, so a diff of snapshots that
    /// differ little costs little. A volume not on this disk maps nothing.
    #[must_use]
    pub fn changed_blocks(&self, base_id: Option<u64>, volume_id: u64, lba: u64, block_count: u64) -> Vec<(u64, u64)> {
        let end = lba.saturating_add(block_count).min(crate::LBA_LIMIT);
        let empty = crate::index::VolumeIndex::default();
        let volume = self.index.volume(volume_id).unwrap_or(&empty);
        let base = base_id.map(|id| self.index.volume(id).unwrap_or(&empty));
        let mut runs = Vec::new();
        volume.differences(base, lba, end, &mut runs);
        runs
    }

    /// The state of each block of `lba..lba + block_count` (at most
    /// `LBA_LIMIT`; memory only, no I/O). A block written with zeroes is a
    /// hole: it reads the same as one never written.
    #[must_use]
    pub fn block_states(&self, volume_id: u64, lba: u64, block_count: u64) -> Vec<BlockState> {
        let zero_crc = crate::record::block_crc(&[0u8; crate::geometry::BLOCK_BYTES]);
        let end = lba.saturating_add(block_count).min(crate::LBA_LIMIT);
        let mut states = vec![BlockState::Hole; usize::try_from(end.saturating_sub(lba)).expect("fits")];
        if let Some(volume) = self.index.volume(volume_id) {
            for (block, entry) in volume.range(lba, end) {
                let at = usize::try_from(block - lba).expect("fits");
                states[at] = match entry.address {
                    crate::index::ADDRESS_BAD => BlockState::Bad,
                    _ if entry.crc == zero_crc => BlockState::Hole,
                    _ => BlockState::Data { crc: entry.crc },
                };
            }
        }
        states
    }

    /// True when the last open's replay ended at a batch whose header
    /// continued the log but whose data was damaged: torn by a crash (then
    /// it was never acknowledged), or rotted within its durable window of
    /// the end (then it was, and this copy lacks it). This copy should be
    /// compared with a replica's before it is trusted over one.
    #[must_use]
    pub fn replay_ended_at_damage(&self) -> bool {
        self.damaged_tail
    }

    /// Checks the segments' live counts against a recount from the index
    /// (every mapped block once, however many clones share it): for tests
    /// and debugging; costs a walk of the whole index.
    ///
    /// # Errors
    /// The first segment whose count differs.
    pub fn verify_live_counts(&self) -> Result<(), String> {
        let recount = open::count_live_blocks(&self.index, &self.geometry);
        for (segment, &expected) in recount.iter().enumerate() {
            let counted = self.segments.live_blocks(u32::try_from(segment).expect("u32"));
            if counted != expected {
                return Err(format!(
                    "segment {segment}: {counted} live blocks counted, {expected} mapped"
                ));
            }
        }
        Ok(())
    }

    /// True once an I/O error stopped the store.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// True when no I/O is in flight and nothing waits (safe to drop).
    #[must_use]
    pub fn is_quiescent(&self) -> bool {
        self.open.is_none()
            && self.sealed.is_empty()
            && self.inflight.is_empty()
            && self.flush_in_flight.is_none()
            && self.user_backlog.is_empty()
            && self.relocation_backlog.is_empty()
            && self.resequence_backlog.is_empty()
            && self.reads.is_empty()
            && self.deferred_reads.is_empty()
            && !self.cleaner.is_busy()
            && self.checkpoint.is_idle()
            && self.discards.in_flight.is_none()
    }

    /// True while the background re-sequencing (`background`) has work
    /// it has not finished; it goes on only while the store is idle.
    #[must_use]
    pub fn background_work_pending(&self) -> bool {
        self.background.has_work() || !self.resequence_backlog.is_empty()
    }

    /// Moves finished requests into `out`.
    pub fn drain_done(&mut self, out: &mut Vec<Done>) {
        out.append(&mut self.done);
    }

    /// Blocks user data may occupy: the fill limit, and never so much that
    /// the cleaner lacks whole segments of slack (small disks) — with that
    /// slack the emptiest segment is always worth cleaning, so cleaning
    /// always makes progress.
    fn capacity_blocks(&self) -> u64 {
        let by_percent = self.geometry.data_blocks() * self.config.fill_limit_percent / 100;
        let slack_segments = USER_RESERVE_SEGMENTS as u64 + CLEANER_SLACK_SEGMENTS;
        let by_segments = u64::from(self.geometry.segment_count).saturating_sub(slack_segments)
            * u64::from(self.geometry.segment_blocks() - 1);
        by_percent.min(by_segments)
    }

    fn error_io(&self, offset_bytes: u64, fault: IoFault) -> StoreError {
        StoreError::Io {
            disk: self.config.disk_name.clone(),
            offset_bytes,
            fault,
        }
    }

    fn error_failed(&self) -> StoreError {
        StoreError::Failed {
            disk: self.config.disk_name.clone(),
            cause: self.failed.clone().unwrap_or_default(),
        }
    }

    fn check_request(&self, lba: u64, block_count: u64, max: u64) -> Result<(), StoreError> {
        if self.failed.is_some() {
            return Err(self.error_failed());
        }
        if block_count == 0 || block_count > max {
            return Err(StoreError::InvalidRequest {
                reason: format!("block count {block_count} not in 1..={max}"),
            });
        }
        if lba.checked_add(block_count).is_none_or(|end| end > crate::LBA_LIMIT) {
            return Err(StoreError::InvalidRequest {
                reason: format!("blocks {lba}+{block_count} beyond the largest volume"),
            });
        }
        Ok(())
    }

    /// Stops the store after a write or flush error: nothing more is written,
    /// every waiting request fails. Reopening replays what is durable.
    fn fail(&mut self, cause: String) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!(disk = %self.config.disk_name, %cause, "store failed; reopen to recover");
        self.failed = Some(cause);
        let error = self.error_failed();
        let mut tags = Vec::new();
        if let Some(open) = self.open.take() {
            tags.extend(open.waiters());
        }
        for batch in self
            .sealed
            .drain(..)
            .chain(std::mem::take(&mut self.inflight).into_values())
        {
            tags.extend(batch.waiters);
        }
        for pending in self.user_backlog.drain(..) {
            tags.extend(pending.tag);
        }
        self.relocation_backlog.clear();
        self.resequence_backlog.clear();
        tags.extend(self.flush_waiters.drain(..).map(|(_, tag)| tag));
        for op in self.deferred_reads.drain(..) {
            tags.push(op.tag);
        }
        for tag in tags {
            self.done.push(Done {
                tag,
                result: Err(error.clone()),
            });
        }
    }

    /// Handles one completion of a request this store submitted.
    pub fn on_completion(&mut self, io: &mut impl BlockIo, completion: IoCompletion) {
        let kind = (completion.token >> KIND_SHIFT) & 0xFF;
        let id = completion.token & ID_MASK;
        match kind {
            KIND_BATCH => self.on_batch_written(io, id, completion.result, completion.buf),
            KIND_FLUSH => self.on_flush_done(io, completion.result),
            KIND_READ => self.on_read_done(io, id, completion.result, completion.buf),
            KIND_CLEAN => self.on_clean_read(io, completion.result, completion.buf),
            KIND_CHECKPOINT => self.on_checkpoint_io(io, id, completion.result),
            KIND_DISCARD => self.on_discard_done(io, completion.result),
            _ => panic!("completion with unknown token {:#x}", completion.token),
        }
        self.pump(io);
    }

    /// Once a write has filled a batch, sends it to the device now instead
    /// of at the next `tick`, and with it the batch behind it when the device
    /// has room: a caller placing many large writes in one turn lets the disk
    /// start on the first while it copies the rest. Small writes that fill
    /// no batch still wait for the tick, which commits them as a group.
    pub fn submit_full_batches(&mut self, io: &mut impl BlockIo) {
        if self.has_sealed_batches() {
            self.pump(io);
        }
    }

    /// Periodic and after-request work: submit batches, run the cleaner and
    /// checkpoints, fail writes that can never find space.
    pub fn tick(&mut self, io: &mut impl BlockIo) {
        self.pump(io);
        if self.failed.is_some() {
            return;
        }
        self.maybe_checkpoint(io);
        self.maybe_clean(io);
        self.fail_hopeless_backlog();
    }

    /// Called by the owner at a fixed interval (the node: every 100 ms),
    /// not per turn: the background re-sequencing (`background`) runs once
    /// a whole interval passed without a request, until the next arrives;
    /// freed segments are discarded at the pace the config sets (`discard`).
    pub fn interval(&mut self, io: &mut impl BlockIo) {
        self.background.on_interval();
        self.resequence_in_background(io);
        self.discard_on_interval(io);
    }

    /// Asks for a checkpoint as soon as possible (clean shutdown).
    pub fn request_checkpoint(&mut self) {
        self.checkpoint.requested = true;
    }

    /// Completed checkpoints.
    #[must_use]
    pub fn checkpoints_done(&self) -> u64 {
        self.stats.checkpoints
    }

    fn blocks_per_request_max() -> u64 {
        u64::from(REQUEST_BLOCKS_MAX)
    }
}

const _: () = assert!(BLOCK_SIZE_BYTES == 4096);
