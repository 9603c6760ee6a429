//! The node-to-node peer protocol on `--listen-peer`: length-prefixed,
//! checksummed frames (`frame`), a handshake that checks the protocol
//! version and the cluster id (`handshake`), a listener that hands each
//! request to a `PeerHandler` (`server`), and a pooled client (`client`).
//! Raft and replication ride on it, inside mutual TLS (`tls`): only
//! holders of a certificate from the cluster's CA are members.

pub mod client;
pub mod frame;
pub mod handshake;
pub mod mux;
pub mod server;
pub mod tls;

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use frame::{FrameError, FrameKind, Header, HEADER_BYTES};

/// A peer connection's byte stream (TLS over TCP).
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> PeerIo for T {}
pub type PeerStream = Box<dyn PeerIo>;

/// The highest peer protocol version this build speaks. 2 brought the
/// Raft commands of registered backup targets and backup schedules, 3 a
/// volume's I/O priority and limits (`SetQos`); each is proposed only once
/// every member speaks it: `Cluster::require_protocol`. 4 reads a replica
/// write's background flag (a resync's copy), sent only on links that
/// negotiated 4.
pub const PROTOCOL_VERSION: u16 = 4;
/// The lowest it still speaks (the previous release's, once there is one):
/// see `handshake` on rolling upgrades.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Longest a dial plus handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of peer connections.
#[derive(Debug, Error)]
pub enum PeerError {
    /// the socket failed or closed
    #[error("peer {address}: {source}")]
    Io {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// the bytes are not valid frames
    #[error("peer {address}: {source}")]
    Frame {
        address: String,
        #[source]
        source: FrameError,
    },
    /// the peer refused the handshake or the request
    #[error("peer {address} refused: {reason}")]
    Refused { address: String, reason: String },
    /// the peer answered with something unexpected
    #[error("peer {address}: {reason}")]
    Protocol { address: String, reason: String },
    /// no answer in time
    #[error("peer {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

impl PeerError {
    /// Whether retrying (maybe elsewhere) could help: the network, not a refusal.
    #[must_use]
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Timeout { .. })
    }
}

/// One frame read off a connection (checksum verified).
pub struct Frame {
    pub kind: FrameKind,
    pub request_id: u64,
    pub payload: Vec<u8>,
}

/// Reads one frame.
pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S, address: &str) -> Result<Frame, PeerError> {
    let io = |source| PeerError::Io {
        address: address.to_owned(),
        source,
    };
    let frame_error = |source| PeerError::Frame {
        address: address.to_owned(),
        source,
    };
    let mut header_bytes = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header_bytes).await.map_err(io)?;
    let header: Header = frame::decode_header(&header_bytes).map_err(frame_error)?;
    let mut payload = vec![0u8; header.payload_bytes];
    stream.read_exact(&mut payload).await.map_err(io)?;
    frame::verify(&header_bytes, &header, &payload).map_err(frame_error)?;
    Ok(Frame {
        kind: header.kind,
        request_id: header.request_id,
        payload,
    })
}

/// Writes one frame.
pub async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    address: &str,
    kind: FrameKind,
    request_id: u64,
    payload: &[u8],
) -> Result<(), PeerError> {
    let bytes = frame::encode(kind, request_id, payload).map_err(|source| PeerError::Frame {
        address: address.to_owned(),
        source,
    })?;
    stream.write_all(&bytes).await.map_err(|source| PeerError::Io {
        address: address.to_owned(),
        source,
    })
}
