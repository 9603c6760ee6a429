//! `ballast-perf qos`: what a volume's I/O limits hold and cost, on one
//! node. fio (NBD engine, one connection) drives one volume:
//!
//! - the cost of the pacer when its limit is not reached: 4 KiB random
//!   writes at QD32 with no limit and with a limit far above what the disk
//!   does (10 M IOPS), alternated;
//! - how well a limit holds: with the IOPS limit at half the unlimited
//!   rate, and with a bandwidth limit at half the unlimited rate of 1 MiB
//!   writes at QD8, the rate fio gets over each 10-s window (fio's own
//!   averaged log) over the limit.
//!
//! - the first latency target: a volume doing 4 KiB QD1 writes with an
//!   fsync after each, alone, beside a second volume saturating the disk
//!   with 1 MiB writes at QD8 when both are `medium` (no classes: first
//!   come, first served), and beside it when the quiet one is `high` and the
//!   noisy one `low` (the disk's scheduler): the p99 of its writes and of
//!   its fsyncs, and what the noisy volume got meanwhile.
//!
//! `--only limits|latency` runs one part. Not measured yet: a resync beside
//! a busy volume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob};
use crate::local_cluster::LocalCluster;
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::BallastBinary;
use crate::stats::{compact, Samples};

#[derive(Clone, Debug)]
pub struct QosOptions {
    pub disk_bytes: u64,
    pub seconds: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
    /// Run only this part (None: both).
    pub only: Option<Part>,
}

/// The benchmark's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The pacer's cost and how limits hold.
    Limits,
    /// A quiet volume's latency beside a noisy one, without and with classes.
    Latency,
}

/// The targets: a limit within 10 % over 10-s windows; the pacer
/// costs under 2 % when its limit is not reached.
const LIMIT_TOLERANCE: f64 = 0.10;
const UNREACHED_COST_MAX: f64 = 0.02;
/// A limit no device reaches.
const FAR_IOPS_LIMIT: u64 = 10_000_000;
/// fio's averaging window for the limit measures.
const WINDOW_MS: u64 = 10_000;

#[derive(Debug, Serialize)]
struct QosReport {
    date_utc: String,
    machine: Machine,
    ballast_binary: String,
    ballast_version: String,
    disk_bytes: u64,
    volume_bytes: u64,
    seconds: u64,
    repeats: usize,
    /// 4 KiB random write IOPS, QD32, without a limit and with one far above.
    limits: Option<LimitsReport>,
    latency: Option<LatencyReport>,
}

#[derive(Debug, Serialize)]
struct LimitsReport {
    unlimited_iops: Samples,
    far_limit_iops: Samples,
    /// far / unlimited per repetition, and its median.
    unreached_ratios: Samples,
    unreached_cost: f64,
    unreached_meets_target: bool,
    iops_limit: u64,
    /// Each 10-s window's IOPS over the limit.
    iops_window_ratios: Samples,
    mib_per_s_limit: u64,
    unlimited_mib_per_s: Samples,
    mib_window_ratios: Samples,
    limits_meet_target: bool,
}

/// The quiet volume's write and fsync p99 (us), and the noisy volume's
/// MiB/s: alone, beside the noisy one with both `medium`, beside it as
/// `high` beside `low`.
#[derive(Debug, Serialize)]
struct LatencyReport {
    quiet_write_p99_us: [Samples; 3],
    quiet_flush_p99_us: [Samples; 3],
    noisy_mib_per_s: [Samples; 3],
    /// Beside/alone write p99 with classes, and whether it is <= 2.
    classes_write_ratio: f64,
    meets_target: bool,
}

/// The slots of the latency part.
const LATENCY_SLOTS: [&str; 3] = ["alone", "beside the noisy one, both medium", "high beside low"];

pub fn run(options: &QosOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(options.seconds >= 1 && options.repeats >= 1);
    crate::servers::require_binary(&options.ballast.path)?;
    if !options
        .ballast
        .run(&["volume", "update", "--help"])?
        .contains("--iops-limit")
    {
        bail!(
            "{} has no --iops-limit (built before QoS?): rebuild it",
            options.ballast.path.display()
        );
    }
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        bail!("cannot benchmark: {why}");
    }
    crate::servers::require_tools(&[("fio", "apt-get install fio")])?;
    let load_average_before = load_average();
    let cluster = LocalCluster::start(&options.ballast, 1, options.disk_bytes)?;
    let volume_bytes = (options.disk_bytes / 4) & !((1 << 20) - 1);
    let scratch = tempfile::Builder::new()
        .prefix("ballast-perf-qos-")
        .tempdir_in("/var/tmp")
        .context("scratch directory")?;
    let limits = if options.only.is_none_or(|part| part == Part::Limits) {
        Some(limits_part(options, &cluster, volume_bytes, scratch.path())?)
    } else {
        None
    };
    let latency = if options.only.is_none_or(|part| part == Part::Latency) {
        Some(latency_part(options, &cluster, volume_bytes)?)
    } else {
        None
    };
    drop(cluster);

    let report = QosReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        disk_bytes: options.disk_bytes,
        volume_bytes,
        seconds: options.seconds,
        repeats: options.repeats,
        limits,
        latency,
    };
    let markdown = render(&report);
    println!("{markdown}");
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join("qos.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out.join("qos.md"), &markdown)?;
    let mut bars = Vec::new();
    if let Some(limits) = &report.limits {
        bars.push(crate::chart::Bar {
            label: "4k random write with a limit not reached (over none)".into(),
            ratio: limits.unreached_ratios.median(),
            target: Some(1.0 - UNREACHED_COST_MAX),
        });
    }
    Ok(bars)
}
/// Sets a volume's QoS with the CLI (`volume update NAME ARGS`).
fn update(cluster: &LocalCluster, name: &str, args: &[&str]) -> Result<()> {
    let api = cluster.nodes[0].api();
    let mut all = vec!["volume", "update", name];
    all.extend_from_slice(args);
    all.extend(["--api", &api]);
    cluster.admin().run(&all)?;
    // The serving node applies the cluster's state within moments.
    std::thread::sleep(std::time::Duration::from_secs(1));
    Ok(())
}

fn limits_part(
    options: &QosOptions,
    cluster: &LocalCluster,
    volume_bytes: u64,
    scratch: &Path,
) -> Result<LimitsReport> {
    let uri = &cluster.create_volume("q", volume_bytes, 1)?;
    eprintln!("filling {uri}");
    fio::run_on_nbd(&FioJob::new("fill", "write", "1M", 8, 0, volume_bytes), uri)?;
    let set = |args: &[&str]| update(cluster, "q", args);
    let random = |seconds: u64| FioJob::new("randwrite", "randwrite", "4k", 32, seconds, volume_bytes);
    // The pacer's cost when its limit is not reached.
    let (mut unlimited, mut far, mut ratios) = (Samples::default(), Samples::default(), Samples::default());
    let far_text = FAR_IOPS_LIMIT.to_string();
    for run in 0..options.repeats {
        let mut pair = [0.0; 2];
        for turn in 0..2 {
            let slot = (turn + run) % 2;
            set(&["--iops-limit", if slot == 0 { "none" } else { &far_text }])?;
            let iops = fio::run_on_nbd(&random(options.seconds), uri)?.iops;
            pair[slot] = iops;
            eprintln!(
                "repetition {}: {}: {} IOPS",
                run + 1,
                ["no limit", "a 10 M IOPS limit"][slot],
                compact(iops)
            );
        }
        unlimited.push(pair[0]);
        far.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    set(&["--iops-limit", "none"])?;
    let unreached_cost = 1.0 - ratios.median();

    // How an IOPS limit at half the unlimited rate holds, window by window.
    let iops_limit = half_of(unlimited.median(), 100);
    set(&["--iops-limit", &iops_limit.to_string()])?;
    let iops_windows = windows(&random(WINDOW_MS / 1000 * 3), uri, scratch, "iops")?;
    set(&["--iops-limit", "none"])?;
    let iops_window_ratios = ratio_samples(&iops_windows, iops_limit as f64);

    // And a bandwidth limit at half the unlimited rate of 1 MiB writes.
    let sequential = |seconds: u64| FioJob::new("write", "write", "1M", 8, seconds, volume_bytes);
    let mut unlimited_mib = Samples::default();
    for _ in 0..options.repeats {
        unlimited_mib
            .push(fio::run_on_nbd(&sequential(options.seconds), uri)?.bandwidth_bytes_per_second / 1_048_576.0);
    }
    let mib_limit = half_of(unlimited_mib.median(), 1);
    set(&["--mib-per-s-limit", &mib_limit.to_string()])?;
    let mib_windows = windows(&sequential(WINDOW_MS / 1000 * 3), uri, scratch, "bw")?;
    set(&["--mib-per-s-limit", "none"])?;
    // fio's bandwidth log is in KiB/s.
    let mib_windows: Vec<f64> = mib_windows.iter().map(|kib| kib / 1024.0).collect();
    let mib_window_ratios = ratio_samples(&mib_windows, mib_limit as f64);

    // The latency part runs at the same fill of the disk whether or not
    // this part ran (a fuller disk makes the store's cleaner run beside
    // the noisy volume's overwrites, and that is not what it measures).
    let api = cluster.nodes[0].api();
    cluster.admin().run(&["volume", "delete", "q", "--api", &api])?;
    let within = |samples: &Samples| {
        !samples.values.is_empty() && samples.values.iter().all(|r| (r - 1.0).abs() <= LIMIT_TOLERANCE)
    };
    Ok(LimitsReport {
        unlimited_iops: unlimited,
        far_limit_iops: far,
        unreached_ratios: ratios,
        unreached_cost,
        unreached_meets_target: unreached_cost < UNREACHED_COST_MAX,
        iops_limit,
        limits_meet_target: within(&iops_window_ratios) && within(&mib_window_ratios),
        iops_window_ratios,
        mib_per_s_limit: mib_limit,
        unlimited_mib_per_s: unlimited_mib,
        mib_window_ratios,
    })
}

/// A quiet volume's QD1 write + fsync latency alone, beside a noisy volume
/// with both `medium`, and as `high` beside it as `low`.
fn latency_part(options: &QosOptions, cluster: &LocalCluster, volume_bytes: u64) -> Result<LatencyReport> {
    let uri = cluster.create_volume("quiet", volume_bytes, 1)?;
    let noisy_uri = cluster.create_volume("noisy", volume_bytes, 1)?;
    eprintln!("filling {uri} and {noisy_uri}");
    fio::run_on_nbd(&FioJob::new("fill", "write", "1M", 8, 0, volume_bytes), &uri)?;
    fio::run_on_nbd(&FioJob::new("fill", "write", "1M", 8, 0, volume_bytes), &noisy_uri)?;
    let mut quiet = FioJob::new("quiet", "randwrite", "4k", 1, options.seconds, volume_bytes);
    quiet.extra.push("--fsync=1".into());
    let noise = FioJob::new("noisy", "write", "1M", 8, options.seconds + 4, volume_bytes);
    let (mut write_p99, mut flush_p99, mut noisy_mib): ([Samples; 3], [Samples; 3], [Samples; 3]) = Default::default();
    for run in 0..options.repeats {
        for turn in 0..3 {
            let slot = (turn + run) % 3;
            let (quiet_priority, noisy_priority) = if slot == 2 {
                ("high", "low")
            } else {
                ("medium", "medium")
            };
            update(cluster, "quiet", &["--io-priority", quiet_priority])?;
            update(cluster, "noisy", &["--io-priority", noisy_priority])?;
            let background = if slot == 0 {
                None
            } else {
                let noise = noise.clone();
                let noisy_uri = noisy_uri.clone();
                let child = std::thread::spawn(move || fio::run_on_nbd(&noise, &noisy_uri));
                std::thread::sleep(std::time::Duration::from_secs(2));
                Some(child)
            };
            let result = fio::run_on_nbd(&quiet, &uri);
            let noisy = background.map(|child| child.join().expect("the fio thread does not panic"));
            let result = result?;
            write_p99[slot].push(result.latency_p99_us);
            flush_p99[slot].push(result.flush_latency_p99_us);
            if let Some(noisy) = noisy {
                noisy_mib[slot].push(noisy?.bandwidth_bytes_per_second / 1_048_576.0);
            }
            eprintln!(
                "repetition {}: quiet volume {}: write p99 {} us, fsync p99 {} us",
                run + 1,
                LATENCY_SLOTS[slot],
                compact(result.latency_p99_us),
                compact(result.flush_latency_p99_us)
            );
        }
    }
    let ratio = write_p99[2].median() / write_p99[0].median();
    Ok(LatencyReport {
        quiet_write_p99_us: write_p99,
        quiet_flush_p99_us: flush_p99,
        noisy_mib_per_s: noisy_mib,
        classes_write_ratio: ratio,
        meets_target: ratio <= 2.0,
    })
}

/// Runs `job` with fio's averaged log of `kind` (`iops` or `bw`) over
/// `WINDOW_MS` windows; the windows' values.
fn windows(job: &FioJob, uri: &str, scratch: &Path, kind: &str) -> Result<Vec<f64>> {
    let prefix = scratch.join(format!("log-{kind}"));
    let mut job = job.clone();
    job.extra.extend([
        format!("--write_{kind}_log={}", prefix.display()),
        format!("--log_avg_msec={WINDOW_MS}"),
    ]);
    fio::run_on_nbd(&job, uri)?;
    let log = std::fs::read_dir(scratch)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&format!("log-{kind}_{kind}")))
        })
        .with_context(|| format!("fio wrote no {kind} log in {}", scratch.display()))?;
    let text = std::fs::read_to_string(&log)?;
    std::fs::remove_file(&log)?;
    // Lines: time (ms), value, direction, block size, offset.
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| line.split(',').nth(1)?.trim().parse::<f64>().ok())
        .collect();
    if values.is_empty() {
        bail!("fio's {kind} log is empty");
    }
    Ok(values)
}

/// Half a measured rate as a whole limit, at least `floor`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn half_of(rate: f64, floor: u64) -> u64 {
    // A rate is positive and far below u64::MAX; `as` saturates anyway.
    ((rate / 2.0).round() as u64).max(floor)
}

fn ratio_samples(values: &[f64], limit: f64) -> Samples {
    let mut samples = Samples::default();
    for value in values {
        samples.push(value / limit);
    }
    samples
}

fn render(report: &QosReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Volume I/O limits: one node, fio through NBD (1 connection), {} x {} s, median\n",
        report.repeats, report.seconds
    );
    let _ = writeln!(
        out,
        "{} UTC; {} ({} cores, kernel {}); load average before {}, after {}; binary {} ({})\n",
        report.date_utc,
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.machine.load_average_before,
        report.machine.load_average_after,
        report.ballast_binary,
        report.ballast_version
    );
    let _ = writeln!(out, "| measure | value | target |");
    let _ = writeln!(out, "| --- | --- | --- |");
    if let Some(limits) = &report.limits {
        render_limits(&mut out, limits);
    }
    if let Some(latency) = &report.latency {
        render_latency(&mut out, latency);
    }
    let _ = writeln!(out, "\nNot measured yet: a resync beside a busy volume.");
    out
}

fn render_limits(out: &mut String, report: &LimitsReport) {
    use std::fmt::Write;
    let windows = |samples: &Samples| {
        samples
            .values
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "| 4k random write QD32: no limit / a 10 M IOPS limit (not reached) | {} / {} IOPS, ratio {:.3} | cost < {:.0} %: {} |",
        compact(report.unlimited_iops.median()),
        compact(report.far_limit_iops.median()),
        report.unreached_ratios.median(),
        UNREACHED_COST_MAX * 100.0,
        if report.unreached_meets_target { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        out,
        "| 4k random write QD32 under a {} IOPS limit: each 10-s window over the limit | {} | within {:.0} %: {} |",
        report.iops_limit,
        windows(&report.iops_window_ratios),
        LIMIT_TOLERANCE * 100.0,
        if report.limits_meet_target { "met" } else { "NOT met" }
    );
    let _ = writeln!(
        out,
        "| 1M write QD8 ({} MiB/s unlimited) under a {} MiB/s limit: each 10-s window over the limit | {} | within {:.0} %: {} |",
        compact(report.unlimited_mib_per_s.median()),
        report.mib_per_s_limit,
        windows(&report.mib_window_ratios),
        LIMIT_TOLERANCE * 100.0,
        if report.limits_meet_target { "met" } else { "NOT met" }
    );
}

fn render_latency(out: &mut String, report: &LatencyReport) {
    use std::fmt::Write;
    let p99 = |samples: &[Samples; 3], what: &str, target: bool| {
        let alone = samples[0].median();
        format!(
            "| 4k QD1 write + fsync, {what} p99: alone / beside 1M QD8 writes of another volume, both `medium` / as `high` beside it as `low` | {} / {} / {} us (x{:.1} / x{:.1}) | {} |",
            compact(alone),
            compact(samples[1].median()),
            compact(samples[2].median()),
            samples[1].median() / alone,
            samples[2].median() / alone,
            if !target {
                "(reported)"
            } else if samples[2].median() <= 2.0 * alone {
                "`high` beside `low` <= 2x alone: met"
            } else {
                "`high` beside `low` <= 2x alone: NOT met"
            }
        )
    };
    let _ = writeln!(out, "{}", p99(&report.quiet_write_p99_us, "write", true));
    let _ = writeln!(out, "{}", p99(&report.quiet_flush_p99_us, "fsync", false));
    let _ = writeln!(
        out,
        "| the noisy volume meanwhile: both `medium` / as `low` | {} / {} MiB/s | (reported) |",
        compact(report.noisy_mib_per_s[1].median()),
        compact(report.noisy_mib_per_s[2].median()),
    );
}
