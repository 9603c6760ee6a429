//! `ballast-perf attach`: the path containers take. A ballast volume
//! attached to this host as a block device (`volume attach --device`: FUSE
//! over io_uring or plain FUSE, and a loop device) against the raw device,
//! fio with io_uring and O_DIRECT on both, targets alternated per
//! repetition, median: 4 KiB random read and write at QD1 and QD32, 4 KiB
//! random write with an fsync after each at QD1, 1 MiB
//! sequential read and write at QD8, the database-like 8 KiB 70/30 job with
//! an fsync after each write; a repl=1 volume per backend this host has, and
//! a repl=3 volume of a local 3-node cluster. And a real database: pgbench
//! on PostgreSQL over ext4, on a volume mounted with `volume mount` against
//! ext4 on the raw device.
//!
//! Every ballast target is started anew on the same loop device the raw
//! measures use (the repl=3 cluster has devices of its own on the same
//! filesystem), and its volume is written once end to end first, so reads
//! hit the disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob, FioResult};
use crate::local_cluster::LocalCluster;
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::{self, BallastBinary, EXPORT_NAME};
use crate::stats::{compact, Samples};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub device_bytes: u64,
    pub seconds: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
    /// Attach backends to measure (`fuse-uring`, `fuse`); the first also serves repl=3.
    pub backends: Vec<String>,
    pub pgbench_seconds: u64,
    pub pgbench_scale: u32,
}

/// The fio measures, with the targets (attached / raw).
struct Measure {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    block_size: &'static str,
    iodepth: u32,
    extra: &'static [&'static str],
    bytes_per_second: bool,
    target_ratio: Option<f64>,
}

const MEASURES: [Measure; 8] = [
    Measure {
        key: "rand_write_4k_qd32",
        label: "4 KiB random write, QD32",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
        extra: &[],
        bytes_per_second: false,
        target_ratio: Some(0.5),
    },
    Measure {
        key: "rand_read_4k_qd32",
        label: "4 KiB random read, QD32",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
        extra: &[],
        bytes_per_second: false,
        target_ratio: Some(0.5),
    },
    Measure {
        key: "rand_write_4k_qd1",
        label: "4 KiB random write, QD1",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 1,
        extra: &[],
        bytes_per_second: false,
        target_ratio: None,
    },
    Measure {
        key: "rand_read_4k_qd1",
        label: "4 KiB random read, QD1",
        rw: "randread",
        block_size: "4k",
        iodepth: 1,
        extra: &[],
        bytes_per_second: false,
        target_ratio: None,
    },
    Measure {
        key: "rand_write_fsync_4k_qd1",
        label: "4 KiB random write + fsync, QD1",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 1,
        extra: &["--fsync=1"],
        bytes_per_second: false,
        target_ratio: Some(0.8),
    },
    Measure {
        key: "database_8k_70_30_fsync_qd1",
        label: "database-like 8 KiB 70/30, fsync after each write, QD1",
        rw: "randrw",
        block_size: "8k",
        iodepth: 1,
        extra: &["--rwmixread=70", "--fsync=1"],
        bytes_per_second: false,
        target_ratio: Some(0.8),
    },
    Measure {
        key: "seq_write_1m_qd8",
        label: "1 MiB sequential write, QD8",
        rw: "write",
        block_size: "1M",
        iodepth: 8,
        extra: &[],
        bytes_per_second: true,
        target_ratio: Some(0.7),
    },
    Measure {
        key: "seq_read_1m_qd8",
        label: "1 MiB sequential read, QD8",
        rw: "read",
        block_size: "1M",
        iodepth: 8,
        extra: &[],
        bytes_per_second: true,
        target_ratio: Some(0.7),
    },
];

/// pgbench TPS on repl=1 against ext4 on the raw device.
const PGBENCH_TARGET_RATIO: f64 = 0.7;
/// Nodes of the cluster the repl=3 volume lives on.
const CLUSTER_NODES: usize = 3;

/// One target of the alternation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    Ballast { backend: String, replicas: usize },
}

impl Kind {
    fn label(&self) -> String {
        match self {
            Self::Raw => "raw device".into(),
            Self::Ballast { backend, replicas } => format!("{backend} repl={replicas}"),
        }
    }
}

/// A volume attached to this host; detached on drop.
struct Attached {
    admin: BallastBinary,
    api: String,
    volume: String,
    device: PathBuf,
}

/// A volume of the cluster; deleted on drop.
struct ClusterVolume {
    admin: BallastBinary,
    api: String,
    volume: String,
}

impl Drop for ClusterVolume {
    fn drop(&mut self) {
        for _ in 0..25 {
            if self
                .admin
                .run(&["volume", "delete", &self.volume, "--api", &self.api])
                .is_ok()
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Attached {
    fn attach(admin: &BallastBinary, api: &str, volume: &str) -> Result<Self> {
        let printed = admin.run_stdout(&["volume", "attach", volume, "--device", "--api", api])?;
        let device = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
        if !device.starts_with("/dev") {
            bail!("`volume attach --device` printed no device: {printed}");
        }
        Ok(Self {
            admin: admin.clone(),
            api: api.to_owned(),
            volume: volume.to_owned(),
            device,
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.admin.run(&["volume", "detach", &self.volume, "--api", &self.api]);
    }
}

#[derive(Default, Serialize)]
struct TargetSamples {
    values: Samples,
    cpu_us_per_request: Samples,
}

#[derive(Serialize)]
struct TargetReport {
    target: String,
    median: f64,
    spread_percent: f64,
    ratio_over_raw: f64,
    cpu_us_per_request: f64,
}

#[derive(Serialize)]
struct MeasureReport {
    key: &'static str,
    description: &'static str,
    fio: String,
    unit: &'static str,
    raw_median: f64,
    targets: Vec<TargetReport>,
    target_ratio: Option<f64>,
}

#[derive(Serialize)]
struct PgbenchReport {
    scale: u32,
    clients: u32,
    seconds: u64,
    raw_tps: f64,
    targets: Vec<(String, f64, f64)>,
    target_ratio_repl1: f64,
}

#[derive(Serialize)]
struct AttachReport {
    date_utc: String,
    machine: Machine,
    device_bytes: u64,
    span_bytes: u64,
    seconds: u64,
    repeats: usize,
    ballast_binary: String,
    measures: Vec<MeasureReport>,
    pgbench: Option<PgbenchReport>,
    skipped: Vec<String>,
}

/// The backends this host can run (`fuse-uring` only when switched on), best first.
#[must_use]
pub fn available_backends() -> Vec<String> {
    let mut backends = Vec::new();
    if kernel_iface::fuse::uring_enabled() == Some(true) {
        backends.push("fuse-uring".to_owned());
    }
    backends.push("fuse".to_owned());
    backends
}

pub fn run(options: &AttachOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(
        options.seconds > 0 && options.repeats > 0,
        "a measurement needs time and a repetition"
    );
    servers::require_binary(&options.ballast.path)?;
    servers::require_tools(&[("fio", "ci/install-deps.sh installs it")])?;
    if !Path::new(kernel_iface::fuse::DEVICE_PATH).exists() {
        bail!("no /dev/fuse: host attach through FUSE cannot run here");
    }
    let mut skipped = Vec::new();
    let backends: Vec<String> = options
        .backends
        .iter()
        .filter(|backend| {
            let usable = backend.as_str() != "fuse-uring" || kernel_iface::fuse::uring_enabled() == Some(true);
            if !usable {
                skipped.push(format!(
                    "{backend}: FUSE over io_uring is off or missing here (echo 1 > {})",
                    kernel_iface::fuse::URING_PARAMETER
                ));
            }
            usable
        })
        .cloned()
        .collect();
    if backends.is_empty() {
        bail!("no attach backend to measure: {}", skipped.join("; "));
    }
    // Half the device: ballast's log needs room beyond the live data.
    let span_bytes = (options.device_bytes / 2) & !((1 << 20) - 1);
    let load_average_before = load_average();
    let target = crate::target(options.device_bytes)?;
    let best = backends[0].clone();
    let cluster_binary = with_backend(&options.ballast, &best);
    let cluster = LocalCluster::start(&cluster_binary, CLUSTER_NODES, options.device_bytes)
        .context("starting the local cluster for the repl=3 volume")?;
    let mut kinds = vec![Kind::Raw];
    kinds.extend(backends.iter().map(|backend| Kind::Ballast {
        backend: backend.clone(),
        replicas: 1,
    }));
    kinds.push(Kind::Ballast {
        backend: best.clone(),
        replicas: 3,
    });
    let mut samples: Vec<Vec<TargetSamples>> = MEASURES
        .iter()
        .map(|_| kinds.iter().map(|_| TargetSamples::default()).collect())
        .collect();
    let mut pgbench: Vec<(Kind, f64)> = Vec::new();
    let pg = postgres_binaries();
    if pg.is_none() {
        skipped.push("pgbench: PostgreSQL is not installed (apt-get install postgresql)".into());
    }
    let bar = node::cli::progress::items((options.repeats * kinds.len()) as u64, "targets measured");
    for run in 0..options.repeats {
        for (slot, kind) in kinds.iter().enumerate() {
            node::cli::progress::note(
                &bar,
                &format!("repetition {}/{}: {}", run + 1, options.repeats, kind.label()),
            );
            bar.inc(1);
            // pgbench once per target, in the first repetition (it takes a while).
            let with_pgbench = run == 0 && pg.is_some();
            match kind {
                Kind::Raw => {
                    for (index, measure) in MEASURES.iter().enumerate() {
                        let result =
                            fio::run_on_device(&fio_job(measure, options.seconds, span_bytes), target.device.path())
                                .with_context(|| format!("{} on the raw device", measure.key))?;
                        samples[index][slot].values.push(value_of(measure, &result));
                    }
                    if with_pgbench {
                        let tps = pgbench_on_raw(
                            target.device.path(),
                            target.dir.path(),
                            options,
                            pg.as_ref().expect("checked"),
                        )?;
                        pgbench.push((kind.clone(), tps));
                    }
                }
                Kind::Ballast { backend, replicas } => {
                    let binary = with_backend(&options.ballast, backend);
                    let (server, admin, api, volume, cluster_volume) = if *replicas == 1 {
                        // A data directory of its own per start (the number names it).
                        let server = servers::start_ballast(
                            &binary,
                            target.dir.path(),
                            run * kinds.len() + slot,
                            target.device.path(),
                            span_bytes,
                        )?;
                        let (admin, api) = server.admin().context("a ballast server has an admin")?;
                        (Some(server), admin, api, EXPORT_NAME.to_owned(), None)
                    } else {
                        let name = format!("attach-r{replicas}-{run}");
                        cluster.create_volume(&name, span_bytes, *replicas)?;
                        let guard = ClusterVolume {
                            admin: cluster.admin(),
                            api: cluster.nodes[0].api(),
                            volume: name.clone(),
                        };
                        (None, cluster.admin(), cluster.nodes[0].api(), name, Some(guard))
                    };
                    let cpu = || -> Result<f64> {
                        match &server {
                            Some(server) => server.cpu_seconds(),
                            None => cluster.cpu_seconds(),
                        }
                    };
                    let attached = Attached::attach(&admin, &api, &volume)?;
                    fill(&attached.device, span_bytes).context("filling the attached volume")?;
                    for (index, measure) in MEASURES.iter().enumerate() {
                        let before = cpu()?;
                        let result =
                            fio::run_on_device(&fio_job(measure, options.seconds, span_bytes), &attached.device)
                                .with_context(|| format!("{} on {}", measure.key, kind.label()))?;
                        let cpu_seconds = cpu()? - before;
                        samples[index][slot].values.push(value_of(measure, &result));
                        if result.io_count > 0 {
                            samples[index][slot]
                                .cpu_us_per_request
                                .push(cpu_seconds * 1e6 / result.io_count as f64);
                        }
                    }
                    drop(attached);
                    if with_pgbench {
                        let tps = pgbench_on_volume(
                            &admin,
                            &api,
                            &volume,
                            target.dir.path(),
                            options,
                            pg.as_ref().expect("checked"),
                        )?;
                        pgbench.push((kind.clone(), tps));
                    }
                    drop(cluster_volume);
                    drop(server);
                }
            }
        }
    }
    let report = AttachReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        device_bytes: options.device_bytes,
        span_bytes,
        seconds: options.seconds,
        repeats: options.repeats,
        ballast_binary: options.ballast.path.display().to_string(),
        measures: MEASURES
            .iter()
            .zip(&samples)
            .map(|(measure, samples)| measure_report(measure, &kinds, samples))
            .collect(),
        pgbench: pgbench_report(&pgbench, options),
        skipped,
    };
    let table = markdown(&report);
    println!("\n{table}");
    std::fs::create_dir_all(&options.out)?;
    std::fs::write(options.out.join("attach.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out.join("attach.md"), &table)?;
    let bars = bars(&report);
    let png = options.out.join("attach.png");
    crate::chart::ratio_chart(
        &png,
        "host attach (volume attach --device) / raw device, fio io_uring O_DIRECT",
        &bars,
    )?;
    println!(
        "\nJSON: {}, table: attach.md, chart: {}",
        options.out.join("attach.json").display(),
        png.display()
    );
    Ok(bars)
}

fn with_backend(binary: &BallastBinary, backend: &str) -> BallastBinary {
    let mut binary = binary.clone();
    binary.env.push(("BALLAST_ATTACH_BACKEND".into(), backend.to_owned()));
    binary
}

fn fio_job(measure: &Measure, seconds: u64, span_bytes: u64) -> FioJob {
    let mut job = FioJob::new(
        measure.key,
        measure.rw,
        measure.block_size,
        measure.iodepth,
        seconds,
        span_bytes,
    );
    job.extra = measure.extra.iter().map(|&arg| arg.to_owned()).collect();
    job
}

fn value_of(measure: &Measure, result: &FioResult) -> f64 {
    if measure.bytes_per_second {
        result.bandwidth_bytes_per_second
    } else {
        result.iops
    }
}

/// Writes the span once (reads then hit the disk: a thin volume answers unwritten blocks from memory).
fn fill(device: &Path, span_bytes: u64) -> Result<()> {
    let output = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", device.display()))
        .args(["bs=1M", "oflag=direct", "status=none"])
        .arg(format!("count={}", span_bytes >> 20))
        .output()?;
    if !output.status.success() {
        bail!("dd: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

fn measure_report(measure: &Measure, kinds: &[Kind], samples: &[TargetSamples]) -> MeasureReport {
    let raw_median = samples[0].values.median();
    let targets = kinds
        .iter()
        .zip(samples)
        .skip(1)
        .map(|(kind, samples)| TargetReport {
            target: kind.label(),
            median: samples.values.median(),
            spread_percent: samples.values.spread_percent(),
            ratio_over_raw: if raw_median > 0.0 {
                samples.values.median() / raw_median
            } else {
                0.0
            },
            cpu_us_per_request: samples.cpu_us_per_request.median(),
        })
        .collect();
    let mut fio = format!(
        "--rw={} --bs={} --iodepth={}",
        measure.rw, measure.block_size, measure.iodepth
    );
    for arg in measure.extra {
        fio.push(' ');
        fio.push_str(arg);
    }
    MeasureReport {
        key: measure.key,
        description: measure.label,
        fio,
        unit: if measure.bytes_per_second { "bytes/s" } else { "IOPS" },
        raw_median,
        targets,
        target_ratio: measure.target_ratio,
    }
}

fn pgbench_report(results: &[(Kind, f64)], options: &AttachOptions) -> Option<PgbenchReport> {
    let raw_tps = results.iter().find(|(kind, _)| *kind == Kind::Raw)?.1;
    Some(PgbenchReport {
        scale: options.pgbench_scale,
        clients: 4,
        seconds: options.pgbench_seconds,
        raw_tps,
        targets: results
            .iter()
            .filter(|(kind, _)| *kind != Kind::Raw)
            .map(|(kind, tps)| (kind.label(), *tps, if raw_tps > 0.0 { tps / raw_tps } else { 0.0 }))
            .collect(),
        target_ratio_repl1: PGBENCH_TARGET_RATIO,
    })
}

fn format_value(bytes_per_second: bool, value: f64) -> String {
    if bytes_per_second {
        format!("{:.0} MiB/s", value / f64::from(1 << 20))
    } else {
        compact(value)
    }
}

fn met(ratio: f64, target: Option<f64>) -> &'static str {
    match target {
        Some(target) if ratio >= target => "met",
        Some(_) => "not met",
        None => "",
    }
}

fn markdown(report: &AttachReport) -> String {
    let mut out = format!(
        "## Host attach vs the raw device ({}, {} x {} s, {} GiB loop device, fio io_uring O_DIRECT)\n\n",
        report.date_utc,
        report.repeats,
        report.seconds,
        report.device_bytes >> 30
    );
    let labels: Vec<&str> = report.measures[0].targets.iter().map(|t| t.target.as_str()).collect();
    out.push_str("| measure | raw |");
    for label in &labels {
        out.push_str(&format!(" {label} | / raw | CPU us/req |"));
    }
    out.push_str(" target (repl=1 / raw) |\n| --- | ---: |");
    for _ in &labels {
        out.push_str(" ---: | ---: | ---: |");
    }
    out.push_str(" --- |\n");
    for measure in &report.measures {
        let bytes = measure.unit == "bytes/s";
        out.push_str(&format!(
            "| {} | {} |",
            measure.description,
            format_value(bytes, measure.raw_median)
        ));
        for target in &measure.targets {
            out.push_str(&format!(
                " {} | {:.2}x | {:.1} |",
                format_value(bytes, target.median),
                target.ratio_over_raw,
                target.cpu_us_per_request
            ));
        }
        let best = measure.targets.first().map_or(0.0, |t| t.ratio_over_raw);
        match measure.target_ratio {
            Some(target) => out.push_str(&format!(" >= {target}x: {} |\n", met(best, Some(target)))),
            None => out.push_str(" |\n"),
        }
    }
    if let Some(pg) = &report.pgbench {
        out.push_str(&format!(
            "\npgbench (scale {}, {} clients, {} s, synchronous_commit=on) on ext4: raw device {:.0} TPS",
            pg.scale, pg.clients, pg.seconds, pg.raw_tps
        ));
        for (label, tps, ratio) in &pg.targets {
            out.push_str(&format!("; {label} {tps:.0} TPS ({ratio:.2}x)"));
        }
        let best = pg.targets.first().map_or(0.0, |t| t.2);
        out.push_str(&format!(
            ". Target repl=1 >= {}x: {}.\n",
            pg.target_ratio_repl1,
            met(best, Some(pg.target_ratio_repl1))
        ));
    }
    for skip in &report.skipped {
        out.push_str(&format!("\nskipped: {skip}\n"));
    }
    out
}

fn bars(report: &AttachReport) -> Vec<crate::chart::Bar> {
    let mut bars = Vec::new();
    for measure in &report.measures {
        for (index, target) in measure.targets.iter().enumerate() {
            bars.push(crate::chart::Bar {
                label: format!("attach {}: {} / raw", target.target, measure.description),
                ratio: target.ratio_over_raw,
                target: if index == 0 { measure.target_ratio } else { None },
            });
        }
    }
    if let Some(pg) = &report.pgbench {
        for (index, (label, _, ratio)) in pg.targets.iter().enumerate() {
            bars.push(crate::chart::Bar {
                label: format!("pgbench {label} / raw"),
                ratio: *ratio,
                target: (index == 0).then_some(pg.target_ratio_repl1),
            });
        }
    }
    bars
}

/// PostgreSQL's binaries (Debian: /usr/lib/postgresql/VERSION/bin), if installed.
fn postgres_binaries() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .collect();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|bin| bin.join("pgbench").is_file() && bin.join("initdb").is_file())
}

/// A PostgreSQL server of a benchmark; stopped (by its own pg_ctl) on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data.display().to_string(), "stop", "-m", "fast"],
        );
    }
}

fn as_postgres(program: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(program)
        .args(args)
        .output()
        .context("runuser (util-linux) is needed to run PostgreSQL as postgres")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{} {}: {text}", program.display(), args.join(" "));
    }
    Ok(text)
}

/// initdb in `mountpoint`, start, pgbench -i, pgbench; the TPS.
fn pgbench_in(mountpoint: &Path, options: &AttachOptions, bin: &Path) -> Result<f64> {
    let data = mountpoint.join("pgdata");
    let chown = Command::new("chown").arg("postgres").arg(mountpoint).status()?;
    if !chown.success() {
        bail!("cannot give {} to the postgres user", mountpoint.display());
    }
    as_postgres(&bin.join("initdb"), &["-D", &data.display().to_string(), "--no-sync"])?;
    let port = servers::free_port()?.to_string();
    let socket_dir = std::env::temp_dir();
    let settings = format!(
        "-p {port} -k {} -c synchronous_commit=on -c fsync=on -c listen_addresses=''",
        socket_dir.display()
    );
    let log = mountpoint.join("postgres.log");
    as_postgres(
        &bin.join("pg_ctl"),
        &[
            "-D",
            &data.display().to_string(),
            "-o",
            &settings,
            "-l",
            &log.display().to_string(),
            "-w",
            "start",
        ],
    )?;
    let _server = Postgres {
        bin: bin.to_owned(),
        data,
    };
    let host = socket_dir.display().to_string();
    as_postgres(
        &bin.join("pgbench"),
        &[
            "-h",
            &host,
            "-p",
            &port,
            "-i",
            "-q",
            "-s",
            &options.pgbench_scale.to_string(),
            "postgres",
        ],
    )?;
    let text = as_postgres(
        &bin.join("pgbench"),
        &[
            "-h",
            &host,
            "-p",
            &port,
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            &options.pgbench_seconds.to_string(),
            "postgres",
        ],
    )?;
    text.lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse::<f64>().ok())
        .with_context(|| format!("pgbench printed no TPS: {text}"))
}

/// pgbench on ext4 made on the raw device.
fn pgbench_on_raw(device: &Path, scratch: &Path, options: &AttachOptions, bin: &Path) -> Result<f64> {
    let mountpoint = scratch.join("pg-raw");
    std::fs::create_dir_all(&mountpoint)?;
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(device).status()?;
    if !mkfs.success() {
        bail!("mkfs.ext4 {} failed", device.display());
    }
    let mount = Command::new("mount").arg(device).arg(&mountpoint).status()?;
    if !mount.success() {
        bail!("cannot mount {}", device.display());
    }
    let result = pgbench_in(&mountpoint, options, bin);
    let _ = Command::new("umount").arg(&mountpoint).status();
    result
}

/// pgbench on the volume mounted with `volume mount` (ext4 made on first use).
fn pgbench_on_volume(
    admin: &BallastBinary,
    api: &str,
    volume: &str,
    scratch: &Path,
    options: &AttachOptions,
    bin: &Path,
) -> Result<f64> {
    let mountpoint = scratch.join(format!("pg-{volume}"));
    std::fs::create_dir_all(&mountpoint)?;
    let path = mountpoint.display().to_string();
    admin.run(&["volume", "mount", volume, &path, "--api", api])?;
    let result = pgbench_in(&mountpoint, options, bin);
    let _ = admin.run(&["volume", "unmount", volume, "--api", api]);
    result
}
