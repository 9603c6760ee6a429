//! Formatting a disk and opening a store: superblock, checkpoint, replay.
//!
//! Open is synchronous (`run_one` on the backend): it happens once per disk
//! at start-up, before the store serves anything.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::checkpoint::CheckpointState;
use super::clean::Cleaner;
use super::segments::SegmentTable;
use super::write::{apply_to_index, BATCH_BUFFER_BYTES};
use super::{LogHead, Store, StoreStats};
use crate::buf::IoBuf;
use crate::checkpoint::{decode_payload, encode_payload, CheckpointHeader, LogPosition, CHECKPOINT_HEADER_BYTES};
use crate::codec::align_up;
use crate::error::{FormatError, IoFault, StoreError};
use crate::geometry::{Geometry, BLOCK_BYTES, BLOCK_SIZE_BYTES, SUPERBLOCK_B_OFFSET_BYTES};
use crate::index::Index;
use crate::io::{run_one, BlockIo, IoOp};
use crate::record::{block_crc, data_crc_of_block_crcs, BatchHeader, BATCH_DATA_BLOCKS_MAX};
use crate::superblock::{Superblock, SUPERBLOCK_BYTES};

const BLOCK: usize = BLOCK_BYTES;
/// Replay reads the log in windows of this size.
const REPLAY_WINDOW_BYTES: usize = 4 << 20;
const OPEN_TOKEN: u64 = 1;

/// Identity and layout of a disk to format.
#[derive(Clone, Debug)]
pub struct FormatParams {
    pub disk_size_bytes: u64,
    pub segment_size_bytes: u64,
    pub cluster_uuid: [u8; 16],
    pub node_uuid: [u8; 16],
    pub disk_uuid: [u8; 16],
    pub created_unix_seconds: u64,
}

/// How to run an opened store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Name used in messages (the device path).
    pub disk_name: String,
    /// Refuse the disk unless its superblock names this node (None: any).
    pub node_uuid: Option<[u8; 16]>,
    /// Random per open; written in every batch header.
    pub open_nonce: u64,
    /// Batch writes submitted and not yet complete, at most.
    pub pipeline_depth: usize,
    /// Log blocks written between checkpoints (bounds replay time); the
    /// store spaces them further when the index is large
    /// (`CHECKPOINT_LOG_RATIO`).
    pub checkpoint_interval_blocks: u64,
    /// Percent of segment space user data may fill; the rest lets the
    /// cleaner work with bounded write amplification.
    pub fill_limit_percent: u64,
    /// Write batches with FUA (RWF_DSYNC), durable on completion, instead
    /// of write + flush: one device round trip less per group commit.
    pub durable_writes: bool,
    /// Reads of at least this many blocks whose data lies scattered are
    /// written back in logical order (see `Store::resequence`); 0: never.
    pub resequence_read_blocks_min: u64,
    /// Bytes of freed segments discarded per `Store::interval` at most
    /// (`store::discard`); 0: the device is never sent a discard.
    pub discard_bytes_per_interval: u64,
    /// Bytes a checkpoint may take, when less than its slot: only tests
    /// set it, to reach a slot's limit on a small disk.
    pub checkpoint_room_bytes: Option<u64>,
    /// Where a checkpoint's payload is encoded (the node: `Background`).
    pub checkpoint_encoding: CheckpointEncoding,
}

/// Where a checkpoint's payload (the whole index) is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointEncoding {
    /// On the thread driving the store, when the checkpoint starts: the
    /// store's behaviour is a function of its inputs alone (the
    /// simulated-disk tests replay it step by step). The thread stops for
    /// the encoding: 6-9 ms per GiB of volume data mapped (measured by the
    /// criterion bench `checkpoint payload`).
    Inline,
    /// On a thread of its own, from a copy of the index frozen when the
    /// checkpoint starts (chunks are shared and copied on write, so the
    /// copy costs a pointer per 4 MiB mapped); the store takes the payload
    /// at its first `tick` after the encoding ends. The thread driving the
    /// store (a reactor) never stops for it: on a full 1 TiB disk the
    /// encoding takes seconds. A chunk written while the copy lives is
    /// copied once (at most the index's size again, briefly).
    Background,
}

/// Discard pace by default: 256 MiB per interval, 2.5 GiB/s on the node's
/// 100 ms interval, one request of at most 64 MiB (8 default segments) at a
/// time. A whole free 1 TiB is told to the device in under 7 minutes.
pub const DISCARD_BYTES_PER_INTERVAL_DEFAULT: u64 = 256 << 20;

impl StoreConfig {
    /// Defaults: pipeline of 8 batches written with FUA (a QD8 stream of
    /// 1 MiB writes keeps the device busy: with 2, sequential writes ran at
    /// 0.67x the raw device, with 8 at about 0.9x), checkpoint every
    /// 1 GiB of log, user data up to 85 % of segment space, reads of
    /// 64 KiB or more re-sequenced when scattered, checkpoints encoded
    /// inline (`CheckpointEncoding`; the node encodes them in the background).
    #[must_use]
    pub fn new(disk_name: impl Into<String>, node_uuid: Option<[u8; 16]>, open_nonce: u64) -> Self {
        Self {
            disk_name: disk_name.into(),
            node_uuid,
            open_nonce,
            pipeline_depth: 8,
            checkpoint_interval_blocks: (1 << 30) / BLOCK_SIZE_BYTES,
            fill_limit_percent: 85,
            durable_writes: true,
            resequence_read_blocks_min: 16,
            discard_bytes_per_interval: DISCARD_BYTES_PER_INTERVAL_DEFAULT,
            checkpoint_room_bytes: None,
            checkpoint_encoding: CheckpointEncoding::Inline,
        }
    }
}

/// The chain checksum the first batch of a freshly formatted disk carries;
/// derived from the disk uuid so batches left by an earlier format never chain.
#[must_use]
pub fn chain_seed(disk_uuid: &[u8; 16]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(b"ballast-log-chain"), disk_uuid)
}

struct Opener<'a, B: BlockIo> {
    io: &'a mut B,
    name: String,
}

impl<B: BlockIo> Opener<'_, B> {
    fn io_error(&self, offset_bytes: u64, fault: IoFault) -> StoreError {
        StoreError::Io {
            disk: self.name.clone(),
            offset_bytes,
            fault,
        }
    }

    fn format_error(&self, source: FormatError) -> StoreError {
        StoreError::Format {
            disk: self.name.clone(),
            source,
        }
    }

    fn read(&mut self, offset_bytes: u64, len: usize) -> Result<IoBuf, StoreError> {
        let buf = IoBuf::new(len);
        let done = run_one(self.io, OPEN_TOKEN, IoOp::Read { offset_bytes, buf });
        done.result.map_err(|fault| self.io_error(offset_bytes, fault))?;
        Ok(done.buf.expect("read returns its buffer"))
    }

    fn write(&mut self, offset_bytes: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut buf = IoBuf::new(bytes.len());
        buf.as_mut_slice().copy_from_slice(bytes);
        let done = run_one(self.io, OPEN_TOKEN, IoOp::Write { offset_bytes, buf });
        done.result.map_err(|fault| self.io_error(offset_bytes, fault))
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let done = run_one(self.io, OPEN_TOKEN, IoOp::Flush);
        done.result.map_err(|fault| self.io_error(0, fault))
    }

    fn superblock(&mut self) -> Result<Superblock, StoreError> {
        const _: () = assert!(SUPERBLOCK_B_OFFSET_BYTES == SUPERBLOCK_BYTES as u64);
        let both = self.read(0, 2 * SUPERBLOCK_BYTES)?;
        let a = Superblock::decode(&both.as_slice()[..SUPERBLOCK_BYTES]);
        let b = Superblock::decode(&both.as_slice()[SUPERBLOCK_BYTES..]);
        Superblock::choose(a, b).map_err(|error| self.format_error(error))
    }

    /// Writes a checkpoint synchronously (format only).
    fn write_checkpoint(
        &mut self,
        geometry: &Geometry,
        slot: usize,
        header: CheckpointHeader,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let base = geometry.checkpoint_slot_offset_bytes(slot);
        self.write(base + CHECKPOINT_HEADER_BYTES as u64, payload)?;
        self.flush()?;
        self.write(base, &header.encode())?;
        self.flush()
    }

    /// Durably zeroes the two blocks where a batch continuing the log after
    /// `head` would start: the head's position and block 0 of its next
    /// segment. Replay ended because neither holds a batch that chains, but
    /// one may hold a batch the crash tore (a sector of older bytes, or data
    /// that fails its crc). This life writes its first batch there with the
    /// same sequence and chain checksum; if a crash tore that write too, its
    /// sectors could complete the old header (sectors past the records are
    /// zero in both, and data may repeat) and replay would apply records
    /// nobody acknowledged, after this life served data without them. Once
    /// both blocks are durably zero, no mix of old and new sectors is the
    /// old header. A crash during this erase loses nothing: nothing was
    /// served yet.
    fn erase_unchained_headers(&mut self, geometry: &Geometry, head: &LogHead) -> Result<(), StoreError> {
        let zero = [0u8; BLOCK];
        if head.offset_blocks < geometry.segment_blocks() {
            let at = geometry.block_address(head.segment, head.offset_blocks);
            self.write(Geometry::address_bytes(at), &zero)?;
        }
        let at = geometry.block_address(head.next_segment, 0);
        self.write(Geometry::address_bytes(at), &zero)?;
        self.flush()
    }

    /// Reads and validates one slot: header and payload.
    fn checkpoint(
        &mut self,
        geometry: &Geometry,
        slot: usize,
    ) -> Result<(CheckpointHeader, crate::checkpoint::DecodedPayload), StoreError> {
        let base = geometry.checkpoint_slot_offset_bytes(slot);
        let block = self.read(base, CHECKPOINT_HEADER_BYTES)?;
        let header = CheckpointHeader::decode(block.as_slice()).map_err(|error| self.format_error(error))?;
        let max_payload = geometry.checkpoint_slot_bytes - CHECKPOINT_HEADER_BYTES as u64;
        if header.payload_bytes > max_payload || header.segment_count != geometry.segment_count {
            return Err(self.format_error(FormatError::BadField {
                what: "checkpoint payload_bytes",
                value: header.payload_bytes,
            }));
        }
        let padded = usize::try_from(align_up(header.payload_bytes, BLOCK_SIZE_BYTES)).expect("bounded by slot size");
        let payload = self.read(base + CHECKPOINT_HEADER_BYTES as u64, padded)?;
        let bytes = &payload.as_slice()[..usize::try_from(header.payload_bytes).expect("bounded")];
        let computed = crc32c::crc32c(bytes);
        if computed != header.payload_crc {
            return Err(self.format_error(FormatError::BadChecksum {
                what: "checkpoint payload",
                stored: header.payload_crc,
                computed,
            }));
        }
        let decoded = decode_payload(&header, bytes, |address| geometry.segment_of(address).is_some())
            .map_err(|error| self.format_error(error))?;
        Ok((header, decoded))
    }
}

/// A batch found valid during replay.
struct ReplayedBatch {
    header: BatchHeader,
    crc: u32,
    block_crcs: Vec<Vec<u32>>,
    /// Per record: its data does not match its data_crc (torn or rotten).
    damaged: Vec<bool>,
}

/// Reads the log in windows during replay.
struct LogReader {
    window: Option<(u32, u32, IoBuf)>,
}

impl LogReader {
    /// Bytes of blocks `offset..offset+count` of `segment`, read if needed.
    fn blocks<B: BlockIo>(
        &mut self,
        opener: &mut Opener<'_, B>,
        geometry: &Geometry,
        segment: u32,
        offset: u32,
        count: u32,
    ) -> Result<&[u8], StoreError> {
        let cached = self.window.as_ref().is_some_and(|(s, start, buf)| {
            *s == segment && *start <= offset && (offset + count - *start) as usize * BLOCK <= buf.len()
        });
        if !cached {
            let room = geometry.segment_blocks() - offset;
            let window_blocks = (REPLAY_WINDOW_BYTES / BLOCK).min(room as usize);
            let offset_bytes = Geometry::address_bytes(geometry.block_address(segment, offset));
            let buf = opener.read(offset_bytes, window_blocks * BLOCK)?;
            self.window = Some((segment, offset, buf));
        }
        let (_, start, buf) = self.window.as_ref().expect("just filled");
        let from = (offset - start) as usize * BLOCK;
        Ok(&buf.as_slice()[from..from + count as usize * BLOCK])
    }

    /// The batch at (`segment`, `offset`) if it validly continues the chain at `head`.
    fn batch<B: BlockIo>(
        &mut self,
        opener: &mut Opener<'_, B>,
        geometry: &Geometry,
        head: &LogHead,
        segment: u32,
        offset: u32,
    ) -> Result<Option<ReplayedBatch>, StoreError> {
        let segment_blocks = geometry.segment_blocks();
        if segment >= geometry.segment_count || offset >= segment_blocks {
            return Ok(None);
        }
        let block = self.blocks(opener, geometry, segment, offset, 1)?;
        let Ok((header, crc)) = BatchHeader::decode(block) else {
            return Ok(None);
        };
        let data_blocks = header.data_block_count();
        let chained = header.sequence == head.sequence
            && header.previous_header_crc == head.previous_crc
            && header.segment_index == segment
            && header.next_segment_index < geometry.segment_count
            && header.next_segment_index != segment
            && data_blocks <= BATCH_DATA_BLOCKS_MAX
            && u64::from(offset) + 1 + u64::from(data_blocks) <= u64::from(segment_blocks)
            && header.records.iter().all(|r| {
                r.lba
                    .checked_add(u64::from(r.block_count))
                    .is_some_and(|end| end <= crate::LBA_LIMIT)
            });
        if !chained {
            return Ok(None);
        }
        let data = self.blocks(opener, geometry, segment, offset + 1, data_blocks.max(1))?;
        let mut block_crcs = Vec::with_capacity(header.records.len());
        let mut damaged = Vec::with_capacity(header.records.len());
        let mut at = 0usize;
        for record in &header.records {
            let blocks = record.data_blocks() as usize;
            let crcs: Vec<u32> = data[at * BLOCK..(at + blocks) * BLOCK]
                .chunks_exact(BLOCK)
                .map(block_crc)
                .collect();
            damaged.push(record.kind.has_data() && data_crc_of_block_crcs(crcs.iter().copied()) != record.data_crc);
            at += blocks;
            block_crcs.push(crcs);
        }
        Ok(Some(ReplayedBatch {
            header,
            crc,
            block_crcs,
            damaged,
        }))
    }

    /// The batch that continues the log after `head`: at the head's
    /// position, or at block 0 of its next segment.
    fn next<B: BlockIo>(
        &mut self,
        opener: &mut Opener<'_, B>,
        geometry: &Geometry,
        head: &LogHead,
    ) -> Result<Option<(u32, u32, ReplayedBatch)>, StoreError> {
        if let Some(batch) = self.batch(opener, geometry, head, head.segment, head.offset_blocks)? {
            return Ok(Some((head.segment, head.offset_blocks, batch)));
        }
        Ok(self
            .batch(opener, geometry, head, head.next_segment, 0)?
            .map(|batch| (head.next_segment, 0, batch)))
    }

    /// Whether the log goes on validly for `count` batches after `head`
    /// (their data is not checked: it may have rotted too).
    fn continues_for<B: BlockIo>(
        &mut self,
        opener: &mut Opener<'_, B>,
        geometry: &Geometry,
        head: &LogHead,
        count: u16,
    ) -> Result<bool, StoreError> {
        let mut head = *head;
        for _ in 0..count {
            match self.next(opener, geometry, &head)? {
                Some((segment, offset, batch)) => head = head_after(&head, segment, offset, &batch),
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// The log head after `batch`, found at (`segment`, `offset`).
fn head_after(head: &LogHead, segment: u32, offset: u32, batch: &ReplayedBatch) -> LogHead {
    LogHead {
        segment,
        offset_blocks: offset + 1 + batch.header.data_block_count(),
        next_segment: batch.header.next_segment_index,
        sequence: head.sequence + 1,
        previous_crc: batch.crc,
    }
}

impl Store {
    /// Formats a disk: both superblock copies and both checkpoint slots.
    pub fn format(io: &mut impl BlockIo, params: &FormatParams, disk_name: &str) -> Result<Superblock, StoreError> {
        let mut opener = Opener {
            io,
            name: disk_name.to_owned(),
        };
        let geometry = Geometry::compute(params.disk_size_bytes, params.segment_size_bytes)
            .map_err(|error| opener.format_error(error))?;
        let superblock = Superblock {
            generation: 1,
            cluster_uuid: params.cluster_uuid,
            node_uuid: params.node_uuid,
            disk_uuid: params.disk_uuid,
            geometry,
            created_unix_seconds: params.created_unix_seconds,
        };
        let segment_count = geometry.segment_count;
        let last_sequences = vec![0u64; segment_count as usize];
        let plan = crate::checkpoint::PayloadPlan::new(&Index::default(), segment_count);
        let len = plan.bytes();
        let mut payload = vec![0u8; usize::try_from(align_up(len as u64, BLOCK_SIZE_BYTES)).expect("fits")];
        let (_, payload_crc, volume_count) = encode_payload(&Index::default(), &plan, &last_sequences, &mut payload);
        let position = LogPosition {
            sequence: 1,
            previous_crc: chain_seed(&params.disk_uuid),
            segment_index: 0,
            offset_blocks: 0,
            next_segment_index: 1,
        };
        for (slot, checkpoint_sequence) in [(0usize, 1u64), (1, 2)] {
            let header = CheckpointHeader {
                checkpoint_sequence,
                log: position,
                payload_bytes: len as u64,
                payload_crc,
                segment_count,
                volume_count,
                payload_format: crate::checkpoint::PAYLOAD_FORMAT,
            };
            opener.write_checkpoint(&geometry, slot, header, &payload)?;
        }
        // Superblocks last: a disk with a superblock always has checkpoints.
        opener.write(0, &superblock.encode())?;
        opener.flush()?;
        opener.write(SUPERBLOCK_B_OFFSET_BYTES, &superblock.encode())?;
        opener.flush()?;
        Ok(superblock)
    }

    /// Reads and validates the superblock without opening the store.
    pub fn read_superblock(io: &mut impl BlockIo, disk_name: &str) -> Result<Superblock, StoreError> {
        Opener {
            io,
            name: disk_name.to_owned(),
        }
        .superblock()
    }

    /// Opens a formatted disk: picks the newest valid checkpoint, replays the
    /// log after it up to the first batch that is torn or does not chain.
    pub fn open(io: &mut impl BlockIo, config: StoreConfig) -> Result<Store, StoreError> {
        let mut opener = Opener {
            io,
            name: config.disk_name.clone(),
        };
        let superblock = opener.superblock()?;
        if let Some(expected) = config.node_uuid {
            if superblock.node_uuid != expected {
                return Err(StoreError::WrongNode {
                    disk: config.disk_name.clone(),
                    found: hex(&superblock.node_uuid),
                    expected: hex(&expected),
                });
            }
        }
        let geometry = superblock.geometry;
        let slot_results = [opener.checkpoint(&geometry, 0), opener.checkpoint(&geometry, 1)];
        let mut order = [0usize, 1];
        let sequence_of = |slot: usize| slot_results[slot].as_ref().map_or(0, |(h, _)| h.checkpoint_sequence);
        if sequence_of(1) > sequence_of(0) {
            order = [1, 0];
        }
        let chosen = order.into_iter().find(|&slot| slot_results[slot].is_ok());
        let Some(chosen) = chosen else {
            let [first, _] = slot_results;
            return Err(first.err().expect("both slots failed"));
        };
        for (slot, result) in slot_results.iter().enumerate() {
            if let Err(error) = result {
                tracing::warn!(disk = %config.disk_name, slot, %error, "checkpoint slot unusable");
            }
        }
        let slots = [
            slot_results[0].as_ref().ok().map(|(h, _)| *h),
            slot_results[1].as_ref().ok().map(|(h, _)| *h),
        ];
        let [result0, result1] = slot_results;
        let (header, decoded) = if chosen == 0 { result0 } else { result1 }.expect("chosen slot is valid");
        let mut index = decoded.index;
        let mut last_sequences = decoded.segment_last_sequence;
        let (head, rotten_blocks, damaged_tail) =
            replay(&mut opener, &geometry, header.log, &mut index, &mut last_sequences)?;
        if head.segment >= geometry.segment_count
            || head.next_segment >= geometry.segment_count
            || head.segment == head.next_segment
        {
            return Err(opener.format_error(FormatError::BadField {
                what: "log head segment",
                value: u64::from(head.segment),
            }));
        }
        opener.erase_unchained_headers(&geometry, &head)?;
        let folded = index.share_identical_chunks();
        if folded > 0 {
            tracing::info!(disk = %config.disk_name, chunks = folded, "index chunks shared again between clones");
        }
        let live = count_live_blocks(&index, &geometry);
        let floor = match slots {
            [Some(a), Some(b)] => a.log.sequence.min(b.log.sequence),
            _ => 0,
        };
        let segments = SegmentTable::new(last_sequences, live, head.segment, head.next_segment, floor);
        let buffers = (0..config.pipeline_depth + 2)
            .map(|_| IoBuf::new(BATCH_BUFFER_BYTES))
            .collect();
        tracing::info!(
            disk = %config.disk_name,
            checkpoint = header.checkpoint_sequence,
            replayed_batches = head.sequence - header.log.sequence,
            volumes = index.volume_count(),
            "store opened"
        );
        let mut store = Store {
            checkpoint: CheckpointState::new(slots),
            superblock,
            geometry,
            index,
            segments,
            durable_sequence: head.sequence - 1,
            log: head,
            open: None,
            sealed: VecDeque::new(),
            inflight: BTreeMap::new(),
            flush_in_flight: None,
            flush_count: 0,
            flush_waiters: Vec::new(),
            free_buffers: buffers,
            user_backlog: VecDeque::new(),
            relocation_backlog: VecDeque::new(),
            resequence_backlog: VecDeque::new(),
            reads: HashMap::new(),
            next_read_id: 0,
            deferred_reads: Vec::new(),
            cleaner: Cleaner::default(),
            background: super::Background::default(),
            discards: super::Discards::default(),
            failed: None,
            damaged_tail,
            stats: StoreStats {
                checksum_errors: rotten_blocks,
                ..StoreStats::default()
            },
            done: Vec::new(),
            config,
        };
        store.start_discards();
        Ok(store)
    }
}

/// Replays the log from `start`; returns the head after the last valid
/// batch, how many blocks replay found rotten (now bad in the index), and
/// whether it ended at a damaged batch.
///
/// A batch whose data fails its checksum was torn by a crash (never
/// acknowledged: replay ends there), or was durable and rotted since: the
/// log then goes on through the batch `durable_window` ahead of it, which
/// was not written before it was durable. Its damaged records' blocks
/// become bad (reads fail until a replica repairs them) and replay goes on,
/// so one rotten block does not cost every write after it.
fn replay<B: BlockIo>(
    opener: &mut Opener<'_, B>,
    geometry: &Geometry,
    start: LogPosition,
    index: &mut Index,
    last_sequences: &mut [u64],
) -> Result<(LogHead, u64, bool), StoreError> {
    let mut head = LogHead {
        segment: start.segment_index,
        offset_blocks: start.offset_blocks,
        next_segment: start.next_segment_index,
        sequence: start.sequence,
        previous_crc: start.previous_crc,
    };
    let mut reader = LogReader { window: None };
    let mut rotten_blocks = 0u64;
    let mut damaged_tail = false;
    while let Some((segment, offset, batch)) = reader.next(opener, geometry, &head)? {
        let after = head_after(&head, segment, offset, &batch);
        if batch.damaged.iter().any(|damaged| *damaged) {
            let window = batch.header.durable_window;
            if window == 0 || !reader.continues_for(opener, geometry, &after, window)? {
                // Torn by a crash (never acknowledged), or rot too close to
                // the end to tell (`Store::replay_ended_at_damage`).
                damaged_tail = true;
                break;
            }
            let blocks: u64 = batch
                .header
                .records
                .iter()
                .zip(&batch.damaged)
                .filter(|(_, damaged)| **damaged)
                .map(|(record, _)| u64::from(record.block_count))
                .sum();
            tracing::error!(disk = %opener.name, sequence = batch.header.sequence, blocks, "replay: data of a durable batch fails its checksum (rot); its blocks are marked bad and replay goes on");
            rotten_blocks += blocks;
        }
        let mut data_offset = offset + 1;
        for ((record, crcs), damaged) in batch.header.records.iter().zip(&batch.block_crcs).zip(&batch.damaged) {
            if *damaged {
                let bad = crate::record::Record {
                    kind: crate::record::RecordKind::Bad,
                    ..*record
                };
                apply_to_index(index, &bad, 0, &[], |_, _| {});
            } else {
                let first_address = if record.kind.has_data() {
                    geometry.block_address(segment, data_offset)
                } else {
                    0
                };
                apply_to_index(index, record, first_address, crcs, |_, _| {});
            }
            data_offset += record.data_blocks();
        }
        last_sequences[segment as usize] = batch.header.sequence;
        head = after;
    }
    Ok((head, rotten_blocks, damaged_tail))
}

/// Live blocks of each segment: every data block some volume maps, a
/// block shared by clones once (counted for the shared volume of lowest id).
pub(super) fn count_live_blocks(index: &Index, geometry: &Geometry) -> Vec<u32> {
    let mut live = vec![0u32; geometry.segment_count as usize];
    let mut shared_before: Vec<u64> = Vec::new();
    for id in index.volume_ids() {
        let volume = index.volume(id).expect("listed");
        for (lba, entry) in volume.iter() {
            let counted = volume.is_shared()
                && shared_before
                    .iter()
                    .any(|&other| index.get(other, lba).address == entry.address);
            if entry.is_data() && !counted {
                live[geometry.segment_of(entry.address).expect("validated") as usize] += 1;
            }
        }
        if volume.is_shared() {
            shared_before.push(id);
        }
    }
    live
}

fn hex(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const _: () = assert!(BATCH_BUFFER_BYTES == BLOCK * (1 + BATCH_DATA_BLOCKS_MAX as usize));
