//! The segment cleaner: when free segments run low, read the best victim
//! (cost-benefit), move its live blocks to the log head and let the
//! checkpoint machinery free it. One victim at a time bounds the work and
//! the memory (one segment-sized buffer).

use super::{token, Store, KIND_CLEAN, USER_RESERVE_SEGMENTS};
use crate::buf::IoBuf;
use crate::error::IoFault;
use crate::geometry::{Geometry, BLOCK_BYTES};
use crate::index::Entry;
use crate::io::{BlockIo, IoOp, IoRequest};
use crate::record::{block_crc, BatchHeader, RecordKind};
use crate::store::segments::SegmentState;
use crate::store::write::PendingWrite;

const BLOCK: usize = BLOCK_BYTES;
/// Most segments the cleaner keeps free ahead of demand.
const CLEAN_WATERMARK_SEGMENTS_MAX: usize = 64;

/// State of the cleaner.
#[derive(Default)]
pub(super) struct Cleaner {
    victim: Option<u32>,
    reading: bool,
    buf: Option<IoBuf>,
}

impl Cleaner {
    pub(super) fn is_busy(&self) -> bool {
        self.victim.is_some()
    }
}

impl Store {
    /// Free segments below which cleaning (or a checkpoint) starts.
    pub(super) fn clean_watermark(&self) -> usize {
        (self.geometry.segment_count as usize / 32).clamp(USER_RESERVE_SEGMENTS + 2, CLEAN_WATERMARK_SEGMENTS_MAX)
    }

    pub(super) fn maybe_clean(&mut self, io: &mut impl BlockIo) {
        if let Some(victim) = self.cleaner.victim {
            if !self.cleaner.reading && self.relocation_backlog.is_empty() {
                self.finish_victim(victim);
            }
            return;
        }
        let available = self.segments.free_count() + self.segments.dead_pending_count();
        if available >= self.clean_watermark() {
            return;
        }
        let Some(victim) =
            self.segments
                .pick_victim(self.geometry.segment_blocks(), self.log.sequence, self.durable_sequence)
        else {
            return;
        };
        let segment_bytes = usize::try_from(self.geometry.segment_size_bytes).expect("at most 1 GiB");
        let mut buf = self.cleaner.buf.take().unwrap_or_else(|| IoBuf::new(segment_bytes));
        buf.set_len(segment_bytes);
        let offset_bytes = Geometry::address_bytes(self.geometry.block_address(victim, 0));
        self.cleaner.victim = Some(victim);
        self.cleaner.reading = true;
        io.submit(IoRequest {
            token: token(KIND_CLEAN, u64::from(victim)),
            op: IoOp::Read { offset_bytes, buf },
        });
    }

    fn finish_victim(&mut self, victim: u32) {
        self.cleaner.victim = None;
        if self.segments.live_blocks(victim) == 0 {
            self.stats.segments_cleaned += 1;
        } else if self.segments.state(victim) == SegmentState::Used {
            tracing::error!(
                disk = %self.config.disk_name,
                segment = victim,
                live_blocks = self.segments.live_blocks(victim),
                "cleaner could not find every live block of a segment; leaving it in place"
            );
            self.segments.mark_stuck(victim);
        }
    }

    pub(super) fn on_clean_read(&mut self, io: &mut impl BlockIo, result: Result<(), IoFault>, buf: Option<IoBuf>) {
        let victim = self.cleaner.victim.expect("clean read without a victim");
        self.cleaner.reading = false;
        let buf = buf.expect("reads return their buffer");
        if let Err(fault) = result {
            tracing::error!(disk = %self.config.disk_name, segment = victim, %fault, "cleaner could not read segment");
            self.segments.mark_stuck(victim);
            self.cleaner.victim = None;
            self.cleaner.buf = Some(buf);
            return;
        }
        let moves = self.live_runs(victim, buf.as_slice());
        for pending in moves {
            // Once one move had to wait, the rest queue behind it in order.
            if self.relocation_backlog.is_empty() {
                self.place_relocation(pending);
            } else {
                self.relocation_backlog.push_back(pending);
            }
        }
        self.cleaner.buf = Some(buf);
        self.pump(io);
        self.maybe_clean(io);
    }

    /// Walks the victim's batches and returns its live blocks as runs to move
    /// (and corrupt blocks as `Bad` markings).
    fn live_runs(&mut self, victim: u32, segment: &[u8]) -> Vec<PendingWrite> {
        let segment_blocks = self.geometry.segment_blocks();
        let last_sequence = self.segments.last_sequence(victim);
        let mut runs = Vec::new();
        let mut offset = 0u32;
        let mut previous_sequence: Option<u64> = None;
        while offset < segment_blocks {
            let at = offset as usize * BLOCK;
            let Ok((header, _)) = BatchHeader::decode(&segment[at..at + BLOCK]) else {
                break;
            };
            let continues = previous_sequence.is_none_or(|previous| header.sequence == previous + 1);
            let fits = u64::from(offset) + 1 + u64::from(header.data_block_count()) <= u64::from(segment_blocks);
            if header.segment_index != victim || !continues || header.sequence > last_sequence || !fits {
                break;
            }
            previous_sequence = Some(header.sequence);
            let mut data_offset = offset + 1;
            for record in &header.records {
                if record.kind.has_data() {
                    self.collect_record(victim, record, data_offset, segment, &mut runs);
                }
                data_offset += record.data_blocks();
            }
            offset = data_offset;
        }
        runs
    }

    fn collect_record(
        &mut self,
        victim: u32,
        record: &crate::record::Record,
        data_offset: u32,
        segment: &[u8],
        runs: &mut Vec<PendingWrite>,
    ) {
        let base = self.geometry.block_address(victim, 0);
        let mut current: Option<PendingWrite> = None;
        for block in 0..record.block_count {
            let lba = record.lba + u64::from(block);
            let address = base + data_offset + block;
            let entry = self.index.get(record.volume_id, lba);
            let live = entry.address == address;
            let at = (data_offset + block) as usize * BLOCK;
            let data = &segment[at..at + BLOCK];
            let intact = live && block_crc(data) == entry.crc;
            if live && !intact {
                self.stats.checksum_errors += 1;
                tracing::error!(disk = %self.config.disk_name, volume = record.volume_id, lba, address, "checksum mismatch while cleaning; marking block bad");
            }
            let kind = if intact { RecordKind::Relocate } else { RecordKind::Bad };
            let extends = current
                .as_ref()
                .is_some_and(|run| run.kind == kind && run.lba + run.block_count == lba);
            if !live || !extends {
                runs.extend(current.take());
            }
            if !live {
                continue;
            }
            let run = current.get_or_insert_with(|| PendingWrite {
                tag: None,
                volume_id: record.volume_id,
                lba,
                block_count: 0,
                kind,
                epoch: record.epoch,
                volume_sequence: record.volume_sequence,
                data: Vec::new(),
                source: Vec::new(),
            });
            run.block_count += 1;
            run.source.push(Entry {
                address,
                crc: entry.crc,
            });
            if kind == RecordKind::Relocate {
                run.data.extend_from_slice(data);
            }
        }
        runs.extend(current);
    }
}
