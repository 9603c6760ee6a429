//! PostgreSQL (Debian's) with its data directory on a ballast volume
//! mounted through one node of a local 3-node cluster: pgbench inserts rows
//! with synchronous commits; that node is killed -9 under it; the volume is
//! mounted through another node, PostgreSQL starts and recovers, and every
//! transaction pgbench reported as committed is there.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{wait_until, TestCluster};
use common::node::{run_with_timeout, wait_exit_within};
use common::plugin::{mounted, AttachLeftovers};
use common::{have_tool, host_attach_available, text};

const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
/// pgbench runs at most this long (the node is killed long before).
const PGBENCH_SECONDS: &str = "60";

/// The directory of Debian's PostgreSQL server programs, if installed.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Runs `program ARGS` as the postgres user; must succeed; its stdout.
fn as_postgres(program: &Path, args: &[&str]) -> String {
    let output = run_with_timeout(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args),
        TOOL_TIMEOUT,
    );
    assert!(
        output.status.success(),
        "{} {args:?}: {}",
        program.display(),
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn chown_postgres(path: &Path) {
    let output = Command::new("chown")
        .arg("-R")
        .arg("postgres:postgres")
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "chown: {}", text(&output));
}

/// A running postmaster, stopped (SIGQUIT: immediate shutdown, then
/// SIGKILL) by its pid on drop.
struct Postmaster {
    pid: i32,
}

impl Postmaster {
    fn start(bin: &Path, data: &Path, socket_dir: &Path, port: u16, log: &Path) -> Self {
        let options = format!(
            "-p {port} -k {} -c listen_addresses='' -c fsync=on -c synchronous_commit=on -c full_page_writes=on",
            socket_dir.display()
        );
        as_postgres(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
        let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().trim().parse().unwrap();
        Self { pid }
    }

    fn alive(&self) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|stat| stat.contains(") Z "))
    }

    /// Waits (bounded) for the postmaster to end, after `signal`.
    fn stop(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), signal);
        let started = Instant::now();
        while self.alive() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if self.alive() {
            self.stop(nix::sys::signal::Signal::SIGQUIT);
        }
    }
}

/// psql's answer to `sql` (one value).
fn query(bin: &Path, socket_dir: &Path, port: u16, sql: &str) -> String {
    as_postgres(
        &bin.join("psql"),
        &[
            "-h",
            socket_dir.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-d",
            "postgres",
            "-tAc",
            sql,
        ],
    )
    .trim()
    .to_owned()
}

/// "number of transactions actually processed: N" from pgbench's report.
fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench's report:\n{report}"))
}

#[test]
fn postgresql_on_a_volume_keeps_every_committed_transaction_when_its_node_is_killed() {
    let test = "postgresql_on_a_volume_keeps_every_committed_transaction_when_its_node_is_killed";
    if !host_attach_available(test, &["mkfs.ext4", "blkid", "runuser"]) {
        return;
    }
    let Some(bin) = postgres_bin() else {
        common::record_skip(
            test,
            "PostgreSQL's server is not installed (ci/install-deps.sh installs postgresql)",
        );
        return;
    };
    if !have_tool(test, "pgbench") {
        return;
    }
    let mut cluster = TestCluster::start(test, 3, &[]);
    let dir = cluster.nodes[0].dir.path().to_owned();
    // postgres must reach its directories under the test's scratch directory.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let first_mount = dir.join("pg-on-node0");
    let second_mount = dir.join("pg-on-node1");
    let socket_dir = dir.join("pg-socket");
    std::fs::create_dir_all(&socket_dir).unwrap();
    chown_postgres(&socket_dir);
    let _leftovers = AttachLeftovers {
        mountpoints: vec![first_mount.clone(), second_mount.clone()],
        fuse_dirs: cluster.nodes.iter().map(|node| node.data_dir.join("attach")).collect(),
    };
    let port = 20_000 + u16::try_from(std::process::id() % 20_000).unwrap();

    cluster.nodes[0].cli_ok(&["volume", "create", "pg", "--size", "1GiB", "--repl", "3"]);
    cluster.nodes[0].cli_ok(&["volume", "mount", "pg", first_mount.to_str().unwrap()]);
    chown_postgres(&first_mount);
    let data = first_mount.join("data");
    as_postgres(
        &bin.join("initdb"),
        &["-D", data.to_str().unwrap(), "--auth=trust", "-U", "postgres"],
    );
    let postmaster = Postmaster::start(&bin, &data, &socket_dir, port, &socket_dir.join("pg-1.log"));
    query(
        &bin,
        &socket_dir,
        port,
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, client int, at timestamptz DEFAULT now())",
    );
    let script = dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO ledger (client) VALUES (:client_id);\n").unwrap();
    chown_postgres(&script);

    // pgbench commits rows (synchronous_commit=on) until the node dies under it.
    let report = dir.join("pgbench.out");
    let mut pgbench: Child = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("pgbench"))
        .args(["-n", "-c", "4", "-T", PGBENCH_SECONDS, "-h"])
        .arg(&socket_dir)
        .args(["-p", &port.to_string(), "-f"])
        .arg(&script)
        .arg("postgres")
        .stdout(std::fs::File::create(&report).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("pgbench committed 500 rows", || {
        query(&bin, &socket_dir, port, "SELECT count(*) FROM ledger")
            .parse::<u64>()
            .unwrap_or(0)
            >= 500
    });
    let holder = cluster.nodes[0].node_id();
    cluster.nodes[0].kill9();
    let bench_status = wait_exit_within(
        &mut pgbench,
        Duration::from_secs(120),
        "pgbench did not end after the node died",
    );
    let mut bench_errors = String::new();
    std::io::Read::read_to_string(&mut pgbench.stderr.take().unwrap(), &mut bench_errors).unwrap();
    let report_text = std::fs::read_to_string(&report).unwrap();
    let committed = processed(&report_text);
    assert!(
        committed >= 500,
        "pgbench reported {committed} commits ({bench_status}):\n{report_text}{bench_errors}"
    );
    // The first host's PostgreSQL and its filesystem go with the node (as if
    // that host were lost): stop what is left of them here.
    postmaster.stop(nix::sys::signal::Signal::SIGQUIT);
    drop(postmaster);
    let lazy = Command::new("umount").arg("-l").arg(&first_mount).output().unwrap();
    assert!(lazy.status.success(), "umount -l: {}", text(&lazy));

    cluster.wait_seen_down(1, holder);
    cluster.nodes[1].cli_ok(&["volume", "mount", "pg", second_mount.to_str().unwrap()]);
    let inspect: serde_json::Value = cluster.nodes[1].inspect("pg");
    assert_eq!(inspect["attached_to"], cluster.nodes[1].node_id(), "{inspect:#}");
    let data = second_mount.join("data");
    let postmaster = Postmaster::start(&bin, &data, &socket_dir, port, &socket_dir.join("pg-2.log"));
    let rows: u64 = query(&bin, &socket_dir, port, "SELECT count(*) FROM ledger")
        .parse()
        .unwrap();
    assert!(
        rows >= committed,
        "pgbench reported {committed} committed transactions, {rows} rows survived"
    );
    // The database is sound: indexes agree with the table.
    query(&bin, &socket_dir, port, "CREATE EXTENSION IF NOT EXISTS amcheck");
    query(
        &bin,
        &socket_dir,
        port,
        "SELECT bt_index_check('ledger_pkey'::regclass, true)",
    );
    postmaster.stop(nix::sys::signal::Signal::SIGINT);
    drop(postmaster);
    cluster.nodes[1].cli_ok(&["volume", "unmount", "pg"]);
    assert!(!mounted(&second_mount));
    eprintln!("postgres failover: {committed} commits reported by pgbench, {rows} rows after recovery");
}
