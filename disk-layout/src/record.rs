//! Log records. Writes are appended to segments as *batches*: one 4 KiB
//! header block describing up to 84 records, followed by the records' data
//! blocks in record order. A batch is written with one I/O and made durable
//! with one flush (group commit), so many small writes cost one header block.
//!
//! Batch header block:
//! ```text
//! offset size field
//!      0    8 magic "BLSTBTCH"
//!      8    4 crc32c of the 4096-byte block with this field zeroed
//!     12    2 record_count (0..=84)
//!     14    2 durable_window: W > 0 promises that no batch with sequence >=
//!               this one's + W was submitted before this one was durable
//!               (written with FUA); 0 promises nothing
//!     16    8 sequence: batch number on this disk, +1 per batch, never reused
//!     24    4 previous_header_crc: crc of the batch before this one (chain)
//!     28    4 segment_index this batch is written in
//!     32    4 next_segment_index: where the log continues when this segment is full
//!     36    4 data_block_count following the header
//!     40    8 open_nonce: random per store open; makes rewritten headers differ
//!     48   16 zero
//!     64   48 record 0, record 1, ... (record_count entries)
//! ```
//!
//! Record entry (48 bytes):
//! ```text
//!      0    8 volume_id
//!      8    8 lba: first volume block (4 KiB units)
//!     16    4 block_count
//!     20    1 kind (1 write, 2 zero, 3 delete volume, 4 relocate, 5 bad,
//!               6 clone: volume_id's map becomes a copy of volume lba's,
//!               sharing its blocks; block_count 0)
//!     21    1 flags (zero)
//!     22    1 relocated_from_high: bits 32..40 of relocated_from
//!     23    1 zero
//!     24    8 epoch of the writer (replication fencing)
//!     32    8 volume_sequence assigned by the volume's coordinator
//!     40    4 data_crc: crc32c over the little-endian crc32c of each data block
//!     44    4 relocated_from: relocate and bad records of the cleaner: the
//!               disk address the first block moved from (the others follow
//!               it); every volume that maps lba+i there is re-pointed.
//!               0 (older records, and all other kinds): only volume_id's
//!               entries change
//! ```
//!
//! A batch continues the log only if its header checksum matches and its
//! sequence and previous_header_crc continue the chain. If a record's data
//! does not match its data_crc, the batch was torn (never acknowledged:
//! replay stops there), unless the chain goes on through the batch
//! durable_window ahead of it: then it was durable and its data rotted
//! since, and replay marks that record's blocks bad and goes on.

use crate::codec::{crc32c_with_hole, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::error::FormatError;
use crate::geometry::BLOCK_BYTES;

pub const BATCH_MAGIC: [u8; 8] = *b"BLSTBTCH";

const MAGIC: usize = 0;
const CRC: usize = MAGIC + 8;
const RECORD_COUNT: usize = CRC + 4;
const WINDOW: usize = RECORD_COUNT + 2;
const SEQUENCE: usize = WINDOW + 2;
const PREVIOUS_CRC: usize = SEQUENCE + 8;
const SEGMENT: usize = PREVIOUS_CRC + 4;
const NEXT_SEGMENT: usize = SEGMENT + 4;
const DATA_BLOCKS: usize = NEXT_SEGMENT + 4;
const NONCE: usize = DATA_BLOCKS + 4;
const RECORDS: usize = 64;
const _: () = assert!(NONCE + 8 <= RECORDS);

const R_VOLUME: usize = 0;
const R_LBA: usize = R_VOLUME + 8;
const R_BLOCKS: usize = R_LBA + 8;
const R_KIND: usize = R_BLOCKS + 4;
const R_FLAGS: usize = R_KIND + 1;
const R_RELOCATED_FROM_HIGH: usize = R_FLAGS + 1;
const R_EPOCH: usize = R_FLAGS + 3;
const R_VOLUME_SEQUENCE: usize = R_EPOCH + 8;
const R_DATA_CRC: usize = R_VOLUME_SEQUENCE + 8;
const R_RELOCATED_FROM: usize = R_DATA_CRC + 4;
/// Encoded size of one record entry.
pub const RECORD_BYTES: usize = 48;
const _: () = assert!(R_RELOCATED_FROM + 4 == RECORD_BYTES);

/// Size of a batch header.
pub const BATCH_HEADER_BYTES: usize = BLOCK_BYTES;
/// Most records one batch header can describe.
pub const RECORDS_PER_BATCH_MAX: usize = (BATCH_HEADER_BYTES - RECORDS) / RECORD_BYTES;
const _: () = assert!(RECORDS_PER_BATCH_MAX == 84);
/// Most data blocks after one header (1 MiB): bounds batch buffers.
pub const BATCH_DATA_BLOCKS_MAX: u32 = 256;

/// What a record does to the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// New data for `block_count` blocks from `lba`.
    Write,
    /// The range reads as zeroes from now on and holds no space (TRIM, WRITE_ZEROES).
    Zero,
    /// Every block of the volume is released.
    DeleteVolume,
    /// The cleaner moved live data; same effect as `Write`.
    Relocate,
    /// The blocks' data was found corrupt; reads fail until rewritten.
    Bad,
    /// The volume's map becomes a copy of another volume's (`lba` holds the
    /// source volume id), sharing its disk blocks: snapshots and clones.
    Clone,
}

impl RecordKind {
    fn to_byte(self) -> u8 {
        match self {
            Self::Write => 1,
            Self::Zero => 2,
            Self::DeleteVolume => 3,
            Self::Relocate => 4,
            Self::Bad => 5,
            Self::Clone => 6,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, FormatError> {
        Ok(match byte {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::DeleteVolume,
            4 => Self::Relocate,
            5 => Self::Bad,
            6 => Self::Clone,
            other => {
                return Err(FormatError::BadField {
                    what: "record kind",
                    value: u64::from(other),
                })
            }
        })
    }

    /// True when the record is followed by `block_count` data blocks.
    #[must_use]
    pub fn has_data(self) -> bool {
        matches!(self, Self::Write | Self::Relocate)
    }
}

/// One record entry of a batch header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub volume_id: u64,
    pub lba: u64,
    pub block_count: u32,
    pub kind: RecordKind,
    pub epoch: u64,
    pub volume_sequence: u64,
    pub data_crc: u32,
    /// See `relocated_from` in the layout above (0: not given); 40 bits.
    pub relocated_from: u64,
}

impl Record {
    /// Data blocks this record occupies after the header.
    #[must_use]
    pub fn data_blocks(&self) -> u32 {
        if self.kind.has_data() {
            self.block_count
        } else {
            0
        }
    }

    fn encode_into(&self, out: &mut [u8]) {
        put_u64(out, R_VOLUME, self.volume_id);
        put_u64(out, R_LBA, self.lba);
        put_u32(out, R_BLOCKS, self.block_count);
        out[R_KIND] = self.kind.to_byte();
        out[R_FLAGS] = 0;
        out[R_RELOCATED_FROM_HIGH] = u8::try_from(self.relocated_from >> 32).expect("addresses have 40 bits");
        out[R_RELOCATED_FROM_HIGH + 1] = 0;
        put_u64(out, R_EPOCH, self.epoch);
        put_u64(out, R_VOLUME_SEQUENCE, self.volume_sequence);
        put_u32(out, R_DATA_CRC, self.data_crc);
        put_u32(out, R_RELOCATED_FROM, crate::codec::low_32(self.relocated_from));
    }

    fn decode_from(bytes: &[u8]) -> Result<Self, FormatError> {
        let record = Self {
            volume_id: get_u64(bytes, R_VOLUME),
            lba: get_u64(bytes, R_LBA),
            block_count: get_u32(bytes, R_BLOCKS),
            kind: RecordKind::from_byte(bytes[R_KIND])?,
            epoch: get_u64(bytes, R_EPOCH),
            volume_sequence: get_u64(bytes, R_VOLUME_SEQUENCE),
            data_crc: get_u32(bytes, R_DATA_CRC),
            relocated_from: u64::from(get_u32(bytes, R_RELOCATED_FROM)) | u64::from(bytes[R_RELOCATED_FROM_HIGH]) << 32,
        };
        if record.kind == RecordKind::Clone && (record.block_count != 0 || record.lba == record.volume_id) {
            return Err(FormatError::BadField {
                what: "clone record",
                value: record.lba,
            });
        }
        if record.kind.has_data() && record.block_count == 0 {
            return Err(FormatError::BadField {
                what: "record block_count",
                value: 0,
            });
        }
        Ok(record)
    }
}

/// The header of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// See `durable_window` in the layout above.
    pub durable_window: u16,
    pub sequence: u64,
    pub previous_header_crc: u32,
    pub segment_index: u32,
    pub next_segment_index: u32,
    pub open_nonce: u64,
    pub records: Vec<Record>,
}

impl BatchHeader {
    /// Data blocks that follow this header.
    #[must_use]
    pub fn data_block_count(&self) -> u32 {
        self.records.iter().map(Record::data_blocks).sum()
    }

    /// Encodes into `out` (one 4096-byte block) and returns the header crc.
    pub fn encode_into(&self, out: &mut [u8]) -> u32 {
        assert_eq!(out.len(), BATCH_HEADER_BYTES);
        assert!(self.records.len() <= RECORDS_PER_BATCH_MAX);
        assert!(self.data_block_count() <= BATCH_DATA_BLOCKS_MAX);
        out.fill(0);
        out[MAGIC..MAGIC + 8].copy_from_slice(&BATCH_MAGIC);
        put_u16(
            out,
            RECORD_COUNT,
            u16::try_from(self.records.len()).expect("bounded by 84"),
        );
        put_u16(out, WINDOW, self.durable_window);
        put_u64(out, SEQUENCE, self.sequence);
        put_u32(out, PREVIOUS_CRC, self.previous_header_crc);
        put_u32(out, SEGMENT, self.segment_index);
        put_u32(out, NEXT_SEGMENT, self.next_segment_index);
        put_u32(out, DATA_BLOCKS, self.data_block_count());
        put_u64(out, NONCE, self.open_nonce);
        for (index, record) in self.records.iter().enumerate() {
            let start = RECORDS + index * RECORD_BYTES;
            record.encode_into(&mut out[start..start + RECORD_BYTES]);
        }
        let crc = crc32c_with_hole(out, CRC);
        put_u32(out, CRC, crc);
        crc
    }

    /// Decodes one header block; returns the header and its crc.
    pub fn decode(block: &[u8]) -> Result<(Self, u32), FormatError> {
        assert!(block.len() >= BATCH_HEADER_BYTES);
        let block = &block[..BATCH_HEADER_BYTES];
        if block[MAGIC..MAGIC + 8] != BATCH_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(block, CRC);
        let computed = crc32c_with_hole(block, CRC);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: "batch header",
                stored,
                computed,
            });
        }
        let record_count = usize::from(get_u16(block, RECORD_COUNT));
        if record_count > RECORDS_PER_BATCH_MAX {
            return Err(FormatError::BadField {
                what: "batch record_count",
                value: record_count as u64,
            });
        }
        let records = (0..record_count)
            .map(|index| {
                let start = RECORDS + index * RECORD_BYTES;
                Record::decode_from(&block[start..start + RECORD_BYTES])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let header = Self {
            durable_window: get_u16(block, WINDOW),
            sequence: get_u64(block, SEQUENCE),
            previous_header_crc: get_u32(block, PREVIOUS_CRC),
            segment_index: get_u32(block, SEGMENT),
            next_segment_index: get_u32(block, NEXT_SEGMENT),
            open_nonce: get_u64(block, NONCE),
            records,
        };
        let data_blocks = get_u32(block, DATA_BLOCKS);
        if data_blocks != header.data_block_count() || data_blocks > BATCH_DATA_BLOCKS_MAX {
            return Err(FormatError::BadField {
                what: "batch data_block_count",
                value: u64::from(data_blocks),
            });
        }
        Ok((header, stored))
    }
}

/// Checksum of one 4 KiB data block, as kept in the index.
#[must_use]
pub fn block_crc(block: &[u8]) -> u32 {
    debug_assert_eq!(block.len(), BLOCK_BYTES);
    crc32c::crc32c(block)
}

/// A record's `data_crc` from the checksums of its blocks, in order.
#[must_use]
pub fn data_crc_of_block_crcs(block_crcs: impl IntoIterator<Item = u32>) -> u32 {
    block_crcs
        .into_iter()
        .fold(0, |crc, block| crc32c::crc32c_append(crc, &block.to_le_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_kind() -> impl Strategy<Value = RecordKind> {
        prop_oneof![
            Just(RecordKind::Write),
            Just(RecordKind::Zero),
            Just(RecordKind::DeleteVolume),
            Just(RecordKind::Relocate),
            Just(RecordKind::Bad),
        ]
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            any::<u64>(),
            1u32..=3,
            arb_kind(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            0u64..1 << 40,
        )
            .prop_map(
                |(volume_id, lba, block_count, kind, epoch, volume_sequence, data_crc, relocated_from)| Record {
                    volume_id,
                    lba,
                    block_count,
                    kind,
                    epoch,
                    volume_sequence,
                    data_crc,
                    relocated_from,
                },
            )
    }

    fn arb_header() -> impl Strategy<Value = BatchHeader> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(arb_record(), 0..=RECORDS_PER_BATCH_MAX),
            any::<u16>(),
        )
            .prop_map(
                |(
                    sequence,
                    previous_header_crc,
                    segment_index,
                    next_segment_index,
                    open_nonce,
                    records,
                    durable_window,
                )| BatchHeader {
                    durable_window,
                    sequence,
                    previous_header_crc,
                    segment_index,
                    next_segment_index,
                    open_nonce,
                    records,
                },
            )
    }

    proptest! {
        #[test]
        fn batch_header_round_trips(header in arb_header()) {
            let mut block = vec![0u8; BATCH_HEADER_BYTES];
            let crc = header.encode_into(&mut block);
            let (decoded, decoded_crc) = BatchHeader::decode(&block).unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(decoded_crc, crc);
        }

        #[test]
        fn any_single_bit_flip_in_a_header_is_detected(header in arb_header(), bit in 0usize..BATCH_HEADER_BYTES * 8) {
            let mut block = vec![0u8; BATCH_HEADER_BYTES];
            header.encode_into(&mut block);
            block[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(BatchHeader::decode(&block).is_err());
        }

        #[test]
        fn any_single_bit_flip_in_data_changes_the_data_crc(bit in 0usize..2 * 4096 * 8, fill in any::<u8>()) {
            let mut data = vec![fill; 2 * 4096];
            let crc_of = |data: &[u8]| data_crc_of_block_crcs(data.chunks(4096).map(block_crc));
            let before = crc_of(&data);
            data[bit / 8] ^= 1 << (bit % 8);
            prop_assert_ne!(crc_of(&data), before);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = BatchHeader::decode(&bytes);
        }
    }

    /// A batch header holding one record with no data blocks.
    fn header_of(record: Record) -> BatchHeader {
        BatchHeader {
            durable_window: 0,
            sequence: 1,
            previous_header_crc: 0,
            segment_index: 0,
            next_segment_index: 1,
            open_nonce: 9,
            records: vec![record],
        }
    }

    fn clone_header(source: u64, target: u64) -> BatchHeader {
        header_of(Record {
            volume_id: target,
            lba: source,
            block_count: 0,
            kind: RecordKind::Clone,
            epoch: 3,
            volume_sequence: 4,
            data_crc: 0,
            relocated_from: 0,
        })
    }

    #[test]
    fn a_data_record_without_blocks_is_refused() {
        let header = header_of(Record {
            kind: RecordKind::Zero,
            epoch: 0,
            volume_sequence: 0,
            ..clone_header(0, 1).records[0]
        });
        let mut block = vec![0u8; BATCH_HEADER_BYTES];
        header.encode_into(&mut block);
        // Turn the zero record into a write without blocks and fix the crc.
        block[RECORDS + R_KIND] = 1;
        let crc = crc32c_with_hole(&block, CRC);
        put_u32(&mut block, CRC, crc);
        assert!(BatchHeader::decode(&block).is_err());
    }

    #[test]
    fn a_clone_record_round_trips_and_names_its_source_in_lba() {
        let header = clone_header(7, 8);
        let mut block = vec![0u8; BATCH_HEADER_BYTES];
        header.encode_into(&mut block);
        let (decoded, _) = BatchHeader::decode(&block).expect("valid");
        assert_eq!(decoded, header);
        assert_eq!(decoded.records[0].data_blocks(), 0);
    }

    #[test]
    fn a_clone_record_onto_its_own_source_is_refused() {
        let mut block = vec![0u8; BATCH_HEADER_BYTES];
        clone_header(7, 7).encode_into(&mut block);
        assert!(BatchHeader::decode(&block).is_err());
    }
}
