//! A local cluster of real `ballast node run` processes for benchmarks,
//! laid out like `scripts/cluster-up.sh` makes it: node i listens on
//! 127.0.0.i and has its own loop-device disk; node 1 starts the cluster and
//! the others join it with a token. Ports are picked free rather than the
//! fixed 9410/10809/9411, so a cluster someone started with the script on
//! this host is never in the way (nor touched).
//!
//! Clean-up on every exit path: dropping the cluster stops each node by its
//! pid (SIGTERM, then SIGKILL), detaches its loop device and deletes its
//! files. A guardian shell process holds the same list (pids and loop
//! devices, in `state`) and does that work if the benchmark dies without
//! running Drop: Ctrl-C, kill, or a panic (release builds abort on panic).

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kernel_iface::loopdev::LoopDevice;
use serde_json::Value;

use crate::servers::{BallastBinary, Server};

/// Nodes on 127.0.0.1 ..= 127.0.0.9, like the script.
pub const NODE_COUNT_MAX: usize = 9;
/// Longest the cluster may take to form, or a volume to get all its replicas in sync.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Lifetime of the join tokens (used at once).
const JOIN_TOKEN_TTL: &str = "10m";

/// Runs once the benchmark's end of its stdin pipe closes, which happens
/// however the benchmark exits. After a clean exit `state` is gone and it
/// does nothing. Otherwise it stops the listed pids that still run the
/// ballast binary, detaches the listed loop devices still backed by this
/// cluster's files, and removes the directory. Arguments: the cluster directory.
const GUARDIAN_SCRIPT: &str = r#"
dir=$1
state=$dir/state
cat >/dev/null
[ -f "$state" ] || exit 0
echo "ballast-perf ended without cleaning up; the guardian stops its nodes and detaches its loop devices" >&2
pids=""
while read -r kind first second; do
  [ "$kind" = pid ] || continue
  case "$(readlink "/proc/$first/exe" 2>/dev/null)" in
    "$second"*) kill -TERM "$first" 2>/dev/null && pids="$pids $first" ;;
  esac
done <"$state"
for pid in $pids; do
  for _ in $(seq 1 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
done
while read -r kind first second; do
  [ "$kind" = loop ] || continue
  case "$(losetup -nO BACK-FILE "$first" 2>/dev/null)" in
    "$second"*) for _ in $(seq 1 20); do losetup -d "$first" 2>/dev/null && break; sleep 0.2; done ;;
  esac
done <"$state"
rm -rf "$dir"
"#;

/// One node of the cluster.
pub struct ClusterNode {
    /// 1-based, as in `node1`, and the last byte of its address.
    pub index: usize,
    pub host: String,
    pub api_port: u16,
    pub nbd_port: u16,
    pub peer_port: u16,
    /// The node's data directory (its admin token is there).
    pub data_dir: std::path::PathBuf,
    /// `node run` and its arguments, to start it again (`restart_node`).
    command: Vec<String>,
    log: PathBuf,
    /// The node's fault plan file (`ClusterLayout::fault_plans`).
    fault_plan: Option<PathBuf>,
    /// Declared before the device: the node stops before its disk goes.
    server: Server,
    _device: LoopDevice,
}

impl ClusterNode {
    /// `http://HOST:PORT` of the node's API.
    #[must_use]
    pub fn api(&self) -> String {
        format!("http://{}:{}", self.host, self.api_port)
    }

    /// `HOST:PORT` of the node's NBD listener.
    #[must_use]
    pub fn nbd_address(&self) -> String {
        format!("{}:{}", self.host, self.nbd_port)
    }

    /// Puts a fault plan in force on the node (its disk is index 0; the
    /// node reads the file again within 100 ms): e.g. `stall 0` holds its
    /// disk's requests until an empty plan follows.
    pub fn set_faults(&self, plan: &str) -> Result<()> {
        let path = self
            .fault_plan
            .as_ref()
            .context("the cluster was started without fault plans")?;
        std::fs::write(path, plan).with_context(|| format!("writing {}", path.display()))
    }

    fn peer_address(&self) -> String {
        format!("{}:{}", self.host, self.peer_port)
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to the node, by pid.
    pub fn signal(&self, signal: &str) -> Result<()> {
        self.server.signal(signal)
    }

    /// The node's process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }
}

/// `node run` arguments for a failover timeout (none: the binary's default).
#[must_use]
pub fn failover_after_args(failover_after_s: Option<u64>) -> Vec<String> {
    failover_after_s
        .map(|s| vec!["--failover-after-s".to_owned(), s.to_string()])
        .unwrap_or_default()
}

/// How to lay the cluster out.
#[derive(Clone, Debug)]
pub struct ClusterLayout {
    /// Node i listens on 127.0.0.(first_host + i - 1).
    pub first_host: u8,
    /// More `node run` arguments for every node.
    pub node_args: Vec<String>,
    /// Each node runs with a fault plan of its own (`ClusterNode::set_faults`).
    pub fault_plans: bool,
}

impl Default for ClusterLayout {
    fn default() -> Self {
        Self {
            first_host: 1,
            node_args: Vec::new(),
            fault_plans: false,
        }
    }
}

/// The guardian process and the pipe whose closing wakes it.
struct Guardian {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// A running cluster; dropping it removes everything it made.
pub struct LocalCluster {
    pub binary: BallastBinary,
    pub nodes: Vec<ClusterNode>,
    dir: Option<tempfile::TempDir>,
    guardian: Option<Guardian>,
}

impl LocalCluster {
    /// Starts `node_count` nodes, each on a fully written `disk_bytes` loop device, and forms the cluster.
    pub fn start(binary: &BallastBinary, node_count: usize, disk_bytes: u64) -> Result<Self> {
        Self::start_with(binary, node_count, disk_bytes, &ClusterLayout::default())
    }

    /// `start` with other addresses and node arguments.
    pub fn start_with(
        binary: &BallastBinary,
        node_count: usize,
        disk_bytes: u64,
        layout: &ClusterLayout,
    ) -> Result<Self> {
        assert!(
            (1..=NODE_COUNT_MAX).contains(&node_count),
            "1 to {NODE_COUNT_MAX} nodes"
        );
        assert!(
            layout.first_host >= 1 && usize::from(layout.first_host) + node_count <= 255,
            "node addresses stay inside 127.0.0.1-254"
        );
        let dir = tempfile::Builder::new()
            .prefix("ballast-perf-cluster-")
            .tempdir_in("/var/tmp")
            .context("scratch directory in /var/tmp")?;
        File::create(dir.path().join("state"))?;
        let guardian = spawn_guardian(dir.path())?;
        let mut cluster = Self {
            binary: binary.clone(),
            nodes: Vec::with_capacity(node_count),
            dir: Some(dir),
            guardian: Some(guardian),
        };
        for index in 1..=node_count {
            let node = cluster.start_node(index, disk_bytes, layout)?;
            cluster.nodes.push(node);
        }
        cluster.form()?;
        Ok(cluster)
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    /// Adds a line to the guardian's list.
    fn record(&self, line: &str) -> Result<()> {
        let mut state = File::options().append(true).open(self.dir().join("state"))?;
        writeln!(state, "{line}")?;
        state.sync_data()?;
        Ok(())
    }

    fn start_node(&self, index: usize, disk_bytes: u64, layout: &ClusterLayout) -> Result<ClusterNode> {
        let host = format!("127.0.0.{}", usize::from(layout.first_host) + index - 1);
        let node_dir = self.dir().join(format!("node{index}"));
        std::fs::create_dir(&node_dir)?;
        let backing = node_dir.join("disk.img");
        crate::write_backing_file(&backing, disk_bytes)?;
        let device = LoopDevice::attach(&backing, true).context("attaching a loop device")?;
        self.record(&format!("loop {} {}", device.path().display(), backing.display()))?;
        let data_dir = node_dir.join("data");
        let data = utf8(&data_dir)?;
        self.binary
            .run(&["disk", "enroll", "--data-dir", data, utf8(device.path())?])?;
        let [api_port, nbd_port, peer_port] = free_ports(&host)?;
        let mut command: Vec<String> = ["node", "run", "--data-dir", data, "--name", &format!("node{index}")]
            .into_iter()
            .map(str::to_owned)
            .collect();
        command.extend(
            [
                // fio dials nbd:// on loopback; the security benchmark nbds:// too.
                "--nbd-tls",
                "plaintext-on-loopback",
                "--listen-api",
                &format!("{host}:{api_port}"),
                "--listen-nbd",
                &format!("{host}:{nbd_port}"),
                "--listen-peer",
                &format!("{host}:{peer_port}"),
            ]
            .into_iter()
            .map(str::to_owned),
        );
        command.extend(layout.node_args.iter().cloned());
        let fault_plan = layout.fault_plans.then(|| node_dir.join("faults.plan"));
        if let Some(plan) = &fault_plan {
            std::fs::write(plan, "")?;
            command.extend(["--inject-faults".to_owned(), utf8(plan)?.to_owned()]);
        }
        let log = node_dir.join("node.log");
        let server = self.spawn_node(index, &command, &host, nbd_port, &log)?;
        let node = ClusterNode {
            index,
            host,
            api_port,
            nbd_port,
            peer_port,
            command,
            log,
            fault_plan,
            server,
            data_dir: data_dir.clone(),
            _device: device,
        };
        self.wait_api(&node)?;
        Ok(node)
    }

    /// Starts node `index`'s process and waits until it listens.
    fn spawn_node(&self, index: usize, args: &[String], host: &str, nbd_port: u16, log: &Path) -> Result<Server> {
        let mut command = self.binary.command();
        command.args(args);
        let mut server = Server::spawn_on(&format!("node{index}"), command, host, nbd_port, log)?;
        let exe = std::fs::canonicalize(&self.binary.path)?;
        let pid = server.pid().context("node exited at once")?;
        self.record(&format!("pid {pid} {}", exe.display()))?;
        server.wait_listening()?;
        Ok(server)
    }

    fn wait_api(&self, node: &ClusterNode) -> Result<()> {
        let api = node.api();
        let binary = self.binary.as_admin_of(&node.data_dir);
        wait_until(&format!("node{}'s API answers", node.index), || {
            Ok(binary.run(&["node", "status", "--api", &api]).is_ok())
        })
        .with_context(|| node.server.log_text())
    }

    /// Kills node `position` (0-based) with SIGKILL if it runs, then starts it again on its disk.
    pub fn restart_node(&mut self, position: usize) -> Result<()> {
        self.nodes[position].server.kill9();
        let node = &self.nodes[position];
        let server = self.spawn_node(node.index, &node.command, &node.host, node.nbd_port, &node.log)?;
        self.nodes[position].server = server;
        self.wait_api(&self.nodes[position])
    }

    /// Node 1 starts the cluster; each other node joins through it with a token of its own.
    fn form(&self) -> Result<()> {
        let first = &self.nodes[0];
        let admin = self.admin();
        admin.run(&["cluster", "init", "--api", &first.api()])?;
        for node in &self.nodes[1..] {
            let token = admin.run_stdout(&[
                "cluster",
                "token",
                "create",
                "--ttl",
                JOIN_TOKEN_TTL,
                "--api",
                &first.api(),
            ])?;
            self.binary.as_admin_of(&node.data_dir).run(&[
                "cluster",
                "join",
                &first.peer_address(),
                "--token",
                token.trim(),
                "--api",
                &node.api(),
            ])?;
        }
        let count = self.nodes.len();
        wait_until("every node up and a leader", || {
            let status = self.json(&["cluster", "status", "--json", "--api", &first.api()])?;
            Ok(!status["leader"].is_null()
                && status["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.len() == count && nodes.iter().all(|node| node["up"] == true)))
        })
    }

    /// The CLI as node 1's admin (after init/join every admin token is
    /// cluster-signed: node 1's serves every node).
    pub fn admin(&self) -> BallastBinary {
        self.binary.as_admin_of(&self.nodes[0].data_dir)
    }

    /// Runs a ballast command printing JSON and parses it.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let text = self.admin().run_stdout(args)?;
        serde_json::from_str(&text).with_context(|| format!("ballast {} printed no JSON: {text}", args.join(" ")))
    }

    /// Creates volume `name` through node 1 with `replicas` copies, waits
    /// until all are in sync, checks that node 1 coordinates it and returns its NBD URI.
    pub fn create_volume(&self, name: &str, size_bytes: u64, replicas: usize) -> Result<String> {
        self.create_volume_with(name, size_bytes, replicas, &[])
    }

    /// `create_volume` with more `volume create` options (`--encrypted`).
    pub fn create_volume_with(&self, name: &str, size_bytes: u64, replicas: usize, options: &[&str]) -> Result<String> {
        let first = &self.nodes[0];
        let (size, replica_count, api) = (size_bytes.to_string(), replicas.to_string(), first.api());
        let mut args = vec![
            "volume",
            "create",
            name,
            "--size",
            &size,
            "--repl",
            &replica_count,
            "--api",
            &api,
        ];
        args.extend_from_slice(options);
        self.admin().run(&args)?;
        let mut inspect = Value::Null;
        wait_until(&format!("volume {name} with {replicas} replicas in sync"), || {
            inspect = self.json(&["volume", "inspect", name, "--json", "--api", &first.api()])?;
            let count = |key: &str| inspect[key].as_array().map_or(0, Vec::len);
            Ok(count("replica_nodes") == replicas && count("in_sync") == replicas)
        })?;
        let coordinator = inspect["coordinator_nbd"].as_str().unwrap_or_default();
        if coordinator != first.nbd_address() {
            bail!(
                "volume {name} is coordinated at {coordinator:?}, not by node 1 ({}): {inspect:#}",
                first.nbd_address()
            );
        }
        Ok(format!("nbd://{coordinator}/{name}"))
    }

    /// CPU seconds all nodes used so far (user + system, all threads).
    pub fn cpu_seconds(&self) -> Result<f64> {
        self.nodes.iter().map(|node| node.server.cpu_seconds()).sum()
    }

    /// Context switches of every node's threads so far, summed.
    pub fn context_switches(&self) -> Result<u64> {
        self.nodes.iter().map(|node| node.server.context_switches()).sum()
    }

    /// Every node's log lines that contain one of `words`, prefixed with the node.
    #[must_use]
    pub fn log_lines_with(&self, words: &[&str]) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            for line in node.server.log_text().lines() {
                if words.iter().any(|word| line.contains(word)) {
                    out.push_str(&format!("node{}: {line}\n", node.index));
                }
            }
        }
        out
    }

    /// The last lines of every node's log, for error messages.
    #[must_use]
    pub fn log_tails(&self) -> String {
        const LINES: usize = 20;
        let mut out = String::new();
        for node in &self.nodes {
            let text = node.server.log_text();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node{} log (last {LINES} lines)\n", node.index));
            for line in &lines[lines.len().saturating_sub(LINES)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Every node first (each stop waits), then their loop devices (the nodes held them).
        for node in &mut self.nodes {
            node.server.stop();
        }
        self.nodes.clear();
        if let Some(dir) = self.dir.take() {
            // Gone before the guardian wakes: it then has nothing to do.
            let _ = std::fs::remove_file(dir.path().join("state"));
            drop(dir);
        }
        if let Some(mut guardian) = self.guardian.take() {
            drop(guardian.stdin.take());
            let _ = guardian.child.wait();
        }
    }
}

/// Starts the guardian in its own process group, so Ctrl-C in the terminal
/// (which stops the benchmark) does not stop it too.
fn spawn_guardian(dir: &Path) -> Result<Guardian> {
    let mut child = Command::new("sh")
        .args(["-c", GUARDIAN_SCRIPT, "ballast-perf-guardian"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .context("cannot start sh for the clean-up guardian")?;
    let stdin = child.stdin.take();
    Ok(Guardian { child, stdin })
}

/// Three distinct free ports on `host`: all held open until each is known
/// (three separate asks could get the same port back).
fn free_ports(host: &str) -> Result<[u16; 3]> {
    let listeners = [0; 3].map(|_| std::net::TcpListener::bind((host, 0)));
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener
            .with_context(|| format!("no free port on {host}"))?
            .local_addr()?
            .port();
    }
    Ok(ports)
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path is not UTF-8: {}", PathBuf::from(path).display()))
}

/// Polls `check` every `POLL_INTERVAL` until it holds, at most `CONVERGE_TIMEOUT`.
pub fn wait_until(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    let mut last_error = None;
    while started.elapsed() < CONVERGE_TIMEOUT {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    match last_error {
        Some(error) => Err(error.context(format!("{what}: not within {CONVERGE_TIMEOUT:?}"))),
        None => bail!("{what}: not within {CONVERGE_TIMEOUT:?}"),
    }
}
