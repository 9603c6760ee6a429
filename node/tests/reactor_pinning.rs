//! `--cores` pins the reactor threads: checked from /proc on a live process.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ballast, scratch};

fn reactor_cpus(pid: u32) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("ballast-reactor") {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                .map(|list| list.trim().to_owned());
        }
    }
    None
}

#[test]
fn the_reactor_thread_runs_only_on_the_given_core() {
    let cores = kernel_iface::affinity::available_cores();
    let core = *cores.last().unwrap();
    let dir = scratch();
    let (data, _) = common::enroll_file_disk(dir.path(), "256MiB", &[]);
    let mut child = ballast()
        .args([
            "debug",
            "write-load",
            "--data-dir",
            data.to_str().unwrap(),
            "--ack-log",
            "/dev/null",
            "--seconds",
            "20",
        ])
        .args(["--cores", &core.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = None;
    while Instant::now() < deadline && seen.is_none() {
        seen = reactor_cpus(child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(seen, Some(core.to_string()), "reactor thread affinity");
}
