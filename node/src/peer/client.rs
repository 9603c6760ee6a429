//! Dialing peers: a small pool of handshaken connections per address, one
//! request in flight per connection, every call bounded by a time-out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::frame::FrameKind;
use super::handshake::{Hello, Welcome};
use super::tls::PeerTls;
use super::{read_frame, write_frame, PeerError, PeerStream, CONNECT_TIMEOUT};

/// Idle connections kept per peer address.
pub const IDLE_CONNECTIONS_MAX: usize = 4;

struct Connection {
    stream: PeerStream,
}

/// A reply as the caller gets it: a `Refused` frame becomes `PeerError::Refused`.
fn answer(address: &str, reply: super::Frame) -> Result<(FrameKind, Vec<u8>), PeerError> {
    if reply.kind == FrameKind::Refused {
        return Err(PeerError::Refused {
            address: address.to_owned(),
            reason: String::from_utf8_lossy(&reply.payload).into_owned(),
        });
    }
    Ok((reply.kind, reply.payload))
}

/// `attempt`, failing with `PeerError::Timeout` after `timeout`.
async fn bounded<T>(
    address: &str,
    timeout: Duration,
    attempt: impl std::future::Future<Output = Result<T, PeerError>>,
) -> Result<T, PeerError> {
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| PeerError::Timeout {
            address: address.to_owned(),
            timeout,
        })?
}

/// Dials peers on behalf of this node.
pub struct PeerClient {
    /// Source address of outgoing connections: the node's advertised peer
    /// IP, so peers (and firewalls) see connections come from it.
    bind_ip: Option<std::net::IpAddr>,
    /// This node's cluster (None: not in one yet) and id, sent in every hello.
    identity: Arc<dyn Fn() -> (Option<uuid::Uuid>, u64) + Send + Sync>,
    /// This node's certificate (connections are mutual TLS).
    tls: Arc<PeerTls>,
    idle: Mutex<HashMap<String, Vec<Connection>>>,
    next_request_id: AtomicU64,
}

impl PeerClient {
    /// A client whose hellos carry what `identity` says at dial time.
    pub fn new(
        identity: Arc<dyn Fn() -> (Option<uuid::Uuid>, u64) + Send + Sync>,
        bind_ip: Option<std::net::IpAddr>,
        tls: Arc<PeerTls>,
    ) -> Self {
        Self {
            bind_ip: bind_ip.filter(|ip| !ip.is_unspecified()),
            identity,
            tls,
            idle: Mutex::new(HashMap::new()),
            next_request_id: AtomicU64::new(1),
        }
    }

    /// Sends one request to `address` and waits (at most `timeout`) for its reply.
    /// A `Refused` reply becomes `PeerError::Refused`.
    pub async fn call(
        &self,
        address: &str,
        kind: FrameKind,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(FrameKind, Vec<u8>), PeerError> {
        let attempt = async {
            let mut connection = match self.take_idle(address) {
                Some(connection) => connection,
                None => self.dial(address).await?,
            };
            let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
            write_frame(&mut connection.stream, address, kind, request_id, payload).await?;
            let reply = read_frame(&mut connection.stream, address).await?;
            if reply.request_id != request_id {
                return Err(PeerError::Protocol {
                    address: address.to_owned(),
                    reason: format!("reply to request {} arrived for request {request_id}", reply.request_id),
                });
            }
            self.put_idle(address, connection);
            answer(address, reply)
        };
        bounded(address, timeout, attempt).await
    }

    /// Sends a join request to the member at `address`, whose certificate
    /// must chain to the CA of fingerprint `ca_fingerprint` (from the
    /// token); this node presents no certificate (it has none yet).
    pub async fn call_join(
        &self,
        address: &str,
        payload: &[u8],
        ca_fingerprint: &str,
        timeout: Duration,
    ) -> Result<(FrameKind, Vec<u8>), PeerError> {
        let config = super::tls::join_client(ca_fingerprint).map_err(|reason| PeerError::Protocol {
            address: address.to_owned(),
            reason,
        })?;
        let attempt = async {
            let (mut stream, _) = self.dial_with(address, config).await?;
            write_frame(&mut stream, address, FrameKind::Join, 1, payload).await?;
            answer(address, read_frame(&mut stream, address).await?)
        };
        bounded(address, timeout, attempt).await
    }

    /// Forgets pooled connections to `address` (after the peer restarted).
    pub fn forget(&self, address: &str) {
        self.idle.lock().remove(address);
    }

    fn take_idle(&self, address: &str) -> Option<Connection> {
        self.idle.lock().get_mut(address).and_then(Vec::pop)
    }

    fn put_idle(&self, address: &str, connection: Connection) {
        let mut idle = self.idle.lock();
        let list = idle.entry(address.to_owned()).or_default();
        if list.len() < IDLE_CONNECTIONS_MAX {
            list.push(connection);
        }
    }

    async fn dial(&self, address: &str) -> Result<Connection, PeerError> {
        self.dial_stream(address).await.map(|stream| Connection { stream })
    }

    /// Opens a handshaken connection to `address` (for callers that keep it).
    pub async fn dial_stream(&self, address: &str) -> Result<PeerStream, PeerError> {
        self.dial_versioned(address).await.map(|(stream, _)| stream)
    }

    /// `dial_stream`, with the peer protocol version the connection speaks.
    pub async fn dial_versioned(&self, address: &str) -> Result<(PeerStream, u16), PeerError> {
        let config = self.tls.client().ok_or_else(|| PeerError::Refused {
            address: address.to_owned(),
            reason: "this node has no cluster certificate yet (it is not in a cluster)".into(),
        })?;
        self.dial_with(address, config).await
    }

    async fn dial_with(
        &self,
        address: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<(PeerStream, u16), PeerError> {
        let handshake = async {
            let io = |source| PeerError::Io {
                address: address.to_owned(),
                source,
            };
            let tcp = match self.bind_ip {
                None => TcpStream::connect(address).await.map_err(io)?,
                Some(ip) => {
                    let target = tokio::net::lookup_host(address)
                        .await
                        .map_err(io)?
                        .find(|target| target.is_ipv4() == ip.is_ipv4())
                        .ok_or_else(|| io(std::io::Error::other("no address of the same family")))?;
                    let socket = if ip.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()
                    } else {
                        tokio::net::TcpSocket::new_v6()
                    }
                    .map_err(io)?;
                    socket.bind(std::net::SocketAddr::new(ip, 0)).map_err(io)?;
                    socket.connect(target).await.map_err(io)?
                }
            };
            let _ = tcp.set_nodelay(true);
            // A connection whose reader a reactor hosts (`mux`) moves onto that reactor's ring.
            let tcp = crate::engine::socket::HostableSocket::new(tcp);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(super::tls::server_name(), tcp)
                .await
                .map_err(|source| PeerError::Io {
                    address: address.to_owned(),
                    source: std::io::Error::other(format!("TLS: {source}")),
                })?;
            let mut stream: PeerStream = Box::new(tls);
            let (cluster_id, node_id) = (self.identity)();
            let ours = super::handshake::local();
            let hello = Hello {
                protocol_version: ours.max,
                min_protocol_version: Some(ours.min),
                version: Some(ours.version.clone()),
                cluster_id,
                node_id,
            };
            let payload = serde_json::to_vec(&hello).expect("hello serializes");
            write_frame(&mut stream, address, FrameKind::Hello, 0, &payload).await?;
            let reply = read_frame(&mut stream, address).await?;
            match reply.kind {
                FrameKind::Welcome => {
                    let welcome: Welcome =
                        serde_json::from_slice(&reply.payload).map_err(|error| PeerError::Protocol {
                            address: address.to_owned(),
                            reason: format!("unreadable welcome: {error}"),
                        })?;
                    if !(ours.min..=ours.max).contains(&welcome.protocol_version) {
                        return Err(PeerError::Protocol {
                            address: address.to_owned(),
                            reason: format!(
                                "the peer (ballast {}) chose peer protocol {}, which this node (ballast {}) does not speak ({})",
                                welcome.version.as_deref().unwrap_or(super::handshake::UNNAMED_VERSION),
                                welcome.protocol_version,
                                ours.version,
                                ours.range()
                            ),
                        });
                    }
                    tracing::debug!(%address, peer_node = welcome.node_id, protocol = welcome.protocol_version, "peer connection open");
                    Ok((stream, welcome.protocol_version))
                }
                FrameKind::Refused => Err(PeerError::Refused {
                    address: address.to_owned(),
                    reason: String::from_utf8_lossy(&reply.payload).into_owned(),
                }),
                other => Err(PeerError::Protocol {
                    address: address.to_owned(),
                    reason: format!("expected welcome, got {other:?}"),
                }),
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| PeerError::Timeout {
                address: address.to_owned(),
                timeout: CONNECT_TIMEOUT,
            })?
    }
}
