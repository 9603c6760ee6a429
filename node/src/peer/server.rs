//! The peer listener: handshake, then one request at a time per
//! connection, each answered with a frame carrying the request's id.
//! Dialers open several connections for concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use tokio::io::AsyncWriteExt;

use super::frame::{self, FrameKind};
use super::handshake::{admit, Admitted, Hello, Welcome};
use super::tls::PeerTls;
use super::{read_frame, write_frame, Frame, PeerError, PeerStream};
use crate::in_flight::InFlight;

/// Most peer connections served at once.
pub const CONNECTIONS_MAX: usize = 256;
/// Requests answered at once on one connection.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 128;
/// Receive buffer of a connection (a payload at least this big bypasses it).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// A connection idle this long is closed (dialers redial).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Answers requests that arrive over the peer protocol.
pub trait PeerHandler: Send + Sync + 'static {
    /// This node's cluster (None: not in one) and node id, for the handshake.
    fn identity(&self) -> (Option<uuid::Uuid>, u64);

    /// Runs a member connection's request loop (`served`) where its requests
    /// are cheapest to serve, e.g. on the reactor that owns the disk its
    /// replica writes go to; hands it back to run on the caller's task when
    /// there is no such place.
    fn host(&self, served: HostedConnection) -> Result<(), HostedConnection> {
        Err(served)
    }

    /// Answers one request: the reply's kind and payload, or a refusal reason.
    fn handle(
        &self,
        kind: FrameKind,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(FrameKind, Vec<u8>), String>> + Send;
}

/// A connection's request loop, to be run to completion (`PeerHandler::host`).
pub type HostedConnection = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Serves peers until `stop` turns true. Every connection is TLS with this
/// node's certificate (none yet: connections are closed at once); a client
/// with a certificate of the cluster's CA is a member, one without may only
/// join, any other is refused by the TLS handshake.
pub async fn serve<H: PeerHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    tls: Arc<PeerTls>,
    mut stop: watch::Receiver<bool>,
) {
    // As on the API and NBD ports: when every slot is taken, a new
    // connection evicts the oldest one still in its handshake, so a flood of
    // silent sockets cannot lock a member out.
    let admission = crate::admission::Admission::new("peer", CONNECTIONS_MAX);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Some(config) = tls.server() else {
            tracing::debug!(%remote, "peer connection closed: this node has no cluster certificate yet");
            continue;
        };
        let Some(slot) = admission.admit(&remote).await else {
            continue;
        };
        let handler = Arc::clone(&handler);
        let stop = stop.clone();
        admission.spawn(&mut connections, move |ticket| async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            // A member's connection is served on a reactor (`PeerHandler::host`),
            // whose ring then tells it when the socket is ready.
            let stream = crate::engine::socket::HostableSocket::new(stream);
            let accepted = tokio::time::timeout(
                super::CONNECT_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(config).accept(stream),
            )
            .await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::warn!(%remote, %error, "peer refused: TLS handshake failed (no certificate of this cluster?)");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "peer refused: no TLS handshake in time");
                    return;
                }
            };
            let member = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|certs| !certs.is_empty());
            let stream: PeerStream = Box::new(stream);
            if let Err(error) = connection(stream, &remote.to_string(), handler, member, stop, ticket).await {
                tracing::debug!(%remote, %error, "peer connection ended");
            }
        });
    }
    // Connections end on `stop` themselves (as before the listener stops).
    connections.detach_all();
}

async fn connection<H: PeerHandler>(
    mut stream: PeerStream,
    address: &str,
    handler: Arc<H>,
    member: bool,
    stop: watch::Receiver<bool>,
    ticket: crate::admission::Ticket,
) -> Result<(), PeerError> {
    let first = tokio::time::timeout(super::CONNECT_TIMEOUT, read_frame(&mut stream, address))
        .await
        .map_err(|_| PeerError::Timeout {
            address: address.to_owned(),
            timeout: super::CONNECT_TIMEOUT,
        })??;
    let (cluster_id, node_id) = handler.identity();
    let hello: Result<Hello, String> = if first.kind == FrameKind::Hello {
        serde_json::from_slice(&first.payload).map_err(|error| format!("unreadable hello: {error}"))
    } else {
        Err(format!("expected a hello frame, got {:?}", first.kind))
    };
    // Without a member's certificate, whatever the hello claims: join only.
    let ours = super::handshake::local();
    let admitted = hello
        .and_then(|hello| admit(&hello, cluster_id, ours))
        .map(|(admitted, protocol)| (if member { admitted } else { Admitted::JoinOnly }, protocol));
    let (admitted, protocol) = match admitted {
        Ok(admitted) => admitted,
        Err(reason) => {
            tracing::warn!(remote = %address, %reason, "peer refused at handshake");
            write_frame(
                &mut stream,
                address,
                FrameKind::Refused,
                first.request_id,
                reason.as_bytes(),
            )
            .await?;
            return Ok(());
        }
    };
    let welcome = Welcome {
        protocol_version: protocol,
        version: Some(ours.version.clone()),
        cluster_id,
        node_id,
    };
    let payload = serde_json::to_vec(&welcome).expect("welcome serializes");
    write_frame(&mut stream, address, FrameKind::Welcome, first.request_id, &payload).await?;
    // Admitted: in use now, no longer evicted by a newcomer.
    ticket.handshake_done();
    if admitted == Admitted::JoinOnly {
        return serve_requests(stream, address.to_owned(), handler, admitted, stop).await;
    }
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let served = serve_requests(stream, address.to_owned(), Arc::clone(&handler), admitted, stop);
    let served: HostedConnection = Box::pin(async move {
        let _ = sender.send(served.await);
    });
    match handler.host(served) {
        Ok(()) => receiver.await.unwrap_or_else(|_| {
            Err(PeerError::Io {
                address: address.to_owned(),
                source: std::io::Error::other("the connection's host stopped"),
            })
        }),
        Err(served) => {
            served.await;
            receiver.await.unwrap_or(Ok(()))
        }
    }
}

/// A connection's reply buffer is kept between sends up to this size.
const SEND_BUFFER_KEEP_BYTES: usize = 2 << 20;

/// Reads requests and runs them concurrently as futures of this
/// connection's task (a slow request, a replicated write waiting for its
/// disk, does not hold up the others; no task spawn or thread hop per
/// request); replies leave in completion order, matched by request id, the
/// ones ready together in one send.
async fn serve_requests<H: PeerHandler>(
    stream: PeerStream,
    address: String,
    handler: Arc<H>,
    admitted: Admitted,
    mut stop: watch::Receiver<bool>,
) -> Result<(), PeerError> {
    let address = address.as_str();
    let (reader, mut writer) = tokio::io::split(stream);
    let reader = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let io_error = |source| PeerError::Io {
        address: address.to_owned(),
        source,
    };
    let mut in_flight: InFlight<(FrameKind, u64, Vec<u8>)> = InFlight::new();
    // Reading a frame is never cancelled midway: the one future lives
    // across loop turns until it has a whole frame.
    let mut reading = Box::pin(next_request(reader, address));
    let mut out: Vec<u8> = Vec::new();
    loop {
        let room = in_flight.len() < REQUESTS_IN_FLIGHT_MAX;
        tokio::select! {
            biased;
            (kind, request_id, payload) = in_flight.next(), if !in_flight.is_empty() => {
                // Encoded straight into the send buffer (a resync read's MiB copied once).
                if let Err(source) = frame::encode_into(&mut out, kind, request_id, &[&payload]) {
                    tracing::error!(address, %source, "peer reply not sent");
                }
            }
            // Biased: reached only when no other reply is ready; all go in one send.
            () = std::future::ready(()), if !out.is_empty() => {
                writer.write_all(&out).await.map_err(io_error)?;
                writer.flush().await.map_err(io_error)?;
                // Kept for the next replies, unless a large one grew it.
                if out.capacity() > SEND_BUFFER_KEEP_BYTES {
                    out = Vec::new();
                } else {
                    out.clear();
                }
            }
            (reader, request) = &mut reading, if room => {
                let request = match request {
                    Ok(Some(request)) => request,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(error),
                };
                reading = Box::pin(next_request(reader, address));
                let handler = Arc::clone(&handler);
                let (kind, request_id) = (request.kind, request.request_id);
                let run = async move {
                    let outcome = if admitted == Admitted::JoinOnly && request.kind != FrameKind::Join {
                        Err("this connection is not from a cluster member; only join requests are accepted".to_owned())
                    } else {
                        handler.handle(request.kind, request.payload).await
                    };
                    match outcome {
                        Ok((kind, payload)) => (kind, request.request_id, payload),
                        Err(reason) => (FrameKind::Refused, request.request_id, reason.into_bytes()),
                    }
                };
                if matches!(kind, FrameKind::ReplicaWrite | FrameKind::ReplicaRead) {
                    // The data path: run here, no hop.
                    in_flight.push(Box::pin(run));
                } else {
                    // Everything else (Raft, scrub digests, joins) on a task of its own,
                    // so its CPU does not hold up the data path on this connection.
                    in_flight.spawn(run, move |error| {
                        (FrameKind::Refused, request_id, format!("request failed: {error}").into_bytes())
                    });
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Reads the next request frame; `None` when the connection was idle for
/// `IDLE_TIMEOUT` (the dialer redials). Gives the reader back.
async fn next_request<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    address: &str,
) -> (R, Result<Option<Frame>, PeerError>) {
    let result = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut reader, address)).await {
        Ok(Ok(frame)) => Ok(Some(frame)),
        Ok(Err(error)) => Err(error),
        Err(_) => Ok(None),
    };
    (reader, result)
}
