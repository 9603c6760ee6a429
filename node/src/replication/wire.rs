//! The replicated-write message: one store mutation of one volume, sent by
//! the volume's coordinator to each in-sync replica (peer frame
//! `ReplicaWrite`, answered by `ReplicaAck` once durable or `Refused`).
//!
//! ```text
//! offset  size  field
//! 0       8     volume id
//! 8       8     epoch (fencing: a replica refuses epochs older than it knows)
//! 16      8     first block (4 KiB)
//! 24      8     block count
//! 32      8     volume sequence (the coordinator's order of mutations)
//! 40      1     kind: 1 write (data follows), 2 zero (no data)
//! 41      7     reserved, zero
//! 48      ...   data: block count x 4096 bytes for a write
//! ```

use thiserror::Error;

/// Bytes before the data.
pub const HEADER_BYTES: usize = 48;
/// Largest write in one message (the store's request limit).
pub const DATA_BYTES_MAX: usize = crate::volume::io::STORE_REQUEST_BYTES_MAX;
const BLOCK_BYTES: usize = 4096;
const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;

/// What a replica must apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    Write(Vec<u8>),
    Zero,
}

/// One mutation of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaOp {
    pub volume_id: u64,
    pub epoch: u64,
    pub lba: u64,
    pub block_count: u64,
    pub volume_sequence: u64,
    pub kind: OpKind,
}

/// Why bytes are not a replica op.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("replica op of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("replica op kind {0} is unknown")]
    Kind(u8),
    #[error("replica op reserved bytes are not zero")]
    Reserved,
    #[error("replica op carries {data_bytes} bytes for {block_count} blocks")]
    Length { data_bytes: usize, block_count: u64 },
}

/// Encodes an op.
#[must_use]
pub fn encode(op: &ReplicaOp) -> Vec<u8> {
    let data: &[u8] = match &op.kind {
        OpKind::Write(data) => data,
        OpKind::Zero => &[],
    };
    debug_assert!(matches!(op.kind, OpKind::Zero) || data.len() as u64 == op.block_count * BLOCK_BYTES as u64);
    let mut out = Vec::with_capacity(HEADER_BYTES + data.len());
    for field in [op.volume_id, op.epoch, op.lba, op.block_count, op.volume_sequence] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.push(match op.kind {
        OpKind::Write(_) => KIND_WRITE,
        OpKind::Zero => KIND_ZERO,
    });
    out.extend_from_slice(&[0u8; 7]);
    out.extend_from_slice(data);
    out
}

/// Decodes an op, checking its lengths.
pub fn decode(bytes: &[u8]) -> Result<ReplicaOp, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Short(bytes.len()));
    }
    let field = |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    let (volume_id, epoch, lba, block_count, volume_sequence) = (field(0), field(1), field(2), field(3), field(4));
    if bytes[41..HEADER_BYTES].iter().any(|b| *b != 0) {
        return Err(WireError::Reserved);
    }
    let data = &bytes[HEADER_BYTES..];
    let kind = match bytes[40] {
        KIND_WRITE => {
            let expected = block_count.checked_mul(BLOCK_BYTES as u64);
            if expected != Some(data.len() as u64) || data.is_empty() || data.len() > DATA_BYTES_MAX {
                return Err(WireError::Length {
                    data_bytes: data.len(),
                    block_count,
                });
            }
            OpKind::Write(data.to_vec())
        }
        KIND_ZERO => {
            if !data.is_empty() || block_count == 0 {
                return Err(WireError::Length {
                    data_bytes: data.len(),
                    block_count,
                });
            }
            OpKind::Zero
        }
        other => return Err(WireError::Kind(other)),
    };
    Ok(ReplicaOp {
        volume_id,
        epoch,
        lba,
        block_count,
        volume_sequence,
        kind,
    })
}

/// Bytes of a read request (`ReplicaRead`): volume id, first block, block count.
pub const READ_REQUEST_BYTES: usize = 24;

/// Encodes a read request.
#[must_use]
pub fn encode_read(volume_id: u64, lba: u64, block_count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(READ_REQUEST_BYTES);
    for field in [volume_id, lba, block_count] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out
}

/// Decodes a read request, bounded like a write.
pub fn decode_read(bytes: &[u8]) -> Result<(u64, u64, u64), WireError> {
    if bytes.len() != READ_REQUEST_BYTES {
        return Err(WireError::Short(bytes.len()));
    }
    let field = |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    let (volume_id, lba, block_count) = (field(0), field(1), field(2));
    if block_count == 0 || block_count.saturating_mul(BLOCK_BYTES as u64) > DATA_BYTES_MAX as u64 {
        return Err(WireError::Length {
            data_bytes: 0,
            block_count,
        });
    }
    Ok((volume_id, lba, block_count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ops_round_trip(volume_id: u64, epoch: u64, lba: u64, sequence: u64, blocks in 1u64..4, zero: bool, fill: u8) {
            let kind = if zero { OpKind::Zero } else { OpKind::Write(vec![fill; usize::try_from(blocks).unwrap() * 4096]) };
            let op = ReplicaOp { volume_id, epoch, lba, block_count: blocks, volume_sequence: sequence, kind };
            prop_assert_eq!(decode(&encode(&op)).unwrap(), op);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn read_requests_round_trip_and_are_bounded() {
        assert_eq!(decode_read(&encode_read(3, 9, 256)).unwrap(), (3, 9, 256));
        assert!(decode_read(&encode_read(3, 9, 0)).is_err());
        assert!(decode_read(&encode_read(3, 9, 257)).is_err());
        assert!(decode_read(&[0; 23]).is_err());
    }

    #[test]
    fn lengths_that_disagree_with_the_block_count_are_refused() {
        let op = ReplicaOp {
            volume_id: 1,
            epoch: 1,
            lba: 0,
            block_count: 2,
            volume_sequence: 1,
            kind: OpKind::Write(vec![0; 4096]),
        };
        let mut bytes = encode(&ReplicaOp { block_count: 1, ..op });
        bytes[24..32].copy_from_slice(&2u64.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(WireError::Length { .. })));
        bytes[40] = 9;
        assert!(matches!(decode(&bytes), Err(WireError::Kind(9))));
    }
}
