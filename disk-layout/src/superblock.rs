//! The superblock: identity and geometry of an enrolled disk.
//!
//! Two copies, at byte 0 and byte 4096. Both are written at format (A, flush,
//! B, flush); an update writes A then B, so one copy is always whole. On open
//! the valid copy with the higher `generation` wins.
//!
//! ```text
//! offset size field
//!      0    8 magic "BLSTSUPR"
//!      8    4 format_version (1)
//!     12    4 crc32c of the 4096-byte block with this field zeroed
//!     16    8 generation (incremented on every rewrite)
//!     24   16 cluster_uuid (zero until the node joins a cluster)
//!     40   16 node_uuid
//!     56   16 disk_uuid
//!     72    4 block_size_bytes (4096)
//!     76    4 segment_count
//!     80    8 segment_size_bytes
//!     88    8 disk_size_bytes (size when formatted)
//!     96    8 checkpoint_offset_bytes
//!    104    8 checkpoint_slot_bytes
//!    112    8 segments_offset_bytes
//!    120    8 created_unix_seconds
//!    128 3968 zero
//! ```

use crate::codec::{crc32c_with_hole, get_bytes16, get_u32, get_u64, put_u32, put_u64};
use crate::error::FormatError;
use crate::geometry::{Geometry, BLOCK_BYTES, BLOCK_SIZE_BYTES};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"BLSTSUPR";
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: usize = 0;
const VERSION: usize = MAGIC + 8;
const CRC: usize = VERSION + 4;
const GENERATION: usize = CRC + 4;
const CLUSTER_UUID: usize = GENERATION + 8;
const NODE_UUID: usize = CLUSTER_UUID + 16;
const DISK_UUID: usize = NODE_UUID + 16;
const BLOCK_SIZE: usize = DISK_UUID + 16;
const SEGMENT_COUNT: usize = BLOCK_SIZE + 4;
const SEGMENT_SIZE: usize = SEGMENT_COUNT + 4;
const DISK_SIZE: usize = SEGMENT_SIZE + 8;
const CHECKPOINT_OFFSET: usize = DISK_SIZE + 8;
const CHECKPOINT_SLOT: usize = CHECKPOINT_OFFSET + 8;
const SEGMENTS_OFFSET: usize = CHECKPOINT_SLOT + 8;
const CREATED: usize = SEGMENTS_OFFSET + 8;
const END: usize = CREATED + 8;
const _: () = assert!(END == 128);
const _: () = assert!(END <= BLOCK_BYTES);

/// Encoded size of a superblock.
pub const SUPERBLOCK_BYTES: usize = BLOCK_BYTES;

/// Identity and layout of one enrolled disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub cluster_uuid: [u8; 16],
    pub node_uuid: [u8; 16],
    pub disk_uuid: [u8; 16],
    pub geometry: Geometry,
    pub created_unix_seconds: u64,
}

impl Superblock {
    /// Encodes into one 4096-byte block.
    #[must_use]
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut block = [0u8; SUPERBLOCK_BYTES];
        block[MAGIC..MAGIC + 8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut block, VERSION, FORMAT_VERSION);
        put_u64(&mut block, GENERATION, self.generation);
        block[CLUSTER_UUID..CLUSTER_UUID + 16].copy_from_slice(&self.cluster_uuid);
        block[NODE_UUID..NODE_UUID + 16].copy_from_slice(&self.node_uuid);
        block[DISK_UUID..DISK_UUID + 16].copy_from_slice(&self.disk_uuid);
        put_u32(&mut block, BLOCK_SIZE, u32::try_from(BLOCK_SIZE_BYTES).expect("4096"));
        put_u32(&mut block, SEGMENT_COUNT, self.geometry.segment_count);
        put_u64(&mut block, SEGMENT_SIZE, self.geometry.segment_size_bytes);
        put_u64(&mut block, DISK_SIZE, self.geometry.disk_size_bytes);
        put_u64(&mut block, CHECKPOINT_OFFSET, self.geometry.checkpoint_offset_bytes);
        put_u64(&mut block, CHECKPOINT_SLOT, self.geometry.checkpoint_slot_bytes);
        put_u64(&mut block, SEGMENTS_OFFSET, self.geometry.segments_offset_bytes);
        put_u64(&mut block, CREATED, self.created_unix_seconds);
        let crc = crc32c_with_hole(&block, CRC);
        put_u32(&mut block, CRC, crc);
        block
    }

    /// Decodes and validates one copy.
    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        assert!(block.len() >= SUPERBLOCK_BYTES);
        let block = &block[..SUPERBLOCK_BYTES];
        if block[MAGIC..MAGIC + 8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(block, CRC);
        let computed = crc32c_with_hole(block, CRC);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: "superblock",
                stored,
                computed,
            });
        }
        let version = get_u32(block, VERSION);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
                ballast: env!("CARGO_PKG_VERSION"),
            });
        }
        let block_size = get_u32(block, BLOCK_SIZE);
        if u64::from(block_size) != BLOCK_SIZE_BYTES {
            return Err(FormatError::BadField {
                what: "superblock block_size_bytes",
                value: u64::from(block_size),
            });
        }
        let geometry = Geometry {
            disk_size_bytes: get_u64(block, DISK_SIZE),
            segment_size_bytes: get_u64(block, SEGMENT_SIZE),
            segment_count: get_u32(block, SEGMENT_COUNT),
            checkpoint_offset_bytes: get_u64(block, CHECKPOINT_OFFSET),
            checkpoint_slot_bytes: get_u64(block, CHECKPOINT_SLOT),
            segments_offset_bytes: get_u64(block, SEGMENTS_OFFSET),
        };
        geometry.validate()?;
        Ok(Self {
            generation: get_u64(block, GENERATION),
            cluster_uuid: get_bytes16(block, CLUSTER_UUID),
            node_uuid: get_bytes16(block, NODE_UUID),
            disk_uuid: get_bytes16(block, DISK_UUID),
            geometry,
            created_unix_seconds: get_u64(block, CREATED),
        })
    }

    /// Picks the copy to trust from the two decoded copies.
    pub fn choose(a: Result<Self, FormatError>, b: Result<Self, FormatError>) -> Result<Self, FormatError> {
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(a), Err(_)) => Err(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(generation: u64) -> Superblock {
        Superblock {
            generation,
            cluster_uuid: [1; 16],
            node_uuid: [2; 16],
            disk_uuid: [3; 16],
            geometry: Geometry::compute(1 << 30, 1 << 20).unwrap(),
            created_unix_seconds: 1_700_000_000,
        }
    }

    #[test]
    fn round_trips() {
        let sb = sample(7);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut block = sample(1).encode();
        put_u32(&mut block, VERSION, 2);
        let crc = crc32c_with_hole(&block, CRC);
        put_u32(&mut block, CRC, crc);
        assert_eq!(
            Superblock::decode(&block),
            Err(FormatError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ballast: env!("CARGO_PKG_VERSION")
            })
        );
    }

    #[test]
    fn a_zeroed_block_is_not_a_superblock() {
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(FormatError::BadMagic));
    }

    #[test]
    fn newer_valid_copy_wins_and_a_bad_copy_is_skipped() {
        let a = sample(1);
        let b = sample(2);
        assert_eq!(Superblock::choose(Ok(a), Ok(b)).unwrap().generation, 2);
        assert_eq!(
            Superblock::choose(Ok(a), Err(FormatError::BadMagic))
                .unwrap()
                .generation,
            1
        );
        assert!(Superblock::choose(Err(FormatError::BadMagic), Err(FormatError::BadMagic)).is_err());
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..SUPERBLOCK_BYTES * 8) {
            let mut block = sample(3).encode();
            block[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Superblock::decode(&block).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = Superblock::decode(&bytes);
        }
    }
}
