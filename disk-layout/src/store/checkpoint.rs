//! Writing checkpoints while the store runs.
//!
//! payload encoding (on a thread of its own with `CheckpointEncoding::Background`)
//! -> payload write -> (wait until every batch before the position is durable)
//! -> flush -> header write -> flush -> the slot is current, and the reuse
//! floor (the older slot's log position) may free dead segments.

use super::{token, CheckpointEncoding, LogHead, Store, KIND_CHECKPOINT, USER_RESERVE_SEGMENTS};
use crate::buf::IoBuf;
use crate::checkpoint::{encode_payload, CheckpointHeader, LogPosition, PayloadPlan, CHECKPOINT_HEADER_BYTES};
use crate::codec::align_up;
use crate::error::IoFault;
use crate::geometry::{BLOCK_BYTES, BLOCK_SIZE_BYTES};
use crate::index::Index;
use crate::io::{BlockIo, IoOp, IoRequest};

const STEP_PAYLOAD: u64 = 1;
const STEP_PAYLOAD_FLUSH: u64 = 2;
const STEP_HEADER: u64 = 3;
const STEP_HEADER_FLUSH: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// The payload is being encoded in the background (`CheckpointState::job`).
    Encoding {
        position: LogPosition,
    },
    Payload {
        written: bool,
        required_sequence: u64,
    },
    PayloadFlush,
    Header,
    HeaderFlush,
}

/// Checkpoint progress and the two slots' current headers.
pub(super) struct CheckpointState {
    pub(super) requested: bool,
    /// Log blocks sealed since the last checkpoint started.
    pub(super) blocks_since: u64,
    /// Blocks the newest checkpoint's payload took (the next one's size,
    /// about): spaces periodic checkpoints (`checkpoint_interval_blocks`).
    payload_blocks: u64,
    /// Payload bytes of the last checkpoint refused for not fitting its slot
    /// (None once one fits again).
    pub(super) too_large: Option<u64>,
    phase: Phase,
    /// The thread encoding the payload, in `Phase::Encoding`.
    job: Option<std::thread::JoinHandle<Encoded>>,
    slot: usize,
    header: Option<CheckpointHeader>,
    slots: [Option<CheckpointHeader>; 2],
}

impl CheckpointState {
    pub(super) fn new(slots: [Option<CheckpointHeader>; 2]) -> Self {
        let payload_blocks = slots
            .iter()
            .flatten()
            .max_by_key(|header| header.checkpoint_sequence)
            .map_or(0, |header| header.payload_bytes.div_ceil(BLOCK_SIZE_BYTES));
        Self {
            requested: false,
            blocks_since: 0,
            payload_blocks,
            too_large: None,
            phase: Phase::Idle,
            job: None,
            slot: 0,
            header: None,
            slots,
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    fn next_sequence(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .map(|h| h.checkpoint_sequence)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// The slot to overwrite: empty, or holding the older checkpoint.
    fn target_slot(&self) -> usize {
        match (&self.slots[0], &self.slots[1]) {
            (None, _) => 0,
            (_, None) => 1,
            (Some(a), Some(b)) => usize::from(a.checkpoint_sequence > b.checkpoint_sequence),
        }
    }

    /// Replay may start at either slot, so segments are reusable only behind both.
    fn reuse_floor(&self) -> Option<u64> {
        match (&self.slots[0], &self.slots[1]) {
            (Some(a), Some(b)) => Some(a.log.sequence.min(b.log.sequence)),
            _ => None,
        }
    }
}

/// A checkpoint's payload, encoded.
enum Encoded {
    Payload {
        /// Padded to whole blocks.
        buf: IoBuf,
        len: usize,
        crc: u32,
        volume_count: u64,
    },
    /// The payload would take `len` bytes; its slot has `room`.
    TooLarge { len: usize, room: u64 },
}

/// Encodes the payload of `index`, or says it does not fit in `room`
/// bytes beside the header.
fn encode(index: &Index, last_sequences: &[u64], segment_count: u32, room: u64) -> Encoded {
    let plan = PayloadPlan::new(index, segment_count);
    let len = plan.bytes();
    let padded = usize::try_from(align_up(len as u64, BLOCK_SIZE_BYTES)).expect("fits");
    if (CHECKPOINT_HEADER_BYTES + padded) as u64 > room {
        return Encoded::TooLarge { len, room };
    }
    let mut buf = IoBuf::new(padded);
    let (written, crc, volume_count) = encode_payload(index, &plan, last_sequences, buf.as_mut_slice());
    debug_assert_eq!(written, len);
    Encoded::Payload {
        buf,
        len,
        crc,
        volume_count,
    }
}

fn position_of(log: &LogHead) -> LogPosition {
    LogPosition {
        sequence: log.sequence,
        previous_crc: log.previous_crc,
        segment_index: log.segment,
        offset_blocks: log.offset_blocks,
        next_segment_index: log.next_segment,
    }
}

/// Fewest log blocks between periodic checkpoints (16 MiB).
const CHECKPOINT_INTERVAL_BLOCKS_MIN: u64 = 4096;
/// Periodic checkpoints are at least this many times their own size of log
/// apart: a checkpoint rewrites the whole index, so on a large, full disk
/// (a checkpoint of gigabytes) checkpoints would otherwise write more than
/// the clients do. Their writes stay under a quarter of the log's; replay
/// after a crash reads at most four checkpoints' worth of log.
pub const CHECKPOINT_LOG_RATIO: u64 = 4;

impl Store {
    /// Log blocks between periodic checkpoints: the configured value, but at
    /// most an eighth of the disk, so the segments the two slots protect
    /// from reuse (up to two intervals of log) stay a small share of it;
    /// and at least `CHECKPOINT_LOG_RATIO` times the last checkpoint's size.
    fn checkpoint_interval_blocks(&self) -> u64 {
        let by_disk = (self.geometry.data_blocks() / 8).max(CHECKPOINT_INTERVAL_BLOCKS_MIN);
        let by_size = self.checkpoint.payload_blocks.saturating_mul(CHECKPOINT_LOG_RATIO);
        self.config
            .checkpoint_interval_blocks
            .min(by_disk)
            .max(by_size.min(by_disk))
    }

    /// Bytes a checkpoint may take: its slot (less, when a test says so).
    fn checkpoint_room_bytes(&self) -> u64 {
        self.config
            .checkpoint_room_bytes
            .map_or(self.geometry.checkpoint_slot_bytes, |room| {
                room.min(self.geometry.checkpoint_slot_bytes)
            })
    }

    /// The slot holding the newest complete checkpoint.
    #[must_use]
    pub fn newest_checkpoint_slot(&self) -> usize {
        match (&self.checkpoint.slots[0], &self.checkpoint.slots[1]) {
            (Some(a), Some(b)) => usize::from(b.checkpoint_sequence > a.checkpoint_sequence),
            (None, Some(_)) => 1,
            _ => 0,
        }
    }

    pub(super) fn maybe_checkpoint(&mut self, io: &mut impl BlockIo) {
        if self.failed.is_none() {
            self.take_encoded(io);
        }
        if !self.checkpoint.is_idle() || self.failed.is_some() {
            return;
        }
        // A checkpoint writes the whole index, so under space pressure it is
        // taken only when it frees several segments, or when space is critical.
        let waiting = self.segments.dead_behind_checkpoint_count();
        let free = self.segments.free_count();
        let space_pressure = waiting > 0
            && free < self.clean_watermark()
            && (waiting >= self.clean_watermark() / 2 || free <= USER_RESERVE_SEGMENTS + 1);
        let due = self.checkpoint.blocks_since >= self.checkpoint_interval_blocks();
        if !(self.checkpoint.requested || due || space_pressure) {
            return;
        }
        self.seal_open();
        let position = position_of(&self.log);
        self.checkpoint.requested = false;
        self.checkpoint.blocks_since = 0;
        let (segment_count, room) = (self.geometry.segment_count, self.checkpoint_room_bytes());
        if self.config.checkpoint_encoding == CheckpointEncoding::Background {
            // Frozen now, with the position: the payload describes the index
            // as of `position`, whatever is written while it is encoded.
            let (index, last_sequences) = (self.index.clone(), self.segments.last_sequences());
            let job = std::thread::Builder::new()
                .name("checkpoint-encode".into())
                .spawn(move || encode(&index, &last_sequences, segment_count, room));
            match job {
                Ok(job) => {
                    self.checkpoint.job = Some(job);
                    self.checkpoint.phase = Phase::Encoding { position };
                    return;
                }
                Err(error) => {
                    tracing::warn!(disk = %self.config.disk_name, %error, "cannot start a thread to encode the checkpoint; encoding it here");
                }
            }
        }
        let encoded = encode(&self.index, &self.segments.last_sequences(), segment_count, room);
        self.write_payload(io, position, encoded);
    }

    /// Takes the payload of a checkpoint encoded in the background once
    /// its thread is done, and writes it.
    fn take_encoded(&mut self, io: &mut impl BlockIo) {
        let Phase::Encoding { position } = self.checkpoint.phase else {
            return;
        };
        if !self
            .checkpoint
            .job
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            return;
        }
        let job = self.checkpoint.job.take().expect("checked above");
        match job.join() {
            Ok(encoded) => self.write_payload(io, position, encoded),
            Err(_) => {
                // A defect, not a state of the disk: the older checkpoints
                // and the log still hold everything; the next one tries again.
                tracing::error!(disk = %self.config.disk_name, "encoding a checkpoint panicked; the next checkpoint tries again");
                self.checkpoint.phase = Phase::Idle;
            }
        }
    }

    /// Writes an encoded payload (or records that it does not fit its slot).
    fn write_payload(&mut self, io: &mut impl BlockIo, position: LogPosition, encoded: Encoded) {
        let (buf, len, payload_crc, volume_count) = match encoded {
            Encoded::Payload {
                buf,
                len,
                crc,
                volume_count,
            } => (buf, len, crc, volume_count),
            Encoded::TooLarge { len, room } => {
                // Never expected (a slot holds 16 bytes per data block; clones
                // are written against their bases), but if the index outgrew
                // it, the store keeps serving from the older checkpoint and
                // the log: no new clone until it fits again (deletes shrink it).
                if self.checkpoint.too_large.is_none() {
                    tracing::error!(
                        disk = %self.config.disk_name,
                        payload_bytes = len,
                        room_bytes = room,
                        "the index no longer fits a checkpoint slot: checkpoints stop and clones are refused until volumes or snapshots are deleted"
                    );
                }
                self.checkpoint.too_large = Some(len as u64);
                self.checkpoint.phase = Phase::Idle;
                self.stats.checkpoints_refused += 1;
                return;
            }
        };
        self.checkpoint.too_large = None;
        let padded = buf.len();
        let slot = self.checkpoint.target_slot();
        let header = CheckpointHeader {
            checkpoint_sequence: self.checkpoint.next_sequence(),
            log: position,
            payload_bytes: len as u64,
            payload_crc,
            segment_count: self.geometry.segment_count,
            volume_count,
            payload_format: crate::checkpoint::PAYLOAD_FORMAT,
        };
        self.checkpoint.slot = slot;
        self.checkpoint.payload_blocks = (padded / BLOCK_BYTES) as u64;
        self.checkpoint.header = Some(header);
        self.checkpoint.phase = Phase::Payload {
            written: false,
            required_sequence: position.sequence - 1,
        };
        self.stats.checkpoint_blocks_written += (padded / BLOCK_BYTES) as u64 + 1;
        let offset_bytes = self.geometry.checkpoint_slot_offset_bytes(slot) + CHECKPOINT_HEADER_BYTES as u64;
        io.submit(IoRequest {
            token: token(KIND_CHECKPOINT, STEP_PAYLOAD),
            op: IoOp::Write { offset_bytes, buf },
        });
    }

    /// Moves the checkpoint on once its payload is written and the log up to
    /// its position is durable.
    pub(super) fn checkpoint_progress(&mut self, io: &mut impl BlockIo) {
        if let Phase::Payload {
            written: true,
            required_sequence,
        } = self.checkpoint.phase
        {
            if self.durable_sequence >= required_sequence {
                self.checkpoint.phase = Phase::PayloadFlush;
                io.submit(IoRequest {
                    token: token(KIND_CHECKPOINT, STEP_PAYLOAD_FLUSH),
                    op: IoOp::Flush,
                });
            }
        }
    }

    pub(super) fn on_checkpoint_io(&mut self, io: &mut impl BlockIo, step: u64, result: Result<(), IoFault>) {
        if let Err(fault) = result {
            let offset = self.geometry.checkpoint_slot_offset_bytes(self.checkpoint.slot);
            let error = self.error_io(offset, fault);
            self.checkpoint.phase = Phase::Idle;
            self.fail(format!("checkpoint failed: {error}"));
            return;
        }
        match (step, self.checkpoint.phase) {
            (STEP_PAYLOAD, Phase::Payload { required_sequence, .. }) => {
                self.checkpoint.phase = Phase::Payload {
                    written: true,
                    required_sequence,
                };
                self.checkpoint_progress(io);
            }
            (STEP_PAYLOAD_FLUSH, Phase::PayloadFlush) => {
                let header = self.checkpoint.header.expect("header of the running checkpoint");
                let mut buf = IoBuf::new(CHECKPOINT_HEADER_BYTES);
                buf.as_mut_slice().copy_from_slice(&header.encode());
                self.checkpoint.phase = Phase::Header;
                io.submit(IoRequest {
                    token: token(KIND_CHECKPOINT, STEP_HEADER),
                    op: IoOp::Write {
                        offset_bytes: self.geometry.checkpoint_slot_offset_bytes(self.checkpoint.slot),
                        buf,
                    },
                });
            }
            (STEP_HEADER, Phase::Header) => {
                self.checkpoint.phase = Phase::HeaderFlush;
                io.submit(IoRequest {
                    token: token(KIND_CHECKPOINT, STEP_HEADER_FLUSH),
                    op: IoOp::Flush,
                });
            }
            (STEP_HEADER_FLUSH, Phase::HeaderFlush) => {
                let header = self.checkpoint.header.take().expect("header of the running checkpoint");
                self.checkpoint.slots[self.checkpoint.slot] = Some(header);
                self.checkpoint.phase = Phase::Idle;
                self.stats.checkpoints += 1;
                if let Some(floor) = self.checkpoint.reuse_floor() {
                    let floor = floor.max(self.segments.reuse_floor_sequence());
                    self.segments.advance_floor(floor, self.durable_sequence);
                }
            }
            (step, phase) => panic!("checkpoint step {step} completed in phase {phase:?}"),
        }
    }
}
