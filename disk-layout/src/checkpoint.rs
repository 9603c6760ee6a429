//! Checkpoints: the index and segment table at one log position, so that
//! start-up replays only the log written after it.
//!
//! Two slots (see `geometry`), written alternately; a checkpoint is written
//! as payload, flush, header, flush, so a header is never valid before its
//! payload is durable. On open the valid slot with the higher sequence wins;
//! if its payload fails its checksum the other slot is used. Segments are
//! reused only when both slots' log positions are past them, so either slot
//! is always a sound starting point for replay.
//!
//! Header block (first 4096 bytes of a slot):
//! ```text
//! offset size field
//!      0    8 magic "BLSTCKP2" (payload format 1: "BLSTCKPT", read only)
//!      8    4 crc32c of the 4096-byte block with this field zeroed
//!     12    4 payload_format = 2 (zero with the old magic: format 1)
//!     16    8 checkpoint_sequence (+1 per checkpoint)
//!     24    8 log_sequence: sequence of the first batch replay expects
//!     32    4 log_previous_crc: header crc of the batch before it
//!     36    4 log_segment_index where replay starts
//!     40    4 log_offset_blocks within that segment
//!     44    4 log_next_segment_index (replay continues there at offset 0)
//!     48    8 payload_bytes
//!     56    4 payload_crc (crc32c of the payload bytes)
//!     60    4 segment_count
//!     64    8 volume_count
//!     72 4024 zero
//! ```
//!
//! Payload format 2 (starts at the slot's second block):
//! ```text
//! segment_count x u64   last batch sequence written in each segment (0 = never)
//! volume_count x {
//!     u64 volume_id, u64 run_count | SHARED | BASED, u64 epoch_max, u64 volume_sequence_max
//!         (SHARED = bit 63: the volume was cloned or is a clone, and may map
//!         disk blocks that other shared volumes map too; BASED = bit 62)
//!     [u64 base_volume_id]  BASED only: a shared volume written earlier;
//!                           the runs are where this map differs from its
//!     run_count x {         (lba ascending, runs do not overlap)
//!         u64 head: lba (bits 0..40) | len - 1 (bits 40..50, len <= 1024)
//!                   | address bits 32..40 (bits 50..58)
//!                   | UNMAPPED (bit 58) | zero (59..64)
//!         UNMAPPED (BASED volumes only): the blocks are unmapped here; the
//!             head is the whole run. Otherwise:
//!         u32 address bits 0..32: block lba + i lives at address + i
//!             (0xFF_FFFF_FFFF: a bad block, len 1)
//!         len x u32 crc     crc32c of each block's data
//!     }
//! }
//! ```
//! A run costs 12 bytes plus 4 per block, so a block costs at most 16 bytes
//! (a run of one), as a mapping of format 1 did: slots sized for format 1
//! hold format 2. A snapshot or clone is written against a base (the
//! volume it shares most chunks with in memory, when that is cheaper than
//! writing it alone), so it costs what differs, not a second copy of the
//! map. Format 1 had `mapping_count x { u64 lba, u32 address
//! (0xFFFFFFFF = bad), u32 crc }` in place of the runs.

use crate::codec::{crc32c_with_hole, get_u32, get_u64, low_32, put_u32, put_u64};
use crate::error::FormatError;
use crate::geometry::BLOCK_BYTES;
use crate::index::{Entry, Index, VolumeIndex, ADDRESS_UNMAPPED, CHUNK_BLOCKS};

/// Magic of a checkpoint header of payload format 1 (read, never written).
pub const CHECKPOINT_MAGIC_V1: [u8; 8] = *b"BLSTCKPT";
/// Magic of the headers written now; their payload format is at offset 12.
/// A new magic, so that a ballast that reads only format 1 finds no valid
/// checkpoint in a slot of format 2 rather than misreading it.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"BLSTCKP2";

const MAGIC: usize = 0;
const CRC: usize = MAGIC + 8;
const PAYLOAD_FORMAT_AT: usize = CRC + 4;
const SEQUENCE: usize = PAYLOAD_FORMAT_AT + 4;
const LOG_SEQUENCE: usize = SEQUENCE + 8;
const LOG_PREVIOUS_CRC: usize = LOG_SEQUENCE + 8;
const LOG_SEGMENT: usize = LOG_PREVIOUS_CRC + 4;
const LOG_OFFSET: usize = LOG_SEGMENT + 4;
const LOG_NEXT_SEGMENT: usize = LOG_OFFSET + 4;
const PAYLOAD_BYTES: usize = LOG_NEXT_SEGMENT + 4;
const PAYLOAD_CRC: usize = PAYLOAD_BYTES + 8;
const SEGMENT_COUNT: usize = PAYLOAD_CRC + 4;
const VOLUME_COUNT: usize = SEGMENT_COUNT + 4;
const END: usize = VOLUME_COUNT + 8;
const _: () = assert!(END == 72);

/// Size of a checkpoint header.
pub const CHECKPOINT_HEADER_BYTES: usize = BLOCK_BYTES;
const VOLUME_HEADER_BYTES: usize = 32;
const MAPPING_BYTES: usize = 16;
/// Flag in a volume's mapping_count: the volume is shared (see `Index`).
const SHARED_FLAG: u64 = 1 << 63;
/// Flag in a volume's run_count (format 2): a base volume's id follows the
/// header, and the runs are where the volume's map differs from the base's.
const BASED_FLAG: u64 = 1 << 62;
const BASE_ID_BYTES: usize = 8;

/// Where replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    pub sequence: u64,
    pub previous_crc: u32,
    pub segment_index: u32,
    pub offset_blocks: u32,
    pub next_segment_index: u32,
}

/// A decoded checkpoint header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub checkpoint_sequence: u64,
    pub log: LogPosition,
    pub payload_bytes: u64,
    pub payload_crc: u32,
    pub segment_count: u32,
    pub volume_count: u64,
    /// 1 or 2 (`PAYLOAD_FORMAT`, the one written).
    pub payload_format: u32,
}

impl CheckpointHeader {
    /// Encodes into one 4096-byte block.
    #[must_use]
    pub fn encode(&self) -> [u8; CHECKPOINT_HEADER_BYTES] {
        let mut block = [0u8; CHECKPOINT_HEADER_BYTES];
        // The store writes only `PAYLOAD_FORMAT`; a format 1 header encodes
        // as format 1 wrote it (the old magic, zero at offset 12).
        if self.payload_format == 1 {
            block[MAGIC..MAGIC + 8].copy_from_slice(&CHECKPOINT_MAGIC_V1);
        } else {
            block[MAGIC..MAGIC + 8].copy_from_slice(&CHECKPOINT_MAGIC);
            put_u32(&mut block, PAYLOAD_FORMAT_AT, self.payload_format);
        }
        put_u64(&mut block, SEQUENCE, self.checkpoint_sequence);
        put_u64(&mut block, LOG_SEQUENCE, self.log.sequence);
        put_u32(&mut block, LOG_PREVIOUS_CRC, self.log.previous_crc);
        put_u32(&mut block, LOG_SEGMENT, self.log.segment_index);
        put_u32(&mut block, LOG_OFFSET, self.log.offset_blocks);
        put_u32(&mut block, LOG_NEXT_SEGMENT, self.log.next_segment_index);
        put_u64(&mut block, PAYLOAD_BYTES, self.payload_bytes);
        put_u32(&mut block, PAYLOAD_CRC, self.payload_crc);
        put_u32(&mut block, SEGMENT_COUNT, self.segment_count);
        put_u64(&mut block, VOLUME_COUNT, self.volume_count);
        let crc = crc32c_with_hole(&block, CRC);
        put_u32(&mut block, CRC, crc);
        block
    }

    /// Decodes and checks one header block.
    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        assert!(block.len() >= CHECKPOINT_HEADER_BYTES);
        let block = &block[..CHECKPOINT_HEADER_BYTES];
        let magic = &block[MAGIC..MAGIC + 8];
        if magic != CHECKPOINT_MAGIC && magic != CHECKPOINT_MAGIC_V1 {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(block, CRC);
        let computed = crc32c_with_hole(block, CRC);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: "checkpoint header",
                stored,
                computed,
            });
        }
        let payload_format = if magic == CHECKPOINT_MAGIC_V1 {
            1
        } else {
            get_u32(block, PAYLOAD_FORMAT_AT)
        };
        if !(1..=PAYLOAD_FORMAT).contains(&payload_format) {
            return Err(FormatError::UnsupportedVersion {
                found: payload_format,
                supported: PAYLOAD_FORMAT,
                ballast: env!("CARGO_PKG_VERSION"),
            });
        }
        Ok(Self {
            payload_format,
            checkpoint_sequence: get_u64(block, SEQUENCE),
            log: LogPosition {
                sequence: get_u64(block, LOG_SEQUENCE),
                previous_crc: get_u32(block, LOG_PREVIOUS_CRC),
                segment_index: get_u32(block, LOG_SEGMENT),
                offset_blocks: get_u32(block, LOG_OFFSET),
                next_segment_index: get_u32(block, LOG_NEXT_SEGMENT),
            },
            payload_bytes: get_u64(block, PAYLOAD_BYTES),
            payload_crc: get_u32(block, PAYLOAD_CRC),
            segment_count: get_u32(block, SEGMENT_COUNT),
            volume_count: get_u64(block, VOLUME_COUNT),
        })
    }
}

/// Payload format written: runs with 40-bit addresses (see the module's
/// documentation). Format 1 (a mapping per block, 32-bit addresses) is read.
pub const PAYLOAD_FORMAT: u32 = 2;
/// Longest run of a format 2 payload (len - 1 takes 10 bits).
const RUN_BLOCKS_MAX: usize = 1024;
const RUN_HEAD_BYTES: usize = 12;
const LBA_BITS: u32 = 40;
const RUN_LEN_SHIFT: u32 = LBA_BITS;
const RUN_ADDRESS_HIGH_SHIFT: u32 = RUN_LEN_SHIFT + 10;
/// Bit of a run head marking a run of unmapped blocks (in a volume written
/// against a base): the head is all such a run takes.
const RUN_UNMAPPED_FLAG: u64 = 1 << (RUN_ADDRESS_HIGH_SHIFT + 8);
const UNMAPPED_RUN_BYTES: usize = 8;
const _: () = assert!(RUN_BLOCKS_MAX == 1 << (RUN_ADDRESS_HIGH_SHIFT - RUN_LEN_SHIFT));
const _: () = assert!(crate::LBA_LIMIT == 1 << LBA_BITS);

/// Groups entries into runs: blocks at consecutive LBAs whose data lies at
/// consecutive addresses, or that are all unmapped (in a volume written
/// against a base); a bad block is a run of its own; at most
/// `RUN_BLOCKS_MAX` long.
struct RunBuilder<F: FnMut(u64, &[Entry])> {
    first: u64,
    run: Vec<Entry>,
    each: F,
}

impl<F: FnMut(u64, &[Entry])> RunBuilder<F> {
    fn new(each: F) -> Self {
        Self {
            first: 0,
            run: Vec::with_capacity(RUN_BLOCKS_MAX),
            each,
        }
    }

    fn push(&mut self, lba: u64, entry: Entry) {
        let continues = self.run.last().is_some_and(|last| {
            self.first + self.run.len() as u64 == lba
                && self.run.len() < RUN_BLOCKS_MAX
                && ((last.is_data() && entry.is_data() && last.address + 1 == entry.address)
                    || (*last == Entry::UNMAPPED && entry == Entry::UNMAPPED))
        });
        if !continues {
            self.finish();
            self.first = lba;
        }
        self.run.push(entry);
    }

    fn finish(&mut self) {
        if !self.run.is_empty() {
            (self.each)(self.first, &self.run);
            self.run.clear();
        }
    }
}

/// Calls `each(first_lba, entries)` for every run `volume` is written as:
/// all its entries, or with a base, the entries where it differs from the
/// base's map (unmapped ones included), in LBA order.
fn for_each_run(volume: &VolumeIndex, base: Option<&VolumeIndex>, each: impl FnMut(u64, &[Entry])) {
    let mut runs = RunBuilder::new(each);
    match base {
        None => {
            for (lba, entry) in volume.iter() {
                runs.push(lba, entry);
            }
        }
        Some(base) => {
            let mut keys: Vec<u64> = volume.chunk_keys().chain(base.chunk_keys()).collect();
            keys.sort_unstable();
            keys.dedup();
            for key in keys {
                if volume.shares_chunk(base, key) {
                    continue;
                }
                let lba = key * CHUNK_BLOCKS;
                let mine = volume.entries(lba, CHUNK_BLOCKS);
                let theirs = base.entries(lba, CHUNK_BLOCKS);
                for (offset, (entry, base_entry)) in mine.iter().zip(&theirs).enumerate() {
                    if entry != base_entry {
                        runs.push(lba + offset as u64, *entry);
                    }
                }
            }
        }
    }
    runs.finish();
}

/// Chunks of a volume sampled to choose its base.
const BASE_SAMPLE_CHUNKS: usize = 64;

/// The volume `id`'s map is written against: among the shared volumes
/// written before it (`earlier`), the one sharing the most of a sample of
/// its chunks in memory (a snapshot and its volume share every chunk not
/// written since), if any shares one. A clone then costs the checkpoint
/// only what differs, not a second copy of the whole map: without this, a
/// snapshot of a volume filling the disk with random data would need twice
/// the room a checkpoint slot has.
fn base_candidate(index: &Index, id: u64, earlier: &[u64]) -> Option<u64> {
    let volume = index.volume(id)?;
    if !volume.is_shared() || volume.used_blocks() == 0 {
        return None;
    }
    let keys: Vec<u64> = volume.chunk_keys().collect();
    let step = keys.len().div_ceil(BASE_SAMPLE_CHUNKS).max(1);
    let sample: Vec<u64> = keys.iter().copied().step_by(step).collect();
    earlier
        .iter()
        .filter_map(|&other| {
            let candidate = index.volume(other).filter(|candidate| candidate.is_shared())?;
            let shared = sample
                .iter()
                .filter(|&&key| volume.shares_chunk(candidate, key))
                .count();
            (shared > 0).then_some((shared, other))
        })
        .max_by_key(|&(shared, other)| (shared, std::cmp::Reverse(other)))
        .map(|(_, other)| other)
}

/// Bytes the runs of `volume` take, written against `base` or alone.
fn runs_bytes(volume: &VolumeIndex, base: Option<&VolumeIndex>) -> usize {
    let mut len = 0;
    for_each_run(volume, base, |_, entries| len += run_bytes(entries));
    len
}

/// How `id` is written: against a base when one makes it cheaper than
/// alone (a snapshot against its volume: by far; a clone trimmed since, or
/// one sharing little: maybe not), and the bytes its runs take that way.
fn plan_volume(index: &Index, id: u64, earlier: &[u64]) -> (Option<u64>, usize) {
    let volume = index.volume(id).expect("listed");
    let Some(base) = base_candidate(index, id, earlier) else {
        return (None, runs_bytes(volume, None));
    };
    let against = runs_bytes(volume, index.volume(base)) + BASE_ID_BYTES;
    // Alone, every block costs at least its crc: only then can it be cheaper.
    let floor = usize::try_from(volume.used_blocks()).expect("fits in memory") * 4;
    if against < floor {
        return (Some(base), against);
    }
    let alone = runs_bytes(volume, None);
    if against < alone {
        (Some(base), against)
    } else {
        (None, alone)
    }
}

/// Bytes a run of `entries` takes (an unmapped run is its head alone).
fn run_bytes(entries: &[Entry]) -> usize {
    if entries[0] == Entry::UNMAPPED {
        UNMAPPED_RUN_BYTES
    } else {
        RUN_HEAD_BYTES + 4 * entries.len()
    }
}

/// How a payload of an index is written: each volume's base, chosen once
/// (the choice walks the volume's map), and the payload's size.
pub struct PayloadPlan {
    /// (volume id, base) in ascending id order.
    volumes: Vec<(u64, Option<u64>)>,
    bytes: usize,
}

impl PayloadPlan {
    /// Plans the payload of `index` with `segment_count` segments.
    #[must_use]
    pub fn new(index: &Index, segment_count: u32) -> Self {
        let mut bytes = segment_count as usize * 8;
        let ids = index.volume_ids();
        let mut volumes = Vec::with_capacity(ids.len());
        for (at, &id) in ids.iter().enumerate() {
            let (base, runs) = plan_volume(index, id, &ids[..at]);
            bytes += VOLUME_HEADER_BYTES + runs;
            volumes.push((id, base));
        }
        Self { volumes, bytes }
    }

    /// Bytes the payload takes.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Encodes the payload (format `PAYLOAD_FORMAT`) of `index` as `plan` (made
/// of the same index) says into `out` (at least `plan.bytes()`) and returns
/// (bytes written, crc, volume count).
pub fn encode_payload(
    index: &Index,
    plan: &PayloadPlan,
    segment_last_sequence: &[u64],
    out: &mut [u8],
) -> (usize, u32, u64) {
    let mut at = 0;
    for sequence in segment_last_sequence {
        put_u64(out, at, *sequence);
        at += 8;
    }
    for &(id, base) in &plan.volumes {
        let volume = index.volume(id).expect("planned");
        let header_at = at;
        put_u64(out, at, id);
        put_u64(out, at + 16, volume.epoch_max);
        put_u64(out, at + 24, volume.volume_sequence_max);
        at += VOLUME_HEADER_BYTES;
        if let Some(base) = base {
            put_u64(out, at, base);
            at += BASE_ID_BYTES;
        }
        let mut runs = 0u64;
        for_each_run(volume, base.and_then(|base| index.volume(base)), |lba, entries| {
            let address = entries[0].address;
            debug_assert!(lba < crate::LBA_LIMIT && address <= crate::index::ADDRESS_BAD);
            let head = lba | ((entries.len() as u64 - 1) << RUN_LEN_SHIFT);
            runs += 1;
            if address == ADDRESS_UNMAPPED {
                put_u64(out, at, head | RUN_UNMAPPED_FLAG);
                at += UNMAPPED_RUN_BYTES;
                return;
            }
            put_u64(out, at, head | ((address >> 32) << RUN_ADDRESS_HIGH_SHIFT));
            put_u32(out, at + 8, low_32(address));
            at += RUN_HEAD_BYTES;
            for entry in entries {
                put_u32(out, at, entry.crc);
                at += 4;
            }
        });
        let shared = if volume.is_shared() { SHARED_FLAG } else { 0 };
        let based = if base.is_some() { BASED_FLAG } else { 0 };
        put_u64(out, header_at + 8, runs | shared | based);
    }
    (at, crc32c::crc32c(&out[..at]), plan.volumes.len() as u64)
}

/// What a payload decodes into.
pub struct DecodedPayload {
    pub index: Index,
    pub segment_last_sequence: Vec<u64>,
}

/// Decodes a payload whose crc was already checked (format 1 or 2, as its
/// header says). `address_ok` says whether a mapped address lies inside
/// the disk's segments.
pub fn decode_payload(
    header: &CheckpointHeader,
    payload: &[u8],
    address_ok: impl Fn(u64) -> bool,
) -> Result<DecodedPayload, FormatError> {
    let bad = |what: &'static str, value: u64| FormatError::BadField { what, value };
    let len =
        usize::try_from(header.payload_bytes).map_err(|_| bad("checkpoint payload_bytes", header.payload_bytes))?;
    if payload.len() < len {
        return Err(bad("checkpoint payload_bytes", header.payload_bytes));
    }
    let payload = &payload[..len];
    let segments = header.segment_count as usize;
    if segments * 8 > payload.len() {
        return Err(bad("checkpoint segment_count", u64::from(header.segment_count)));
    }
    let segment_last_sequence = (0..segments).map(|i| get_u64(payload, i * 8)).collect();
    let mut at = segments * 8;
    let mut index = Index::default();
    let mut previous_id = None;
    for _ in 0..header.volume_count {
        if at + VOLUME_HEADER_BYTES > payload.len() {
            return Err(bad("checkpoint volume_count", header.volume_count));
        }
        let id = get_u64(payload, at);
        if previous_id.is_some_and(|previous| previous >= id) {
            return Err(bad("checkpoint volume order", id));
        }
        previous_id = Some(id);
        let count_and_flags = get_u64(payload, at + 8);
        let based = header.payload_format >= 2 && count_and_flags & BASED_FLAG != 0;
        let count = count_and_flags & !SHARED_FLAG & if header.payload_format >= 2 { !BASED_FLAG } else { !0 };
        if count_and_flags & SHARED_FLAG != 0 {
            index.mark_shared(id);
        }
        let (epoch_max, volume_sequence_max) = (get_u64(payload, at + 16), get_u64(payload, at + 24));
        at += VOLUME_HEADER_BYTES;
        if based {
            if at + BASE_ID_BYTES > payload.len() {
                return Err(bad("checkpoint base volume", id));
            }
            // The base was decoded already (ids ascend) and is shared, as
            // is the volume written against it.
            let base = get_u64(payload, at);
            at += BASE_ID_BYTES;
            let base_shared = index.volume(base).is_some_and(VolumeIndex::is_shared);
            if base >= id || !base_shared || count_and_flags & SHARED_FLAG == 0 {
                return Err(bad("checkpoint base volume", base));
            }
            index.clone_volume(base, id);
        }
        let volume = index.volume_mut(id);
        volume.epoch_max = epoch_max;
        volume.volume_sequence_max = volume_sequence_max;
        let count_usize = usize::try_from(count).map_err(|_| bad("checkpoint mapping_count", count))?;
        let smallest = if header.payload_format == 1 {
            MAPPING_BYTES
        } else {
            UNMAPPED_RUN_BYTES
        };
        if count_usize > (payload.len() - at) / smallest {
            return Err(bad("checkpoint mapping_count", count));
        }
        // The first LBA the next mapping or run may start at.
        let mut next_lba = 0;
        for _ in 0..count {
            let (lba, blocks, address, crcs_at, size) = if header.payload_format == 1 {
                if at + MAPPING_BYTES > payload.len() {
                    return Err(bad("checkpoint mapping_count", count));
                }
                let address = match get_u32(payload, at + 8) {
                    u32::MAX => crate::index::ADDRESS_BAD,
                    address => u64::from(address),
                };
                (get_u64(payload, at), 1, address, at + 12, MAPPING_BYTES)
            } else {
                if at + UNMAPPED_RUN_BYTES > payload.len() {
                    return Err(bad("checkpoint mapping_count", count));
                }
                let head = get_u64(payload, at);
                let unmapped = head & RUN_UNMAPPED_FLAG != 0;
                let high = (head >> RUN_ADDRESS_HIGH_SHIFT) & 0xFF;
                if head >> (RUN_ADDRESS_HIGH_SHIFT + 9) != 0 || (unmapped && high != 0) {
                    return Err(bad("checkpoint run head", head));
                }
                let blocks = ((head >> RUN_LEN_SHIFT) & (RUN_BLOCKS_MAX as u64 - 1)) + 1;
                let size = if unmapped {
                    UNMAPPED_RUN_BYTES
                } else {
                    RUN_HEAD_BYTES + 4 * usize::try_from(blocks).expect("at most 1024")
                };
                if at + size > payload.len() {
                    return Err(bad("checkpoint run length", blocks));
                }
                let address = if unmapped {
                    ADDRESS_UNMAPPED
                } else {
                    (high << 32) | u64::from(get_u32(payload, at + 8))
                };
                if !unmapped && address == ADDRESS_UNMAPPED {
                    return Err(bad("checkpoint mapping address", address));
                }
                (head & ((1 << LBA_BITS) - 1), blocks, address, at + RUN_HEAD_BYTES, size)
            };
            if lba < next_lba {
                return Err(bad("checkpoint mapping order", lba));
            }
            next_lba = lba
                .checked_add(blocks)
                .ok_or_else(|| bad("checkpoint mapping lba", lba))?;
            if address == ADDRESS_UNMAPPED {
                // Unmapped where the base maps: only in a volume with a base.
                if !based {
                    return Err(bad("checkpoint mapping address", address));
                }
                for offset in 0..blocks {
                    volume.set(lba + offset, Entry::UNMAPPED);
                }
                at += size;
                continue;
            }
            let data = address != crate::index::ADDRESS_BAD;
            if (!data && blocks != 1) || (data && !(address_ok(address) && address_ok(address + blocks - 1))) {
                return Err(bad("checkpoint mapping address", address));
            }
            for offset in 0..blocks {
                let crc = get_u32(payload, crcs_at + 4 * usize::try_from(offset).expect("at most 1024"));
                let address = if data { address + offset } else { address };
                volume.set(lba + offset, Entry { address, crc });
            }
            at += size;
        }
    }
    if at != payload.len() {
        return Err(bad("checkpoint payload trailing bytes", (payload.len() - at) as u64));
    }
    Ok(DecodedPayload {
        index,
        segment_last_sequence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(payload: &[u8], payload_crc: u32, volume_count: u64, segment_count: u32) -> CheckpointHeader {
        CheckpointHeader {
            checkpoint_sequence: 3,
            log: LogPosition {
                sequence: 10,
                previous_crc: 0xABCD,
                segment_index: 2,
                offset_blocks: 17,
                next_segment_index: 5,
            },
            payload_bytes: payload.len() as u64,
            payload_crc,
            segment_count,
            volume_count,
            payload_format: PAYLOAD_FORMAT,
        }
    }

    #[test]
    fn header_round_trips_and_detects_flips() {
        let h = header(&[0; 16], 7, 1, 2);
        let block = h.encode();
        assert_eq!(CheckpointHeader::decode(&block).unwrap(), h);
        for bit in (0..CHECKPOINT_HEADER_BYTES * 8).step_by(97) {
            let mut flipped = block;
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(CheckpointHeader::decode(&flipped).is_err(), "bit {bit}");
        }
    }

    /// A payload in format 1 (a mapping per block, 32-bit addresses), as
    /// ballast wrote it before format 2.
    fn encode_format_1(index: &Index, segments: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for sequence in segments {
            out.extend_from_slice(&sequence.to_le_bytes());
        }
        for id in index.volume_ids() {
            let volume = index.volume(id).unwrap();
            out.extend_from_slice(&id.to_le_bytes());
            let shared = if volume.is_shared() { SHARED_FLAG } else { 0 };
            out.extend_from_slice(&(volume.used_blocks() | shared).to_le_bytes());
            out.extend_from_slice(&volume.epoch_max.to_le_bytes());
            out.extend_from_slice(&volume.volume_sequence_max.to_le_bytes());
            for (lba, entry) in volume.iter() {
                let address = if entry.address == crate::index::ADDRESS_BAD {
                    u32::MAX
                } else {
                    u32::try_from(entry.address).unwrap()
                };
                out.extend_from_slice(&lba.to_le_bytes());
                out.extend_from_slice(&address.to_le_bytes());
                out.extend_from_slice(&entry.crc.to_le_bytes());
            }
        }
        out
    }

    fn sample_index() -> Index {
        let mut index = Index::default();
        let volume = index.volume_mut(7);
        volume.epoch_max = 3;
        volume.volume_sequence_max = 99;
        for lba in 0..600 {
            volume.set(
                lba,
                Entry {
                    address: 5000 + lba,
                    crc: 1 + u32::try_from(lba).unwrap(),
                },
            );
        }
        volume.set(700, Entry::BAD);
        volume.set(701, Entry::BAD);
        volume.set(702, Entry { address: 100, crc: 9 });
        index.mark_shared(7);
        index
    }

    fn listing(index: &Index) -> Vec<(u64, u64, Entry)> {
        index
            .volume_ids()
            .into_iter()
            .flat_map(|id| {
                index
                    .volume(id)
                    .unwrap()
                    .iter()
                    .map(move |(lba, entry)| (id, lba, entry))
            })
            .collect()
    }

    fn resealed(mut block: [u8; CHECKPOINT_HEADER_BYTES]) -> [u8; CHECKPOINT_HEADER_BYTES] {
        let crc = crc32c_with_hole(&block, CRC);
        put_u32(&mut block, CRC, crc);
        block
    }

    #[test]
    fn checkpoints_of_payload_format_1_are_still_read() {
        let index = sample_index();
        let payload = encode_format_1(&index, &[4, 5]);
        let mut h = header(&payload, 0, 1, 2);
        h.payload_format = 1;
        let decoded = decode_payload(&h, &payload, |_| true).unwrap();
        assert_eq!(listing(&decoded.index), listing(&index));
        assert!(decoded.index.volume(7).unwrap().is_shared());
        assert_eq!(decoded.segment_last_sequence, vec![4, 5]);
        // A format 1 header (old magic, zero at offset 12) decodes as format 1.
        let mut block = header(&payload, 0, 1, 2).encode();
        block[..8].copy_from_slice(&CHECKPOINT_MAGIC_V1);
        block[PAYLOAD_FORMAT_AT..PAYLOAD_FORMAT_AT + 4].fill(0);
        let block = resealed(block);
        assert_eq!(CheckpointHeader::decode(&block).unwrap(), h);
        assert_eq!(h.encode(), block, "and encodes back as format 1 wrote it");
    }

    #[test]
    fn a_payload_format_from_the_future_is_refused_by_name() {
        let mut block = header(&[], 0, 0, 0).encode();
        put_u32(&mut block, PAYLOAD_FORMAT_AT, PAYLOAD_FORMAT + 1);
        assert!(matches!(
            CheckpointHeader::decode(&resealed(block)),
            Err(FormatError::UnsupportedVersion { found, .. }) if found == PAYLOAD_FORMAT + 1
        ));
    }

    #[test]
    fn sequential_data_costs_a_run_head_per_1024_blocks_plus_its_crcs() {
        let index = sample_index();
        // 600 contiguous blocks: one run; two bad blocks and a lone block: three.
        let expected = 2 * 8 + VOLUME_HEADER_BYTES + 4 * RUN_HEAD_BYTES + 4 * 603;
        assert_eq!(PayloadPlan::new(&index, 2).bytes(), expected);
        let mut long = Index::default();
        for lba in 0..3000 {
            long.volume_mut(1).set(
                lba,
                Entry {
                    address: 10_000 + lba,
                    crc: 0,
                },
            );
        }
        assert_eq!(
            PayloadPlan::new(&long, 0).bytes(),
            VOLUME_HEADER_BYTES + 3 * RUN_HEAD_BYTES + 4 * 3000
        );
    }

    #[test]
    fn addresses_beyond_32_bits_and_lbas_up_to_the_limit_round_trip() {
        let mut index = Index::default();
        let high = (1u64 << 39) + 12_345;
        let last_lba = crate::LBA_LIMIT - 1;
        for offset in 0..5 {
            index.volume_mut(2).set(
                last_lba - 4 + offset,
                Entry {
                    address: high + offset,
                    crc: 7,
                },
            );
        }
        index.volume_mut(2).set(
            9,
            Entry {
                address: crate::geometry::DISK_BLOCKS_MAX,
                crc: 8,
            },
        );
        let plan = PayloadPlan::new(&index, 1);
        let len = plan.bytes();
        let mut out = vec![0u8; len];
        let (written, crc, volumes) = encode_payload(&index, &plan, &[1], &mut out);
        assert_eq!(written, len);
        let decoded = decode_payload(&header(&out, crc, volumes, 1), &out, |_| true).unwrap();
        assert_eq!(listing(&decoded.index), listing(&index));
    }

    fn round_trip(index: &Index) -> (usize, Index) {
        let plan = PayloadPlan::new(index, 1);
        let len = plan.bytes();
        let mut out = vec![0u8; len];
        let (written, crc, volumes) = encode_payload(index, &plan, &[1], &mut out);
        assert_eq!(written, len);
        let decoded = decode_payload(&header(&out, crc, volumes, 1), &out, |_| true).unwrap();
        assert_eq!(listing(&decoded.index), listing(index));
        for id in index.volume_ids() {
            assert_eq!(
                decoded.index.volume(id).unwrap().is_shared(),
                index.volume(id).unwrap().is_shared()
            );
        }
        (len, decoded.index)
    }

    #[test]
    fn a_snapshot_costs_the_checkpoint_only_what_differs_from_its_volume() {
        let mut index = Index::default();
        // Random data: every block its own run (16 bytes in a checkpoint).
        for lba in 0..4096 {
            let address = 10 + (lba * 389) % 4096;
            index.volume_mut(1).set(lba, Entry { address, crc: 5 });
        }
        let (alone, _) = round_trip(&index);
        index.clone_volume(1, 2);
        index.clone_volume(1, 3);
        let (with_snapshots, _) = round_trip(&index);
        assert_eq!(
            with_snapshots,
            alone + 2 * (VOLUME_HEADER_BYTES + BASE_ID_BYTES),
            "two snapshots not written to since cost their headers"
        );
        // The volume moves on: five blocks rewritten, two unmapped; a
        // snapshot loses one block.
        for lba in [0, 1, 2, 3, 4000] {
            index.volume_mut(1).set(
                lba,
                Entry {
                    address: 9000 + lba,
                    crc: 6,
                },
            );
        }
        index.volume_mut(1).set(100, Entry::UNMAPPED);
        index.volume_mut(1).set(2000, Entry::UNMAPPED);
        index.volume_mut(3).set(7, Entry::UNMAPPED);
        let (diverged, decoded) = round_trip(&index);
        assert!(
            diverged < with_snapshots + 400,
            "{diverged} bytes: the snapshots cost their differences ({with_snapshots} before)"
        );
        // After decoding, the snapshots share the chunks they did not
        // change with their base: the index costs about one copy.
        assert!(
            decoded.memory_bytes() <= index.memory_bytes() + index.memory_bytes() / 10,
            "decoded {} bytes, in memory before {}",
            decoded.memory_bytes(),
            index.memory_bytes()
        );
    }

    #[test]
    fn unmapped_runs_are_refused_in_a_volume_without_a_base() {
        let mut index = Index::default();
        index.volume_mut(4).set(3, Entry { address: 50, crc: 1 });
        let plan = PayloadPlan::new(&index, 0);
        let len = plan.bytes();
        let mut out = vec![0u8; len];
        let (_, crc, volumes) = encode_payload(&index, &plan, &[], &mut out);
        // The run's address (bits 0..32 at offset 8 of the run) made 0.
        put_u32(&mut out, VOLUME_HEADER_BYTES + 8, 0);
        let _ = crc;
        let crc = crc32c::crc32c(&out);
        assert!(decode_payload(&header(&out, crc, volumes, 0), &out, |_| true).is_err());
    }

    proptest! {
        /// Volumes written, cloned onto one another and written again, in
        /// any order: the checkpoint describes every volume's map exactly,
        /// whichever bases it picks.
        #[test]
        fn clones_written_against_bases_round_trip(
            ops in proptest::collection::vec((0u8..6, 1u64..5, 1u64..5, 0u64..3000, 1u64..200), 1..40)
        ) {
            let mut index = Index::default();
            let mut next_address = 100;
            for (kind, volume, other, lba, len) in ops {
                match kind {
                    0 if volume != other => {
                        index.volume_mut(other).clear();
                        index.clone_volume(volume, other);
                    }
                    1 => {
                        for offset in 0..len {
                            index.volume_mut(volume).set(lba + offset, Entry::UNMAPPED);
                        }
                    }
                    _ => {
                        for offset in 0..len {
                            index.volume_mut(volume).set(lba + offset, Entry { address: next_address, crc: 3 });
                            next_address += if kind == 5 { 7 } else { 1 };
                        }
                    }
                }
            }
            round_trip(&index);
        }

        #[test]
        fn payload_round_trips(
            volumes in proptest::collection::btree_map(
                any::<u64>(),
                (proptest::collection::btree_map(0u64..3000, (100u64..1000, any::<u32>()), 0..300), any::<u64>(), any::<u64>()),
                0..5),
            segments in proptest::collection::vec(any::<u64>(), 1..20),
        ) {
            let mut index = Index::default();
            for (id, (mappings, epoch, sequence)) in &volumes {
                let volume = index.volume_mut(*id);
                volume.epoch_max = *epoch;
                volume.volume_sequence_max = *sequence;
                for (lba, (address, crc)) in mappings {
                    volume.set(*lba, Entry { address: *address, crc: *crc });
                }
            }
            let segment_count = u32::try_from(segments.len()).unwrap();
            let plan = PayloadPlan::new(&index, segment_count);
        let len = plan.bytes();
            let mut out = vec![0u8; len];
            let (written, crc, volume_count) = encode_payload(&index, &plan, &segments, &mut out);
            prop_assert_eq!(written, len);
            let h = header(&out, crc, volume_count, segment_count);
            let decoded = decode_payload(&h, &out, |address| (100..1000).contains(&address)).unwrap();
            prop_assert_eq!(&decoded.segment_last_sequence, &segments);
            for (id, (mappings, epoch, sequence)) in &volumes {
                let volume = decoded.index.volume(*id).unwrap();
                prop_assert_eq!(volume.epoch_max, *epoch);
                prop_assert_eq!(volume.volume_sequence_max, *sequence);
                let got: Vec<_> = volume.iter().map(|(lba, e)| (lba, (e.address, e.crc))).collect();
                let want: Vec<_> = mappings.iter().map(|(k, v)| (*k, *v)).collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn garbage_payloads_are_refused_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            volume_count in 0u64..4,
            segment_count in 0u32..8,
        ) {
            let h = header(&bytes, 0, volume_count, segment_count);
            let _ = decode_payload(&h, &bytes, |_| true);
        }
    }
}
