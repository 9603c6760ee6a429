//! `ballast-perf security`: what NBD over TLS and encryption at rest cost,
//! measured in one run on one node. Two volumes, one plain and one
//! encrypted (`--encrypted`, AES-XTS-256), are each driven by fio's NBD
//! engine over plaintext (`nbd://`) and over TLS (`nbds://` with a client
//! certificate from `ballast auth cert create`): four configurations, run
//! in turn, rotating which goes first in each repetition; medians are
//! reported as ratios against plain volume + plaintext.
//!
//! fio's NBD engine cannot name certificate files in its URI (libnbd
//! refuses local files there), so every fio run, TLS or not, runs as
//! `nobody` with HOME in a scratch directory holding `.pki/libnbd/` (where
//! libnbd looks for a non-root user): the same process setup for all four.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob, FioResult};
use crate::local_cluster::LocalCluster;
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::BallastBinary;
use crate::stats::{compact, Samples};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct SecurityOptions {
    pub disk_bytes: u64,
    pub seconds: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
}

/// Each volume is this fraction of the disk (both together a quarter: the
/// cleaner has room, as in the nbd benchmark).
const SPAN_DISK_FRACTION: u64 = 8;
/// The user fio runs as (see the module comment).
const FIO_UID: &str = "65534";

/// One fio job run in every configuration.
struct Measure {
    key: &'static str,
    description: &'static str,
    rw: &'static str,
    block_size: &'static str,
    iodepth: u32,
    /// The target for each ratio (at least), if any.
    target: Option<f64>,
}

const MEASURES: [Measure; 3] = [
    Measure {
        key: "rand_write_4k_qd32",
        description: "4 KiB random write IOPS, QD32",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
        target: Some(0.7),
    },
    Measure {
        key: "rand_read_4k_qd32",
        description: "4 KiB random read IOPS, QD32",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
        target: None,
    },
    Measure {
        key: "seq_write_1m_qd8",
        description: "1 MiB sequential write MB/s, QD8",
        rw: "write",
        block_size: "1M",
        iodepth: 8,
        target: None,
    },
];

/// The configurations, baseline first.
const CONFIGS: [(&str, bool, bool); 4] = [
    ("plain volume, plaintext NBD", false, false),
    ("plain volume, NBD over TLS", false, true),
    ("encrypted volume, plaintext NBD", true, false),
    ("encrypted volume, NBD over TLS", true, true),
];

/// One line of the table: a measure in every configuration.
#[derive(Debug, Serialize)]
struct Row {
    measure: &'static str,
    /// Medians per configuration (IOPS, or MB/s for the sequential write).
    medians: [f64; 4],
    /// Each configuration's median over the baseline's.
    ratios: [f64; 4],
    /// Ratios within each repetition (configurations ran back to back).
    ratios_per_repetition: [Vec<f64>; 4],
    target: Option<f64>,
    /// Every non-baseline ratio meets the target.
    meets_target: Option<bool>,
}

#[derive(Debug, Serialize)]
struct SecurityReport {
    date_utc: String,
    machine: Machine,
    aes_ni: bool,
    ballast_binary: String,
    ballast_version: String,
    disk_bytes: u64,
    volume_bytes: u64,
    preparation: &'static str,
    seconds: u64,
    repeats: usize,
    configurations: Vec<&'static str>,
    measure_keys: Vec<&'static str>,
    /// `samples[measure][configuration]`.
    samples: Vec<[Samples; 4]>,
    table: Vec<Row>,
}

/// Runs the benchmark, prints the table and writes `security.json` under `out`.
pub fn run(options: &SecurityOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(options.seconds > 0 && options.repeats > 0);
    let volume_bytes = (options.disk_bytes / SPAN_DISK_FRACTION) & !((1 << 20) - 1);
    if volume_bytes < 64 << 20 {
        bail!("--size must be at least 512 MiB");
    }
    preflight(&options.ballast)?;
    let load_average_before = load_average();
    let cluster = LocalCluster::start(&options.ballast, 1, options.disk_bytes)?;
    let home = tempfile::Builder::new()
        .prefix("ballast-perf-fio-")
        .tempdir_in("/var/tmp")
        .context("scratch directory for fio")?;
    client_certificates(&cluster, home.path())?;
    let mut uris = Vec::new();
    for (name, encrypted) in [("plain", false), ("encrypted", true)] {
        let options: &[&str] = if encrypted { &["--encrypted"] } else { &[] };
        let uri = cluster.create_volume_with(name, volume_bytes, 1, options)?;
        eprintln!("filling {uri}");
        let fill = FioJob::new("fill", "write", "1M", 8, 0, volume_bytes);
        run_fio(&fill, &uri, home.path()).with_context(|| format!("filling {name}:\n{}", cluster.log_tails()))?;
        uris.push(uri);
    }
    let tls_uri = |uri: &str| uri.replacen("nbd://", "nbds://", 1);
    let targets: Vec<String> = CONFIGS
        .iter()
        .map(|&(_, encrypted, tls)| {
            let uri = &uris[usize::from(encrypted)];
            if tls {
                tls_uri(uri)
            } else {
                uri.clone()
            }
        })
        .collect();
    let samples = measure_all(&cluster, &targets, home.path(), options, volume_bytes)?;
    drop(cluster);
    let table = MEASURES.iter().zip(&samples).map(|(m, s)| row(m, s)).collect();
    let report = SecurityReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        aes_ni: std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|text| text.contains(" aes ")),
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        disk_bytes: options.disk_bytes,
        volume_bytes,
        preparation: "each volume written once end to end (fio 1 MiB sequential, QD8) before the measures",
        seconds: options.seconds,
        repeats: options.repeats,
        configurations: CONFIGS.iter().map(|c| c.0).collect(),
        measure_keys: MEASURES.iter().map(|m| m.key).collect(),
        samples,
        table,
    };
    print_report(&report);
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("security.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    let png = options.out.join("security.png");
    let bars: Vec<crate::chart::Bar> = report
        .table
        .iter()
        .flat_map(|row| {
            // Configuration 0 is the baseline (plain volume, plaintext NBD).
            report
                .configurations
                .iter()
                .zip(row.ratios)
                .skip(1)
                .map(|(configuration, ratio)| crate::chart::Bar {
                    label: format!("{}: {configuration}", row.measure),
                    ratio,
                    target: row.target,
                })
        })
        .collect();
    crate::chart::ratio_chart(&png, "what TLS and encryption at rest cost (over plain)", &bars)?;
    println!("\nJSON: {}, chart: {}", file.display(), png.display());
    Ok(bars)
}

/// An admin client certificate in `home/.pki/libnbd`, all of `home` owned by fio's user.
fn client_certificates(cluster: &LocalCluster, home: &Path) -> Result<()> {
    let node = &cluster.nodes[0];
    let pki = home.join(".pki/libnbd");
    cluster.binary.as_admin_of(&node.data_dir).run(&[
        "auth",
        "--api",
        &node.api(),
        "cert",
        "create",
        "--subject",
        "perf",
        "--role",
        "admin",
        "--ttl",
        "1d",
        "--out",
        &pki.display().to_string(),
    ])?;
    let chown = Command::new("chown")
        .args(["-R", &format!("{FIO_UID}:{FIO_UID}")])
        .arg(home)
        .status()?;
    if !chown.success() {
        bail!("cannot hand {} to fio's user", home.display());
    }
    Ok(())
}

/// Runs fio as `nobody` with HOME = `home` (see the module comment).
fn run_fio(job: &FioJob, uri: &str, home: &Path) -> Result<FioResult> {
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={FIO_UID}"),
            &format!("--regid={FIO_UID}"),
            "--clear-groups",
            "fio",
        ])
        .env("HOME", home)
        .current_dir(home);
    fio::run(fio::nbd_command(command, job, uri))
}

fn measure_all(
    cluster: &LocalCluster,
    targets: &[String],
    home: &Path,
    options: &SecurityOptions,
    volume_bytes: u64,
) -> Result<Vec<[Samples; 4]>> {
    let mut samples: Vec<[Samples; 4]> = MEASURES.iter().map(|_| Default::default()).collect();
    let steps = (options.repeats * MEASURES.len() * CONFIGS.len()) as u64;
    let bar = node::cli::progress::items(steps, "security measures");
    for run in 0..options.repeats {
        for (index, measure) in MEASURES.iter().enumerate() {
            for turn in 0..CONFIGS.len() {
                let slot = (turn + run) % CONFIGS.len();
                let job = FioJob::new(
                    measure.key,
                    measure.rw,
                    measure.block_size,
                    measure.iodepth,
                    options.seconds,
                    volume_bytes,
                );
                let result = run_fio(&job, &targets[slot], home)
                    .with_context(|| format!("{} on {}:\n{}", measure.key, targets[slot], cluster.log_tails()))?;
                let value = if measure.block_size == "1M" {
                    result.bandwidth_bytes_per_second / 1e6
                } else {
                    result.iops
                };
                samples[index][slot].push(value);
                node::cli::progress::note(
                    &bar,
                    &format!(
                        "repetition {}/{}: {} {}: {}",
                        run + 1,
                        options.repeats,
                        measure.key,
                        CONFIGS[slot].0,
                        compact(value)
                    ),
                );
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    Ok(samples)
}

fn row(measure: &Measure, samples: &[Samples; 4]) -> Row {
    let medians = [0, 1, 2, 3].map(|i| samples[i].median());
    let ratios = medians.map(|median| median / medians[0]);
    let ratios_per_repetition = [0, 1, 2, 3].map(|i| {
        samples[i]
            .values
            .iter()
            .zip(&samples[0].values)
            .map(|(value, base)| value / base)
            .collect()
    });
    Row {
        measure: measure.description,
        medians,
        ratios,
        ratios_per_repetition,
        target: measure.target,
        meets_target: measure
            .target
            .map(|target| ratios[1..].iter().all(|ratio| *ratio >= target)),
    }
}

fn preflight(ballast: &BallastBinary) -> Result<()> {
    crate::servers::require_binary(&ballast.path)?;
    if ballast.run(&["auth", "cert", "create", "--help"]).is_err() {
        bail!(
            "{} has no `auth cert` command (built before NBD TLS?): rebuild it",
            ballast.path.display()
        );
    }
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        bail!("cannot benchmark: {why}");
    }
    crate::servers::require_tools(&[
        ("fio", "apt-get install fio"),
        ("setpriv", "apt-get install util-linux"),
    ])
}

fn print_report(report: &SecurityReport) {
    println!(
        "\n## Cost of NBD over TLS and encryption at rest: one node, fio through NBD (libnbd, 1 connection), {} x {} s per measure, median",
        report.repeats, report.seconds
    );
    println!(
        "{} UTC; {} ({} cores, AES-NI {}, kernel {}); load average before {}, after {}",
        report.date_utc,
        report.machine.cpu,
        report.machine.cores,
        if report.aes_ni { "yes" } else { "no" },
        report.machine.kernel,
        report.machine.load_average_before,
        report.machine.load_average_after
    );
    println!(
        "binary {} ({}); a {} loop device, each volume {} (written once end to end first)",
        report.ballast_binary,
        report.ballast_version,
        node::size::format_size(report.disk_bytes),
        node::size::format_size(report.volume_bytes)
    );
    println!(
        "\n| measure | plain | TLS | encrypted | TLS + encrypted | ratio TLS | ratio encrypted | ratio both | target |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in &report.table {
        let target = match (row.target, row.meets_target) {
            (Some(target), Some(true)) => format!(">= {target} met"),
            (Some(target), _) => format!(">= {target} NOT met"),
            (None, _) => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {target} |",
            row.measure,
            compact(row.medians[0]),
            compact(row.medians[1]),
            compact(row.medians[2]),
            compact(row.medians[3]),
            row.ratios[1],
            row.ratios[2],
            row.ratios[3],
        );
    }
}
