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
//! 40      1     kind: 1 write (data follows), 2 zero (no data),
//!               3 snapshot (block count 0), 4 restore (first block 0,
//!               block count: the volume's; a replica that misses it is
//!               marked dirty over all of it)
//! 41      1     flags: bit 0 = background work (a resync's copy: the
//!               replica's disk scheduler puts it below every client;
//!               sent only on links of peer protocol 4 and up)
//! 42      6     reserved, zero
//! 48      ...   data: block count x 4096 bytes for a write;
//!               snapshot: u64 snapshot id, then its name (UTF-8, 1-64 bytes);
//!               restore: u64 id of the snapshot the volume goes back to
//! ```
//!
//! A snapshot or restore is ordered with the volume's writes like any
//! mutation: the coordinator sends it while it holds the whole volume's
//! range lock, so every copy takes it at the same point.

use std::borrow::Cow;

use bytes::Bytes;
use thiserror::Error;

/// Bytes before the data.
pub const HEADER_BYTES: usize = 48;
/// Largest write in one message (the store's request limit).
pub const DATA_BYTES_MAX: usize = crate::volume::io::STORE_REQUEST_BYTES_MAX;
const BLOCK_BYTES: usize = 4096;
const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_RESTORE: u8 = 4;
/// Header byte 41: the op is background work (`FLAG_BACKGROUND`).
const FLAGS_AT: usize = 41;
/// The op is a resync's copy, not a client's mutation.
pub const FLAG_BACKGROUND: u8 = 1;

/// Marks an encoded header as background work (peer protocol 4 and up).
pub fn mark_background(header: &mut [u8; HEADER_BYTES]) {
    header[FLAGS_AT] |= FLAG_BACKGROUND;
}

/// Whether an encoded op (checked by `decode`) is marked as background work.
#[must_use]
pub fn is_background(payload: &[u8]) -> bool {
    payload.get(FLAGS_AT).is_some_and(|flags| flags & FLAG_BACKGROUND != 0)
}
/// Longest snapshot name.
pub const SNAPSHOT_NAME_BYTES_MAX: usize = 64;

/// What a replica must apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// The data: shared with the coordinator's own write, or a slice of
    /// the frame it arrived in (no copy between the wire and the store).
    Write(Bytes),
    Zero,
    /// The volume's data, as of this point, is cloned to a new read-only
    /// volume `id`, snapshot `name` of it.
    Snapshot {
        id: u64,
        name: String,
    },
    /// The volume's data becomes that of its snapshot `id`.
    Restore {
        id: u64,
    },
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
    #[error("replica op names a snapshot that is not 1-64 bytes of UTF-8")]
    SnapshotName,
}

/// Encodes an op into one buffer.
#[must_use]
pub fn encode(op: &ReplicaOp) -> Vec<u8> {
    let (header, data) = encode_parts(op);
    [&header[..], &data].concat()
}

/// An op as its header and its data, to be sent as one payload
/// (`MuxLink::call_parts`) without first joining them: a write's data is
/// borrowed, not copied.
#[must_use]
pub fn encode_parts(op: &ReplicaOp) -> ([u8; HEADER_BYTES], Cow<'_, [u8]>) {
    let data: Cow<'_, [u8]> = match &op.kind {
        OpKind::Write(data) => Cow::Borrowed(data),
        OpKind::Zero => Cow::Borrowed(&[]),
        OpKind::Snapshot { id, name } => Cow::Owned([&id.to_le_bytes()[..], name.as_bytes()].concat()),
        OpKind::Restore { id } => Cow::Owned(id.to_le_bytes().to_vec()),
    };
    debug_assert!(!matches!(op.kind, OpKind::Write(_)) || data.len() as u64 == op.block_count * BLOCK_BYTES as u64);
    let mut header = [0u8; HEADER_BYTES];
    for (index, field) in [op.lba, op.block_count, op.volume_sequence].into_iter().enumerate() {
        header[16 + index * 8..24 + index * 8].copy_from_slice(&field.to_le_bytes());
    }
    header[..8].copy_from_slice(&op.volume_id.to_le_bytes());
    header[8..16].copy_from_slice(&op.epoch.to_le_bytes());
    header[40] = match op.kind {
        OpKind::Write(_) => KIND_WRITE,
        OpKind::Zero => KIND_ZERO,
        OpKind::Snapshot { .. } => KIND_SNAPSHOT,
        OpKind::Restore { .. } => KIND_RESTORE,
    };
    (header, data)
}

/// Decodes an op, checking its lengths; a write's data is a slice of
/// `payload`, not a copy.
pub fn decode(payload: impl Into<Bytes>) -> Result<ReplicaOp, WireError> {
    let payload: Bytes = payload.into();
    let bytes = &payload[..];
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Short(bytes.len()));
    }
    let field = |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    let (volume_id, epoch, lba, block_count, volume_sequence) = (field(0), field(1), field(2), field(3), field(4));
    if bytes[FLAGS_AT] & !FLAG_BACKGROUND != 0 || bytes[FLAGS_AT + 1..HEADER_BYTES].iter().any(|b| *b != 0) {
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
            OpKind::Write(payload.slice(HEADER_BYTES..))
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
        KIND_SNAPSHOT | KIND_RESTORE => {
            let snapshot = bytes[40] == KIND_SNAPSHOT;
            let name_bytes = data.len().saturating_sub(8);
            let fits = if snapshot {
                (1..=SNAPSHOT_NAME_BYTES_MAX).contains(&name_bytes)
            } else {
                data.len() == 8
            };
            // A restore names the whole volume in its range (a replica that
            // misses it must copy all of it); a snapshot changes no block.
            if (snapshot && block_count != 0) || data.len() < 8 || (!snapshot && !fits) {
                return Err(WireError::Length {
                    data_bytes: data.len(),
                    block_count,
                });
            }
            let id = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
            if snapshot {
                let name = std::str::from_utf8(&data[8..]).map_err(|_| WireError::SnapshotName)?;
                if !fits {
                    return Err(WireError::SnapshotName);
                }
                OpKind::Snapshot {
                    id,
                    name: name.to_owned(),
                }
            } else {
                OpKind::Restore { id }
            }
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

/// Most blocks one scrub request covers (64 MiB).
pub const SCRUB_BLOCKS_MAX: u64 = 16384;
/// Bytes of a scrub request (`ReplicaScrub`).
pub const SCRUB_REQUEST_BYTES: usize = 40;
const SCRUB_FLAG_VERIFY: u64 = 1;
const SCRUB_SAME: u8 = 0;
const SCRUB_STATES: u8 = 1;
const STATE_HOLE: u8 = 0;
const STATE_DATA: u8 = 1;
const STATE_BAD: u8 = 2;

/// A coordinator asks a replica how its copy of a region stands
/// (`ReplicaScrub`, answered by `ReplicaScrubbed`).
///
/// ```text
/// offset  size  field
/// 0       8     volume id
/// 8       8     first block (4 KiB)
/// 16      8     block count, 1..=16384
/// 24      8     flags: bit 0 verify (read the data and check it against its crcs); others zero
/// 32      8     the coordinator's digest of the region (`digest`)
/// ```
///
/// The answer is one byte 0 when the replica's digest is the same, else
/// byte 1 and per block 5 bytes: state (0 hole, 1 data, 2 bad) and the
/// data's crc32c (little-endian; zero unless data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubRequest {
    pub volume_id: u64,
    pub lba: u64,
    pub block_count: u64,
    pub verify: bool,
    pub digest: u64,
}

/// Encodes a scrub request.
#[must_use]
pub fn encode_scrub(request: &ScrubRequest) -> Vec<u8> {
    let flags = if request.verify { SCRUB_FLAG_VERIFY } else { 0 };
    let mut out = Vec::with_capacity(SCRUB_REQUEST_BYTES);
    for field in [
        request.volume_id,
        request.lba,
        request.block_count,
        flags,
        request.digest,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out
}

/// Decodes a scrub request, bounded in size and range.
pub fn decode_scrub(bytes: &[u8]) -> Result<ScrubRequest, WireError> {
    if bytes.len() != SCRUB_REQUEST_BYTES {
        return Err(WireError::Short(bytes.len()));
    }
    let field = |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    let (volume_id, lba, block_count, flags, digest) = (field(0), field(1), field(2), field(3), field(4));
    if block_count == 0
        || block_count > SCRUB_BLOCKS_MAX
        || lba
            .checked_add(block_count)
            .is_none_or(|end| end > disk_layout::LBA_LIMIT)
    {
        return Err(WireError::Length {
            data_bytes: 0,
            block_count,
        });
    }
    if flags & !SCRUB_FLAG_VERIFY != 0 {
        return Err(WireError::Reserved);
    }
    Ok(ScrubRequest {
        volume_id,
        lba,
        block_count,
        verify: flags & SCRUB_FLAG_VERIFY != 0,
        digest,
    })
}

/// A 64-bit digest of a region's block states (two crc32c with different seeds).
#[must_use]
pub fn digest(states: &[disk_layout::BlockState]) -> u64 {
    let bytes = encode_states(states);
    let low = crc32c::crc32c(&bytes);
    let high = crc32c::crc32c_append(0x5C5C_5C5C, &bytes);
    (u64::from(high) << 32) | u64::from(low)
}

fn encode_states(states: &[disk_layout::BlockState]) -> Vec<u8> {
    use disk_layout::BlockState;
    let mut out = Vec::with_capacity(states.len() * 5);
    for state in states {
        let (tag, crc) = match *state {
            BlockState::Hole => (STATE_HOLE, 0),
            BlockState::Data { crc } => (STATE_DATA, crc),
            BlockState::Bad => (STATE_BAD, 0),
        };
        out.push(tag);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

/// A replica's answer: None when its region has the digest it was sent.
#[must_use]
pub fn encode_scrub_reply(states: Option<&[disk_layout::BlockState]>) -> Vec<u8> {
    match states {
        None => vec![SCRUB_SAME],
        Some(states) => {
            let mut out = vec![SCRUB_STATES];
            out.extend(encode_states(states));
            out
        }
    }
}

/// Decodes a replica's answer to a request for `block_count` blocks.
pub fn decode_scrub_reply(bytes: &[u8], block_count: u64) -> Result<Option<Vec<disk_layout::BlockState>>, WireError> {
    use disk_layout::BlockState;
    match bytes.split_first() {
        Some((&SCRUB_SAME, [])) => Ok(None),
        Some((&SCRUB_STATES, rest)) => {
            if block_count.checked_mul(5) != Some(rest.len() as u64) {
                return Err(WireError::Length {
                    data_bytes: rest.len(),
                    block_count,
                });
            }
            rest.chunks_exact(5)
                .map(|entry| {
                    let crc = u32::from_le_bytes(entry[1..5].try_into().expect("4 bytes"));
                    match (entry[0], crc) {
                        (STATE_HOLE, 0) => Ok(BlockState::Hole),
                        (STATE_DATA, crc) => Ok(BlockState::Data { crc }),
                        (STATE_BAD, 0) => Ok(BlockState::Bad),
                        (STATE_HOLE | STATE_BAD, _) => Err(WireError::Reserved),
                        (other, _) => Err(WireError::Kind(other)),
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        Some((&other, _)) => Err(WireError::Kind(other)),
        None => Err(WireError::Short(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_mark_travels_in_the_header_and_an_unknown_flag_is_refused() {
        let op = ReplicaOp {
            volume_id: 3,
            epoch: 2,
            lba: 8,
            block_count: 1,
            volume_sequence: 9,
            kind: OpKind::Write(Bytes::from(vec![5u8; 4096])),
        };
        let (mut header, data) = encode_parts(&op);
        let plain = [&header[..], &data].concat();
        assert!(!is_background(&plain));
        mark_background(&mut header);
        let marked = [&header[..], &data].concat();
        assert!(is_background(&marked));
        assert_eq!(decode(marked.clone()).unwrap(), op, "the mark changes nothing else");
        let mut unknown = marked;
        unknown[FLAGS_AT] |= 2;
        assert_eq!(decode(unknown), Err(WireError::Reserved));
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ops_round_trip(volume_id: u64, epoch: u64, lba: u64, sequence: u64, blocks in 1u64..4, zero: bool, fill: u8) {
            let kind = if zero { OpKind::Zero } else { OpKind::Write(vec![fill; usize::try_from(blocks).unwrap() * 4096].into()) };
            let op = ReplicaOp { volume_id, epoch, lba, block_count: blocks, volume_sequence: sequence, kind };
            prop_assert_eq!(decode(encode(&op)).unwrap(), op);
        }

        #[test]
        fn snapshot_and_restore_ops_round_trip(volume_id: u64, epoch: u64, sequence: u64, id: u64, name in "[a-z0-9][a-z0-9_.-]{0,63}", restore: bool) {
            let kind = if restore { OpKind::Restore { id } } else { OpKind::Snapshot { id, name } };
            let op = ReplicaOp { volume_id, epoch, lba: 0, block_count: 0, volume_sequence: sequence, kind };
            prop_assert_eq!(decode(encode(&op)).unwrap(), op);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(bytes);
        }
    }

    #[test]
    fn snapshot_ops_with_blocks_or_bad_names_are_refused() {
        let op = |kind| ReplicaOp {
            volume_id: 1,
            epoch: 1,
            lba: 0,
            block_count: 0,
            volume_sequence: 1,
            kind,
        };
        let mut with_blocks = encode(&op(OpKind::Snapshot {
            id: 5,
            name: "a".into(),
        }));
        with_blocks[24] = 1;
        assert!(matches!(decode(with_blocks.clone()), Err(WireError::Length { .. })));
        let whole_volume = ReplicaOp {
            block_count: 4096,
            ..op(OpKind::Restore { id: 5 })
        };
        assert_eq!(decode(encode(&whole_volume)), Ok(whole_volume));
        let long = encode(&op(OpKind::Snapshot {
            id: 5,
            name: "x".repeat(SNAPSHOT_NAME_BYTES_MAX + 1),
        }));
        assert_eq!(decode(long.clone()), Err(WireError::SnapshotName));
        let mut nameless = encode(&op(OpKind::Snapshot {
            id: 5,
            name: "a".into(),
        }));
        nameless.pop();
        assert!(decode(nameless.clone()).is_err());
        let mut not_utf8 = encode(&op(OpKind::Snapshot {
            id: 5,
            name: "a".into(),
        }));
        *not_utf8.last_mut().unwrap() = 0xFF;
        assert_eq!(decode(not_utf8.clone()), Err(WireError::SnapshotName));
    }

    #[test]
    fn scrub_requests_and_answers_round_trip_and_are_bounded() {
        use disk_layout::BlockState;
        let request = ScrubRequest {
            volume_id: 7,
            lba: 1024,
            block_count: SCRUB_BLOCKS_MAX,
            verify: true,
            digest: 0xDEAD_BEEF_0000_0001,
        };
        assert_eq!(decode_scrub(&encode_scrub(&request)), Ok(request));
        for bad in [
            ScrubRequest {
                block_count: 0,
                ..request
            },
            ScrubRequest {
                block_count: SCRUB_BLOCKS_MAX + 1,
                ..request
            },
            ScrubRequest {
                lba: u64::MAX - 1,
                ..request
            },
        ] {
            assert!(decode_scrub(&encode_scrub(&bad)).is_err(), "{bad:?}");
        }
        let mut flagged = encode_scrub(&request);
        flagged[24] = 3;
        assert_eq!(decode_scrub(&flagged), Err(WireError::Reserved));
        let states = vec![BlockState::Hole, BlockState::Data { crc: 9 }, BlockState::Bad];
        assert_eq!(
            decode_scrub_reply(&encode_scrub_reply(Some(&states)), 3),
            Ok(Some(states.clone()))
        );
        assert_eq!(decode_scrub_reply(&encode_scrub_reply(None), 3), Ok(None));
        assert!(decode_scrub_reply(&encode_scrub_reply(Some(&states)), 4).is_err());
        assert!(decode_scrub_reply(&[], 1).is_err());
        assert!(decode_scrub_reply(&[1, 7, 0, 0, 0, 0], 1).is_err());
        assert_ne!(digest(&states), digest(&states[..2]));
        assert_ne!(
            digest(&[BlockState::Data { crc: 1 }]),
            digest(&[BlockState::Data { crc: 2 }])
        );
    }

    #[test]
    fn read_requests_round_trip_and_are_bounded() {
        assert_eq!(decode_read(&encode_read(3, 9, 256)).unwrap(), (3, 9, 256));
        assert!(decode_read(&encode_read(3, 9, 0)).is_err());
        assert!(decode_read(&encode_read(3, 9, 257)).is_err());
        assert!(decode_read(&[0; 23]).is_err());
    }

    #[test]
    fn a_decoded_write_shares_the_frame_and_its_parts_join_to_the_whole() {
        let op = ReplicaOp {
            volume_id: 4,
            epoch: 2,
            lba: 8,
            block_count: 2,
            volume_sequence: 3,
            kind: OpKind::Write(Bytes::from(vec![7u8; 8192])),
        };
        let (header, data) = encode_parts(&op);
        assert!(
            matches!(data, Cow::Borrowed(_)),
            "a write's data is borrowed, not copied"
        );
        let payload = Bytes::from([&header[..], &data].concat());
        assert_eq!(&payload[..], &encode(&op)[..]);
        let decoded = decode(payload.clone()).unwrap();
        let OpKind::Write(data) = &decoded.kind else {
            panic!("not a write: {decoded:?}");
        };
        assert_eq!(
            data.as_ptr(),
            payload[HEADER_BYTES..].as_ptr(),
            "the data is the frame's own bytes"
        );
        assert_eq!(decoded, op);
    }

    #[test]
    fn lengths_that_disagree_with_the_block_count_are_refused() {
        let op = ReplicaOp {
            volume_id: 1,
            epoch: 1,
            lba: 0,
            block_count: 2,
            volume_sequence: 1,
            kind: OpKind::Write(vec![0; 4096].into()),
        };
        let mut bytes = encode(&ReplicaOp { block_count: 1, ..op });
        bytes[24..32].copy_from_slice(&2u64.to_le_bytes());
        assert!(matches!(decode(bytes.clone()), Err(WireError::Length { .. })));
        bytes[40] = 9;
        assert!(matches!(decode(bytes), Err(WireError::Kind(9))));
    }
}
