//! A multiplexed peer connection for the data path: many requests in
//! flight on one connection, replies matched by request id in whatever
//! order the peer finishes them. Redials after the connection breaks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::WriteHalf;
use tokio::sync::oneshot;

use super::client::PeerClient;
use super::frame::FrameKind;
use super::{read_frame, Frame, PeerError, PeerStream};
use tokio::io::AsyncWriteExt;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// Runs a connection's reader where its replies are cheapest to take (on a
/// reactor, whose ring then says when replies arrive, and whose callers it
/// wakes without a system call); hands it back when there is no such place.
pub type ReaderHost =
    Arc<dyn Fn(super::server::HostedConnection) -> Result<(), super::server::HostedConnection> + Send + Sync>;

/// Ends a connection when its reader ends (or is dropped with its reactor):
/// marks it dead and fails every caller still waiting.
struct Closed {
    pending: Pending,
    dead: Arc<AtomicBool>,
}

impl Drop for Closed {
    fn drop(&mut self) {
        self.dead.store(true, Ordering::Release);
        // Dropping the senders fails every caller still waiting.
        self.pending.lock().clear();
    }
}

struct Connection {
    writer: tokio::sync::Mutex<WriteHalf<PeerStream>>,
    /// Frames encoded and not yet sent: whoever takes the writer sends
    /// all of them at once (one TLS record and one system call for the
    /// frames of many concurrent requests).
    outbox: Mutex<Vec<u8>>,
    pending: Pending,
    dead: Arc<AtomicBool>,
    next_request_id: AtomicU64,
    reader: futures::future::AbortHandle,
    /// The peer protocol version it speaks.
    protocol: u16,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One peer, many requests in flight.
pub struct MuxLink {
    client: Arc<PeerClient>,
    address: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    reader_host: Option<ReaderHost>,
}

/// Removes a request's reply slot if its caller gives up (time-out).
struct Slot<'a> {
    pending: &'a Pending,
    request_id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.request_id);
    }
}

impl MuxLink {
    /// A link whose connections' readers run on the runtime, or where
    /// `reader_host` puts them.
    #[must_use]
    pub fn new(client: Arc<PeerClient>, address: String, reader_host: Option<ReaderHost>) -> Self {
        Self {
            client,
            address,
            connection: tokio::sync::Mutex::new(None),
            reader_host,
        }
    }

    /// The peer's address.
    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The peer protocol version the link's connection speaks (connecting
    /// if it has none).
    pub async fn protocol(&self) -> Result<u16, PeerError> {
        self.connection().await.map(|connection| connection.protocol)
    }

    async fn connection(&self) -> Result<Arc<Connection>, PeerError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.dead.load(Ordering::Acquire) {
                return Ok(Arc::clone(connection));
            }
        }
        let (stream, protocol) = self.client.dial_versioned(&self.address).await?;
        let (mut reader, writer) = tokio::io::split(stream);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let dead = Arc::new(AtomicBool::new(false));
        let (reading, reader) = {
            let closed = Closed {
                pending: Arc::clone(&pending),
                dead: Arc::clone(&dead),
            };
            let address = self.address.clone();
            futures::future::abortable(async move {
                let closed = closed;
                while let Ok(frame) = read_frame(&mut reader, &address).await {
                    if let Some(sender) = closed.pending.lock().remove(&frame.request_id) {
                        let _ = sender.send(frame);
                    }
                }
            })
        };
        let reading: super::server::HostedConnection = Box::pin(async move {
            let _ = reading.await;
        });
        let unhosted = match &self.reader_host {
            Some(host) => host(reading).err(),
            None => Some(reading),
        };
        if let Some(reading) = unhosted {
            tokio::spawn(reading);
        }
        let connection = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(writer),
            outbox: Mutex::new(Vec::new()),
            pending,
            dead,
            next_request_id: AtomicU64::new(1),
            reader,
            protocol,
        });
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// Sends what `connection`'s outbox holds, unless an earlier caller
    /// already took it (then the frame this caller added went with theirs).
    /// With other requests in flight, callers polled in one turn of the same
    /// thread (a reactor serving many requests) let the others add theirs
    /// first: the send waits one yield. The peer, serving the connection on
    /// its reactor, then takes the frames of one send in one turn (one
    /// group commit, one reply send).
    async fn send_outbox(&self, connection: &Connection) -> Result<(), PeerError> {
        // Alone (nothing else in flight here): no one to wait for.
        if connection.pending.lock().len() > 1 {
            tokio::task::yield_now().await;
        }
        let mut writer = connection.writer.lock().await;
        let bytes = std::mem::take(&mut *connection.outbox.lock());
        if bytes.is_empty() {
            return Ok(());
        }
        let io_error = |source| PeerError::Io {
            address: self.address.clone(),
            source,
        };
        writer.write_all(&bytes).await.map_err(io_error)?;
        writer.flush().await.map_err(io_error)
    }

    /// Sends one request and waits (at most `timeout`, dial included) for its reply.
    pub async fn call(&self, kind: FrameKind, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, PeerError> {
        self.call_parts(kind, &[payload], timeout).await
    }

    /// `call` with the payload in parts (a replica write's op header and
    /// its data): they are copied once, into the connection's send buffer.
    pub async fn call_parts(&self, kind: FrameKind, parts: &[&[u8]], timeout: Duration) -> Result<Vec<u8>, PeerError> {
        let attempt = async {
            let connection = self.connection().await?;
            let request_id = connection.next_request_id.fetch_add(1, Ordering::Relaxed);
            let (sender, receiver) = oneshot::channel();
            connection.pending.lock().insert(request_id, sender);
            let _slot = Slot {
                pending: &connection.pending,
                request_id,
            };
            super::frame::encode_into(&mut connection.outbox.lock(), kind, request_id, parts).map_err(|source| {
                PeerError::Frame {
                    address: self.address.clone(),
                    source,
                }
            })?;
            if let Err(error) = self.send_outbox(&connection).await {
                connection.dead.store(true, Ordering::Release);
                return Err(error);
            }
            let reply = receiver.await.map_err(|_| PeerError::Io {
                address: self.address.clone(),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "peer connection closed"),
            })?;
            if reply.kind == FrameKind::Refused {
                return Err(PeerError::Refused {
                    address: self.address.clone(),
                    reason: String::from_utf8_lossy(&reply.payload).into_owned(),
                });
            }
            Ok(reply.payload)
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| PeerError::Timeout {
                address: self.address.clone(),
                timeout,
            })?
    }
}
