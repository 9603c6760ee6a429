//! The write path: records are placed in the open batch (updating the
//! index at once), batches are sealed and submitted while the pipeline has
//! room (group commit: whatever arrived while the device was busy goes out
//! as one write), and a single flush in flight makes the longest written
//! prefix of batches durable, which is when their requests are acknowledged.

use super::{token, Done, Reply, Store, KIND_BATCH, KIND_FLUSH, REQUEST_BLOCKS_MAX, USER_RESERVE_SEGMENTS};
use crate::buf::IoBuf;
use crate::error::{IoFault, StoreError};
use crate::geometry::{Geometry, BLOCK_BYTES};
use crate::index::{Entry, Index, VolumeIndex};
use crate::io::{BlockIo, IoOp, IoRequest};
use crate::record::{
    block_crc, data_crc_of_block_crcs, BatchHeader, Record, RecordKind, BATCH_DATA_BLOCKS_MAX, BATCH_HEADER_BYTES,
    RECORDS_PER_BATCH_MAX,
};
use crate::store::segments::SegmentTable;

const BLOCK: usize = BLOCK_BYTES;
/// Bytes of one batch buffer: header plus the most data a batch holds.
pub(super) const BATCH_BUFFER_BYTES: usize = BATCH_HEADER_BYTES + BATCH_DATA_BLOCKS_MAX as usize * BLOCK;

/// What a finished record answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReplyKind {
    Written,
    Zeroed,
    Deleted,
    Cloned,
}

impl ReplyKind {
    fn reply(self) -> Reply {
        match self {
            Self::Written => Reply::Written,
            Self::Zeroed => Reply::Zeroed,
            Self::Deleted => Reply::Deleted,
            Self::Cloned => Reply::Cloned,
        }
    }
}

/// The batch being filled.
pub(super) struct OpenBatch {
    segment: u32,
    offset_blocks: u32,
    data_capacity_blocks: u32,
    pub(super) records: Vec<Record>,
    data_blocks: u32,
    /// Data blocks placed by the cleaner (paced: see `relocation_has_room`).
    relocated_blocks: u32,
    buf: IoBuf,
    waiters: Vec<(u64, ReplyKind)>,
}

impl OpenBatch {
    pub(super) fn waiters(self) -> impl Iterator<Item = u64> {
        self.waiters.into_iter().map(|(tag, _)| tag)
    }

    /// Absolute block range the batch will occupy if sealed now.
    pub(super) fn address_range(&self, geometry: &Geometry) -> (u64, u64) {
        let first = geometry.block_address(self.segment, self.offset_blocks);
        (first, first + 1 + u64::from(self.data_blocks))
    }
}

/// A sealed batch, from sealing until it is durable.
pub(super) struct InflightBatch {
    pub(super) sequence: u64,
    pub(super) first_address: u64,
    pub(super) blocks: u32,
    pub(super) written: bool,
    pub(super) submitted: bool,
    pub(super) waiters: Vec<u64>,
    kinds: Vec<ReplyKind>,
    buf: Option<IoBuf>,
}

/// A record waiting for a batch buffer or a free segment.
pub(super) struct PendingWrite {
    pub(super) tag: Option<u64>,
    pub(super) volume_id: u64,
    pub(super) lba: u64,
    pub(super) block_count: u64,
    pub(super) kind: RecordKind,
    pub(super) epoch: u64,
    pub(super) volume_sequence: u64,
    pub(super) data: Vec<u8>,
    /// Relocations only: where each block must still be for the move to apply.
    pub(super) source: Vec<Entry>,
}

impl PendingWrite {
    /// Drops the first `blocks` blocks (already placed) from a data request.
    fn advance(&mut self, blocks: u64) {
        if blocks == 0 {
            return;
        }
        debug_assert!(self.kind.has_data() && blocks < self.block_count);
        self.lba += blocks;
        self.block_count -= blocks;
        let skip = usize::try_from(blocks).expect("bounded");
        if !self.source.is_empty() {
            self.source.drain(..skip);
        }
    }
}

/// Which blocks of a move still apply when it is placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Moved {
    /// The cleaner's: every block some volume still maps at its old address.
    StillReferred,
    /// A re-sequencing's: every block the read's volume still maps exactly
    /// as it was read (address and crc), so the data held is its data.
    Unchanged,
}

/// Why a record could not be placed now.
pub(super) enum PlaceError {
    /// Every batch buffer is in flight; retry after a completion.
    NeedBuffer,
    /// No free segment to continue the log in; the cleaner must run.
    NeedSegment,
    /// Out of space for good, or the request is invalid.
    Refused(StoreError),
}

impl Store {
    /// Writes `data` (a multiple of 4096 bytes, at most 1 MiB) at volume
    /// block `lba`. Done (`Reply::Written`) once durable.
    pub fn write(&mut self, tag: u64, volume_id: u64, lba: u64, data: &[u8], epoch: u64, volume_sequence: u64) {
        self.stats.write_requests += 1;
        self.background.note_write();
        let block_count = (data.len() / BLOCK) as u64;
        let checked = if !data.len().is_multiple_of(BLOCK) {
            Err(StoreError::InvalidRequest {
                reason: format!("write of {} bytes is not a multiple of 4096", data.len()),
            })
        } else {
            self.check_request(lba, block_count, Self::blocks_per_request_max())
        };
        let pending = PendingWrite {
            tag: Some(tag),
            volume_id,
            lba,
            block_count,
            kind: RecordKind::Write,
            epoch,
            volume_sequence,
            data: Vec::new(),
            source: Vec::new(),
        };
        match checked {
            Err(error) => self.done.push(Done {
                tag,
                result: Err(error),
            }),
            Ok(()) => self.submit_or_queue(pending, data),
        }
    }

    /// Makes `block_count` blocks from `lba` read as zeroes and frees their
    /// space (TRIM, WRITE_ZEROES). Done (`Reply::Zeroed`) once durable.
    pub fn zero(&mut self, tag: u64, volume_id: u64, lba: u64, block_count: u64, epoch: u64, volume_sequence: u64) {
        self.background.note_write();
        let pending = PendingWrite {
            tag: Some(tag),
            volume_id,
            lba,
            block_count,
            kind: RecordKind::Zero,
            epoch,
            volume_sequence,
            data: Vec::new(),
            source: Vec::new(),
        };
        match self.check_request(lba, block_count, u64::from(u32::MAX)) {
            Err(error) => self.done.push(Done {
                tag,
                result: Err(error),
            }),
            Ok(()) => self.submit_or_queue(pending, &[]),
        }
    }

    /// Releases every block of a volume. Done (`Reply::Deleted`) once durable.
    pub fn delete_volume(&mut self, tag: u64, volume_id: u64) {
        self.background.note_write();
        self.background.forget_volume(volume_id);
        let pending = PendingWrite {
            tag: Some(tag),
            volume_id,
            lba: 0,
            block_count: 0,
            kind: RecordKind::DeleteVolume,
            epoch: 0,
            volume_sequence: 0,
            data: Vec::new(),
            source: Vec::new(),
        };
        match self.check_request(0, 1, 1) {
            Err(error) => self.done.push(Done {
                tag,
                result: Err(error),
            }),
            Ok(()) => self.submit_or_queue(pending, &[]),
        }
    }

    /// Makes `target`'s contents a copy of `source`'s as of now, sharing
    /// every block (no data is copied or written: a snapshot, a clone, or a
    /// volume restored from its snapshot). Later writes to either volume
    /// leave the other as it was. `target`'s previous blocks are released.
    /// Done (`Reply::Cloned`) once durable.
    pub fn clone_volume(&mut self, tag: u64, source: u64, target: u64, epoch: u64, volume_sequence: u64) {
        self.background.note_write();
        let pending = PendingWrite {
            tag: Some(tag),
            volume_id: target,
            lba: source,
            block_count: 0,
            kind: RecordKind::Clone,
            epoch,
            volume_sequence,
            data: Vec::new(),
            source: Vec::new(),
        };
        let checked = if source == target {
            Err(StoreError::InvalidRequest {
                reason: format!("volume {source} cannot be cloned onto itself"),
            })
        } else if let Some(payload_bytes) = self.checkpoint.too_large {
            Err(StoreError::InvalidRequest {
                reason: format!(
                    "disk {}: the volumes' maps no longer fit its checkpoint area ({payload_bytes} bytes); \
                     no snapshot or clone is taken until volumes or snapshots are deleted",
                    self.config.disk_name
                ),
            })
        } else {
            self.check_request(0, 1, 1)
        };
        match checked {
            Err(error) => self.done.push(Done {
                tag,
                result: Err(error),
            }),
            Ok(()) => self.submit_or_queue(pending, &[]),
        }
    }

    /// Done (`Reply::Flushed`) once every request accepted before it is durable.
    pub fn flush(&mut self, tag: u64) {
        self.background.note_request();
        if self.failed.is_some() {
            let error = self.error_failed();
            self.done.push(Done {
                tag,
                result: Err(error),
            });
            return;
        }
        // Every acknowledged write is already durable, so a flush only has
        // to wait for what has been placed in batches so far.
        self.seal_open();
        let target = self.log.sequence - 1;
        if target <= self.durable_sequence {
            self.done.push(Done {
                tag,
                result: Ok(Reply::Flushed),
            });
        } else {
            self.flush_waiters.push((target, tag));
        }
    }

    fn submit_or_queue(&mut self, mut pending: PendingWrite, data: &[u8]) {
        let mut placed = 0;
        if self.user_backlog.is_empty() {
            match self.place(&pending, data) {
                Ok(()) => return,
                Err((PlaceError::Refused(error), _)) => {
                    let tag = pending.tag.expect("user request");
                    self.done.push(Done {
                        tag,
                        result: Err(error),
                    });
                    return;
                }
                Err((PlaceError::NeedBuffer | PlaceError::NeedSegment, placed_blocks)) => placed = placed_blocks,
            }
        }
        pending.advance(placed);
        pending.data = data[usize::try_from(placed).expect("bounded") * BLOCK..].to_vec();
        self.user_backlog.push_back(pending);
    }

    /// Places a request in the open batch (or several, if it does not fit
    /// in one) and applies it to the index. The caller's tag rides on the
    /// last part: batches become durable in order, so the request is
    /// durable when that part is. On error, `placed_blocks` tells how much
    /// was placed already; the caller queues the rest.
    pub(super) fn place(&mut self, pending: &PendingWrite, data: &[u8]) -> Result<(), (PlaceError, u64)> {
        let for_cleaner = matches!(pending.kind, RecordKind::Relocate | RecordKind::Bad);
        let total = if pending.kind.has_data() {
            pending.block_count
        } else {
            0
        };
        debug_assert_eq!(data.len() as u64, total * BLOCK as u64);
        if pending.kind == RecordKind::Write {
            self.check_space(pending).map_err(|e| (e, 0))?;
        }
        if pending.kind == RecordKind::DeleteVolume || self.index.volume(pending.volume_id).is_none() {
            self.check_volume_limit(pending).map_err(|e| (e, 0))?;
        }
        // Invariant: user records are placed only while USER_RESERVE_SEGMENTS
        // segments are free (their own switches keep that many). Checking at
        // switches alone let them fill a segment the cleaner had opened from
        // the reserve, leaving its victim half moved with no free segment and
        // nothing dead to free: every write then waited forever.
        if !for_cleaner && self.segments.free_count() < USER_RESERVE_SEGMENTS {
            return Err((PlaceError::NeedSegment, 0));
        }
        let mut placed = 0u64;
        loop {
            let want = u32::try_from(total - placed).expect("bounded by REQUEST_BLOCKS_MAX");
            let batch_max = self.batch_data_blocks_max();
            let fits = self.open.as_ref().is_some_and(|open| {
                open.records.len() < RECORDS_PER_BATCH_MAX
                    && (want == 0 || open.data_blocks < open.data_capacity_blocks)
                    && open.data_blocks + want.min(batch_max) <= open.data_capacity_blocks
            });
            if !fits {
                self.seal_open();
                self.start_open(for_cleaner).map_err(|e| (e, placed))?;
            }
            let open = self.open.as_ref().expect("just ensured");
            let take = want.min(open.data_capacity_blocks - open.data_blocks);
            let last = placed + u64::from(take) == total;
            let from = usize::try_from(placed).expect("bounded") * BLOCK;
            let part_data = &data[from..from + take as usize * BLOCK];
            let source = if for_cleaner && !pending.source.is_empty() {
                &pending.source[usize::try_from(placed).expect("bounded")..]
            } else {
                &[][..]
            };
            let lba = pending.lba + placed;
            let block_count = if pending.kind.has_data() {
                u64::from(take)
            } else {
                pending.block_count
            };
            self.place_part(pending, lba, block_count, part_data, source, last);
            placed += u64::from(take);
            if last {
                return Ok(());
            }
        }
    }

    /// Most data blocks one batch can hold on this disk.
    fn batch_data_blocks_max(&self) -> u32 {
        BATCH_DATA_BLOCKS_MAX.min(self.geometry.segment_blocks() - 1)
    }

    /// Places one record that fits the open batch.
    fn place_part(
        &mut self,
        pending: &PendingWrite,
        lba: u64,
        block_count: u64,
        data: &[u8],
        source: &[Entry],
        last: bool,
    ) {
        let for_cleaner = matches!(pending.kind, RecordKind::Relocate | RecordKind::Bad);
        let geometry = self.geometry;
        let open = self.open.as_mut().expect("placed into the open batch");
        let data_blocks = u32::try_from(data.len() / BLOCK).expect("bounded");
        assert!(open.data_blocks + data_blocks <= open.data_capacity_blocks);
        assert!(open.records.len() < RECORDS_PER_BATCH_MAX);
        let first_data_offset = open.offset_blocks + 1 + open.data_blocks;
        let mut crcs = Vec::with_capacity(data_blocks as usize);
        let start = BLOCK * (1 + open.data_blocks as usize);
        for (index, block) in data.chunks_exact(BLOCK).enumerate() {
            let at = start + index * BLOCK;
            open.buf.as_mut_slice()[at..at + BLOCK].copy_from_slice(block);
            crcs.push(if for_cleaner {
                source[index].crc
            } else {
                block_crc(block)
            });
        }
        let record = Record {
            volume_id: pending.volume_id,
            lba,
            block_count: u32::try_from(block_count).expect("checked at request"),
            kind: pending.kind,
            epoch: pending.epoch,
            volume_sequence: pending.volume_sequence,
            data_crc: data_crc_of_block_crcs(crcs.iter().copied()),
            relocated_from: if for_cleaner {
                source.first().map_or(0, |entry| entry.address)
            } else {
                0
            },
        };
        open.records.push(record);
        open.data_blocks += data_blocks;
        if pending.kind == RecordKind::Relocate {
            open.relocated_blocks += data_blocks;
        }
        if let (Some(tag), true) = (pending.tag, last) {
            let kind = match pending.kind {
                RecordKind::Zero => ReplyKind::Zeroed,
                RecordKind::DeleteVolume => ReplyKind::Deleted,
                RecordKind::Clone => ReplyKind::Cloned,
                _ => ReplyKind::Written,
            };
            open.waiters.push((tag, kind));
        }
        let first_address = if data_blocks > 0 {
            geometry.block_address(open.segment, first_data_offset)
        } else {
            0
        };
        let sequence = self.log.sequence;
        apply_record(
            &mut self.index,
            &mut self.segments,
            &geometry,
            &record,
            first_address,
            &crcs,
            sequence,
        );
        // Moves are counted by `place_relocation`, which knows whose they are.
        if pending.kind == RecordKind::Write {
            self.stats.user_blocks_written += u64::from(data_blocks);
        }
    }

    fn check_space(&self, pending: &PendingWrite) -> Result<(), PlaceError> {
        // A block another clone still maps stays: overwriting it takes a new one.
        let newly_live = (pending.lba..pending.lba + pending.block_count)
            .filter(|&lba| {
                let entry = self.index.get(pending.volume_id, lba);
                !entry.is_data() || self.index.shared_maps(pending.volume_id, lba, entry)
            })
            .count() as u64;
        let used = self.segments.live_blocks_total();
        if used + newly_live > self.capacity_blocks() {
            return Err(PlaceError::Refused(StoreError::NoSpace {
                disk: self.config.disk_name.clone(),
                used_blocks: used,
                capacity_blocks: self.capacity_blocks(),
            }));
        }
        Ok(())
    }

    fn check_volume_limit(&self, pending: &PendingWrite) -> Result<(), PlaceError> {
        let count = self.index.volume_count() as u64;
        if pending.kind != RecordKind::DeleteVolume && count >= crate::geometry::VOLUMES_PER_DISK_MAX {
            return Err(PlaceError::Refused(StoreError::TooManyVolumes {
                disk: self.config.disk_name.clone(),
                count,
            }));
        }
        Ok(())
    }

    /// Opens a new batch at the log head, moving to the reserved segment if
    /// the current one cannot hold a header and one data block.
    ///
    /// A record longer than the rest of the segment is split (`place` puts
    /// the rest in the next segment), so no segment tail is left empty.
    /// Moving to the next segment whenever a whole record did not fit wasted
    /// up to a request per segment (half of a 2 MiB segment with 1 MiB
    /// writes): the cleaner then rewrote each victim's live blocks into as
    /// much space as the victim freed and spun forever while writes waited.
    fn start_open(&mut self, for_cleaner: bool) -> Result<(), PlaceError> {
        debug_assert!(self.open.is_none());
        let Some(mut buf) = self.free_buffers.pop() else {
            return Err(PlaceError::NeedBuffer);
        };
        let segment_blocks = self.geometry.segment_blocks();
        if segment_blocks - self.log.offset_blocks < 2 {
            let reserve = if for_cleaner { 0 } else { USER_RESERVE_SEGMENTS };
            if self.segments.free_count() < 1 + reserve {
                self.free_buffers.push(buf);
                return Err(PlaceError::NeedSegment);
            }
            let next = self.segments.reserve().expect("free count checked");
            self.segments
                .switch(self.log.segment, self.log.next_segment, self.log.sequence);
            self.log.segment = self.log.next_segment;
            self.log.offset_blocks = 0;
            self.log.next_segment = next;
        }
        buf.set_len(BATCH_BUFFER_BYTES);
        let room = segment_blocks - self.log.offset_blocks - 1;
        self.open = Some(OpenBatch {
            segment: self.log.segment,
            offset_blocks: self.log.offset_blocks,
            data_capacity_blocks: room.min(BATCH_DATA_BLOCKS_MAX),
            records: Vec::with_capacity(RECORDS_PER_BATCH_MAX),
            data_blocks: 0,
            relocated_blocks: 0,
            buf,
            waiters: Vec::new(),
        });
        Ok(())
    }

    /// Seals the open batch: gives it its sequence and chain checksum and
    /// queues it for submission.
    pub(super) fn seal_open(&mut self) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        if open.records.is_empty() {
            self.free_buffers.push(open.buf);
            return;
        }
        assert_eq!(open.segment, self.log.segment);
        assert_eq!(open.offset_blocks, self.log.offset_blocks);
        let sequence = self.log.sequence;
        let durable_window = if self.config.durable_writes {
            u16::try_from(self.config.pipeline_depth).expect("a small pipeline")
        } else {
            0
        };
        let header = BatchHeader {
            durable_window,
            sequence,
            previous_header_crc: self.log.previous_crc,
            segment_index: open.segment,
            next_segment_index: self.log.next_segment,
            open_nonce: self.config.open_nonce,
            records: std::mem::take(&mut open.records),
        };
        let crc = header.encode_into(&mut open.buf.as_mut_slice()[..BATCH_HEADER_BYTES]);
        let blocks = 1 + open.data_blocks;
        open.buf.set_len(blocks as usize * BLOCK);
        self.log.sequence += 1;
        self.log.previous_crc = crc;
        self.log.offset_blocks += blocks;
        self.segments.note_batch(open.segment, sequence);
        self.stats.header_blocks_written += 1;
        self.stats.batches_written += 1;
        self.checkpoint.blocks_since += u64::from(blocks);
        let (kinds, waiters): (Vec<_>, Vec<_>) = open.waiters.iter().map(|(tag, kind)| (*kind, *tag)).unzip();
        let first_address = self.geometry.block_address(open.segment, open.offset_blocks);
        self.sealed.push_back(InflightBatch {
            sequence,
            first_address,
            blocks,
            written: false,
            submitted: false,
            waiters,
            kinds,
            buf: Some(open.buf),
        });
    }

    pub(super) fn has_sealed_batches(&self) -> bool {
        !self.sealed.is_empty()
    }

    fn unwritten_submitted(&self) -> usize {
        self.inflight.values().filter(|batch| !batch.written).count()
    }

    /// Submits sealed batches while the pipeline has room, seals the open
    /// batch when the device is free, places backlogged records, flushes.
    pub(super) fn pump(&mut self, io: &mut impl BlockIo) {
        if self.failed.is_some() {
            return;
        }
        for _ in 0..RECORDS_PER_BATCH_MAX * 4 {
            self.submit_sealed(io);
            let device_has_room = self.sealed.is_empty() && self.unwritten_submitted() < self.config.pipeline_depth;
            if device_has_room && self.open.as_ref().is_some_and(|open| !open.records.is_empty()) {
                self.seal_open();
                self.submit_sealed(io);
            }
            if !self.drain_backlog() {
                break;
            }
        }
        self.maybe_flush(io);
        self.resolve_flush_waiters();
    }

    fn submit_sealed(&mut self, io: &mut impl BlockIo) {
        while self.unwritten_submitted() < self.config.pipeline_depth {
            // The header's durable_window: nothing `pipeline_depth` or more
            // ahead of a batch not yet written goes to the disk.
            let oldest_unwritten = self.inflight.values().find(|batch| !batch.written).map(|b| b.sequence);
            let Some(next) = self.sealed.front().map(|batch| batch.sequence) else {
                break;
            };
            if oldest_unwritten.is_some_and(|oldest| next >= oldest + self.config.pipeline_depth as u64) {
                break;
            }
            let Some(mut batch) = self.sealed.pop_front() else {
                break;
            };
            let buf = batch.buf.take().expect("sealed batch owns its buffer");
            let offset_bytes = Geometry::address_bytes(batch.first_address);
            batch.submitted = true;
            io.submit(IoRequest {
                token: token(KIND_BATCH, batch.sequence),
                op: if self.config.durable_writes {
                    IoOp::WriteDurable { offset_bytes, buf }
                } else {
                    IoOp::Write { offset_bytes, buf }
                },
            });
            self.inflight.insert(batch.sequence, batch);
        }
    }

    /// Places backlogged records; true if any was placed.
    fn drain_backlog(&mut self) -> bool {
        let mut placed_any = false;
        while let Some(mut pending) = self.user_backlog.pop_front() {
            let data = std::mem::take(&mut pending.data);
            match self.place(&pending, &data) {
                Ok(()) => placed_any = true,
                Err((PlaceError::Refused(error), _)) => {
                    let tag = pending.tag.expect("user request");
                    self.done.push(Done {
                        tag,
                        result: Err(error),
                    });
                    placed_any = true;
                }
                Err((PlaceError::NeedBuffer | PlaceError::NeedSegment, placed)) => {
                    placed_any |= placed > 0;
                    pending.advance(placed);
                    pending.data = data[usize::try_from(placed).expect("bounded") * BLOCK..].to_vec();
                    self.user_backlog.push_front(pending);
                    break;
                }
            }
        }
        while self.relocation_has_room() {
            let Some(pending) = self.relocation_backlog.pop_front() else {
                break;
            };
            if let Some(rest) = self.place_relocation(pending, Moved::StillReferred) {
                self.relocation_backlog.push_front(rest);
                break;
            }
            placed_any = true;
        }
        placed_any |= self.drain_resequence_backlog();
        placed_any
    }

    /// Relocations take at most half of a batch, so user writes never wait
    /// behind a whole segment of moved data; when free segments are nearly
    /// gone the cleaner goes first (user writes are waiting for it anyway).
    fn relocation_has_room(&self) -> bool {
        if self.segments.free_count() <= USER_RESERVE_SEGMENTS + 1 {
            return true;
        }
        self.open
            .as_ref()
            .is_none_or(|open| open.relocated_blocks < open.data_capacity_blocks / 2)
    }

    /// Places the still-live parts of a relocation (or a `Bad` marking);
    /// the part not placed yet if it had to wait. Moved data blocks count
    /// as the cleaner's or the re-sequencing's, as `moved` says.
    pub(super) fn place_relocation(&mut self, pending: PendingWrite, moved: Moved) -> Option<PendingWrite> {
        let count = usize::try_from(pending.block_count).expect("bounded");
        let has_data = pending.kind.has_data();
        let mut start = 0;
        let mut placed_blocks = 0;
        let mut rest = None;
        while start < count {
            let live = |index: usize| {
                let lba = pending.lba + index as u64;
                let source = pending.source[index];
                match moved {
                    Moved::StillReferred => self.index.referrer(pending.volume_id, lba, source.address).is_some(),
                    Moved::Unchanged => self.index.get(pending.volume_id, lba) == source,
                }
            };
            if !live(start) {
                start += 1;
                continue;
            }
            let mut end = start + 1;
            while end < count && live(end) {
                end += 1;
            }
            let part = PendingWrite {
                tag: None,
                volume_id: pending.volume_id,
                lba: pending.lba + start as u64,
                block_count: (end - start) as u64,
                kind: pending.kind,
                epoch: pending.epoch,
                volume_sequence: pending.volume_sequence,
                data: Vec::new(),
                source: pending.source[start..end].to_vec(),
            };
            let data = if has_data {
                &pending.data[start * BLOCK..end * BLOCK]
            } else {
                &[][..]
            };
            match self.place(&part, data) {
                Ok(()) => {
                    placed_blocks += end - start;
                    start = end;
                }
                Err((PlaceError::Refused(_), _)) => unreachable!("relocations never grow usage"),
                Err((PlaceError::NeedBuffer | PlaceError::NeedSegment, placed)) => {
                    let placed = usize::try_from(placed).expect("bounded");
                    placed_blocks += placed;
                    start += placed;
                    rest = Some(PendingWrite {
                        tag: None,
                        volume_id: pending.volume_id,
                        lba: pending.lba + start as u64,
                        block_count: (count - start) as u64,
                        kind: pending.kind,
                        epoch: pending.epoch,
                        volume_sequence: pending.volume_sequence,
                        data: if has_data {
                            pending.data[start * BLOCK..].to_vec()
                        } else {
                            Vec::new()
                        },
                        source: pending.source[start..].to_vec(),
                    });
                    break;
                }
            }
        }
        if pending.kind == RecordKind::Relocate {
            let counter = match moved {
                Moved::StillReferred => &mut self.stats.relocated_blocks_written,
                Moved::Unchanged => &mut self.stats.resequenced_blocks_written,
            };
            *counter += placed_blocks as u64;
        }
        rest
    }

    pub(super) fn on_batch_written(
        &mut self,
        io: &mut impl BlockIo,
        sequence: u64,
        result: Result<(), IoFault>,
        buf: Option<IoBuf>,
    ) {
        let first_address = self.inflight.get(&sequence).map(|batch| batch.first_address);
        if let Err(fault) = result {
            let offset = Geometry::address_bytes(first_address.unwrap_or(0));
            let error = self.error_io(offset, fault);
            self.fail(format!("batch {sequence} write failed: {error}"));
            return;
        }
        if let Some(batch) = self.inflight.get_mut(&sequence) {
            batch.written = true;
        }
        if let Some(mut buf) = buf {
            buf.set_len(BATCH_BUFFER_BYTES);
            self.free_buffers.push(buf);
        }
        self.retry_deferred_reads(io);
        if self.config.durable_writes {
            // Each batch was durable when it completed: the written prefix is durable.
            let covers = self.written_prefix();
            if covers > self.durable_sequence {
                self.make_durable(io, covers);
            }
        } else {
            self.maybe_flush(io);
        }
    }

    /// Highest sequence such that it and every earlier batch are written.
    fn written_prefix(&self) -> u64 {
        let mut covers = self.durable_sequence;
        for (sequence, batch) in &self.inflight {
            if *sequence != covers + 1 || !batch.written {
                break;
            }
            covers = *sequence;
        }
        covers
    }

    /// Starts a flush covering the longest prefix of written batches.
    pub(super) fn maybe_flush(&mut self, io: &mut impl BlockIo) {
        if self.flush_in_flight.is_some() || self.failed.is_some() {
            return;
        }
        let covers = self.written_prefix();
        if covers > self.durable_sequence {
            self.flush_count += 1;
            self.flush_in_flight = Some(covers);
            io.submit(IoRequest {
                token: token(KIND_FLUSH, self.flush_count),
                op: IoOp::Flush,
            });
        }
    }

    pub(super) fn on_flush_done(&mut self, io: &mut impl BlockIo, result: Result<(), IoFault>) {
        let covers = self.flush_in_flight.take().expect("flush completion without a flush");
        if let Err(fault) = result {
            let error = self.error_io(0, fault);
            self.fail(format!("flush failed: {error}"));
            return;
        }
        self.stats.flushes += 1;
        self.make_durable(io, covers);
        self.maybe_flush(io);
    }

    /// Batches up to `covers` are durable: acknowledge their requests.
    fn make_durable(&mut self, io: &mut impl BlockIo, covers: u64) {
        debug_assert!(covers > self.durable_sequence);
        self.durable_sequence = covers;
        self.segments.release(covers);
        while let Some(entry) = self.inflight.first_entry() {
            if *entry.key() > covers {
                break;
            }
            let batch = entry.remove();
            debug_assert!(batch.written);
            for (tag, kind) in batch.waiters.into_iter().zip(batch.kinds) {
                self.done.push(Done {
                    tag,
                    result: Ok(kind.reply()),
                });
            }
        }
        self.resolve_flush_waiters();
        self.checkpoint_progress(io);
    }

    fn resolve_flush_waiters(&mut self) {
        let durable = self.durable_sequence;
        let mut index = 0;
        while index < self.flush_waiters.len() {
            if self.flush_waiters[index].0 <= durable {
                let (_, tag) = self.flush_waiters.swap_remove(index);
                self.done.push(Done {
                    tag,
                    result: Ok(Reply::Flushed),
                });
            } else {
                index += 1;
            }
        }
    }

    /// Fails user writes in the backlog when no space can ever be found.
    pub(super) fn fail_hopeless_backlog(&mut self) {
        if self.user_backlog.is_empty()
            || self.segments.free_count() > USER_RESERVE_SEGMENTS
            || self.cleaner.is_busy()
            || !self.checkpoint.is_idle()
            || !self.relocation_backlog.is_empty()
            || !self.inflight.is_empty()
        {
            return;
        }
        // Dead segments are freed by a checkpoint, and cleaning makes more:
        // hope, unless checkpoints are refused (the maps outgrew the slot).
        let hope = self.segments.dead_pending_count() > 0
            || self
                .segments
                .pick_victim(
                    self.geometry.segment_blocks(),
                    self.geometry.segment_blocks(),
                    self.log.sequence,
                    self.durable_sequence,
                )
                .is_some();
        if hope && self.checkpoint.too_large.is_none() {
            return;
        }
        let error = StoreError::NoSpace {
            disk: self.config.disk_name.clone(),
            used_blocks: self.segments.live_blocks_total(),
            capacity_blocks: self.capacity_blocks(),
        };
        for pending in self.user_backlog.drain(..) {
            if let Some(tag) = pending.tag {
                self.done.push(Done {
                    tag,
                    result: Err(error.clone()),
                });
            }
        }
    }
}

/// Applies one record to the index and the segments' live counts.
pub(super) fn apply_record(
    index: &mut Index,
    segments: &mut SegmentTable,
    geometry: &Geometry,
    record: &Record,
    first_address: u64,
    crcs: &[u32],
    sequence: u64,
) {
    apply_to_index(index, record, first_address, crcs, |old, new| {
        if old.is_data() {
            segments.remove_live(
                geometry.segment_of(old.address).expect("data address in a segment"),
                sequence,
            );
        }
        if new.is_data() {
            segments.add_live(geometry.segment_of(new.address).expect("data address in a segment"));
        }
    });
}

/// Applies one record to the index. `changed(old, new)` reports each change
/// of a disk block's references: `old` (if data) lost its last referrer,
/// `new` (if data) got its first. A block shared by clones is reported once,
/// when the first volume takes it or the last one lets go.
pub(super) fn apply_to_index(
    index: &mut Index,
    record: &Record,
    first_address: u64,
    crcs: &[u32],
    mut changed: impl FnMut(Entry, Entry),
) {
    let shared = index.volume(record.volume_id).is_some_and(VolumeIndex::is_shared);
    match record.kind {
        RecordKind::Write | RecordKind::Relocate if record.relocated_from == 0 => {
            assert_eq!(crcs.len(), record.block_count as usize);
            for (offset, crc) in crcs.iter().enumerate() {
                let new = Entry {
                    address: first_address + offset as u64,
                    crc: *crc,
                };
                let lba = record.lba + offset as u64;
                let old = index.volume_mut(record.volume_id).set(lba, new);
                let old_kept = shared && index.shared_maps(record.volume_id, lba, old);
                changed(if old_kept { Entry::UNMAPPED } else { old }, new);
            }
        }
        RecordKind::Relocate | RecordKind::Bad if record.relocated_from != 0 => {
            // The cleaner moved (or found rotten) blocks that any number of
            // volumes may map: re-point every one that still does.
            let candidates = index.referrer_candidates(record.volume_id);
            for offset in 0..record.block_count {
                let lba = record.lba + u64::from(offset);
                let from = record.relocated_from + u64::from(offset);
                let new = if record.kind == RecordKind::Bad {
                    Entry::BAD
                } else {
                    Entry {
                        address: first_address + offset as u64,
                        crc: crcs[offset as usize],
                    }
                };
                if let Some(old) = index.repoint(&candidates, lba, from, new) {
                    changed(old, new);
                }
            }
        }
        RecordKind::Write | RecordKind::Relocate => unreachable!("guards above cover both"),
        RecordKind::Zero | RecordKind::Bad => {
            let new = if record.kind == RecordKind::Bad {
                Entry::BAD
            } else {
                Entry::UNMAPPED
            };
            let end = record.lba.saturating_add(u64::from(record.block_count));
            let targets: Vec<u64> = if record.kind == RecordKind::Bad {
                (record.lba..end).collect()
            } else {
                index
                    .volume(record.volume_id)
                    .map(|volume| volume.range(record.lba, end).map(|(lba, _)| lba).collect())
                    .unwrap_or_default()
            };
            for lba in targets {
                let old = index.volume_mut(record.volume_id).set(lba, new);
                let old_kept = shared && index.shared_maps(record.volume_id, lba, old);
                changed(if old_kept { Entry::UNMAPPED } else { old }, new);
            }
        }
        RecordKind::DeleteVolume => {
            if let Some(volume) = index.remove_volume(record.volume_id) {
                for (lba, old) in volume.iter() {
                    if !(shared && index.shared_maps(record.volume_id, lba, old)) {
                        changed(old, Entry::UNMAPPED);
                    }
                }
            }
            return;
        }
        RecordKind::Clone => {
            let source = record.lba;
            index.mark_shared(source);
            let released = index.volume_mut(record.volume_id).clear();
            for (lba, old) in released {
                if !index.shared_maps(record.volume_id, lba, old) {
                    changed(old, Entry::UNMAPPED);
                }
            }
            // The source's blocks are referenced already: no new ones.
            index.clone_volume(source, record.volume_id);
            index.prune(source);
        }
    }
    let volume = index.volume_mut(record.volume_id);
    volume.epoch_max = volume.epoch_max.max(record.epoch);
    volume.volume_sequence_max = volume.volume_sequence_max.max(record.volume_sequence);
    index.prune(record.volume_id);
}

const _: () = assert!(REQUEST_BLOCKS_MAX <= BATCH_DATA_BLOCKS_MAX);
