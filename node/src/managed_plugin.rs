//! `ballast plugin managed`: the entrypoint of the Docker managed plugin
//! (`scripts/docker-plugin.sh` builds it; `docker plugin enable` starts it).
//! One process tree inside the plugin's container, nothing else on the
//! host: it enrolls the disks it is given (those not enrolled yet), runs the
//! node (`ballast node run`, a child of this process, same binary), waits
//! for its API, makes it a one-node cluster when asked (`init = single`)
//! and serves the volume plugin on the socket dockerd gave it, against that
//! node. SIGTERM (`docker plugin disable`) stops the plugin, then the node.
//! If the node dies, so does the plugin (Docker sees the plugin fail).
//!
//! Settings come from the plugin's environment (`docker plugin set ballast
//! DISKS=/dev/nvme1n1 ...`), each also a flag for running it by hand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::client::ApiClient;
use crate::datadir::DataDir;
use crate::enroll::{self, EnrollOptions};

/// Where the managed plugin mounts volumes: its propagated mount
/// (config.json `propagatedmount`), which Docker shares with the host.
pub const DEFAULT_MOUNTS: &str = "/mnt/volumes";

/// How long the node may take to answer its API after it starts.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the node may take to stop after SIGTERM before it is killed.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the managed plugin runs.
#[derive(Clone, Debug)]
pub struct ManagedOptions {
    pub data_dir: PathBuf,
    /// Disks to enroll (those already enrolled in `data_dir` are skipped).
    pub disks: Vec<PathBuf>,
    /// Make the node a one-node cluster if it is in none.
    pub init_single: bool,
    pub listen_api: String,
    pub listen_nbd: String,
    pub listen_peer: String,
    /// The plugin socket (inside the plugin: dockerd's per-plugin directory).
    pub socket: PathBuf,
    /// Where volumes are mounted (the plugin's propagated mount).
    pub mounts: PathBuf,
}

/// Runs the managed plugin until SIGTERM.
pub fn run(options: &ManagedOptions) -> Result<()> {
    let token_file = options.data_dir.join(crate::api::auth::ADMIN_TOKEN_FILE);
    // The plugin's API calls read the node's admin token from here (set
    // before any thread starts).
    std::env::set_var("BALLAST_TOKEN_FILE", &token_file);
    enroll_new_disks(&options.data_dir, &options.disks)?;
    let api = format!("http://{}", options.listen_api);
    let mut node = start_node(options)?;
    let ready = wait_for_api(&api, &token_file, &mut node).and_then(|client| {
        if options.init_single {
            init_single(&client)
        } else {
            Ok(())
        }
    });
    if let Err(error) = ready {
        stop_node(&mut node);
        return Err(error);
    }
    // The node dying ends the plugin (Docker then shows it failed), unless
    // the plugin is stopping it.
    let node_pid = node.id();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (exited, node_exit) = std::sync::mpsc::channel();
    {
        let stopping = std::sync::Arc::clone(&stopping);
        std::thread::spawn(move || {
            let status = node.wait();
            if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::error!(
                    pid = node_pid,
                    ?status,
                    "the node of the managed plugin exited; the plugin stops"
                );
                std::process::exit(1);
            }
            let _ = exited.send(());
        });
    }
    let served = crate::plugin::serve(crate::plugin::PluginOptions {
        socket: options.socket.clone(),
        apis: vec![api],
        mounts: options.mounts.clone(),
    });
    // SIGTERM: the plugin has stopped serving; now the node.
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    signal(node_pid, libc::SIGTERM);
    if node_exit.recv_timeout(NODE_STOP_TIMEOUT).is_err() {
        tracing::warn!(
            pid = node_pid,
            "the node did not stop within {NODE_STOP_TIMEOUT:?}; killing it"
        );
        signal(node_pid, libc::SIGKILL);
        let _ = node_exit.recv_timeout(NODE_STOP_TIMEOUT);
    }
    served
}

/// Enrolls each of `disks` not enrolled in `data_dir` yet.
fn enroll_new_disks(data_dir: &Path, disks: &[PathBuf]) -> Result<()> {
    let data = DataDir::open(data_dir, true).with_context(|| format!("data directory {}", data_dir.display()))?;
    let enrolled: Vec<PathBuf> = data.disks()?.into_iter().map(|disk| disk.path).collect();
    if disks.is_empty() && enrolled.is_empty() {
        bail!("no disk to store volumes on: set DISKS (docker plugin set ballast DISKS=/dev/sdX,...) or --disks");
    }
    let options = EnrollOptions {
        force: false,
        create_size_bytes: None,
        segment_size_bytes: enroll::DEFAULT_SEGMENT_BYTES,
        discard: true,
    };
    for disk in disks.iter().filter(|disk| !enrolled.contains(disk)) {
        enroll::enroll(&data, disk, &options).with_context(|| format!("enrolling {}", disk.display()))?;
        tracing::info!(disk = %disk.display(), "disk enrolled");
    }
    Ok(())
}

fn start_node(options: &ManagedOptions) -> Result<Child> {
    let binary = std::env::current_exe().context("finding this binary to run the node")?;
    Command::new(binary)
        .arg("node")
        .arg("run")
        .arg("--data-dir")
        .arg(&options.data_dir)
        .args(["--listen-api", &options.listen_api])
        .args(["--listen-nbd", &options.listen_nbd])
        .args(["--listen-peer", &options.listen_peer])
        .spawn()
        .context("starting the node")
}

/// An API client of the node once it answers (its token is written by then).
fn wait_for_api(api: &str, token_file: &Path, node: &mut Child) -> Result<ApiClient> {
    let started = Instant::now();
    loop {
        if let Some(status) = node.try_wait()? {
            bail!("the node exited before it served its API ({status}); see its log above");
        }
        if let Ok(token) = std::fs::read_to_string(token_file) {
            let client = ApiClient::new(api).with_token(Some(token.trim().to_owned()));
            if client.get::<serde_json::Value>("/v1/cluster").is_ok() {
                return Ok(client);
            }
        }
        if started.elapsed() > NODE_READY_TIMEOUT {
            bail!("the node did not answer on {api} within {NODE_READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Makes the node a one-node cluster unless it is in one already.
fn init_single(client: &ApiClient) -> Result<()> {
    let status: serde_json::Value = client.get("/v1/cluster")?;
    if !status["cluster_id"].is_null() {
        return Ok(());
    }
    let _: serde_json::Value = client
        .post("/v1/cluster/init", &serde_json::json!({}))
        .context("initializing a one-node cluster")?;
    tracing::info!("one-node cluster initialized");
    Ok(())
}

/// Sends `signal` to the node this process started.
fn signal(pid: u32, signal: i32) {
    let _ = kernel_iface::process::send_signal(pid, signal);
}

fn stop_node(node: &mut Child) {
    signal(node.id(), libc::SIGTERM);
    let started = Instant::now();
    while started.elapsed() < NODE_STOP_TIMEOUT {
        if let Ok(Some(_)) = node.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = node.kill();
    let _ = node.wait();
}
