//! Serves the API router over HTTP/1 with limits a public port needs:
//! at most `CONNECTIONS_MAX` connections (so a flood of idle sockets cannot
//! use up the process's file descriptors, which NBD and the peer port
//! share); when all are taken, a new one evicts the oldest connection that
//! has not sent a request yet (`crate::admission`), and a client must send
//! each request's headers within `HEADER_TIMEOUT` (so a silent or slowloris
//! connection is closed after it; tests/bad_input.rs).

use std::time::Duration;

use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// API connections served at once.
pub const CONNECTIONS_MAX: usize = 256;
/// Longest a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest shutdown waits for requests under way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `stop` turns true.
pub async fn serve(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    let admission = crate::admission::Admission::new("api", CONNECTIONS_MAX);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Some(slot) = admission.admit(&remote).await else {
            continue;
        };
        let router = router.clone();
        let mut stop = stop.clone();
        admission.spawn(&mut connections, move |ticket| async move {
            let _slot = slot;
            // The first request ends the connection's handshake: it is in use.
            let inner = hyper_util::service::TowerToHyperService::new(router);
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                ticket.handshake_done();
                // The client's address, for the audit trail.
                request.extensions_mut().insert(axum::extract::ConnectInfo(remote));
                inner.call(request)
            });
            let io = TokioIo::new(stream);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let connection = builder.serve_connection(io, service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%remote, %error, "API connection ended");
                    }
                }
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}
