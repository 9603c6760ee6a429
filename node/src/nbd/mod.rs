//! The NBD server: every volume is an export of the same name. Hand-written
//! against the upstream protocol (fixed newstyle, structured replies,
//! base:allocation), because no crate serves it well.
//!
//! `proto` holds the pure wire codec, `handshake` the option phase,
//! `transmission` the request phase of one connection. Connections are
//! accepted and negotiated on the runtime; their request phase runs on the
//! reactor that owns the volume's disk (`transmit`), so requests reach the
//! store and come back without a thread hop.

pub mod client;
pub mod handshake;
pub mod proto;
pub mod tls;
pub mod transmission;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::handshake::{Access, Negotiation};
use self::tls::NbdSecurity;
use crate::volume::Volumes;

/// Connections served at once. When all are taken, a new connection
/// evicts the oldest one still in its handshake (a client that connected
/// and says nothing: slowloris, a flood); with every slot in a session,
/// it is closed at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// A client must finish the handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum NbdError {
    /// socket error
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// the client broke the protocol; the connection is closed
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Accepts connections until `stop` turns true, serving each on its own task.
pub async fn serve(
    listener: TcpListener,
    volumes: Arc<Volumes>,
    security: Arc<NbdSecurity>,
    mut stop: watch::Receiver<bool>,
) {
    let admission = crate::admission::Admission::new("nbd", CONNECTIONS_MAX);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "NBD accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Some(permit) = admission.admit(&peer).await else {
            continue;
        };
        let volumes = Arc::clone(&volumes);
        let security = Arc::clone(&security);
        let stop = stop.clone();
        admission.spawn(&mut connections, move |ticket| async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let peer = peer.to_string();
            if let Err(error) = connection(stream, &volumes, &security, &peer, stop, &ticket).await {
                tracing::info!(peer, %error, "NBD connection closed");
            }
        });
    }
    // Connections answer what they read, then close (`transmission::serve`).
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

/// How long stopping waits for connections to answer what they read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

async fn connection(
    stream: tokio::net::TcpStream,
    volumes: &Volumes,
    security: &NbdSecurity,
    peer: &str,
    stop: watch::Receiver<bool>,
    ticket: &crate::admission::Ticket,
) -> Result<(), NbdError> {
    // Negotiated on the runtime; once its request phase runs on a reactor,
    // that reactor's ring tells it when the socket is ready.
    let mut stream = crate::engine::socket::HostableSocket::new(stream);
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let timed_out = |_| NbdError::Protocol("handshake timed out".into());
    let plaintext = Access {
        security,
        caller: None,
        peer,
    };
    let negotiated = tokio::time::timeout_at(deadline, handshake::negotiate(&mut stream, volumes, &plaintext))
        .await
        .map_err(timed_out)??;
    let (no_zeroes, config) = match negotiated {
        Negotiation::Left => return Ok(()),
        Negotiation::Session(session) => {
            ticket.handshake_done();
            let (reader, writer) = tokio::io::split(stream);
            return transmit(reader, writer, session, peer, "plaintext", stop).await;
        }
        Negotiation::StartTls { no_zeroes, config } => (no_zeroes, config),
    };
    let accepted = tokio::time::timeout_at(deadline, tokio_rustls::TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(timed_out)?;
    let mut stream = match accepted {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(peer, %error, "NBD TLS handshake refused");
            return Err(error.into());
        }
    };
    let caller = match security.identity(stream.get_ref().1) {
        Ok(caller) => caller,
        Err(reason) => {
            tracing::warn!(peer, %reason, "NBD client certificate refused");
            return Err(NbdError::Protocol(reason));
        }
    };
    let subject = caller.subject.clone();
    let secured = Access {
        security,
        caller: Some(caller),
        peer,
    };
    let negotiated = tokio::time::timeout_at(deadline, handshake::options(&mut stream, volumes, &secured, no_zeroes))
        .await
        .map_err(timed_out)??;
    match negotiated {
        Negotiation::Session(session) => {
            ticket.handshake_done();
            let (reader, writer) = tokio::io::split(stream);
            transmit(reader, writer, session, peer, &format!("TLS as {subject}"), stop).await
        }
        Negotiation::Left => Ok(()),
        Negotiation::StartTls { .. } => Err(NbdError::Protocol("STARTTLS twice".into())),
    }
}

async fn transmit<R, W>(
    reader: R,
    writer: W,
    session: handshake::Session,
    peer: &str,
    security: &str,
    stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _guard = session.volume.connect();
    tracing::info!(peer, volume = %session.volume.name, structured = session.structured_replies, security, "NBD client connected");
    let volume = Arc::clone(&session.volume);
    let peer_name = peer.to_owned();
    let served = async move { transmission::serve(reader, writer, session, &peer_name, Some(stop)).await };
    // On the reactor of the volume's disk: its requests reach the store and
    // their answers come back on that thread (no hop each way).
    let host = volume.engine().host_of_disk(volume.disk_index());
    match host.filter(|_| on_reactors()) {
        Some(host) => {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            volume
                .engine()
                .host_future(&host, async move {
                    let _ = sender.send(served.await);
                })
                .map_err(|error| NbdError::Protocol(format!("cannot serve the connection: {error}")))?;
            receiver.await.unwrap_or_else(|_| {
                Err(NbdError::Protocol(
                    "the storage engine stopped under the connection".into(),
                ))
            })
        }
        None => served.await,
    }
}

/// Whether NBD connections are served on the reactors (`BALLAST_NBD_ON_REACTORS=0`: on the runtime).
fn on_reactors() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BALLAST_NBD_ON_REACTORS").map_or(true, |value| value != "0"))
}
