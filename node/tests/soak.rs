//! A sustained load with the node's resident memory and open descriptors
//! sampled every second: fio (NBD engine, QD32, 4 KiB random reads and
//! writes) on three volumes at once for `BALLAST_SOAK_SECONDS` (30 by
//! default; set it to hours for a real soak). Memory may grow while caches
//! warm up, but not without bound: its peak in the last third of the run
//! stays within a margin of its peak in the first third. Descriptors stay
//! within the connections in use and return to their count before the run.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::node::{run_with_timeout, TestNode};
use common::{have_tool, text};

const VOLUMES: [&str; 3] = ["soak-a", "soak-b", "soak-c"];

fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
fn a_sustained_load_on_three_volumes_keeps_memory_and_descriptors_bounded() {
    let test = "a_sustained_load_on_three_volumes";
    if !have_tool(test, "fio") {
        return;
    }
    let seconds: u64 = std::env::var("BALLAST_SOAK_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(30)
        .max(9);
    let node = TestNode::start(test, 1 << 30);
    for volume in VOLUMES {
        node.create_volume(volume, "128MiB");
    }
    let pid = node.pid();
    let fds_before = open_fds(pid);
    let samples = Arc::new(parking_lot::Mutex::new(Vec::<(u64, usize)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                samples.lock().push((resident_kib(pid), open_fds(pid)));
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let mut fio = Command::new("fio");
    fio.args([
        "--ioengine=nbd",
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=4k",
        "--iodepth=32",
        "--size=128M",
        "--time_based",
        &format!("--runtime={seconds}"),
        "--output-format=json",
    ]);
    let report_path = node.dir.path().join("fio.json");
    fio.arg(format!("--output={}", report_path.display()));
    for volume in VOLUMES {
        fio.arg(format!("--name={volume}"))
            .arg(format!("--uri={}", node.uri(volume)));
    }
    let output = run_with_timeout(&mut fio, Duration::from_secs(seconds + 300));
    stop.store(true, Ordering::Release);
    sampler.join().unwrap();
    assert!(output.status.success(), "fio: {}", text(&output));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).expect("fio's JSON report");
    let mut operations = 0;
    for job in report["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "fio job {}: {job:#}", job["jobname"]);
        operations += job["read"]["total_ios"].as_u64().unwrap() + job["write"]["total_ios"].as_u64().unwrap();
    }
    assert!(operations > 0, "no I/O done");

    let samples = samples.lock().clone();
    assert!(samples.len() >= 6, "too few samples: {samples:?}");
    let third = samples.len() / 3;
    let peak = |range: &[(u64, usize)]| range.iter().map(|(rss, _)| *rss).max().unwrap_or(0);
    let (early, late) = (peak(&samples[..third]), peak(&samples[samples.len() - third..]));
    println!(
        "soak: {seconds} s, {operations} I/Os on {} volumes; resident memory peak {early} KiB in the first third, {late} KiB in the last; descriptors {fds_before} before, up to {} during",
        VOLUMES.len(),
        samples.iter().map(|(_, fds)| *fds).max().unwrap_or(0)
    );
    assert!(
        late <= early + early / 4 + 32 * 1024,
        "resident memory kept growing: {early} KiB early, {late} KiB late ({samples:?})"
    );
    let most_fds = samples.iter().map(|(_, fds)| *fds).max().unwrap_or(0);
    assert!(
        most_fds <= fds_before + VOLUMES.len() + 16,
        "descriptors grew past the connections in use: {fds_before} before, {most_fds} during"
    );
    common::cluster::wait_until("descriptors back to their count before the load", || {
        open_fds(pid) <= fds_before + 2
    });
}
