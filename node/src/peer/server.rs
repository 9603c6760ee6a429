//! The peer listener: handshake, then one request at a time per
//! connection, each answered with a frame carrying the request's id.
//! Dialers open several connections for concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::frame::FrameKind;
use super::handshake::{admit, Admitted, Hello, Welcome};
use super::{read_frame, write_frame, PeerError, PROTOCOL_VERSION};

/// Most peer connections served at once.
pub const CONNECTIONS_MAX: usize = 256;
/// A connection idle this long is closed (dialers redial).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Answers requests that arrive over the peer protocol.
pub trait PeerHandler: Send + Sync + 'static {
    /// This node's cluster (None: not in one) and node id, for the handshake.
    fn identity(&self) -> (Option<uuid::Uuid>, u64);

    /// Answers one request: the reply's kind and payload, or a refusal reason.
    fn handle(
        &self,
        kind: FrameKind,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(FrameKind, Vec<u8>), String>> + Send;
}

/// Serves peers until `stop` turns true.
pub async fn serve<H: PeerHandler>(listener: TcpListener, handler: Arc<H>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%remote, "too many peer connections; refusing one");
            continue;
        };
        let handler = Arc::clone(&handler);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            if let Err(error) = connection(stream, &remote.to_string(), handler, stop).await {
                tracing::debug!(%remote, %error, "peer connection ended");
            }
        });
    }
}

async fn connection<H: PeerHandler>(
    mut stream: TcpStream,
    address: &str,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
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
    let admitted = match hello.and_then(|hello| admit(&hello, cluster_id)) {
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
        protocol_version: PROTOCOL_VERSION,
        cluster_id,
        node_id,
    };
    let payload = serde_json::to_vec(&welcome).expect("welcome serializes");
    write_frame(&mut stream, address, FrameKind::Welcome, first.request_id, &payload).await?;
    loop {
        let request = tokio::select! {
            request = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream, address)) => match request {
                Ok(request) => request?,
                Err(_) => return Ok(()),
            },
            _ = stop.changed() => return Ok(()),
        };
        let outcome = if admitted == Admitted::JoinOnly && request.kind != FrameKind::Join {
            Err("this connection is not from a cluster member; only join requests are accepted".to_owned())
        } else {
            handler.handle(request.kind, request.payload).await
        };
        match outcome {
            Ok((kind, payload)) => write_frame(&mut stream, address, kind, request.request_id, &payload).await?,
            Err(reason) => {
                write_frame(
                    &mut stream,
                    address,
                    FrameKind::Refused,
                    request.request_id,
                    reason.as_bytes(),
                )
                .await?;
            }
        }
    }
}
