//! The benchmark harness itself (issue 10): `ballast-perf engine --quick`
//! runs end to end on a real loop device against fio on the same device,
//! and writes its JSON, markdown table of ratios and PNG chart. No timing is asserted:
//! only that every measure was taken and reported.

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
    let fio = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join("fio").is_file()));
    if !fio {
        return skip("fio is not installed (ci/install-deps.sh installs it)");
    }
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ballast-perf"))
        .args(["engine", "--quick", "--out"])
        .arg(out.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            panic!("ballast-perf engine --quick ran over 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("engine.json")).unwrap()).unwrap();
    for measure in [
        "raw_randwrite_iops",
        "ballast_randwrite_iops",
        "raw_randread_iops",
        "ballast_randread_iops",
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
    let table = std::fs::read_to_string(out.path().join("engine.md")).unwrap();
    assert!(table.contains("| random write IOPS"), "{table}");
    assert!(table.contains("x |"), "ratios in the table: {table}");
    assert!(stdout.contains(&table), "the table printed is the one saved");
    let png = std::fs::read(out.path().join("engine.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "engine.png is a PNG");
    assert!(png.len() > 2000, "and has something drawn in it ({} bytes)", png.len());
}
