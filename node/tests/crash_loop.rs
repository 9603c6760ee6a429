//! kill -9 of a process writing through the engine, at random moments, on a
//! real loop device with io_uring and O_DIRECT: after each kill, every
//! acknowledged write must read back intact. The device is small, so the
//! cleaner and checkpoints run during the loop.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ballast, iterations, loop_device, run, scratch, text};

fn kill_loop(test: &str, extra: &[&str], rounds: usize) {
    let dir = scratch();
    let Some(device) = loop_device(test, dir.path(), 256 << 20) else {
        return;
    };
    let data = dir.path().join("data");
    let acks = dir.path().join("acks");
    let (data, acks, dev) = (
        data.to_str().unwrap(),
        acks.to_str().unwrap(),
        device.path().to_str().unwrap(),
    );
    let enrolled = run(&["disk", "enroll", "--data-dir", data, "--segment-size", "1MiB", dev]);
    assert!(enrolled.status.success(), "{}", text(&enrolled));
    let blocks = "40000"; // 160 MiB of a ~220 MiB capacity: the cleaner must work
    let mut rng = disk_layout::sim_disk::SimRng::new(u64::from(std::process::id()));
    for round in 1..=rounds {
        let run_number = round.to_string();
        let mut child = ballast()
            .args([
                "debug",
                "write-load",
                "--data-dir",
                data,
                "--ack-log",
                acks,
                "--blocks",
                blocks,
                "--seconds",
                "60",
                "--run",
                &run_number,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it is writing, then kill at a random moment within 1.5 s.
        let started = Instant::now();
        while std::fs::metadata(acks).map_or(0, |m| m.len()) == 0 && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(1500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let verified = run(&[
            "debug",
            "verify-load",
            "--data-dir",
            data,
            "--ack-log",
            acks,
            "--blocks",
            blocks,
        ]);
        let message = text(&verified);
        assert!(verified.status.success(), "round {round}: {message}");
        assert!(message.contains("lost: 0, corrupt: 0"), "round {round}: {message}");
    }
    let acked = std::fs::metadata(acks).unwrap().len() / 16;
    assert!(
        acked > 1000 * rounds as u64,
        "too few writes were acknowledged to mean anything: {acked}"
    );
}

#[test]
fn acknowledged_writes_survive_kill_9_with_io_uring() {
    kill_loop(
        "acknowledged_writes_survive_kill_9_with_io_uring",
        &[],
        iterations(14, 5),
    );
}

#[test]
fn acknowledged_writes_survive_kill_9_with_the_thread_pool() {
    kill_loop(
        "acknowledged_writes_survive_kill_9_with_the_thread_pool",
        &["--thread-pool"],
        iterations(5, 2),
    );
}
