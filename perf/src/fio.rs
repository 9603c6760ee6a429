//! Running fio and reading its JSON output.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// What one fio job measured.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub bandwidth_bytes_per_second: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_p999_us: f64,
    /// Requests completed (reads and writes).
    pub io_count: u64,
    /// Flushes completed (`--fsync=N`; the NBD engine sends NBD_CMD_FLUSH) and their latency.
    pub flush_count: u64,
    pub flush_latency_p50_us: f64,
    pub flush_latency_p99_us: f64,
    pub flush_latency_p999_us: f64,
}

/// One fio job description.
#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    /// `randwrite`, `randread`, `write`, `read`, `randrw`.
    pub rw: String,
    pub block_size: String,
    pub iodepth: u32,
    pub seconds: u64,
    /// Bytes of the target the job may touch.
    pub size_bytes: u64,
    pub extra: Vec<String>,
}

impl FioJob {
    /// A job with fio defaults for the rest.
    #[must_use]
    pub fn new(name: &str, rw: &str, block_size: &str, iodepth: u32, seconds: u64, size_bytes: u64) -> Self {
        Self {
            name: name.to_owned(),
            rw: rw.to_owned(),
            block_size: block_size.to_owned(),
            iodepth,
            seconds,
            size_bytes,
            extra: Vec::new(),
        }
    }
}

/// Runs `job` with the io_uring engine and O_DIRECT against a device or file.
pub fn run_on_device(job: &FioJob, target: &Path) -> Result<FioResult> {
    let mut command = Command::new("fio");
    command
        .arg(format!("--name={}", job.name))
        .arg(format!("--filename={}", target.display()))
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--output-format=json",
            "--time_based",
            "--group_reporting",
        ])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--runtime={}", job.seconds))
        .arg(format!("--size={}", job.size_bytes))
        .args(&job.extra);
    run(command)
}

/// Runs `job` with fio's NBD engine (libnbd, one connection) against `uri`.
pub fn run_on_nbd(job: &FioJob, uri: &str) -> Result<FioResult> {
    run(nbd_command(Command::new("fio"), job, uri))
}

/// `fio` (the program `command` runs, maybe through a wrapper) with the
/// NBD engine's arguments for `job` on `uri`.
pub fn nbd_command(mut command: Command, job: &FioJob, uri: &str) -> Command {
    command
        .arg(format!("--name={}", job.name))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(["--output-format=json", "--group_reporting"])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.block_size))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--size={}", job.size_bytes))
        .args(&job.extra);
    // Zero seconds: run once over `size_bytes` (a fill), not for a fixed time.
    if job.seconds > 0 {
        command.arg("--time_based").arg(format!("--runtime={}", job.seconds));
    }
    command
}

/// Runs a prepared fio command and parses its JSON.
pub fn run(mut command: Command) -> Result<FioResult> {
    let output = command
        .output()
        .context("cannot run fio (install it: apt-get install fio)")?;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// Parses fio's JSON output (reads and writes summed).
pub fn parse(text: &str) -> Result<FioResult> {
    // fio may print warnings before the JSON document.
    let start = text.find('{').context("fio printed no JSON")?;
    let json: Value = serde_json::from_str(&text[start..]).context("fio JSON does not parse")?;
    let job = &json["jobs"][0];
    if let Some(code) = job["error"].as_i64().filter(|code| *code != 0) {
        bail!("fio job {} ended with error {code}", job["jobname"]);
    }
    let mut result = FioResult::default();
    let mut weights = 0.0;
    for direction in ["read", "write"] {
        let part = &job[direction];
        let iops = part["iops"].as_f64().unwrap_or(0.0);
        if iops <= 0.0 {
            continue;
        }
        result.iops += iops;
        result.io_count += part["total_ios"].as_u64().unwrap_or(0);
        result.bandwidth_bytes_per_second += part["bw_bytes"].as_f64().unwrap_or(0.0);
        let percentile = |key: &str| part["clat_ns"]["percentile"][key].as_f64().unwrap_or(0.0) / 1000.0;
        result.latency_p50_us += percentile("50.000000") * iops;
        result.latency_p99_us += percentile("99.000000") * iops;
        result.latency_p999_us += percentile("99.900000") * iops;
        weights += iops;
    }
    if weights > 0.0 {
        result.latency_p50_us /= weights;
        result.latency_p99_us /= weights;
        result.latency_p999_us /= weights;
    }
    // fio reports syncs apart from writes: total latency only (a sync has no submission phase).
    let sync = &job["sync"];
    result.flush_count = sync["total_ios"].as_u64().unwrap_or(0);
    let flush_percentile = |key: &str| sync["lat_ns"]["percentile"][key].as_f64().unwrap_or(0.0) / 1000.0;
    result.flush_latency_p50_us = flush_percentile("50.000000");
    result.flush_latency_p99_us = flush_percentile("99.000000");
    result.flush_latency_p999_us = flush_percentile("99.900000");
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_and_skips_leading_warnings() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs":[{"read":{"iops":0.0},"write":{"iops":1000.5,"bw_bytes":4098048,
"clat_ns":{"percentile":{"50.000000":20000,"99.000000":90000}},"total_ios":3002}}]}"#;
        let result = parse(text).unwrap();
        assert!((result.iops - 1000.5).abs() < 1e-9);
        assert_eq!(result.io_count, 3002);
        assert!((result.latency_p99_us - 90.0).abs() < 1e-9);
        assert_eq!(result.flush_count, 0);
        assert!(parse("no json here").is_err());
    }

    #[test]
    fn parses_flush_latency_and_the_999th_percentile() {
        let text = r#"{"jobs":[{"write":{"iops":500.0,"total_ios":1000,
"clat_ns":{"percentile":{"50.000000":100000,"99.000000":400000,"99.900000":900000}}},
"sync":{"total_ios":1000,"lat_ns":{"percentile":{"50.000000":20000,"99.000000":60000,"99.900000":250000}}}}]}"#;
        let result = parse(text).unwrap();
        assert!((result.latency_p999_us - 900.0).abs() < 1e-9);
        assert_eq!(result.flush_count, 1000);
        assert!((result.flush_latency_p50_us - 20.0).abs() < 1e-9);
        assert!((result.flush_latency_p99_us - 60.0).abs() < 1e-9);
        assert!((result.flush_latency_p999_us - 250.0).abs() < 1e-9);
    }
}
