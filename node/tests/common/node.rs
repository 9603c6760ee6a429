//! A real `ballast node run` process for tests: its own data directory and
//! disk, free ports on 127.0.0.1, stopped (by pid) on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ballast, record_skip, scratch, text, LoopDevice};

/// Longest a node may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a clean stop may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);

fn free_port(host: &str) -> u16 {
    TcpListener::bind(format!("{host}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running (or stopped) node.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    /// Loopback address the node listens on (127.0.0.1 unless a test spreads nodes).
    pub host: String,
    pub api_port: u16,
    pub nbd_port: u16,
    pub peer_port: u16,
    /// Extra `node run` arguments (labels, name).
    pub extra_args: Vec<String>,
    /// Extra environment of `node run` (applies from the next (re)start).
    pub env: Vec<(String, String)>,
    /// The node's cluster id (known once it started).
    id: u64,
    child: Option<Child>,
    _devices: Vec<LoopDevice>,
    log: PathBuf,
}

impl TestNode {
    /// Enrolls a disk of `disk_bytes` (a loop device when available, else a
    /// file) and starts a node on it.
    pub fn start(test: &str, disk_bytes: u64) -> Self {
        Self::start_with_disks(test, &[disk_bytes])
    }

    /// Like `start`, with one enrolled disk per size given; the node
    /// starts a single-node cluster of its own.
    pub fn start_with_disks(test: &str, disks_bytes: &[u64]) -> Self {
        let node = Self::start_unclustered(test, "127.0.0.1", disks_bytes, &[]);
        node.cli_ok(&["cluster", "init"]);
        node
    }

    /// A node on `host` (a 127.0.0.0/8 address) that is in no cluster yet.
    pub fn start_unclustered(test: &str, host: &str, disks_bytes: &[u64], extra_args: &[&str]) -> Self {
        Self::start_unclustered_with_env(test, host, disks_bytes, extra_args, &[])
    }

    /// Like `start_unclustered`, with `env` set for `node run`.
    pub fn start_unclustered_with_env(
        test: &str,
        host: &str,
        disks_bytes: &[u64],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = scratch();
        let data_dir = dir.path().join("data");
        let mut devices = Vec::new();
        let mut paths = Vec::new();
        for (index, bytes) in disks_bytes.iter().enumerate() {
            let backing = dir.path().join(format!("disk{index}.img"));
            std::fs::File::create(&backing).unwrap().set_len(*bytes).unwrap();
            match super::unavailable_reason() {
                None => {
                    let device = LoopDevice::attach(&backing, true).expect("losetup");
                    paths.push(device.path().to_owned());
                    devices.push(device);
                }
                Some(why) => {
                    record_skip(
                        &format!("{test} (loop device part)"),
                        &format!("{why}; using a plain file"),
                    );
                    paths.push(backing);
                }
            }
        }
        let enrolled = ballast()
            .args(["disk", "enroll", "--data-dir"])
            .arg(&data_dir)
            .args(&paths)
            .output()
            .unwrap();
        assert!(enrolled.status.success(), "enroll: {}", text(&enrolled));
        let mut node = Self {
            log: dir.path().join("node.log"),
            dir,
            data_dir,
            host: host.to_owned(),
            api_port: free_port(host),
            nbd_port: free_port(host),
            peer_port: free_port(host),
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: env
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            id: 0,
            child: None,
            _devices: devices,
        };
        node.restart();
        node
    }

    /// Starts the node process (again) and waits until its API answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = ballast()
            .env("BALLAST_LOG", "info")
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .args(["node", "run", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-api", &format!("{}:{}", self.host, self.api_port)])
            .args(["--listen-nbd", &format!("{}:{}", self.host, self.nbd_port)])
            .args(["--listen-peer", &self.peer_address()])
            .args(if self.extra_args.iter().any(|arg| arg == "--nbd-tls") {
                &[][..]
            } else {
                // Tests dial nbd:// on loopback (tests/nbd_tls.rs covers TLS).
                &["--nbd-tls", "plaintext-on-loopback"][..]
            })
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let health = self.cli(&["node", "status", "--json"]);
            if health.status.success() {
                let status: serde_json::Value = serde_json::from_slice(&health.stdout).unwrap();
                self.id = status["node_id"].as_u64().unwrap();
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                // A port picked as free was taken meanwhile (tests run side by side):
                // on a first start, pick new ones and try again.
                let collisions = self.log_text().matches("is in use").count();
                if self.id == 0 && (1..=3).contains(&collisions) {
                    self.child = None;
                    self.api_port = free_port(&self.host);
                    self.nbd_port = free_port(&self.host);
                    self.peer_port = free_port(&self.host);
                    return self.restart();
                }
                panic!("node exited during start ({status}):\n{}", self.log_text());
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "node not ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's id in the cluster.
    pub fn node_id(&self) -> u64 {
        assert_ne!(self.id, 0, "node never started");
        self.id
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ballast ARGS` against this node's API.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        ballast()
            .env("BALLAST_API", self.api_url())
            .env("BALLAST_TOKEN_FILE", self.token_file())
            .args(args)
            .output()
            .unwrap()
    }

    /// `ballast ARGS`, asserting success; stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(output.status.success(), "ballast {args:?}: {}", text(&output));
        String::from_utf8(output.stdout).unwrap()
    }

    /// `volume inspect NAME --json` through this node.
    pub fn inspect(&self, volume: &str) -> serde_json::Value {
        let text = self.cli_ok(&["volume", "inspect", volume, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("volume inspect {volume}: {error}: {text}"))
    }

    /// `node status --json` of this node.
    pub fn status(&self) -> serde_json::Value {
        let text = self.cli_ok(&["node", "status", "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("node status: {error}: {text}"))
    }

    /// The node's disks as `node status` lists them.
    pub fn disks(&self) -> Vec<serde_json::Value> {
        self.status()["disks"].as_array().expect("disks in node status").clone()
    }

    /// Volume replicas this node holds (`volume_count` of `node status`).
    pub fn local_replicas(&self) -> u64 {
        self.status()["volume_count"].as_u64().unwrap()
    }

    /// Bytes in use on all of the node's disks.
    pub fn disk_used_bytes(&self) -> u64 {
        self.disks().iter().map(|d| d["used_bytes"].as_u64().unwrap()).sum()
    }

    /// Creates a volume of `size` (e.g. "1GiB").
    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    pub fn api_url(&self) -> String {
        format!("http://{}:{}", self.host, self.api_port)
    }

    /// HOST:PORT of the peer protocol.
    pub fn peer_address(&self) -> String {
        format!("{}:{}", self.host, self.peer_port)
    }

    /// nbd:// URI of a volume.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}:{}/{volume}", self.host, self.nbd_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the node to exit by itself (e.g. killed by another process).
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_exit_within(&mut child, limit, "node did not exit")
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).unwrap();
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        wait_exit_or_else(&mut child, STOP_TIMEOUT, || {
            format!("node did not stop:\n{}", self.log_text())
        })
    }

    /// The data directory's path.
    /// The node's admin API token file (written at every start).
    pub fn token_file(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// The node's admin API token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .expect("the node wrote its admin token")
            .trim()
            .to_owned()
    }

    pub fn data(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
        // What a clean stop would have removed (`node::local_nodes`).
        let record = format!("{}:{}", self.host, self.api_port);
        let _ = std::fs::remove_file(std::path::Path::new(node::local_nodes::RECORDS_DIR).join(record));
        // A failing test's node logs survive it when BALLAST_TEST_LOGS names a directory.
        if std::thread::panicking() {
            if let Some(dir) = std::env::var_os("BALLAST_TEST_LOGS") {
                let _ = std::fs::create_dir_all(&dir);
                let name = format!("{}-{}.log", self.host, self.api_port);
                let _ = std::fs::copy(&self.log, std::path::Path::new(&dir).join(name));
            }
        }
    }
}

/// Waits for a started `child` to exit, at most `limit`; on time-out kills
/// it (by pid) and fails the test with `what`.
pub fn wait_exit_within(child: &mut std::process::Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    wait_exit_or_else(child, limit, || what.to_owned())
}

/// `wait_exit_within`, with the failure's words made only when it fails
/// (a node's log as it is then).
pub fn wait_exit_or_else(
    child: &mut std::process::Child,
    limit: Duration,
    what: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} (waited {limit:?})", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command with a time limit; returns its output (panics on time-out).
pub fn run_with_timeout(command: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("{command:?} did not finish within {limit:?}: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}
