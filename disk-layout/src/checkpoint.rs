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
//!      0    8 magic "BLSTCKPT"
//!      8    4 crc32c of the 4096-byte block with this field zeroed
//!     12    4 zero
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
//! Payload (starts at the slot's second block):
//! ```text
//! segment_count x u64   last batch sequence written in each segment (0 = never)
//! volume_count x {
//!     u64 volume_id, u64 mapping_count | SHARED, u64 epoch_max, u64 volume_sequence_max
//!         (SHARED = bit 63: the volume was cloned or is a clone, and may map
//!         disk blocks that other shared volumes map too)
//!     mapping_count x { u64 lba, u32 address, u32 crc }   (lba ascending)
//! }
//! ```

use crate::codec::{crc32c_with_hole, get_u32, get_u64, put_u32, put_u64};
use crate::error::FormatError;
use crate::geometry::BLOCK_BYTES;
use crate::index::{Entry, Index, VolumeIndex, ADDRESS_UNMAPPED};

pub const CHECKPOINT_MAGIC: [u8; 8] = *b"BLSTCKPT";

const MAGIC: usize = 0;
const CRC: usize = MAGIC + 8;
const SEQUENCE: usize = CRC + 8;
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
}

impl CheckpointHeader {
    /// Encodes into one 4096-byte block.
    #[must_use]
    pub fn encode(&self) -> [u8; CHECKPOINT_HEADER_BYTES] {
        let mut block = [0u8; CHECKPOINT_HEADER_BYTES];
        block[MAGIC..MAGIC + 8].copy_from_slice(&CHECKPOINT_MAGIC);
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
        if block[MAGIC..MAGIC + 8] != CHECKPOINT_MAGIC {
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
        Ok(Self {
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

/// Bytes the payload of `index` with `segment_count` segments takes.
#[must_use]
pub fn payload_len(index: &Index, segment_count: u32) -> usize {
    let mut len = segment_count as usize * 8;
    for id in index.volume_ids() {
        let volume = index.volume(id).expect("listed");
        len += VOLUME_HEADER_BYTES + mapped_count(volume) * MAPPING_BYTES;
    }
    len
}

fn mapped_count(volume: &VolumeIndex) -> usize {
    usize::try_from(volume.used_blocks()).expect("fits in memory")
}

/// Encodes the payload into `out` (at least `payload_len` bytes) and returns
/// (bytes written, crc, volume count).
pub fn encode_payload(index: &Index, segment_last_sequence: &[u64], out: &mut [u8]) -> (usize, u32, u64) {
    let mut at = 0;
    for sequence in segment_last_sequence {
        put_u64(out, at, *sequence);
        at += 8;
    }
    let ids = index.volume_ids();
    for id in &ids {
        let volume = index.volume(*id).expect("listed");
        put_u64(out, at, *id);
        let shared = if volume.is_shared() { SHARED_FLAG } else { 0 };
        put_u64(out, at + 8, volume.used_blocks() | shared);
        put_u64(out, at + 16, volume.epoch_max);
        put_u64(out, at + 24, volume.volume_sequence_max);
        at += VOLUME_HEADER_BYTES;
        for (lba, entry) in volume.iter() {
            put_u64(out, at, lba);
            put_u32(out, at + 8, entry.address);
            put_u32(out, at + 12, entry.crc);
            at += MAPPING_BYTES;
        }
    }
    (at, crc32c::crc32c(&out[..at]), ids.len() as u64)
}

/// What a payload decodes into.
pub struct DecodedPayload {
    pub index: Index,
    pub segment_last_sequence: Vec<u64>,
}

/// Decodes a payload whose crc was already checked. `address_ok` says
/// whether a mapped address lies inside the disk's segments.
pub fn decode_payload(
    header: &CheckpointHeader,
    payload: &[u8],
    address_ok: impl Fn(u32) -> bool,
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
        let count = count_and_flags & !SHARED_FLAG;
        if count_and_flags & SHARED_FLAG != 0 {
            index.mark_shared(id);
        }
        let volume = index.volume_mut(id);
        volume.epoch_max = get_u64(payload, at + 16);
        volume.volume_sequence_max = get_u64(payload, at + 24);
        at += VOLUME_HEADER_BYTES;
        let count_usize = usize::try_from(count).map_err(|_| bad("checkpoint mapping_count", count))?;
        if count_usize > (payload.len() - at) / MAPPING_BYTES {
            return Err(bad("checkpoint mapping_count", count));
        }
        let mut previous_lba = None;
        for _ in 0..count {
            let lba = get_u64(payload, at);
            let entry = Entry {
                address: get_u32(payload, at + 8),
                crc: get_u32(payload, at + 12),
            };
            at += MAPPING_BYTES;
            if previous_lba.is_some_and(|previous| previous >= lba) {
                return Err(bad("checkpoint mapping order", lba));
            }
            previous_lba = Some(lba);
            if entry.address == ADDRESS_UNMAPPED || (entry.is_data() && !address_ok(entry.address)) {
                return Err(bad("checkpoint mapping address", u64::from(entry.address)));
            }
            volume.set(lba, entry);
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

    proptest! {
        #[test]
        fn payload_round_trips(
            volumes in proptest::collection::btree_map(
                any::<u64>(),
                (proptest::collection::btree_map(0u64..100_000, (100u32..1000, any::<u32>()), 0..50), any::<u64>(), any::<u64>()),
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
            let len = payload_len(&index, segment_count);
            let mut out = vec![0u8; len];
            let (written, crc, volume_count) = encode_payload(&index, &segments, &mut out);
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
