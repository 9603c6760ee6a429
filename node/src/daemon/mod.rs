//! `ballast node run`: opens the data directory's disks (replaying their
//! logs), loads the volumes, and serves the HTTP API and NBD until SIGTERM
//! or SIGINT, then shuts down cleanly: listeners close, connections end,
//! every reactor writes a final checkpoint (bounded by the engine's
//! shutdown timeout).

pub mod config;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{ApiState, DiskStatus, NodeStatus};
use crate::datadir::DataDir;
use crate::engine::{DiskSpec, Engine, EngineConfig};
use crate::volume::meta::MetaStore;
use crate::volume::Volumes;
use config::NodeConfig;

/// Threads serving sockets (the reactors do the I/O).
pub const RUNTIME_THREADS: usize = 2;
/// Time connections get to finish after a stop signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the node until a stop signal.
pub fn run(config: &NodeConfig) -> Result<()> {
    let data = DataDir::open(&config.data_dir, false)
        .with_context(|| format!("cannot open data directory {}", config.data_dir.display()))?;
    let disks = data.disks()?;
    if disks.is_empty() {
        tracing::warn!(data_dir = %config.data_dir.display(), "no enrolled disks: volumes cannot be created until `ballast disk enroll` adds one");
    }
    let mut engine_config = EngineConfig::new(*data.node.node_uuid.as_bytes());
    engine_config.cores = match &config.cores {
        Some(list) => kernel_iface::affinity::parse_core_list(list)?,
        None => kernel_iface::affinity::available_cores(),
    };
    if config.thread_pool {
        engine_config.choice = kernel_iface::EngineChoice::ThreadPool;
    }
    let specs: Vec<DiskSpec> = disks.iter().map(|d| DiskSpec { path: d.path.clone() }).collect();
    tracing::info!(disks = specs.len(), "opening disks (replaying logs)");
    let engine = Arc::new(Engine::start(&specs, &engine_config)?);
    let meta = MetaStore::open(&config.data_dir)?;
    let volumes = Arc::new(Volumes::open(Arc::clone(&engine), meta)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .thread_name("ballast-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let node_uuid = data.node.node_uuid;
    let status_engine = Arc::clone(&engine);
    let status_volumes = Arc::clone(&volumes);
    let state = Arc::new(ApiState {
        volumes: Arc::clone(&volumes),
        node: Box::new(move || node_status(node_uuid, &status_engine, &status_volumes)),
    });
    let served = runtime.block_on(serve(config, state, Arc::clone(&volumes)));
    runtime.shutdown_timeout(DRAIN_TIMEOUT);
    drop(volumes);
    tracing::info!("stopping the storage engine (final checkpoint)");
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown(),
        Err(shared) => {
            tracing::warn!("storage engine still referenced at shutdown; it stops when released");
            drop(shared);
        }
    }
    drop(data);
    served?;
    tracing::info!("node stopped");
    Ok(())
}

fn node_status(node_uuid: uuid::Uuid, engine: &Engine, volumes: &Volumes) -> NodeStatus {
    let disks = engine
        .disks()
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let space = engine.query(index, |store| store.space()).ok();
            DiskStatus {
                path: disk.path.display().to_string(),
                disk_uuid: uuid::Uuid::from_bytes(disk.disk_uuid),
                engine: disk.engine_kind.to_owned(),
                capacity_bytes: space.map_or(0, |s| s.capacity_blocks * 4096),
                used_bytes: space.map_or(0, |s| s.used_blocks * 4096),
            }
        })
        .collect();
    NodeStatus {
        node_uuid,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        disks,
        volume_count: volumes.names().len(),
    }
}

async fn bind(what: &str, address: std::net::SocketAddr) -> Result<TcpListener> {
    match TcpListener::bind(address).await {
        Ok(listener) => Ok(listener),
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            bail!(
                "{what} address {address} is in use (another ballast node?); pick another with --listen-{}",
                what.to_lowercase()
            )
        }
        Err(error) => Err(error).with_context(|| format!("cannot listen for {what} on {address}")),
    }
}

async fn serve(config: &NodeConfig, state: Arc<ApiState>, volumes: Arc<Volumes>) -> Result<()> {
    let api_listener = bind("API", config.listen_api).await?;
    let nbd_listener = bind("NBD", config.listen_nbd).await?;
    if let Some(peer) = config.listen_peer {
        tracing::info!(%peer, "peer address noted; the peer protocol starts with cluster membership");
    }
    let (stop_sender, stop) = watch::channel(false);
    let nbd = tokio::spawn(crate::nbd::serve(nbd_listener, volumes, stop.clone()));
    let mut api_stop = stop.clone();
    let api = tokio::spawn(async move {
        let shutdown = async move {
            let _ = api_stop.changed().await;
        };
        axum::serve(api_listener, crate::api::router(state))
            .with_graceful_shutdown(shutdown)
            .await
    });
    tracing::info!(
        api = %format!("http://{}", config.listen_api),
        nbd = %format!("nbd://{}", config.listen_nbd),
        "ballast node ready"
    );
    wait_for_stop_signal().await?;
    tracing::info!("stop signal: closing listeners and connections");
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = nbd.await;
        let _ = api.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections did not finish within {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

async fn wait_for_stop_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
