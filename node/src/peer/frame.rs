//! Frames of the node-to-node peer protocol: pure encoding and decoding.
//!
//! Every message on a peer connection, in both directions, is one frame:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BLPF"
//! 4       2     kind (FrameKind)
//! 6       2     flags (0; reserved)
//! 8       8     request id (a reply carries its request's id)
//! 16      4     payload length in bytes (at most PAYLOAD_BYTES_MAX)
//! 20      4     crc32c of bytes 0..20 and the payload
//! 24      ...   payload
//! ```
//!
//! Little-endian throughout. The connection starts with a `Hello` frame
//! from the dialing side and a `Welcome` (or `Refused`) frame back; the
//! protocol version and cluster id travel in those (see `handshake`).

use thiserror::Error;

/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 24;
/// Largest payload of one frame (Raft snapshots of a large cluster fit).
pub const PAYLOAD_BYTES_MAX: usize = 64 << 20;
const MAGIC: [u8; 4] = *b"BLPF";
const CRC_OFFSET: usize = 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// dialer -> listener: protocol version, cluster id, node id
    Hello = 1,
    /// listener -> dialer: handshake accepted
    Welcome = 2,
    /// listener -> dialer: handshake or request refused; payload is a reason
    Refused = 3,
    /// liveness and capacity probe
    Ping = 10,
    Pong = 11,
    /// a node asks the Raft leader to confirm its serving lease (`cluster::lease`)
    LeaseRequest = 12,
    /// the leader confirmed its leadership; payload: the index to have applied
    LeaseGrant = 13,
    /// a node taking a volume over asks another whether it still serves it
    ServingQuery = 14,
    ServingAnswer = 15,
    /// Raft RPCs (JSON payloads) and their replies
    RaftAppend = 20,
    RaftVote = 21,
    RaftSnapshot = 22,
    RaftReply = 29,
    /// a metadata change for the Raft leader to commit
    Propose = 30,
    ProposeReply = 31,
    /// a node asks to join the cluster with a token
    Join = 40,
    JoinReply = 41,
    /// a coordinator's mutation of a volume for a replica (see `replication::wire`)
    ReplicaWrite = 50,
    /// the mutation is durable on the replica
    ReplicaAck = 51,
    /// a coordinator repairing its copy asks a replica for blocks
    ReplicaRead = 52,
    /// the blocks
    ReplicaData = 53,
    /// a new coordinator raises a replica's epoch before it serves
    ReplicaFence = 54,
    /// a coordinator's scrub asks how a replica's copy of a region stands
    ReplicaScrub = 55,
    /// the answer (see `replication::wire::ScrubRequest`)
    ReplicaScrubbed = 56,
}

impl FrameKind {
    fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Refused,
            10 => Self::Ping,
            11 => Self::Pong,
            12 => Self::LeaseRequest,
            13 => Self::LeaseGrant,
            14 => Self::ServingQuery,
            15 => Self::ServingAnswer,
            20 => Self::RaftAppend,
            21 => Self::RaftVote,
            22 => Self::RaftSnapshot,
            29 => Self::RaftReply,
            30 => Self::Propose,
            31 => Self::ProposeReply,
            40 => Self::Join,
            41 => Self::JoinReply,
            50 => Self::ReplicaWrite,
            51 => Self::ReplicaAck,
            52 => Self::ReplicaRead,
            53 => Self::ReplicaData,
            54 => Self::ReplicaFence,
            55 => Self::ReplicaScrub,
            56 => Self::ReplicaScrubbed,
            _ => return None,
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub request_id: u64,
    pub payload_bytes: usize,
    crc: u32,
}

/// Why bytes are not a frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// not the peer protocol (another service on the port?)
    #[error("not a ballast peer frame (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// unknown kind: a newer peer, or garbage
    #[error("unknown peer frame kind {0}")]
    UnknownKind(u16),
    /// reserved bits set
    #[error("peer frame flags {0:#x} are not supported")]
    BadFlags(u16),
    /// over the limit
    #[error("peer frame payload of {0} bytes exceeds the {PAYLOAD_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    /// the checksum does not match: corrupted in transit or a bug
    #[error("peer frame checksum mismatch (kind {kind:?}, request {request_id})")]
    BadChecksum { kind: FrameKind, request_id: u64 },
}

/// Encodes one frame (header and payload) into a new buffer.
pub fn encode(kind: FrameKind, request_id: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    encode_into(&mut out, kind, request_id, &[payload])?;
    Ok(out)
}

/// Appends one frame to `out`, its payload the concatenation of `parts`
/// (a replica write's op header and the client's data, each copied once,
/// straight into the send buffer). On an error `out` is unchanged.
pub fn encode_into(out: &mut Vec<u8>, kind: FrameKind, request_id: u64, parts: &[&[u8]]) -> Result<(), FrameError> {
    let payload_bytes: usize = parts.iter().map(|part| part.len()).sum();
    if payload_bytes > PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(payload_bytes));
    }
    let len = u32::try_from(payload_bytes).map_err(|_| FrameError::TooLarge(payload_bytes))?;
    let start = out.len();
    out.reserve(HEADER_BYTES + payload_bytes);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    let crc = parts
        .iter()
        .fold(crc32c::crc32c(&out[start..start + CRC_OFFSET]), |crc, part| {
            crc32c::crc32c_append(crc, part)
        });
    out.extend_from_slice(&crc.to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    debug_assert_eq!(out.len() - start, HEADER_BYTES + payload_bytes);
    Ok(())
}

/// Decodes a header; the payload is checked with `verify` once read.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<Header, FrameError> {
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let kind_raw = u16::from_le_bytes([bytes[4], bytes[5]]);
    let kind = FrameKind::from_u16(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if flags != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let request_id = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    let payload_bytes = usize::try_from(len).map_err(|_| FrameError::TooLarge(usize::MAX))?;
    if payload_bytes > PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLarge(payload_bytes));
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    Ok(Header {
        kind,
        request_id,
        payload_bytes,
        crc,
    })
}

/// Checks a frame's checksum over its header and payload.
pub fn verify(header_bytes: &[u8; HEADER_BYTES], header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    assert_eq!(
        payload.len(),
        header.payload_bytes,
        "payload length must match its header"
    );
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header_bytes[..CRC_OFFSET]), payload);
    if crc == header.crc {
        Ok(())
    } else {
        Err(FrameError::BadChecksum {
            kind: header.kind,
            request_id: header.request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(frame: &[u8]) -> ([u8; HEADER_BYTES], &[u8]) {
        (frame[..HEADER_BYTES].try_into().unwrap(), &frame[HEADER_BYTES..])
    }

    proptest! {
        #[test]
        fn frames_round_trip(kind in prop::sample::select(vec![FrameKind::Hello, FrameKind::Ping, FrameKind::RaftAppend, FrameKind::JoinReply]),
                             request_id: u64, payload in prop::collection::vec(any::<u8>(), 0..300)) {
            let frame = encode(kind, request_id, &payload).unwrap();
            let (header_bytes, body) = split(&frame);
            let header = decode_header(&header_bytes).unwrap();
            prop_assert_eq!(header.kind, kind);
            prop_assert_eq!(header.request_id, request_id);
            prop_assert_eq!(header.payload_bytes, payload.len());
            prop_assert!(verify(&header_bytes, &header, body).is_ok());
        }

        #[test]
        fn a_frame_from_parts_appended_to_others_equals_one_encoded_whole(
            earlier in prop::collection::vec(any::<u8>(), 0..50),
            payload in prop::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..300,
        ) {
            let cut = cut.min(payload.len());
            let mut out = earlier.clone();
            encode_into(&mut out, FrameKind::ReplicaWrite, 9, &[&payload[..cut], &payload[cut..]]).unwrap();
            prop_assert_eq!(&out[..earlier.len()], &earlier[..]);
            prop_assert_eq!(&out[earlier.len()..], &encode(FrameKind::ReplicaWrite, 9, &payload).unwrap()[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in prop::collection::vec(any::<u8>(), 1..64), bit in 0usize..(88 * 8)) {
            let mut frame = encode(FrameKind::Propose, 7, &payload).unwrap();
            let bit = bit % (frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            let (header_bytes, body) = split(&frame);
            match decode_header(&header_bytes) {
                Err(_) => {}
                Ok(header) if header.payload_bytes != body.len() => {}
                Ok(header) => prop_assert!(verify(&header_bytes, &header, body).is_err()),
            }
        }
    }

    #[test]
    fn oversized_and_foreign_frames_are_refused() {
        let mut frame = encode(FrameKind::Ping, 1, b"").unwrap();
        frame[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let (header_bytes, _) = split(&frame);
        assert!(matches!(decode_header(&header_bytes), Err(FrameError::TooLarge(_))));
        let http: [u8; HEADER_BYTES] = *b"GET / HTTP/1.1\r\nHost:a\r\n";
        assert!(matches!(decode_header(&http), Err(FrameError::BadMagic(_))));
    }
}
