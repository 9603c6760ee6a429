//! The NBD server: every volume is an export of the same name. Hand-written
//! against the upstream protocol (fixed newstyle, structured replies,
//! base:allocation), because no crate serves it well.
//!
//! `proto` holds the pure wire codec, `handshake` the option phase,
//! `transmission` the request phase of one connection.

pub mod handshake;
pub mod proto;
pub mod transmission;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::volume::Volumes;

/// Connections served at once; more wait in the listen backlog.
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
pub async fn serve(listener: TcpListener, volumes: Arc<Volumes>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
            _ = stop.changed() => break,
        };
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
        let volumes = Arc::clone(&volumes);
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let peer = peer.to_string();
            if let Err(error) = connection(stream, &volumes, &peer, stop).await {
                tracing::info!(peer, %error, "NBD connection closed");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

async fn connection(
    mut stream: tokio::net::TcpStream,
    volumes: &Volumes,
    peer: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError> {
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut stream, volumes))
        .await
        .map_err(|_| NbdError::Protocol("handshake timed out".into()))??;
    let Some(session) = negotiated else {
        return Ok(());
    };
    let _guard = session.volume.connect();
    tracing::info!(peer, volume = %session.volume.name, structured = session.structured_replies, "NBD client connected");
    let (reader, writer) = stream.into_split();
    tokio::select! {
        result = transmission::serve(reader, writer, session, peer) => result,
        _ = stop.changed() => Ok(()),
    }
}
