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
use crate::cluster::health::NodeReport;
use crate::cluster::{Cluster, LocalNode};
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
    crate::peer::handshake::check_local().map_err(anyhow::Error::msg)?;
    let speaks = crate::peer::handshake::local();
    tracing::info!(version = %speaks.version, peer_protocol = %speaks.range(), "ballast node starting");
    raise_open_file_limit();
    // Before any thread starts, so all inherit it (host attach: see kernel_iface::process).
    if let Err(error) = kernel_iface::process::set_io_flusher() {
        tracing::warn!(%error, "cannot mark the node as an I/O flusher (PR_SET_IO_FLUSHER); a volume attached to this host could deadlock under memory pressure");
    }
    let data = DataDir::open(&config.data_dir, false)
        .with_context(|| format!("cannot open data directory {}", config.data_dir.display()))?;
    // Shared with the API, which enrolls disks into the running node.
    let data = Arc::new(parking_lot::Mutex::new(data));
    let data_guard = data.lock();
    let disks = data_guard.disks()?;
    if disks.is_empty() {
        tracing::warn!(data_dir = %config.data_dir.display(), "no enrolled disks: volumes cannot be created until `ballast disk enroll` adds one");
    }
    let mut engine_config = EngineConfig::new(*data_guard.node.node_uuid.as_bytes());
    engine_config.cores = match &config.cores {
        Some(list) => kernel_iface::affinity::parse_core_list(list)?,
        None => kernel_iface::affinity::available_cores(),
    };
    engine_config.discard_bytes_per_s = config.discard_bytes_per_s;
    if config.thread_pool {
        engine_config.choice = kernel_iface::EngineChoice::ThreadPool;
    }
    if let Some(path) = &config.inject_faults {
        tracing::warn!(plan = %path.display(), "FAULT INJECTION ENABLED (a test flag): disk I/O fails as this file says");
        engine_config.faults = Some(kernel_iface::faults::FaultSource::watch(path));
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
    let node_uuid = data_guard.node.node_uuid;
    drop(data_guard);
    let local = LocalNode {
        id: crate::cluster::node_id_of(node_uuid),
        uuid: node_uuid,
        name: config.name.clone(),
        peer_address: config.listen_peer.to_string(),
        api_address: config.listen_api.to_string(),
        nbd_address: config.listen_nbd.to_string(),
        labels: config.labels.clone(),
    };
    let report_engine = Arc::clone(&engine);
    let report_volumes = Arc::clone(&volumes);
    let report = Box::new(move || node_report(&report_engine, &report_volumes));
    let cluster = runtime.block_on(Cluster::open(&config.data_dir, local, report))?;
    cluster.attach_volumes(Arc::clone(&volumes));
    let damaged: Vec<usize> = (0..engine.disks().len())
        .filter(|index| engine.disks()[*index].damaged_tail)
        .collect();
    for volume in volumes.live_volumes() {
        if damaged.contains(&volume.disk_index()) {
            tracing::warn!(volume = %volume.name, "the disk's log ended at a damaged batch (a crash mid-write, or rot): this copy is compared with another before it is served");
            cluster
                .suspects
                .lock()
                .insert(volume.name.clone(), std::time::Instant::now());
        }
    }
    cluster.set_automation(config.automation);
    cluster.set_replica_timeout(config.replica_timeout);
    cluster
        .scrubs
        .configure(config.scrub_bytes_per_s, config.scrub_interval);
    cluster.set_alert_webhook(config.alert_webhook.clone());
    let status_engine = Arc::clone(&engine);
    let status_volumes = Arc::clone(&volumes);
    let status_cluster = Arc::clone(&cluster);
    let external = match &config.jwt {
        Some((issuer, key, jwks)) => Some(
            crate::api::auth::ExternalIssuer::load(issuer, key.as_deref(), jwks.as_deref())
                .map_err(|error| anyhow::anyhow!(error))?,
        ),
        None => None,
    };
    let auth = Arc::new(crate::api::auth::Authenticator::open(
        &config.data_dir,
        node_uuid,
        Arc::clone(&cluster),
        external,
    )?);
    auth.write_admin_token().map_err(|error| anyhow::anyhow!(error))?;
    let attach = Arc::new(crate::attach::HostAttach::new(
        &config.data_dir,
        runtime.handle().clone(),
        config.attach_backend,
    ));
    {
        // Attached devices follow their volumes' sizes (online grow).
        let attach = Arc::downgrade(&attach);
        runtime.spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                ticker.tick().await;
                let Some(attach) = attach.upgrade() else {
                    return;
                };
                let _ = tokio::task::spawn_blocking(move || attach.follow_sizes()).await;
            }
        });
    }
    let upgrades = Arc::new(crate::handoff::Upgrades::default());
    let state = Arc::new(ApiState {
        volumes: Arc::clone(&volumes),
        cluster: Arc::clone(&cluster),
        auth,
        engine: Arc::clone(&engine),
        node: {
            let attach = Arc::clone(&attach);
            let upgrades = Arc::clone(&upgrades);
            Box::new(move || {
                let mut status = node_status(node_uuid, &status_cluster, &status_engine, &status_volumes);
                (status.attach_backend, status.attach_note) = attach.describe();
                status.upgrade = upgrades.last();
                status
            })
        },
        attach: Arc::clone(&attach),
        data: Arc::clone(&data),
        audit: Arc::new(crate::audit::AuditLog::in_dir(&config.data_dir)),
        upgrades: Arc::clone(&upgrades),
    });
    let served = runtime.block_on(serve(config, state, Arc::clone(&volumes), Arc::clone(&cluster)));
    // Loop devices and the FUSE mount go while the runtime still answers
    // their I/O (after a hand-over there are none left here).
    attach.shutdown();
    if let Err(error) = runtime.block_on(cluster.raft.shutdown()) {
        tracing::warn!(%error, "raft did not stop cleanly");
    }
    drop(cluster);
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
    match served? {
        Ending::Stopped => {
            tracing::info!("node stopped");
            Ok(())
        }
        Ending::Upgrade(upgrade) => {
            let Upgrade {
                order,
                listeners,
                attach,
                paused_at,
                previous_binary,
            } = *upgrade;
            let error = crate::handoff::exec_new(&order, listeners, attach, previous_binary, paused_at);
            bail!("upgrade in place failed: {error}")
        }
    }
}

/// How serving ended.
enum Ending {
    /// A stop signal.
    Stopped,
    /// An upgrade in place: what to hand the new binary.
    Upgrade(Box<Upgrade>),
}

struct Upgrade {
    order: crate::handoff::Order,
    listeners: crate::handoff::KeptListeners,
    attach: crate::attach::AttachHandoff,
    paused_at: u64,
    previous_binary: std::os::fd::OwnedFd,
}

/// What this node tells its peers about itself (in pongs).
fn node_report(engine: &Engine, volumes: &Volumes) -> NodeReport {
    let speaks = crate::peer::handshake::local();
    let mut report = NodeReport {
        disks: u32::try_from(engine.disks().len()).unwrap_or(u32::MAX),
        replicas: u32::try_from(volumes.count()).unwrap_or(u32::MAX),
        version: speaks.version.clone(),
        protocol_min: speaks.min,
        protocol_max: speaks.max,
        ..NodeReport::default()
    };
    for (index, disk) in engine.disks().iter().enumerate() {
        let mut entry = crate::cluster::health::DiskReport {
            path: disk.path.display().to_string(),
            ..Default::default()
        };
        match engine.query(index, |store| (store.space(), store.stats(), store.is_failed())) {
            Ok((space, stats, failed)) => {
                entry.capacity_bytes = space.capacity_blocks * 4096;
                entry.used_bytes = space.used_blocks * 4096;
                entry.checksum_errors = stats.checksum_errors;
                entry.failed = failed;
            }
            Err(_) => entry.failed = true,
        }
        report.capacity_bytes += entry.capacity_bytes;
        report.used_bytes += entry.used_bytes;
        report.checksum_errors += entry.checksum_errors;
        report.failed_disks += u32::from(entry.failed);
        report.disk_list.push(entry);
    }
    let failed: Vec<usize> = (0..report.disk_list.len())
        .filter(|index| report.disk_list[*index].failed)
        .collect();
    report.failed_volumes = volumes
        .live_volumes()
        .into_iter()
        .filter(|volume| failed.contains(&volume.disk_index()))
        .map(|volume| volume.name.clone())
        .collect();
    report.cores = std::thread::available_parallelism().map_or(0, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    report.served = volumes
        .live_volumes()
        .into_iter()
        .filter(|volume| volume.is_served())
        .map(|volume| crate::cluster::health::ServedReport {
            name: volume.name.clone(),
            used_bytes: volumes.used_bytes(&volume),
            connections: volume.connection_count() as u64,
        })
        .collect();
    report.unix_millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    report
}

fn node_status(node_uuid: uuid::Uuid, cluster: &Cluster, engine: &Engine, volumes: &Volumes) -> NodeStatus {
    let disks = engine
        .disks()
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let (space, discarding) = engine
                .query(index, |store| (store.space(), store.discards_enabled()))
                .ok()
                .unzip();
            let discard = match (discarding, &disk.discard_off) {
                (Some(true), _) => "on".to_owned(),
                (_, Some(why)) => format!("off: {why}"),
                (Some(false), None) => "off: the device refused a discard".to_owned(),
                (None, None) => String::new(),
            };
            DiskStatus {
                discard,
                path: disk.path.display().to_string(),
                disk_uuid: uuid::Uuid::from_bytes(disk.disk_uuid),
                engine: disk.engine_kind.to_owned(),
                capacity_bytes: space.map_or(0, |s| s.capacity_blocks * 4096),
                used_bytes: space.map_or(0, |s| s.used_blocks * 4096),
                state: volumes
                    .drains()
                    .iter()
                    .find(|drain| drain.disk_uuid.as_bytes() == &disk.disk_uuid)
                    .map_or("in use", |drain| match drain.state.as_str() {
                        "failed" => "drain failed",
                        other => other,
                    })
                    .to_owned(),
            }
        })
        .collect();
    NodeStatus {
        node_uuid,
        node_id: cluster.local.id,
        cluster_id: cluster.cluster_id(),
        version: crate::peer::handshake::local().version.clone(),
        disks,
        volume_count: volumes.count(),
        drains: volumes.drains(),
        attach_backend: String::new(),
        attach_note: None,
        upgrade: None,
    }
}

/// Raises the soft limit on open files to the hard one: NBD, API and peer
/// connections, disks and the databases all need descriptors, and the
/// usual soft limit (1024) is below what the listeners admit together.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(error) => tracing::warn!(%error, soft, hard, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}

/// The listener of `address`: the one a previous binary of this process
/// handed over (`inherited`) when it is still that address's, else a new one.
async fn bind(what: &str, address: std::net::SocketAddr, inherited: Option<std::os::fd::RawFd>) -> Result<TcpListener> {
    if let Some(fd) = inherited {
        let adopted = kernel_iface::process::inherited_listener(fd).and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        });
        match adopted {
            Ok(listener) if listener.local_addr().is_ok_and(|local| local == address) => {
                tracing::info!(%address, "{what} listener taken over from the previous binary");
                return Ok(listener);
            }
            Ok(listener) => {
                tracing::info!(%address, previous = ?listener.local_addr().ok(), "{what} listener of the previous binary is another address: closed");
            }
            Err(error) => {
                tracing::warn!(%error, "cannot take over the previous binary's {what} listener; listening anew")
            }
        }
    }
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

async fn serve(
    config: &NodeConfig,
    state: Arc<ApiState>,
    volumes: Arc<Volumes>,
    cluster: Arc<Cluster>,
) -> Result<Ending> {
    let handoff = crate::handoff::inherited();
    let inherited = handoff.map(|handoff| handoff.listeners).unwrap_or_default();
    let api_listener = bind("API", config.listen_api, inherited.api).await?;
    // The CLI on this host finds the admin token through it (until the node stops).
    let _local_record = crate::local_nodes::record(config.listen_api, &config.data_dir);
    let nbd_listener = bind("NBD", config.listen_nbd, inherited.nbd).await?;
    let peer_listener = bind("Peer", config.listen_peer, inherited.peer).await?;
    let kept = crate::handoff::KeptListeners::keep(&api_listener, &nbd_listener, &peer_listener)
        .context("cannot keep the listening sockets for an upgrade in place")?;
    let (attach, upgrades) = (Arc::clone(&state.attach), Arc::clone(&state.upgrades));
    if let Some(handoff) = handoff {
        // Last of what can fail, then disarm at once: a failure before this
        // runs the old binary again, and the session's descriptor must still
        // be open then. Before the API serves: an attach must find the
        // session taken over, not mount a second one.
        if let Err(error) = attach.adopt(&handoff.attach, &volumes) {
            crate::handoff::roll_back(&error);
            bail!("cannot take the attached devices over: {error}");
        }
        if let Some(record) = crate::handoff::disarm() {
            upgrades.record(record);
        }
    } else {
        attach.recover_left(&volumes);
    }
    let (stop_sender, stop) = watch::channel(false);
    let peer = tokio::spawn(crate::peer::server::serve(
        peer_listener,
        Arc::clone(&cluster),
        Arc::clone(&cluster.tls),
        stop.clone(),
    ));
    cluster.spawn_background(stop.clone());
    let reconcile = tokio::spawn(crate::cluster::reconcile::reconcile_loop(
        Arc::clone(&cluster),
        Arc::clone(&volumes),
        stop.clone(),
    ));
    let mut nbd_security = crate::nbd::tls::NbdSecurity::new(
        Arc::clone(&cluster),
        config.listen_nbd,
        config.nbd_tls,
        &config.nbd_tls_names,
    );
    nbd_security.audit = Some(Arc::clone(&state.audit));
    let nbd_security = Arc::new(nbd_security);
    let nbd_scheme = if nbd_security.required { "nbds" } else { "nbd" };
    let nbd = tokio::spawn(crate::nbd::serve(
        nbd_listener,
        Arc::clone(&volumes),
        nbd_security,
        stop.clone(),
    ));
    let api = tokio::spawn(crate::api::serve::serve(
        api_listener,
        crate::api::router(state),
        stop.clone(),
    ));
    tracing::info!(
        api = %format!("http://{}", config.listen_api),
        nbd = %format!("{nbd_scheme}://{}", config.listen_nbd),
        peer = %config.listen_peer,
        node_id = cluster.local.id,
        cluster = %cluster.cluster_id().map_or_else(|| "none (run `ballast cluster init` or `ballast cluster join`)".to_owned(), |id| id.to_string()),
        "ballast node ready"
    );
    if handoff.is_some() {
        // The members held off failing this node's volumes over: it is back.
        cluster.announce_upgrade(Duration::ZERO).await;
    }
    let ending = wait_for_stop_or_upgrade(&cluster, &attach, &upgrades).await?;
    match &ending {
        None => tracing::info!("stop signal: closing listeners and connections"),
        Some(_) => tracing::info!("upgrade in place: closing connections, keeping the listening sockets"),
    }
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = nbd.await;
        let _ = api.await;
        let _ = peer.await;
        let _ = reconcile.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections did not finish within {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(match ending {
        None => Ending::Stopped,
        Some((order, attach, paused_at, previous_binary)) => Ending::Upgrade(Box::new(Upgrade {
            order,
            listeners: kept,
            attach,
            paused_at,
            previous_binary,
        })),
    })
}

/// What an upgrade hands over: the order, the attached devices, when they
/// paused, and the running binary (for a rollback).
type HandedOver = (
    crate::handoff::Order,
    crate::attach::AttachHandoff,
    u64,
    std::os::fd::OwnedFd,
);

/// Serves until a stop signal (None) or an upgrade whose attached devices
/// were handed over. An upgrade that cannot hand them over is refused and
/// serving goes on.
async fn wait_for_stop_or_upgrade(
    cluster: &Arc<Cluster>,
    attach: &Arc<crate::attach::HostAttach>,
    upgrades: &Arc<crate::handoff::Upgrades>,
) -> Result<Option<HandedOver>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    loop {
        let order = tokio::select! {
            _ = terminate.recv() => return Ok(None),
            _ = interrupt.recv() => return Ok(None),
            order = upgrades.ordered() => order,
        };
        // Before anything is handed over: a rollback needs it.
        let previous_binary = match crate::handoff::open_running_binary() {
            Ok(file) => file,
            Err(error) => {
                upgrades.refused(
                    &order,
                    format!("cannot open the running binary (/proc/self/exe) to roll back to: {error}"),
                );
                continue;
            }
        };
        tracing::info!(binary = %order.binary.display(), to = %order.to_version, "upgrade in place: handing attached devices over");
        cluster.announce_upgrade(crate::handoff::UPGRADE_WINDOW).await;
        let paused_at = crate::audit::now_unix_ms();
        let handing = Arc::clone(attach);
        let handed = tokio::task::spawn_blocking(move || handing.hand_over(crate::handoff::DRAIN_ATTACHED))
            .await
            .unwrap_or_else(|error| Err(format!("the hand-over task failed: {error}")));
        match handed {
            Ok(handed) => return Ok(Some((order, handed, paused_at, previous_binary))),
            Err(reason) => {
                upgrades.refused(&order, reason);
                cluster.announce_upgrade(Duration::ZERO).await;
            }
        }
    }
}
