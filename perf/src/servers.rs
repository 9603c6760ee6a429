//! NBD servers under test, each a child process on 127.0.0.1 and a free
//! port, stopped by its pid (SIGTERM, then SIGKILL) when dropped, so an
//! error or panic in the benchmark leaves no server behind.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Longest a server may take to accept connections (ballast replays its log).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a server may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// A server that dies this soon after start is taken to have refused its flags.
const EARLY_EXIT_WINDOW: Duration = Duration::from_millis(1500);

/// Clock ticks per second in /proc/PID/stat (fixed at 100 in the Linux ABI).
const USER_HZ: f64 = 100.0;

/// The export every server offers (qemu-nbd and ballast by name; nbdkit's
/// file plugin serves its one file under any name).
pub const EXPORT_NAME: &str = "bench";

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it next).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub fn cpu_seconds_of(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15, in clock ticks of 1/100 s (USER_HZ on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |index: usize| -> Result<f64> {
        let text = fields.get(index).context("short stat")?;
        Ok(text.parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// A running server process.
pub struct Server {
    /// What it is, for messages (`ballast`, `qemu-nbd (aio=io_uring)`).
    pub label: String,
    /// The loopback address it listens on (127.0.0.1 unless a cluster spreads nodes).
    pub host: String,
    pub nbd_port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// ballast only: its CLI as the admin, and the API URL.
    admin: Option<(BallastBinary, String)>,
}

/// Server-side latency of one fio job's requests (ballast's own
/// hdrhistogram), weighted over reads and writes by count as fio weighs its
/// clat percentiles.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServerLatency {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Server {
    /// Starts `command` (listening on 127.0.0.1) with stdout and stderr appended to `log`.
    fn spawn(label: &str, command: Command, nbd_port: u16, log: &Path) -> Result<Self> {
        Self::spawn_on(label, command, "127.0.0.1", nbd_port, log)
    }

    /// Starts `command`, which will listen for NBD on `host:nbd_port`, with
    /// stdout and stderr appended to `log`.
    pub fn spawn_on(label: &str, mut command: Command, host: &str, nbd_port: u16, log: &Path) -> Result<Self> {
        let out = File::options().create(true).append(true).open(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {label} ({command:?}); ci/install-deps.sh installs it"))?;
        Ok(Self {
            label: label.to_owned(),
            host: host.to_owned(),
            nbd_port,
            child: Some(child),
            log: log.to_owned(),
            admin: None,
        })
    }

    /// Starts the server's own latency percentiles afresh (ballast; others have none).
    pub fn reset_latency(&self) -> Result<()> {
        if let Some((binary, api)) = &self.admin {
            reset_latency(binary, api, EXPORT_NAME)?;
        }
        Ok(())
    }

    /// The server's own latency of reads and writes since the reset, and a
    /// fresh start (ballast; `None` for servers that keep none).
    pub fn take_latency(&self) -> Result<Option<ServerLatency>> {
        self.admin
            .as_ref()
            .map(|(binary, api)| take_latency(binary, api, EXPORT_NAME))
            .transpose()
    }

    /// ballast only: its CLI as the admin, and the API URL.
    #[must_use]
    pub fn admin(&self) -> Option<(BallastBinary, String)> {
        self.admin.clone()
    }

    /// `nbd://HOST:PORT/bench`.
    pub fn uri(&self) -> String {
        format!("nbd://{}:{}/{EXPORT_NAME}", self.host, self.nbd_port)
    }

    /// The process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CPU seconds (user + system, all threads, io_uring workers included)
    /// the server has used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        let child = self.child.as_ref().context("server stopped")?;
        cpu_seconds_of(child.id())
    }

    /// Context switches (voluntary and not) of all the server's live
    /// threads so far: a thread that ended meanwhile takes its count with it.
    pub fn context_switches(&self) -> Result<u64> {
        let child = self.child.as_ref().context("server stopped")?;
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", child.id()))? {
            // A thread may end between the listing and the read.
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
                continue;
            };
            total += context_switches_in(&status);
        }
        Ok(total)
    }

    /// Exit status if the process has ended.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Waits until the NBD port accepts TCP connections.
    pub fn wait_listening(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                bail!("{} exited during start ({status}):\n{}", self.label, self.log_text());
            }
            if TcpStream::connect((self.host.as_str(), self.nbd_port)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} not listening after {READY_TIMEOUT:?}:\n{}",
                    self.label,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (as kill(1) spells it: `-STOP`) to the process, by pid.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.label))?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .context("kill(1)")?;
        if !status.success() {
            bail!("kill {signal} {pid} ({}) failed: {status}", self.label);
        }
        Ok(())
    }

    /// SIGKILL by pid (a stopped process too), and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM by pid, then SIGKILL after `STOP_TIMEOUT`; reaps the child.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // kill(1) by pid: perf has no unsafe code for kill(2), and never kills by name.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop after SIGTERM; killing pid {}", self.label, child.id());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails with how to build it when there is no ballast binary at `path`.
pub fn require_binary(path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!(
            "no ballast binary at {}: build it with `cargo build --release -p node --bin ballast` (or pass --ballast PATH)",
            path.display()
        );
    }
    Ok(())
}

/// Fails naming the first of `tools` that does not run (`--version`) and
/// how to get it.
pub fn require_tools(tools: &[(&str, &str)]) -> Result<()> {
    for (tool, hint) in tools {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is not installed ({hint})");
        }
    }
    Ok(())
}

/// The ballast binary to run and the environment to give it.
#[derive(Clone, Debug)]
pub struct BallastBinary {
    pub path: PathBuf,
    /// `KEY=VALUE` pairs (experiment knobs of a scratch build).
    pub env: Vec<(String, String)>,
}

impl BallastBinary {
    /// The same binary, its CLI calls authenticated with the admin token
    /// of the node whose data directory is `data_dir`.
    #[must_use]
    pub fn as_admin_of(&self, data_dir: &Path) -> Self {
        let mut binary = self.clone();
        let token_file = data_dir.join("admin.token");
        binary
            .env
            .push(("BALLAST_TOKEN_FILE".into(), token_file.display().to_string()));
        binary
    }

    /// A command running the binary with its environment (log level warn,
    /// no discards: the harness's disks are loop devices over written
    /// files, measured raw between ballast's runs, and a discard would
    /// punch holes in them that the next raw run pays to fill; binaries
    /// from before discards ignore these variables).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.path);
        command.env("BALLAST_LOG", "warn");
        command.env("BALLAST_NO_DISCARD", "true");
        command.env("BALLAST_DISCARD_MIB_PER_S", "0");
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs the binary to completion; its output (stdout and stderr), or an error quoting it.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (stdout, stderr) = self.run_split(args)?;
        Ok(format!("{stdout}{stderr}"))
    }

    /// Runs the binary to completion; its stdout alone (a token, JSON), or an error quoting its output.
    pub fn run_stdout(&self, args: &[&str]) -> Result<String> {
        Ok(self.run_split(args)?.0)
    }

    fn run_split(&self, args: &[&str]) -> Result<(String, String)> {
        let output = self
            .command()
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.path.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            bail!("ballast {} failed: {}{}", args.join(" "), stdout, stderr.trim());
        }
        Ok((stdout, stderr))
    }
}

/// The voluntary and involuntary context switches a /proc/PID/task/TID/status text counts.
fn context_switches_in(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key, "voluntary_ctxt_switches" | "nonvoluntary_ctxt_switches")
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// Enrolls `device` into a fresh data directory under `scratch`, starts a
/// node on free ports, makes it a one-node cluster and creates the export
/// as a volume of `volume_bytes`.
pub fn start_ballast(
    binary: &BallastBinary,
    scratch: &Path,
    run: usize,
    device: &Path,
    volume_bytes: u64,
) -> Result<Server> {
    let data_dir = scratch.join(format!("ballast-data-{run}"));
    let data = data_dir.to_str().context("scratch path is not UTF-8")?;
    let device_text = device.to_str().context("device path is not UTF-8")?;
    // --force: the previous server left its own data (or ballast's old store) on the device.
    binary.run(&["disk", "enroll", "--force", "--data-dir", data, device_text])?;
    let api_port = free_port()?;
    let nbd_port = free_port()?;
    let peer_port = free_port()?;
    let api = format!("http://127.0.0.1:{api_port}");
    let mut command = binary.command();
    command.args(["node", "run", "--data-dir", data, "--nbd-tls", "plaintext-on-loopback"]);
    command.args(["--listen-api", &format!("127.0.0.1:{api_port}")]);
    command.args(["--listen-nbd", &format!("127.0.0.1:{nbd_port}")]);
    command.args(["--listen-peer", &format!("127.0.0.1:{peer_port}")]);
    let log = scratch.join(format!("ballast-{run}.log"));
    let mut server = Server::spawn("ballast", command, nbd_port, &log)?;
    server.wait_listening()?;
    let binary = binary.as_admin_of(&data_dir);
    binary
        .run(&["cluster", "init", "--api", &api])
        .with_context(|| server.log_text())?;
    server.admin = Some((binary.clone(), api.clone()));
    binary.run(&[
        "volume",
        "create",
        EXPORT_NAME,
        "--size",
        &volume_bytes.to_string(),
        "--api",
        &api,
    ])?;
    Ok(server)
}

/// Starts `volume`'s latency percentiles afresh on the node at `api`.
pub fn reset_latency(admin: &BallastBinary, api: &str, volume: &str) -> Result<()> {
    admin.run(&["volume", "latency", volume, "--reset", "--api", api])?;
    Ok(())
}

/// `volume`'s latency of reads and writes on the node at `api` since the
/// reset, and a fresh start.
pub fn take_latency(admin: &BallastBinary, api: &str, volume: &str) -> Result<ServerLatency> {
    let text = admin.run_stdout(&["volume", "latency", volume, "--reset", "--json", "--api", api])?;
    let report: serde_json::Value = serde_json::from_str(&text).context("volume latency --json")?;
    Ok(weighted_latency(&report))
}

/// p50 and p99 of `volume latency --json`'s reads and writes, weighted by count.
fn weighted_latency(report: &serde_json::Value) -> ServerLatency {
    let mut latency = ServerLatency::default();
    let mut weights = 0.0;
    let ops = report["ops"].as_array().map(Vec::as_slice).unwrap_or_default();
    for op in ops.iter().filter(|op| op["op"] == "read" || op["op"] == "write") {
        let count = op["count"].as_f64().unwrap_or(0.0);
        latency.p50_us += op["p50_us"].as_f64().unwrap_or(0.0) * count;
        latency.p99_us += op["p99_us"].as_f64().unwrap_or(0.0) * count;
        weights += count;
    }
    if weights > 0.0 {
        latency.p50_us /= weights;
        latency.p99_us /= weights;
    }
    latency
}

/// `qemu-nbd` with O_DIRECT (`--cache=none`) and the given AIO mode.
fn spawn_qemu_nbd(device: &Path, aio: &str, log: &Path) -> Result<Server> {
    let port = free_port()?;
    let mut command = Command::new("qemu-nbd");
    command
        .args(["--cache=none", &format!("--aio={aio}"), "--format=raw", "--persistent"])
        .args(["--shared=8", "--bind=127.0.0.1", &format!("--port={port}")])
        .args(["--export-name", EXPORT_NAME])
        .arg(device);
    Server::spawn(&format!("qemu-nbd (aio={aio})"), command, port, log)
}

/// Starts qemu-nbd with `--aio=io_uring`, or `--aio=native` when io_uring is
/// refused (the label says which ran).
pub fn start_qemu_nbd(scratch: &Path, run: usize, device: &Path) -> Result<Server> {
    let log = scratch.join(format!("qemu-nbd-{run}.log"));
    let mut server = spawn_qemu_nbd(device, "io_uring", &log)?;
    let started = Instant::now();
    while started.elapsed() < EARLY_EXIT_WINDOW && server.exited().is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(status) = server.exited() {
        eprintln!(
            "qemu-nbd refused --aio=io_uring ({status}: {}); falling back to --aio=native",
            server.log_text().trim()
        );
        server = spawn_qemu_nbd(device, "native", &log)?;
    }
    server.wait_listening()?;
    Ok(server)
}

/// nbdkit's file plugin. Its `cache=none` evicts pages after each request
/// (fadvise); nbdkit 1.32 has no O_DIRECT option, so this is as close as it gets.
pub fn start_nbdkit(scratch: &Path, run: usize, device: &Path) -> Result<Server> {
    let plugin = [
        "file".to_owned(),
        format!("file={}", device.display()),
        "cache=none".to_owned(),
    ];
    spawn_nbdkit(
        "nbdkit (file, cache=none)",
        &plugin,
        &scratch.join(format!("nbdkit-{run}.log")),
    )
}

/// nbdkit on a free loopback port with `plugin` (its name and arguments),
/// once it listens.
fn spawn_nbdkit(label: &str, plugin: &[String], log: &Path) -> Result<Server> {
    let port = free_port()?;
    let mut command = Command::new("nbdkit");
    command
        .args(["--foreground", "--exit-with-parent", "--ipaddr", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(plugin);
    let mut server = Server::spawn(label, command, port, log)?;
    server.wait_listening()?;
    Ok(server)
}

/// nbdkit's null plugin: writes are dropped, reads are zeros, nothing
/// touches a device. fio through it measures what fio's NBD client, TCP and
/// the cheapest possible server reach on this machine: the ceiling of any
/// NBD server's throughput here.
pub fn start_nbdkit_null(scratch: &Path, run: usize, size_bytes: u64) -> Result<Server> {
    spawn_nbdkit(
        "nbdkit (null: no I/O, the NBD ceiling)",
        &["null".to_owned(), format!("size={size_bytes}")],
        &scratch.join(format!("nbdkit-null-{run}.log")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_switches_count_voluntary_and_involuntary_ones_of_a_thread() {
        let status = "Name:\tballast-reactor\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(context_switches_in(status), 127);
        assert_eq!(context_switches_in("Name:\tx\n"), 0);
        // A sleep gives up the CPU: at least one voluntary switch.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(context_switches_in(&own) > 0, "this thread has run: {own}");
    }

    #[test]
    fn server_latency_weighs_reads_and_writes_by_count_and_leaves_flushes_out() {
        let report = serde_json::json!({
            "volume": "bench",
            "node_id": 1,
            "ops": [
                {"op": "read", "count": 700, "p50_us": 100, "p99_us": 1000},
                {"op": "write", "count": 300, "p50_us": 200, "p99_us": 2000},
                {"op": "flush", "count": 300, "p50_us": 9000, "p99_us": 90000},
            ],
        });
        let latency = weighted_latency(&report);
        assert!((latency.p50_us - 130.0).abs() < 1e-9, "{latency:?}");
        assert!((latency.p99_us - 1300.0).abs() < 1e-9, "{latency:?}");
        assert_eq!(
            weighted_latency(&serde_json::json!({"ops": []})),
            ServerLatency::default()
        );
    }
}
