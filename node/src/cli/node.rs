//! `ballast node run | status`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::api::client::{ApiClient, DEFAULT_API_URL};
use crate::api::NodeStatus;
use crate::daemon::config::{ConfigFile, NodeConfig};
use crate::size::format_size;

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Run the node: open the enrolled disks, serve the API and NBD until SIGTERM.
    ///
    /// SIGTERM or SIGINT stops it cleanly (connections closed, final
    /// checkpoint). After kill -9 nothing acknowledged is lost: the next
    /// start replays the log.
    Run(Box<RunArgs>),
    /// Move every replica off a node, then take it out of the cluster.
    ///
    /// Each of its replicas is first copied to another node (which must
    /// exist and have room); volumes it served move to their new replica
    /// (NBD clients reconnect there). Safe to run again if it stopped
    /// half-way. Waits until done (up to an hour).
    Decommission {
        /// The node's id (see `ballast cluster status`).
        id: u64,
        /// The node API to talk to.
        #[arg(long, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
        api: String,
    },
    /// Put a node into maintenance (it keeps its replicas, gets no new ones) or take it out.
    Maintenance {
        /// on or off
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// The node's id (see `ballast cluster status`).
        id: u64,
        /// The node API to talk to.
        #[arg(long, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
        api: String,
    },
    /// One cluster member in depth: state, addresses, version, disks with
    /// health, the replicas it holds (and their role) and its alerts.
    Inspect {
        /// The node's id (see `ballast status`).
        id: u64,
        /// The node API to ask (any member).
        #[arg(long, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
        api: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Upgrade a running node in place: it executes the new binary in its
    /// own process, keeping its attached devices (their I/O pauses, never
    /// fails) and its listening sockets; NBD clients are disconnected and
    /// reconnect. The new binary is checked first (it must run, take over
    /// from this one, and speak a peer protocol every member speaks);
    /// members wait for the node instead of failing its volumes over. A new
    /// binary that fails to start runs the old one again (rolled back).
    /// ublk devices are kept through ublk's user recovery. Devices attached
    /// through the kernel NBD client, FUSE over io_uring, or a ublk_drv
    /// without user recovery cannot be kept: the upgrade is refused while
    /// there are any, saying why.
    Upgrade {
        /// The new binary [default: the file now at the path the node was started from].
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// The node API to talk to (the node that upgrades).
        #[arg(long, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
        api: String,
        /// Talk to the node this config file describes (its listen_api) instead of --api.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Give up waiting for the outcome after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Show a running node: id, cluster, disks, space, replica count.
    Status {
        /// The node API to ask.
        #[arg(long, env = "BALLAST_API", default_value = DEFAULT_API_URL)]
        api: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config file (keys: data_dir, listen_api, listen_nbd, listen_peer, nbd_tls, nbd_tls_names, attach_backend, cores, thread_pool, name, labels, ...); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The node's data directory (made by `ballast disk enroll`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP API address [default: 127.0.0.1:9410].
    #[arg(long)]
    pub listen_api: Option<String>,
    /// NBD address [default: 127.0.0.1:10809]. Clients need TLS (nbds:// and a client certificate: `ballast auth cert create`).
    #[arg(long)]
    pub listen_nbd: Option<String>,
    /// NBD TLS: `required`, or `plaintext-on-loopback` to also accept plaintext (nbd://) when the NBD listener is loopback-only [default: required].
    #[arg(long, value_name = "MODE")]
    pub nbd_tls: Option<crate::nbd::tls::TlsMode>,
    /// Another name (DNS or IP) NBD clients dial this node by; its TLS certificate names it (repeatable).
    #[arg(long = "nbd-tls-name", value_name = "NAME")]
    pub nbd_tls_names: Vec<String>,
    /// Address other nodes reach this one at (Raft, replication) [default: 127.0.0.1:9411].
    #[arg(long)]
    pub listen_peer: Option<String>,
    /// Name shown in `ballast cluster status` [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// As Raft leader, serve a volume from another in-sync replica when its node has shown the leader no sign of life (a lease renewal, 4 a second, or a ping answer) this long (0: only by `volume attach`) [default: 4].
    #[arg(long)]
    pub failover_after_s: Option<u64>,
    /// As Raft leader, rebuild elsewhere the replicas of a node silent this long (0: never) [default: 600].
    #[arg(long)]
    pub rebuild_after_s: Option<u64>,
    /// As coordinator, drop a replica from the in-sync set when it has not answered a write for this long [default: 5000].
    #[arg(long)]
    pub replica_timeout_ms: Option<u64>,
    /// As coordinator, verify every copy of each volume this often, in hours (0: only `ballast scrub start`) [default: 168].
    #[arg(long)]
    pub scrub_interval_hours: Option<u64>,
    /// As coordinator, the most data a verifying scrub reads per second, in MiB [default: 64].
    #[arg(long)]
    pub scrub_mib_per_s: Option<u64>,
    /// Freed disk space is told to the SSDs (discard/TRIM) at most this fast, in MiB/s; 0: never [default: 2560].
    #[arg(long, env = "BALLAST_DISCARD_MIB_PER_S")]
    pub discard_mib_per_s: Option<u64>,
    /// As Raft leader, POST every alert that starts or clears to this URL as JSON.
    #[arg(long, value_name = "URL")]
    pub alert_webhook: Option<String>,
    /// Also accept API tokens issued by this identity provider (their `iss`); needs --jwt-public-key-file or --jwt-jwks-file.
    #[arg(long, value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The identity provider's public key (PEM: RSA, EC P-256 or Ed25519).
    #[arg(long, value_name = "FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// The identity provider's keys as a JWKS document.
    #[arg(long, value_name = "FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// A label KEY=VALUE (repeatable); `zone` spreads replicas over distinct zones.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Cores for the reactor threads, e.g. 0-3,6 [default: every allowed core].
    #[arg(long)]
    pub cores: Option<String>,
    /// Use the pread/pwrite thread pool instead of io_uring.
    #[arg(long)]
    pub thread_pool: bool,
    /// How `volume attach --device` makes block devices: auto (ublk when ublk_drv is loaded, else the kernel NBD client when the nbd module is, else FUSE over io_uring + loop when the kernel has it switched on, else FUSE + loop), ublk, nbd, fuse-uring or fuse [default: auto].
    #[arg(long, value_name = "BACKEND", env = "BALLAST_ATTACH_BACKEND")]
    pub attach_backend: Option<crate::attach::Backend>,
    /// Tests only: fail or stall disk I/O as the rules in FILE say (`kernel_iface::faults`).
    #[arg(long, value_name = "FILE", hide = true)]
    pub inject_faults: Option<std::path::PathBuf>,
}

/// Runs a node command.
pub fn run(command: NodeCommand) -> Result<ExitCode> {
    match command {
        NodeCommand::Run(args) => {
            let file = match &args.config {
                Some(path) => ConfigFile::load(path)?,
                None => ConfigFile::default(),
            };
            let flags = ConfigFile {
                data_dir: args.data_dir,
                listen_api: args.listen_api,
                listen_nbd: args.listen_nbd,
                nbd_tls: args.nbd_tls,
                nbd_tls_names: (!args.nbd_tls_names.is_empty()).then_some(args.nbd_tls_names),
                attach_backend: args.attach_backend,
                listen_peer: args.listen_peer,
                cores: args.cores,
                thread_pool: args.thread_pool.then_some(true),
                name: args.name,
                failover_after_s: args.failover_after_s,
                rebuild_after_s: args.rebuild_after_s,
                replica_timeout_ms: args.replica_timeout_ms,
                scrub_interval_hours: args.scrub_interval_hours,
                scrub_mib_per_s: args.scrub_mib_per_s,
                discard_mib_per_s: args.discard_mib_per_s,
                alert_webhook: args.alert_webhook,
                jwt_issuer: args.jwt_issuer,
                jwt_public_key_file: args.jwt_public_key_file,
                jwt_jwks_file: args.jwt_jwks_file,
                labels: if args.labels.is_empty() {
                    None
                } else {
                    Some(crate::daemon::config::parse_labels(&args.labels)?)
                },
            };
            let mut config = NodeConfig::resolve(file, flags)?;
            config.inject_faults = args.inject_faults;
            crate::daemon::run(&config)?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Decommission { id, api } => {
            eprintln!("decommissioning node {id}: moving its replicas away (this waits until done)...");
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watcher = {
                let (api, done) = (api.clone(), std::sync::Arc::clone(&done));
                std::thread::spawn(move || follow_decommission(&api, id, &done))
            };
            let result = ApiClient::with_timeout(&api, crate::api::DECOMMISSION_TIMEOUT)
                .post::<_, serde_json::Value>(&format!("/v1/cluster/nodes/{id}/decommission"), &serde_json::json!({}));
            done.store(true, std::sync::atomic::Ordering::Release);
            let _ = watcher.join();
            result?;
            println!("node {id} holds no replica any more and left the cluster");
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Maintenance { state, id, api } => {
            let on = state == "on";
            let body = crate::api::MaintenanceBody { on };
            ApiClient::new(&api).put(&format!("/v1/cluster/nodes/{id}/maintenance"), &body)?;
            println!("node {id}: maintenance {state}");
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Inspect { id, api, json } => inspect(&api, id, json),
        NodeCommand::Upgrade {
            binary,
            api,
            config,
            timeout_s,
        } => {
            let api = match config {
                Some(path) => api_of_config(&path)?,
                None => api,
            };
            upgrade(&api, binary, timeout_s)
        }
        NodeCommand::Status { api, json } => {
            let status: NodeStatus = ApiClient::new(&api).get("/v1/node")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(ExitCode::SUCCESS);
            }
            // The id every command takes; the UUID only names whose disks are whose.
            println!("node {} (ballast {})", status.node_id, status.version);
            println!("disks stamped with node UUID {}", status.node_uuid);
            match status.cluster_id {
                Some(cluster) => println!("cluster: {cluster}"),
                None => println!("cluster: none (run `ballast cluster init` or `ballast cluster join`)"),
            }
            println!("volumes: {}", status.volume_count);
            if !status.attach_backend.is_empty() {
                println!("host attach: {}", status.attach_backend);
            }
            if let Some(note) = &status.attach_note {
                println!("hint: {note}");
            }
            if let Some(upgrade) = &status.upgrade {
                let reason = upgrade
                    .reason
                    .as_deref()
                    .map_or_else(String::new, |why| format!(" ({why})"));
                println!(
                    "last upgrade in place: {} -> {}: {}{reason}, paused {} ms",
                    upgrade.from_version, upgrade.to_version, upgrade.outcome, upgrade.paused_ms
                );
            }
            for disk in &status.disks {
                let state = if disk.state.is_empty() || disk.state == "in use" {
                    String::new()
                } else {
                    format!(", {}", disk.state)
                };
                let discard = if disk.discard.is_empty() {
                    String::new()
                } else {
                    format!(", discard {}", disk.discard)
                };
                println!(
                    "disk {} {}: {} of {} used ({}{discard}{state})",
                    disk.path,
                    disk.disk_uuid,
                    format_size(disk.used_bytes),
                    format_size(disk.capacity_bytes),
                    disk.engine
                );
            }
            for drain in status.drains.iter().filter(|drain| drain.state == "draining") {
                println!(
                    "draining {}: {} of {} copies moved, {} copied",
                    drain.path,
                    drain.copies_moved,
                    drain.copies_total,
                    format_size(drain.bytes_copied)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The API URL of the node a config file describes (a wildcard address is
/// reached on loopback).
fn api_of_config(path: &std::path::Path) -> Result<String> {
    let text = ConfigFile::load(path)?
        .listen_api
        .unwrap_or_else(|| crate::daemon::config::DEFAULT_LISTEN_API.into());
    let mut address: std::net::SocketAddr = text.parse().map_err(|_| {
        anyhow::anyhow!(
            "{}: listen_api {text:?} is not an address like 127.0.0.1:9410",
            path.display()
        )
    })?;
    if address.ip().is_unspecified() {
        address.set_ip(if address.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(format!("http://{address}"))
}

/// `node upgrade`: orders it, then follows the node until it answers with the outcome.
fn upgrade(api: &str, binary: Option<PathBuf>, timeout_s: u64) -> Result<ExitCode> {
    let client = ApiClient::new(api);
    let order: crate::handoff::Order = client.post("/v1/node/upgrade", &crate::api::UpgradeBody { binary })?;
    eprintln!(
        "upgrading the node at {api} in place to ballast {} ({})...",
        order.to_version,
        order.binary.display()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let polling = ApiClient::with_timeout(api, std::time::Duration::from_secs(5));
    loop {
        // Errors are expected while the programs change (the API listener
        // stays open, so a request waits for the new one).
        if let Ok(status) = polling.get::<NodeStatus>("/v1/node") {
            if let Some(record) = status.upgrade.filter(|record| record.id == order.id) {
                let reason = record.reason.as_deref().unwrap_or("");
                return Ok(match record.outcome.as_str() {
                    "upgraded" => {
                        println!(
                            "node {} upgraded in place from ballast {} to {}; attached devices and listeners paused {} ms",
                            status.node_id, record.from_version, record.to_version, record.paused_ms
                        );
                        ExitCode::SUCCESS
                    }
                    "rolled back" => {
                        eprintln!(
                            "error: the new binary failed ({reason}); the node runs ballast {} again (paused {} ms)",
                            record.to_version, record.paused_ms
                        );
                        ExitCode::FAILURE
                    }
                    _ => {
                        eprintln!("error: upgrade refused, nothing changed: {reason}");
                        ExitCode::FAILURE
                    }
                });
            }
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "no outcome from the node at {api} after {timeout_s} s: see `ballast node status` and the node's log"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What `node inspect` shows of one member.
#[derive(serde::Serialize)]
struct NodeInspection<'a> {
    node: &'a crate::cluster::status::NodeView,
    /// (volume, role: coordinator, in-sync or stale)
    replicas: Vec<(String, &'static str)>,
    alerts: Vec<&'a crate::cluster::alerts::Alert>,
}

fn inspect(api: &str, id: u64, json: bool) -> Result<ExitCode> {
    let status: crate::cluster::status::ClusterStatus = ApiClient::new(api).get("/v1/cluster")?;
    let Some(node) = status.nodes.iter().find(|node| node.id == id) else {
        let ids: Vec<String> = status.nodes.iter().map(|n| n.id.to_string()).collect();
        anyhow::bail!("no node {id} in the cluster (members: {})", ids.join(", "));
    };
    let replicas: Vec<(String, &'static str)> = status
        .volumes
        .iter()
        .filter(|v| v.replica_nodes.contains(&id))
        .map(|v| {
            let role = if v.coordinator == id {
                "coordinator"
            } else if v.in_sync.contains(&id) {
                "in-sync"
            } else {
                "stale"
            };
            (v.name.clone(), role)
        })
        .collect();
    let subject = id.to_string();
    let alerts: Vec<&crate::cluster::alerts::Alert> =
        status.alerts.iter().filter(|alert| alert.subject == subject).collect();
    let inspection = NodeInspection { node, replicas, alerts };
    if json {
        println!("{}", serde_json::to_string_pretty(&inspection)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("node {} ({})", node.id, node.name);
    println!("  role:     {}", node.role);
    println!(
        "  state:    {}{}",
        if node.up { "up" } else { "DOWN" },
        node.last_error
            .as_deref()
            .map_or_else(String::new, |error| format!(" ({error})"))
    );
    println!("  admin:    {}", format!("{:?}", node.admin).to_lowercase());
    println!("  version:  {}   cores: {}", node.version, node.cores);
    if node.cert_expires_unix > 0 {
        let days = node
            .cert_expires_unix
            .saturating_sub(crate::datadir::now_unix_seconds())
            / 86_400;
        println!("  peer TLS: certificate expires in {days} days (`ballast cluster rotate-certs` renews)");
    }
    println!(
        "  api {}   nbd {}   peer {}",
        node.api_address, node.nbd_address, node.peer_address
    );
    let labels: Vec<String> = node.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "  labels:   {}",
        if labels.is_empty() {
            "-".to_owned()
        } else {
            labels.join(",")
        }
    );
    println!(
        "  space:    {} of {} used",
        format_size(node.used_bytes),
        format_size(node.capacity_bytes)
    );
    for disk in &node.disks {
        println!(
            "  disk {}: {} of {} used, {}{}",
            disk.path,
            format_size(disk.used_bytes),
            format_size(disk.capacity_bytes),
            if disk.failed { "FAILED" } else { "ok" },
            if disk.checksum_errors > 0 {
                format!(", {} checksum errors", disk.checksum_errors)
            } else {
                String::new()
            }
        );
    }
    println!("  replicas: {}", inspection.replicas.len());
    for (volume, role) in &inspection.replicas {
        println!("    {volume}: {role}");
    }
    if inspection.alerts.is_empty() {
        println!("  alerts:   none");
    }
    for alert in &inspection.alerts {
        println!("  ALERT {}: {}", alert.key, alert.message);
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows, on a terminal, how many of the node's replicas have moved while
/// a decommission runs.
fn follow_decommission(api: &str, id: u64, done: &std::sync::atomic::AtomicBool) {
    let client = ApiClient::new(api);
    let held = |client: &ApiClient| -> Option<u64> {
        let status: crate::cluster::status::ClusterStatus = client.get("/v1/cluster").ok()?;
        Some(status.volumes.iter().filter(|v| v.replica_nodes.contains(&id)).count() as u64)
    };
    let total = held(&client).unwrap_or(0);
    let bar = crate::cli::progress::items(total, &format!("node {id}: replicas moved"));
    while !done.load(std::sync::atomic::Ordering::Acquire) {
        if let Some(left) = held(&client) {
            bar.set_position(total.saturating_sub(left));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_upgrade_with_a_config_file_talks_to_its_listen_api_and_reaches_a_wildcard_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ballast.toml");
        std::fs::write(&path, "listen_api = \"0.0.0.0:9555\"\n").unwrap();
        assert_eq!(super::api_of_config(&path).unwrap(), "http://127.0.0.1:9555");
        std::fs::write(&path, "listen_api = \"10.1.2.3:9410\"\n").unwrap();
        assert_eq!(super::api_of_config(&path).unwrap(), "http://10.1.2.3:9410");
        std::fs::write(&path, "").unwrap();
        assert_eq!(super::api_of_config(&path).unwrap(), "http://127.0.0.1:9410");
        std::fs::write(&path, "listen_apis = 1\n").unwrap();
        assert!(super::api_of_config(&path).is_err());
    }
}
