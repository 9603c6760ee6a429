//! The book of a checked load: every write sent and every write
//! acknowledged, per block, and the verdict on what a block read back holds.
//!
//! The ack log file (little-endian), appended as the load runs:
//!
//! ```text
//! header, 32 bytes:
//!   0  magic "BLSTACK1"
//!   8  stream: u64        the pattern tag of this load's blocks (pattern::fill's volume)
//!  16  block_bytes: u64   4096
//!  24  blocks: u64        the load wrote blocks 0 .. blocks
//! records, 17 bytes each:
//!   0  kind: u8           1 = sent (before the request leaves), 2 = acknowledged
//!   1  lba: u64
//!   9  generation: u64    unique in the load, increasing
//! ```
//!
//! A write is logged as sent before it is sent and as acknowledged only
//! after its successful reply arrived, so the log never claims an
//! acknowledgement that did not happen.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::pattern::{Decoded, PATTERN_BLOCK_BYTES};

const MAGIC: &[u8; 8] = b"BLSTACK1";
/// Bytes of the header.
pub const HEADER_BYTES: usize = 32;
/// Bytes of one record.
pub const RECORD_BYTES: usize = 17;
const KIND_SENT: u8 = 1;
const KIND_ACKNOWLEDGED: u8 = 2;

/// A malformed ack log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BookError {
    /// the file does not start with the ack log header
    #[error("not a ballast ack log (no BLSTACK1 header of {HEADER_BYTES} bytes)")]
    NotAnAckLog,
    /// the header names another block size
    #[error("ack log of {found}-byte blocks; only {PATTERN_BLOCK_BYTES} is supported")]
    BlockBytes { found: u64 },
    /// a record is cut short or of an unknown kind
    #[error("ack log record {index}: {reason}")]
    BadRecord { index: usize, reason: String },
}

/// What was sent to and acknowledged for one block.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockHistory {
    /// The newest generation acknowledged (0: none).
    pub acknowledged: u64,
    /// How many writes of this block were acknowledged.
    pub acknowledgements: u64,
    /// Every generation sent to this block, in order.
    pub sent: Vec<u64>,
}

/// What a block read back holds, judged against its history.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The newest acknowledged write (or nothing, when none was sent).
    Expected,
    /// A write sent after the newest acknowledged one, never acknowledged
    /// (its reply was lost with the fault): allowed.
    Unacknowledged,
    /// Zeroes or an older write where a newer one was acknowledged.
    Lost(String),
    /// Bytes no write of this load put there.
    Corrupt(String),
}

/// The whole load's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Book {
    pub stream: u64,
    pub blocks: u64,
    pub histories: BTreeMap<u64, BlockHistory>,
}

impl Book {
    #[must_use]
    pub fn new(stream: u64, blocks: u64) -> Self {
        Self {
            stream,
            blocks,
            histories: BTreeMap::new(),
        }
    }

    /// Records a write about to be sent.
    pub fn sent(&mut self, lba: u64, generation: u64) {
        debug_assert!(lba < self.blocks);
        self.histories.entry(lba).or_default().sent.push(generation);
    }

    /// Records a write's successful reply.
    pub fn acknowledged(&mut self, lba: u64, generation: u64) {
        let history = self.histories.entry(lba).or_default();
        assert!(
            history.sent.contains(&generation),
            "block {lba}: generation {generation} acknowledged, never sent"
        );
        history.acknowledged = history.acknowledged.max(generation);
        history.acknowledgements += 1;
    }

    /// Acknowledged writes in the book.
    #[must_use]
    pub fn acknowledgements(&self) -> u64 {
        self.histories.values().map(|history| history.acknowledgements).sum()
    }

    /// Judges what block `lba` holds.
    #[must_use]
    pub fn judge(&self, lba: u64, found: &Decoded) -> Verdict {
        let empty = BlockHistory::default();
        let history = self.histories.get(&lba).unwrap_or(&empty);
        match *found {
            Decoded::Zero if history.acknowledged == 0 => Verdict::Expected,
            Decoded::Zero => Verdict::Lost(format!(
                "block {lba}: zeroes, but generation {} was acknowledged",
                history.acknowledged
            )),
            Decoded::Written { generation } if !history.sent.contains(&generation) => Verdict::Corrupt(format!(
                "block {lba}: generation {generation}, which was never sent to it"
            )),
            Decoded::Written { generation } if generation < history.acknowledged => Verdict::Lost(format!(
                "block {lba}: generation {generation}, older than the acknowledged {}",
                history.acknowledged
            )),
            Decoded::Written { generation } if generation == history.acknowledged => Verdict::Expected,
            Decoded::Written { .. } => Verdict::Unacknowledged,
            Decoded::Garbage => Verdict::Corrupt(format!("block {lba}: bytes no write of this load put there")),
        }
    }
}

/// The log header.
#[must_use]
pub fn encode_header(stream: u64, blocks: u64) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&stream.to_le_bytes());
    out[16..24].copy_from_slice(&(PATTERN_BLOCK_BYTES as u64).to_le_bytes());
    out[24..32].copy_from_slice(&blocks.to_le_bytes());
    out
}

/// One record: a write sent (`acknowledged` false) or acknowledged.
#[must_use]
pub fn encode_record(acknowledged: bool, lba: u64, generation: u64) -> [u8; RECORD_BYTES] {
    let mut out = [0u8; RECORD_BYTES];
    out[0] = if acknowledged { KIND_ACKNOWLEDGED } else { KIND_SENT };
    out[1..9].copy_from_slice(&lba.to_le_bytes());
    out[9..17].copy_from_slice(&generation.to_le_bytes());
    out
}

/// Rebuilds the book from a whole log.
pub fn decode(bytes: &[u8]) -> Result<Book, BookError> {
    if bytes.len() < HEADER_BYTES || &bytes[0..8] != MAGIC {
        return Err(BookError::NotAnAckLog);
    }
    let field = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if field(16) != PATTERN_BLOCK_BYTES as u64 {
        return Err(BookError::BlockBytes { found: field(16) });
    }
    let mut book = Book::new(field(8), field(24));
    let records = &bytes[HEADER_BYTES..];
    if !records.len().is_multiple_of(RECORD_BYTES) {
        return Err(BookError::BadRecord {
            index: records.len() / RECORD_BYTES,
            reason: format!("cut short ({} of {RECORD_BYTES} bytes)", records.len() % RECORD_BYTES),
        });
    }
    for (index, record) in records.chunks_exact(RECORD_BYTES).enumerate() {
        let lba = u64::from_le_bytes(record[1..9].try_into().expect("8 bytes"));
        let generation = u64::from_le_bytes(record[9..17].try_into().expect("8 bytes"));
        let bad = |reason: String| BookError::BadRecord { index, reason };
        if lba >= book.blocks {
            return Err(bad(format!("block {lba} is past the load's {} blocks", book.blocks)));
        }
        match record[0] {
            KIND_SENT => book.sent(lba, generation),
            KIND_ACKNOWLEDGED => {
                if !book
                    .histories
                    .get(&lba)
                    .is_some_and(|history| history.sent.contains(&generation))
                {
                    return Err(bad(format!(
                        "block {lba}: generation {generation} acknowledged before it was sent"
                    )));
                }
                book.acknowledged(lba, generation);
            }
            kind => return Err(bad(format!("unknown kind {kind}"))),
        }
    }
    Ok(book)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[(bool, u64, u64)]) -> Vec<u8> {
        let mut bytes = encode_header(7, 100).to_vec();
        for &(acknowledged, lba, generation) in records {
            bytes.extend_from_slice(&encode_record(acknowledged, lba, generation));
        }
        bytes
    }

    #[test]
    fn decoded_log_gives_back_the_newest_acknowledged_generation_and_every_sent_one() {
        let book = decode(&log(&[
            (false, 3, 1),
            (true, 3, 1),
            (false, 3, 2),
            (false, 5, 3),
            (true, 5, 3),
        ]))
        .unwrap();
        assert_eq!((book.stream, book.blocks), (7, 100));
        assert_eq!(
            book.histories[&3],
            BlockHistory {
                acknowledged: 1,
                acknowledgements: 1,
                sent: vec![1, 2]
            }
        );
        assert_eq!(book.acknowledgements(), 2);
    }

    #[test]
    fn verdicts_allow_the_acknowledged_or_a_newer_sent_write_and_nothing_else() {
        let book = decode(&log(&[(false, 3, 1), (true, 3, 1), (false, 3, 2), (false, 4, 5)])).unwrap();
        let written = |generation| Decoded::Written { generation };
        assert_eq!(book.judge(3, &written(1)), Verdict::Expected);
        assert_eq!(book.judge(3, &written(2)), Verdict::Unacknowledged);
        assert!(matches!(book.judge(3, &Decoded::Zero), Verdict::Lost(_)));
        assert!(matches!(book.judge(3, &written(9)), Verdict::Corrupt(_)));
        assert!(matches!(book.judge(3, &Decoded::Garbage), Verdict::Corrupt(_)));
        // Block 4: sent, never acknowledged: zeroes or the write are both fine.
        assert_eq!(book.judge(4, &Decoded::Zero), Verdict::Expected);
        assert_eq!(book.judge(4, &written(5)), Verdict::Unacknowledged);
        // An older write where a newer one was acknowledged is a loss.
        let book = decode(&log(&[(false, 3, 1), (true, 3, 1), (false, 3, 2), (true, 3, 2)])).unwrap();
        assert!(matches!(book.judge(3, &written(1)), Verdict::Lost(_)));
        // A block never written must read as zeroes.
        assert!(matches!(book.judge(50, &written(1)), Verdict::Corrupt(_)));
    }

    #[test]
    fn malformed_logs_are_refused_with_the_record_that_is_wrong() {
        assert_eq!(decode(b"short"), Err(BookError::NotAnAckLog));
        let mut cut = log(&[(false, 3, 1)]);
        cut.pop();
        assert!(matches!(decode(&cut), Err(BookError::BadRecord { index: 0, .. })));
        assert!(matches!(
            decode(&log(&[(true, 3, 1)])),
            Err(BookError::BadRecord { index: 0, .. })
        ));
        assert!(matches!(
            decode(&log(&[(false, 100, 1)])),
            Err(BookError::BadRecord { index: 0, .. })
        ));
        let mut unknown = log(&[(false, 3, 1)]);
        unknown[HEADER_BYTES] = 9;
        assert!(matches!(decode(&unknown), Err(BookError::BadRecord { index: 0, .. })));
        let mut other_size = log(&[]);
        other_size[17] = 0x20; // 8192-byte blocks
        assert!(matches!(decode(&other_size), Err(BookError::BlockBytes { .. })));
    }
}
