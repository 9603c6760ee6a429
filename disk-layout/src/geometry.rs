//! Where everything lives on an enrolled disk.
//!
//! ```text
//! byte 0          superblock copy A            (1 block)
//! byte 4096       superblock copy B            (1 block)
//! ...             reserved, zero               (up to 1 MiB)
//! 1 MiB           checkpoint slot 0            (checkpoint_slot_bytes)
//! ...             checkpoint slot 1            (checkpoint_slot_bytes)
//! segments_offset segment 0, segment 1, ...    (segment_size_bytes each)
//! ```
//!
//! Addresses inside the store are absolute 4 KiB block numbers (`u64`, of
//! which the index and the checkpoints keep 40 bits), so a disk may hold at
//! most 2^40 - 2 blocks (4 PiB). Block 0 (the superblock) never holds data,
//! which lets 0 mean "unmapped" in the index.

use crate::codec::align_up;
use crate::error::FormatError;

/// The only block size of format version 1.
pub const BLOCK_SIZE_BYTES: u64 = 4096;
/// The same, as a `usize` for slicing.
pub const BLOCK_BYTES: usize = 4096;
const _: () = assert!(BLOCK_BYTES as u64 == BLOCK_SIZE_BYTES);
/// Bytes reserved at the start of the disk for the two superblock copies.
pub const SUPERBLOCK_AREA_BYTES: u64 = 1 << 20;
/// Byte offset of superblock copy B (copy A is at 0).
pub const SUPERBLOCK_B_OFFSET_BYTES: u64 = BLOCK_SIZE_BYTES;
/// Checkpoint slots and segments start on 1 MiB boundaries.
pub const AREA_ALIGN_BYTES: u64 = 1 << 20;
/// Smallest and largest segment sizes accepted at format.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 1 << 20;
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 1 << 30;
/// Default segment size: big enough for long sequential runs, small enough
/// that the cleaner moves little data per victim.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 8 << 20;
/// A disk must hold at least this many segments (cleaning needs spares).
pub const SEGMENT_COUNT_MIN: u64 = 8;
/// Most volumes that may have data on one disk (bounds the checkpoint size).
pub const VOLUMES_PER_DISK_MAX: u64 = 65_536;
/// Bits of a block address the index and the checkpoints keep.
pub const ADDRESS_BITS: u32 = 40;
/// Largest disk, in blocks: addresses fit in `ADDRESS_BITS` and the highest
/// one is reserved (the index's "bad block").
pub const DISK_BLOCKS_MAX: u64 = (1 << ADDRESS_BITS) - 2;

/// Checkpoint payload bytes per segment (its last written sequence).
pub const CHECKPOINT_BYTES_PER_SEGMENT: u64 = 8;
/// Checkpoint payload bytes per mapped block at worst (a run of one block:
/// its 12-byte head and its crc; format 1 spent the same on a mapping).
pub const CHECKPOINT_BYTES_PER_MAPPING: u64 = 16;
/// Checkpoint payload bytes per volume section header.
pub const CHECKPOINT_BYTES_PER_VOLUME: u64 = 32;

/// The computed layout of one disk. Stored in the superblock so a later
/// version of the computation cannot reinterpret an existing disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub disk_size_bytes: u64,
    pub segment_size_bytes: u64,
    pub segment_count: u32,
    pub checkpoint_offset_bytes: u64,
    pub checkpoint_slot_bytes: u64,
    pub segments_offset_bytes: u64,
}

impl Geometry {
    /// Lays out a disk of `disk_size_bytes` with segments of `segment_size_bytes`.
    pub fn compute(disk_size_bytes: u64, segment_size_bytes: u64) -> Result<Self, FormatError> {
        if !segment_size_bytes.is_power_of_two()
            || !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&segment_size_bytes)
        {
            return Err(FormatError::BadSegmentSize { segment_size_bytes });
        }
        if disk_size_bytes / BLOCK_SIZE_BYTES > DISK_BLOCKS_MAX {
            return Err(FormatError::DiskTooLarge { disk_size_bytes });
        }
        let usable_bytes = disk_size_bytes.saturating_sub(SUPERBLOCK_AREA_BYTES);
        // Each segment costs its own bytes plus its share of both checkpoint slots.
        let per_segment = segment_size_bytes
            + 2 * (CHECKPOINT_BYTES_PER_SEGMENT + segment_size_bytes / BLOCK_SIZE_BYTES * CHECKPOINT_BYTES_PER_MAPPING);
        let fixed = 2 * (Self::slot_fixed_bytes() + AREA_ALIGN_BYTES) + AREA_ALIGN_BYTES;
        let mut segment_count = usable_bytes.saturating_sub(fixed) / per_segment;
        if segment_count > u64::from(u32::MAX) {
            return Err(FormatError::TooManySegments {
                disk_size_bytes,
                segment_size_bytes,
            });
        }
        loop {
            if segment_count < SEGMENT_COUNT_MIN {
                return Err(FormatError::DiskTooSmall {
                    disk_size_bytes,
                    segment_size_bytes,
                });
            }
            let geometry = Self::with_segment_count(disk_size_bytes, segment_size_bytes, segment_count);
            if geometry.end_bytes() <= disk_size_bytes {
                return Ok(geometry);
            }
            segment_count -= 1;
        }
    }

    fn slot_fixed_bytes() -> u64 {
        BLOCK_SIZE_BYTES + VOLUMES_PER_DISK_MAX * CHECKPOINT_BYTES_PER_VOLUME
    }

    fn with_segment_count(disk_size_bytes: u64, segment_size_bytes: u64, segment_count: u64) -> Self {
        let segment_blocks = segment_size_bytes / BLOCK_SIZE_BYTES;
        let payload = segment_count * CHECKPOINT_BYTES_PER_SEGMENT
            + segment_count * segment_blocks * CHECKPOINT_BYTES_PER_MAPPING;
        let checkpoint_slot_bytes = align_up(Self::slot_fixed_bytes() + payload, AREA_ALIGN_BYTES);
        let checkpoint_offset_bytes = SUPERBLOCK_AREA_BYTES;
        let segments_offset_bytes = checkpoint_offset_bytes + 2 * checkpoint_slot_bytes;
        Self {
            disk_size_bytes,
            segment_size_bytes,
            segment_count: u32::try_from(segment_count).expect("segment count bounded by DISK_BLOCKS_MAX"),
            checkpoint_offset_bytes,
            checkpoint_slot_bytes,
            segments_offset_bytes,
        }
    }

    /// Checks a geometry read from a superblock for internal consistency.
    pub fn validate(&self) -> Result<(), FormatError> {
        let recomputed = Self::with_segment_count(
            self.disk_size_bytes,
            self.segment_size_bytes,
            u64::from(self.segment_count),
        );
        let sane = self.segment_size_bytes.is_power_of_two()
            && (SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&self.segment_size_bytes)
            && u64::from(self.segment_count) >= SEGMENT_COUNT_MIN
            && recomputed == *self
            && self.end_bytes() <= self.disk_size_bytes;
        if sane {
            Ok(())
        } else {
            Err(FormatError::BadGeometry)
        }
    }

    /// First byte after the last segment.
    #[must_use]
    pub fn end_bytes(&self) -> u64 {
        self.segments_offset_bytes + u64::from(self.segment_count) * self.segment_size_bytes
    }

    /// Blocks per segment.
    #[must_use]
    pub fn segment_blocks(&self) -> u32 {
        u32::try_from(self.segment_size_bytes / BLOCK_SIZE_BYTES).expect("segment size bounded")
    }

    /// Byte offset of checkpoint slot `slot` (0 or 1).
    #[must_use]
    pub fn checkpoint_slot_offset_bytes(&self, slot: usize) -> u64 {
        assert!(slot < 2);
        self.checkpoint_offset_bytes + slot as u64 * self.checkpoint_slot_bytes
    }

    /// Absolute block address of block `offset_blocks` of segment `segment`.
    #[must_use]
    pub fn block_address(&self, segment: u32, offset_blocks: u32) -> u64 {
        debug_assert!(segment < self.segment_count);
        debug_assert!(offset_blocks < self.segment_blocks());
        let address = self.segments_offset_bytes / BLOCK_SIZE_BYTES
            + u64::from(segment) * u64::from(self.segment_blocks())
            + u64::from(offset_blocks);
        debug_assert!(address <= DISK_BLOCKS_MAX, "disk blocks bounded by DISK_BLOCKS_MAX");
        address
    }

    /// Segment holding absolute block `address`, if it is a segment block.
    #[must_use]
    pub fn segment_of(&self, address: u64) -> Option<u32> {
        let first = self.segments_offset_bytes / BLOCK_SIZE_BYTES;
        let relative = address.checked_sub(first)?;
        let segment = relative / u64::from(self.segment_blocks());
        (segment < u64::from(self.segment_count)).then(|| u32::try_from(segment).expect("bounded"))
    }

    /// Byte offset on the disk of absolute block `address`.
    #[must_use]
    pub fn address_bytes(address: u64) -> u64 {
        address * BLOCK_SIZE_BYTES
    }

    /// Data blocks in all segments.
    #[must_use]
    pub fn data_blocks(&self) -> u64 {
        u64::from(self.segment_count) * u64::from(self.segment_blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_disk_layout_fits_and_is_aligned() {
        let geometry = Geometry::compute(256 << 20, 1 << 20).unwrap();
        assert!(geometry.end_bytes() <= 256 << 20);
        assert_eq!(geometry.checkpoint_offset_bytes % AREA_ALIGN_BYTES, 0);
        assert_eq!(geometry.segments_offset_bytes % AREA_ALIGN_BYTES, 0);
        assert!(
            geometry.segment_count >= 200,
            "most of the disk is segments: {geometry:?}"
        );
        geometry.validate().unwrap();
    }

    #[test]
    fn tiny_disks_and_odd_segment_sizes_are_refused() {
        assert!(matches!(
            Geometry::compute(8 << 20, 1 << 20),
            Err(FormatError::DiskTooSmall { .. })
        ));
        assert!(matches!(
            Geometry::compute(1 << 30, 3 << 20),
            Err(FormatError::BadSegmentSize { .. })
        ));
        assert!(matches!(
            Geometry::compute(1 << 30, 4096),
            Err(FormatError::BadSegmentSize { .. })
        ));
    }

    #[test]
    fn segment_addresses_round_trip() {
        let geometry = Geometry::compute(1 << 30, 1 << 20).unwrap();
        let last = geometry.segment_count - 1;
        let address = geometry.block_address(last, geometry.segment_blocks() - 1);
        assert_eq!(geometry.segment_of(address), Some(last));
        assert_eq!(geometry.segment_of(address + 1), None);
        assert_eq!(geometry.segment_of(1), None);
        assert_eq!(geometry.segment_of(geometry.block_address(0, 0)), Some(0));
    }

    proptest! {
        #[test]
        fn any_computed_geometry_fits_its_disk_and_validates(
            disk_mib in 24u64..200_000,
            segment_shift in 20u32..=26,
        ) {
            let disk = disk_mib << 20;
            if let Ok(geometry) = Geometry::compute(disk, 1u64 << segment_shift) {
                prop_assert!(geometry.end_bytes() <= disk);
                prop_assert!(geometry.validate().is_ok());
                // The checkpoint slot can hold every mapping the segments can hold.
                let need = BLOCK_SIZE_BYTES
                    + u64::from(geometry.segment_count) * CHECKPOINT_BYTES_PER_SEGMENT
                    + geometry.data_blocks() * CHECKPOINT_BYTES_PER_MAPPING
                    + VOLUMES_PER_DISK_MAX * CHECKPOINT_BYTES_PER_VOLUME;
                prop_assert!(geometry.checkpoint_slot_bytes >= need);
            }
        }
    }
}
