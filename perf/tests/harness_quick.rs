//! The benchmark harness itself (issue 10): `ballast-perf engine --quick`
//! runs end to end on a real loop device against fio on the same device,
//! and `ballast-perf nbd --quick` runs its whole fio matrix (one repetition of 1 s)
//! against ballast (repl=1, 2, 3), qemu-nbd, nbdkit, the raw device and the
//! NBD ceiling (nbdkit null); each writes its
//! JSON, markdown table of ratios and PNG chart; `ballast-perf attach --quick`
//! measures the attached device (every FUSE backend, repl=1 and 3) and pgbench
//! against the raw device; `ballast-perf fleet --quick` kills the node
//! coordinating a third of 60 volumes and sees each served again; `ballast-perf
//! backup --quick` backs up, changes 1 % and restores through S3 (moto_server) and a
//! file target beside qemu-img. No timing is asserted:
//! only that every measure was taken and reported.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Records a skip the way `scripts/test.sh` counts them.
fn skip(why: &str) {
    println!("SKIP: harness_quick: {why}");
    if let Some(log) = std::env::var_os("BALLAST_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(log) {
            let _ = writeln!(file, "SKIP: harness_quick: {why}");
        }
    }
}

#[test]
fn the_engine_benchmark_runs_quick_and_writes_its_json_ratio_table_and_chart() {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        return skip(&why.to_string());
    }
    if !installed("fio") {
        return skip("fio is not installed (ci/install-deps.sh installs it)");
    }
    let out = tempfile::tempdir().unwrap();
    let stdout = run_perf(&["engine", "--quick"], out.path());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("engine.json")).unwrap()).unwrap();
    for measure in [
        "raw_randwrite_iops",
        "ballast_randwrite_iops",
        "raw_randread_iops",
        "ballast_randread_iops",
        "raw_sequential_read_mib_s",
        "scan_first_contact_mib_s",
        "scan_after_idle_mib_s",
        "background_pass_seconds",
        "background_moved_per_volume_block",
    ] {
        let samples = report[measure]["values"]
            .as_array()
            .unwrap_or_else(|| panic!("{measure} in {report:#}"));
        assert_eq!(samples.len(), 1, "--quick: one repetition of {measure}");
        assert!(samples[0].as_f64().unwrap() > 0.0, "{measure}: {report:#}");
    }
    for amplification in ["write_amplification_50_percent", "write_amplification_80_percent"] {
        let value = report[amplification].as_f64().unwrap();
        assert!(
            value >= 1.0,
            "{amplification} = {value}: every user block is written at least once"
        );
    }
    // Discards off, then on: only with them does the backing file shrink after the delete.
    let discards = report["discards"]
        .as_array()
        .unwrap_or_else(|| panic!("discards in {report:#}"));
    assert_eq!(discards.len(), 2, "{report:#}");
    let (off, on) = (&discards[0], &discards[1]);
    assert_eq!(
        off["allocated_after_delete_mib"], off["allocated_full_mib"],
        "{report:#}"
    );
    assert!(
        on["allocated_after_delete_mib"].as_f64().unwrap() < on["allocated_full_mib"].as_f64().unwrap() / 2.0,
        "{report:#}"
    );
    let index = report["index"]
        .as_array()
        .unwrap_or_else(|| panic!("index in {report:#}"));
    assert_eq!(
        index.len(),
        4,
        "sequential, random, sparse random and mixed fills: {report:#}"
    );
    assert!(
        index.iter().all(|fill| fill["percent_of_data"].as_f64().unwrap() > 0.0),
        "{report:#}"
    );
    let table = std::fs::read_to_string(out.path().join("engine.md")).unwrap();
    assert!(table.contains("| random write IOPS"), "{table}");
    assert!(table.contains("| on |") && table.contains("| sequential |"), "{table}");
    assert!(
        table.contains("after the idle store's background re-sequencing"),
        "{table}"
    );
    assert!(table.contains("x |"), "ratios in the table: {table}");
    assert!(stdout.contains(&table), "the table printed is the one saved");
    let png = std::fs::read(out.path().join("engine.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "engine.png is a PNG");
    assert!(png.len() > 2000, "and has something drawn in it ({} bytes)", png.len());
}

#[test]
fn the_fleet_benchmark_kills_the_node_coordinating_a_share_of_the_volumes_and_each_is_served_again() {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        return skip(&why.to_string());
    }
    let Some(ballast) = ballast_binary() else {
        return skip("target/debug/ballast is not built (cargo test --workspace builds it)");
    };
    let out = tempfile::tempdir().unwrap();
    let stdout = run_perf(
        &["fleet", "--quick", "--ballast", ballast.to_str().unwrap()],
        out.path(),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("fleet.json")).unwrap()).unwrap();
    assert_eq!(report["volumes"], 60, "{report:#}");
    assert_eq!(report["on_victim"], 20, "node 1 coordinated its share: {report:#}");
    assert_eq!(
        report["moved"], 20,
        "every one of node 1's volumes took a write elsewhere: {report:#}"
    );
    assert_eq!(report["not_moved"], 0, "{report:#}");
    for measure in ["create_p50_ms", "status_median_s", "failover_p99_s"] {
        assert!(report[measure].as_f64().unwrap() > 0.0, "{measure}: {report:#}");
    }
    let rss = report["rss_mib_per_node"].as_array().unwrap();
    assert_eq!(rss.len(), 3, "{report:#}");
    assert!(rss.iter().all(|mib| mib.as_f64().unwrap() > 1.0), "{report:#}");
    let table = std::fs::read_to_string(out.path().join("fleet.md")).unwrap();
    assert!(table.contains("served again elsewhere"), "{table}");
    assert!(stdout.contains(&table), "the table printed is the one saved");
}

#[test]
fn the_backup_benchmark_measures_full_incremental_and_restore_beside_qemu_img_and_the_moved_ratio() {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        return skip(&why.to_string());
    }
    for tool in ["fio", "qemu-img", "moto_server"] {
        if !installed(tool) {
            return skip(&format!("{tool} is not installed (ci/install-deps.sh installs it)"));
        }
    }
    let Some(ballast) = ballast_binary() else {
        return skip("target/debug/ballast is not built (cargo test --workspace builds it)");
    };
    let out = tempfile::tempdir().unwrap();
    let stdout = run_perf(
        &["backup", "--quick", "--ballast", ballast.to_str().unwrap()],
        out.path(),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("backup.json")).unwrap()).unwrap();
    let table = report["table"].as_array().unwrap();
    assert_eq!(table.len(), 8, "{report:#}");
    for row in table {
        assert!(row["mib_per_s"].as_f64().unwrap() > 0.0, "{row:#}");
        assert!(row["cpu_seconds_per_gib"].as_f64().unwrap() > 0.0, "{row:#}");
    }
    for key in ["full_backup_s3", "full_backup_file", "restore_s3", "restore_file"] {
        let row = table.iter().find(|row| row["key"] == key).unwrap();
        assert!(row["ratio_to_baseline"].as_f64().unwrap() > 0.0, "{row:#}");
    }
    for key in ["incremental_backup_s3", "incremental_backup_file"] {
        let row = table.iter().find(|row| row["key"] == key).unwrap();
        let moved = row["moved_over_changed"].as_f64().unwrap();
        // Bytes, not time: the patches send what changed and little more.
        assert!((1.0..=1.2).contains(&moved), "{row:#}");
    }
    let markdown = std::fs::read_to_string(out.path().join("backup.md")).unwrap();
    assert!(stdout.contains(&markdown), "the table printed is the one saved");
}

/// Whether `program` is on the PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The ballast binary this workspace's test build made (`target/debug/ballast`
/// beside this test's `deps` directory).
fn ballast_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("ballast");
    path.is_file().then_some(path)
}

/// Runs `ballast-perf` with `args`, at most 15 minutes; returns its stdout.
fn run_perf(args: &[&str], out: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ballast-perf"))
        .args(args)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ballast-perf {args:?} ran over 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_nbd_matrix_measures_every_profile_on_every_target_and_writes_its_table_and_chart() {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        return skip(&why.to_string());
    }
    for tool in ["fio", "qemu-nbd", "nbdkit"] {
        if !installed(tool) {
            return skip(&format!("{tool} is not installed (ci/install-deps.sh installs it)"));
        }
    }
    let Some(ballast) = ballast_binary() else {
        return skip("target/debug/ballast is not built (cargo test --workspace builds it)");
    };
    let out = tempfile::tempdir().unwrap();
    // The debug build: the numbers mean nothing, the harness is what is tested.
    let ballast = ballast.to_str().unwrap();
    let args = ["nbd", "--quick", "--ballast", ballast];
    let stdout = run_perf(&args, out.path());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("nbd.json")).unwrap()).unwrap();
    let measures = report["measures"].as_array().expect("measures");
    assert_eq!(measures.len(), 9, "the issue's profiles: {report:#}");
    for measure in measures {
        let name = measure["name"].as_str().unwrap();
        for target in [
            "ballast",
            "ballast_repl2",
            "ballast_repl3",
            "qemu_nbd",
            "nbdkit",
            "raw_device",
            "nbd_ceiling",
        ] {
            let values = measure[target]["value"]["values"].as_array().unwrap();
            assert_eq!(values.len(), 1, "{name} on {target}: one repetition");
            assert!(values[0].as_f64().unwrap() > 0.0, "{name} on {target}: {measure:#}");
        }
        for server in [
            "ballast",
            "ballast_repl2",
            "ballast_repl3",
            "qemu_nbd",
            "nbdkit",
            "nbd_ceiling",
        ] {
            let per_cpu = &measure[server]["requests_per_cpu_second"]["values"];
            assert!(
                per_cpu[0].as_f64().unwrap() > 0.0,
                "{name}: {server}'s CPU cost: {measure:#}"
            );
        }
        assert!(
            measure["ratio_ballast_over_raw_device"].as_f64().unwrap() > 0.0,
            "{measure:#}"
        );
        // ballast's own percentiles of the same requests: inside what the client saw.
        for ballast in ["ballast", "ballast_repl3"] {
            let server_p99 = measure[ballast]["server_latency_p99_us"]["values"][0].as_f64().unwrap();
            let server_p50 = measure[ballast]["server_latency_p50_us"]["values"][0].as_f64().unwrap();
            assert!(
                server_p50 >= 1.0 && server_p50 <= server_p99,
                "{name} on {ballast}: {measure:#}"
            );
        }
        assert!(measure["ratio_repl3_over_repl1"].as_f64().unwrap() > 0.0, "{measure:#}");
        assert!(
            measure["ratio_nbd_ceiling_over_qemu_nbd"].as_f64().unwrap() > 0.0,
            "{measure:#}"
        );
        assert!(
            measure["qemu_nbd"]["server_latency_p99_us"]["values"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{name}: qemu-nbd keeps no percentiles"
        );
    }
    let table = std::fs::read_to_string(out.path().join("nbd.md")).unwrap();
    assert!(table.contains("ballast, server side"), "{table}");
    assert!(table.contains("repl=3 / repl=1"), "{table}");
    for row in [
        "| 4 KiB random write, QD32 |",
        "| database-like:",
        "| 64 KiB random 70 % read",
    ] {
        assert!(table.contains(row), "{row} in {table}");
    }
    assert!(table.contains("ballast / raw"), "{table}");
    assert!(table.contains("ceiling / qemu-nbd"), "{table}");
    assert!(stdout.contains(&table), "the table printed is the one saved");
    let png = std::fs::read(out.path().join("nbd.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "nbd.png is a PNG");
}

/// Turns FUSE over io_uring on for a test, and back to what it was after.
struct UringSwitch(Option<String>);

impl UringSwitch {
    fn on() -> Self {
        let was = std::fs::read_to_string(kernel_iface::fuse::URING_PARAMETER).ok();
        if was.is_some() {
            let _ = std::fs::write(kernel_iface::fuse::URING_PARAMETER, "1");
        }
        Self(was)
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = std::fs::write(kernel_iface::fuse::URING_PARAMETER, was.trim());
        }
    }
}

#[test]
fn the_attach_benchmark_measures_every_profile_on_every_backend_and_pgbench_and_writes_its_table_and_chart() {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        return skip(&why.to_string());
    }
    if !Path::new(kernel_iface::fuse::DEVICE_PATH).exists() {
        return skip("no /dev/fuse (FUSE is not available on this host)");
    }
    if !installed("fio") {
        return skip("fio is not installed (ci/install-deps.sh installs it)");
    }
    let Some(ballast) = ballast_binary() else {
        return skip("target/debug/ballast is not built (cargo test --workspace builds it)");
    };
    let uring = UringSwitch::on();
    let backends: Vec<&str> = if uring.0.is_some() {
        vec!["fuse-uring", "fuse"]
    } else {
        vec!["fuse"]
    };
    let out = tempfile::tempdir().unwrap();
    // The debug build: the numbers mean nothing, the harness is what is tested.
    let args = ["attach", "--quick", "--ballast", ballast.to_str().unwrap()];
    let stdout = run_perf(&args, out.path());
    drop(uring);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("attach.json")).unwrap()).unwrap();
    let measures = report["measures"].as_array().expect("measures");
    assert_eq!(measures.len(), 8, "the issue's profiles: {report:#}");
    let mut expected: Vec<String> = backends.iter().map(|backend| format!("{backend} repl=1")).collect();
    expected.push(format!("{} repl=3", backends[0]));
    for measure in measures {
        assert!(measure["raw_median"].as_f64().unwrap() > 0.0, "{measure:#}");
        let targets: Vec<&str> = measure["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["target"].as_str().unwrap())
            .collect();
        assert_eq!(targets, expected, "{measure:#}");
        for target in measure["targets"].as_array().unwrap() {
            assert!(target["ratio_over_raw"].as_f64().unwrap() > 0.0, "{measure:#}");
            assert!(target["cpu_us_per_request"].as_f64().unwrap() > 0.0, "{measure:#}");
        }
    }
    let table = std::fs::read_to_string(out.path().join("attach.md")).unwrap();
    for row in [
        "| 4 KiB random write, QD32 |",
        "| 4 KiB random write + fsync, QD1 |",
        "| database-like 8 KiB 70/30",
        "| 1 MiB sequential read, QD8 |",
    ] {
        assert!(table.contains(row), "{row} in {table}");
    }
    if installed("runuser") && Path::new("/usr/lib/postgresql").is_dir() {
        let pgbench = &report["pgbench"];
        assert!(pgbench["raw_tps"].as_f64().unwrap() > 0.0, "{report:#}");
        let targets = pgbench["targets"].as_array().unwrap();
        assert_eq!(targets.len(), expected.len(), "{report:#}");
        assert!(table.contains("pgbench"), "{table}");
    } else {
        skip("pgbench part: PostgreSQL is not installed (ci/install-deps.sh installs it)");
    }
    assert!(stdout.contains(&table), "the table printed is the one saved");
    let png = std::fs::read(out.path().join("attach.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "attach.png is a PNG");
}
