//! `ballast-perf backup`: what off-cluster backups cost, measured in one
//! run on one node. A volume is filled with random (incompressible, unique)
//! data; each repetition then, in an order that rotates:
//!
//! - copies it out: `qemu-img convert` from its NBD export to a file (the
//!   baseline), a full `ballast backup create` to an S3-compatible server
//!   (moto_server, started here on 127.0.0.1) and one to a `file://` target;
//! - changes 1 % of it in random 4-KiB writes (fio, each block once) and
//!   takes an incremental backup to each target: the bytes it sends (chunks
//!   and patches, plus its manifest) over the bytes changed is the ratio the
//!   issue bounds (<= 1.2);
//! - copies it back: `qemu-img convert` of that file into a new volume over
//!   NBD (the baseline), and `ballast backup restore` of the incremental from
//!   each target into a new volume.
//!
//! Throughput is the volume's size over the wall time of the command, as a
//! user waits for it; CPU is the node's, the store's (moto) and the client
//! program's (the ballast CLI, or qemu-img), each over the same interval.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob};
use crate::local_cluster::LocalCluster;
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::{cpu_seconds_of, free_port, BallastBinary};
use crate::stats::{compact, Samples};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub volume_bytes: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
}

/// The share of the volume the incremental changes: 1 %.
const CHANGED_FRACTION: u64 = 100;
/// The bound on (bytes sent) / (bytes changed) for that incremental.
const INCREMENTAL_RATIO_TARGET: f64 = 1.2;
const BUCKET: &str = "ballast-bench";

/// What is measured, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    ExportQemu,
    FullS3,
    FullFile,
    IncrementalS3,
    IncrementalFile,
    ImportQemu,
    RestoreS3,
    RestoreFile,
}

const MEASURES: [Measure; 8] = [
    Measure::ExportQemu,
    Measure::FullS3,
    Measure::FullFile,
    Measure::IncrementalS3,
    Measure::IncrementalFile,
    Measure::ImportQemu,
    Measure::RestoreS3,
    Measure::RestoreFile,
];

impl Measure {
    fn key(self) -> &'static str {
        match self {
            Self::ExportQemu => "qemu_img_convert_volume_to_file",
            Self::FullS3 => "full_backup_s3",
            Self::FullFile => "full_backup_file",
            Self::IncrementalS3 => "incremental_backup_s3",
            Self::IncrementalFile => "incremental_backup_file",
            Self::ImportQemu => "qemu_img_convert_file_to_volume",
            Self::RestoreS3 => "restore_s3",
            Self::RestoreFile => "restore_file",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::ExportQemu => "qemu-img convert, volume (NBD) to a file: baseline out",
            Self::FullS3 => "full backup to S3 (moto_server)",
            Self::FullFile => "full backup to file://",
            Self::IncrementalS3 => "incremental after 1 % random 4-KiB writes, to S3",
            Self::IncrementalFile => "incremental after 1 % random 4-KiB writes, to file://",
            Self::ImportQemu => "qemu-img convert, file to a new volume (NBD): baseline in",
            Self::RestoreS3 => "restore from S3 into a new volume",
            Self::RestoreFile => "restore from file:// into a new volume",
        }
    }

    /// The baseline a throughput is compared with.
    fn baseline(self) -> Option<Measure> {
        match self {
            Self::FullS3 | Self::FullFile => Some(Self::ExportQemu),
            Self::RestoreS3 | Self::RestoreFile => Some(Self::ImportQemu),
            _ => None,
        }
    }

    fn incremental(self) -> bool {
        matches!(self, Self::IncrementalS3 | Self::IncrementalFile)
    }
}

/// One measure's samples over the repetitions.
#[derive(Debug, Default, Serialize)]
struct MeasureSamples {
    seconds: Samples,
    /// The volume's size over `seconds` (MiB/s); for an incremental, the
    /// changed bytes over `seconds`.
    mib_per_s: Samples,
    node_cpu_seconds: Samples,
    store_cpu_seconds: Samples,
    client_cpu_seconds: Samples,
    /// Bytes the node sent to the target (chunks, patches; backups only).
    sent_bytes: Samples,
    /// The backup's manifest (file target; an S3 one is the same size).
    manifest_bytes: Samples,
    /// Bytes the node read from the snapshot (backups only).
    read_bytes: Samples,
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Row {
    key: &'static str,
    measure: &'static str,
    seconds: f64,
    mib_per_s: f64,
    /// Over the baseline's MiB/s in the same repetitions (median of ratios).
    ratio_to_baseline: Option<f64>,
    /// Node + store + client CPU seconds per GiB of volume.
    cpu_seconds_per_gib: f64,
    node_cpu_seconds_per_gib: f64,
    /// Incrementals: (sent + manifest) / changed.
    moved_over_changed: Option<f64>,
    meets_target: Option<bool>,
}

#[derive(Debug, Serialize)]
struct BackupReport {
    date_utc: String,
    machine: Machine,
    ballast_binary: String,
    ballast_version: String,
    qemu_img_version: String,
    moto_server_version: String,
    volume_bytes: u64,
    changed_bytes: Samples,
    repeats: usize,
    preparation: &'static str,
    measure_keys: Vec<&'static str>,
    samples: Vec<MeasureSamples>,
    table: Vec<Row>,
    incremental_ratio_target: f64,
}

/// A moto_server on 127.0.0.1, stopped by its pid when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Result<Self> {
        let port = free_port()?;
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start moto_server (ci/install-deps.sh installs it: pip install 'moto[server]')")?;
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        crate::local_cluster::wait_until("moto_server listening", || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        moto.request("PUT", &format!("/{BUCKET}"))?;
        Ok(moto)
    }

    /// An unsigned request (moto takes them); Err unless it answers 2xx.
    fn request(&self, method: &str, path: &str) -> Result<()> {
        use std::io::{Read, Write};
        let address = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        if !answer.starts_with("HTTP/1.1 2") {
            bail!(
                "moto_server answered {method} {path} with {}",
                answer.lines().next().unwrap_or("")
            );
        }
        Ok(())
    }

    fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds_of(self.child.id())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds of this process's waited-for children so far (cutime and
/// cstime of /proc/self/stat, in ticks of 1/100 s).
fn children_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |index: usize| -> Result<f64> { Ok(fields.get(index).context("short stat")?.parse::<u64>()? as f64) };
    Ok((ticks(13)? + ticks(14)?) / 100.0)
}

/// Everything one run shares.
struct Bench<'a> {
    cluster: &'a LocalCluster,
    moto: &'a Moto,
    cli: BallastBinary,
    key_file: PathBuf,
    scratch: &'a Path,
    volume_bytes: u64,
    source_uri: String,
}

/// What one command cost.
struct Cost {
    seconds: f64,
    node_cpu: f64,
    store_cpu: f64,
    client_cpu: f64,
}

impl Bench<'_> {
    fn api(&self) -> String {
        self.cluster.nodes[0].api()
    }

    /// Runs `work`, timing it and charging the CPU each party used meanwhile.
    fn costed<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Cost)> {
        let (node, store, client) = (
            self.cluster.cpu_seconds()?,
            self.moto.cpu_seconds()?,
            children_cpu_seconds()?,
        );
        let started = Instant::now();
        let value = work()?;
        let seconds = started.elapsed().as_secs_f64();
        let cost = Cost {
            seconds,
            node_cpu: self.cluster.cpu_seconds()? - node,
            store_cpu: self.moto.cpu_seconds()? - store,
            client_cpu: children_cpu_seconds()? - client,
        };
        Ok((value, cost))
    }

    /// The target URL and extra CLI arguments of repetition `run` on S3 or a file.
    fn target(&self, s3: bool, run: usize) -> (String, Vec<String>) {
        if s3 {
            (
                format!("s3://{BUCKET}/run-{run}"),
                vec!["--endpoint".into(), self.moto.endpoint.clone()],
            )
        } else {
            (
                format!("file://{}", self.scratch.join(format!("file-target-{run}")).display()),
                Vec::new(),
            )
        }
    }

    /// Runs a `ballast backup` command printing JSON and parses it.
    fn backup_json(&self, args: &[String]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        let (api, key) = (self.api(), self.key_file.display().to_string());
        all.extend(["--key-file", &key, "--json", "--api", &api]);
        let text = self.cli.run_stdout(&all)?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).with_context(|| format!("ballast {} printed {text}", all.join(" ")))?;
        if value.get("state").is_some_and(|state| state != "done") {
            bail!("ballast {} ended: {value:#}", all.join(" "));
        }
        Ok(value)
    }

    fn backup(&self, s3: bool, run: usize) -> Result<(serde_json::Value, Cost)> {
        let (target, mut extra) = self.target(s3, run);
        let mut args: Vec<String> = ["backup", "create", "src", "--target", &target]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.append(&mut extra);
        self.costed(|| self.backup_json(&args))
    }

    fn restore(&self, s3: bool, run: usize, backup: &str, into: &str) -> Result<Cost> {
        let (target, mut extra) = self.target(s3, run);
        let mut args: Vec<String> = ["backup", "restore", &target, backup, into]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.append(&mut extra);
        let ((), cost) = self.costed(|| self.backup_json(&args).map(drop))?;
        self.delete_volume(into)?;
        Ok(cost)
    }

    fn delete_volume(&self, name: &str) -> Result<()> {
        let api = self.api();
        self.cli.run(&["volume", "delete", name, "--api", &api])?;
        Ok(())
    }

    fn qemu_img(&self, from: &str, to: &str, into_existing: bool) -> Result<Cost> {
        let mut command = Command::new("qemu-img");
        command.args(["convert", "-f", "raw", "-O", "raw"]);
        if into_existing {
            command.arg("-n");
        }
        let (status, cost) = self.costed(|| command.args([from, to]).output().context("cannot run qemu-img"))?;
        if !status.status.success() {
            bail!(
                "qemu-img convert {from} {to}: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            );
        }
        Ok(cost)
    }

    /// Deletes every `backup-*` snapshot of the source (between repetitions).
    fn drop_backup_snapshots(&self) -> Result<()> {
        let api = self.api();
        let text = self
            .cli
            .run_stdout(&["snapshot", "list", "src", "--json", "--api", &api])?;
        let listed: serde_json::Value = serde_json::from_str(&text)?;
        for snapshot in listed.as_array().into_iter().flatten() {
            let name = snapshot["name"].as_str().unwrap_or_default();
            if name.starts_with("backup-") {
                self.cli.run(&["snapshot", "delete", "src", name, "--api", &api])?;
            }
        }
        Ok(())
    }
}

/// Runs the benchmark, prints the table and writes `backup.json` and
/// `backup.md` under `out`.
pub fn run(options: &BackupOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(options.repeats > 0);
    if options.volume_bytes < 64 << 20 || !options.volume_bytes.is_multiple_of(1 << 20) {
        bail!("--volume must be a whole number of MiB, at least 64 MiB");
    }
    preflight(&options.ballast)?;
    let load_average_before = load_average();
    let moto = Moto::start()?;
    // Room for the volume, a restored copy, the snapshots between them and the cleaner.
    let disk_bytes = options.volume_bytes * 4 + (512 << 20);
    let cluster = LocalCluster::start(&options.ballast, 1, disk_bytes)?;
    let scratch = tempfile::Builder::new()
        .prefix("ballast-perf-backup-")
        .tempdir_in("/var/tmp")
        .context("scratch directory in /var/tmp")?;
    let key_file = scratch.path().join("backup.key");
    std::fs::write(&key_file, rand::random::<[u8; 32]>())?;
    let mut cli = cluster.admin();
    for (key, value) in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
        ("AWS_REGION", "us-east-1"),
    ] {
        cli.env.push((key.into(), value.into()));
    }
    let source_uri = cluster.create_volume("src", options.volume_bytes, 1)?;
    eprintln!("filling {source_uri} with random data");
    let mut fill = FioJob::new("fill", "write", "1M", 8, 0, options.volume_bytes);
    fill.extra.push("--refill_buffers=1".into());
    fio::run_on_nbd(&fill, &source_uri).with_context(|| format!("filling the volume:\n{}", cluster.log_tails()))?;
    let bench = Bench {
        cluster: &cluster,
        moto: &moto,
        cli,
        key_file,
        scratch: scratch.path(),
        volume_bytes: options.volume_bytes,
        source_uri,
    };
    let mut samples: Vec<MeasureSamples> = MEASURES.iter().map(|_| MeasureSamples::default()).collect();
    let mut changed = Samples::default();
    let bar = node::cli::progress::items((options.repeats * MEASURES.len()) as u64, "backup measures");
    for run in 0..options.repeats {
        repetition(&bench, run, &mut samples, &mut changed, &bar)
            .with_context(|| format!("repetition {}:\n{}", run + 1, cluster.log_tails()))?;
    }
    bar.finish_and_clear();
    drop(cluster);
    drop(moto);
    let table = MEASURES
        .iter()
        .map(|m| row(*m, &samples, &changed, options.volume_bytes))
        .collect();
    let report = BackupReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        qemu_img_version: command_line("qemu-img", &["--version"])
            .lines()
            .next()
            .unwrap_or("unknown")
            .to_owned(),
        moto_server_version: command_line("python3", &["-c", "import moto; print(moto.__version__)"]),
        volume_bytes: options.volume_bytes,
        changed_bytes: changed,
        repeats: options.repeats,
        preparation: "the volume written end to end once with random data (fio, 1 MiB, refill_buffers) before the first repetition",
        measure_keys: MEASURES.iter().map(|m| m.key()).collect(),
        samples,
        table,
        incremental_ratio_target: INCREMENTAL_RATIO_TARGET,
    };
    let markdown = render(&report);
    println!("{markdown}");
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("backup.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out.join("backup.md"), &markdown)?;
    println!(
        "\nJSON: {}, table: {}",
        file.display(),
        options.out.join("backup.md").display()
    );
    Ok(report
        .table
        .iter()
        .filter_map(|row| {
            row.ratio_to_baseline.map(|ratio| crate::chart::Bar {
                label: format!("{} (over qemu-img convert)", row.measure),
                ratio,
                target: None,
            })
        })
        .collect())
}

#[allow(clippy::too_many_lines)]
fn repetition(
    bench: &Bench<'_>,
    run: usize,
    samples: &mut [MeasureSamples],
    changed: &mut Samples,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let volume = bench.volume_bytes as f64;
    let mut sample = |measure: Measure, cost: &Cost, bytes: f64, backup: Option<&serde_json::Value>| {
        record(samples, bar, run, measure, cost, bytes, backup);
    };
    let image = bench.scratch.join("export.img");
    let image_text = image.display().to_string();
    // Out: the baseline and the two full backups, in a rotating order.
    let mut fulls: [Option<serde_json::Value>; 2] = [None, None];
    for turn in 0..3 {
        match (turn + run) % 3 {
            0 => {
                let cost = bench.qemu_img(&bench.source_uri, &image_text, false)?;
                sample(Measure::ExportQemu, &cost, volume, None);
            }
            which => {
                let s3 = which == 1;
                let (backup, cost) = bench.backup(s3, run)?;
                if !backup["parent"].is_null() {
                    bail!("the first backup to a new target has a parent: {backup:#}");
                }
                sample(
                    if s3 { Measure::FullS3 } else { Measure::FullFile },
                    &cost,
                    volume,
                    Some(&backup),
                );
                fulls[usize::from(!s3)] = Some(backup);
            }
        }
    }
    // 1 % of the volume in random 4-KiB writes, each block once.
    let mut change = FioJob::new("change", "randwrite", "4k", 16, 0, bench.volume_bytes);
    change.extra.extend([
        format!("--io_size={}", bench.volume_bytes / CHANGED_FRACTION),
        "--refill_buffers=1".into(),
        "--randrepeat=0".into(),
    ]);
    let written = fio::run_on_nbd(&change, &bench.source_uri)?;
    let changed_bytes = (written.io_count * 4096) as f64;
    changed.push(changed_bytes);
    let mut incrementals: [Option<serde_json::Value>; 2] = [None, None];
    for turn in 0..2 {
        let s3 = (turn + run).is_multiple_of(2);
        let (backup, cost) = bench.backup(s3, run)?;
        let full = fulls[usize::from(!s3)].as_ref().expect("taken above");
        if backup["parent"] != full["backup"] {
            bail!("the incremental's parent is not the full backup: {backup:#}");
        }
        let measure = if s3 {
            Measure::IncrementalS3
        } else {
            Measure::IncrementalFile
        };
        sample(measure, &cost, changed_bytes, Some(&backup));
        incrementals[usize::from(!s3)] = Some(backup);
    }
    // The manifest's size, read in the file target; the S3 one has the same shape.
    let id = incrementals[1].as_ref().expect("taken above")["backup"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let file_target = PathBuf::from(bench.target(false, run).0.trim_start_matches("file://"));
    let path = file_target.join(format!("backups/{id}.json"));
    let manifest = std::fs::metadata(&path)
        .with_context(|| path.display().to_string())?
        .len() as f64;
    for measure in [Measure::IncrementalS3, Measure::IncrementalFile] {
        samples[index_of(measure)].manifest_bytes.push(manifest);
    }
    let mut sample = |measure: Measure, cost: &Cost, bytes: f64, backup: Option<&serde_json::Value>| {
        record(samples, bar, run, measure, cost, bytes, backup);
    };
    // In: the baseline and the two restores of the incremental, rotating.
    for turn in 0..3 {
        match (turn + run) % 3 {
            0 => {
                let uri = bench.cluster.create_volume("copy-qemu", bench.volume_bytes, 1)?;
                let cost = bench.qemu_img(&image_text, &uri, true)?;
                bench.delete_volume("copy-qemu")?;
                sample(Measure::ImportQemu, &cost, volume, None);
            }
            which => {
                let s3 = which == 1;
                let backup = incrementals[usize::from(!s3)].as_ref().expect("taken above");
                let id = backup["backup"].as_str().unwrap_or_default();
                let cost = bench.restore(s3, run, id, if s3 { "copy-s3" } else { "copy-file" })?;
                sample(
                    if s3 { Measure::RestoreS3 } else { Measure::RestoreFile },
                    &cost,
                    volume,
                    None,
                );
            }
        }
    }
    // Leave nothing for the next repetition: its targets are new.
    std::fs::remove_file(&image)?;
    std::fs::remove_dir_all(&file_target)?;
    // The S3 ones (slot 0) are deleted, so moto's memory holds one repetition at a time.
    for backup in [&incrementals[0], &fulls[0]].into_iter().flatten() {
        let id = backup["backup"].as_str().unwrap_or_default().to_owned();
        let (target, extra) = bench.target(true, run);
        let key = bench.key_file.display().to_string();
        let mut args = vec![
            "backup".to_owned(),
            "delete".into(),
            target,
            id,
            "--key-file".into(),
            key,
        ];
        args.extend(extra);
        bench.cli.run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    bench.drop_backup_snapshots()
}

fn index_of(measure: Measure) -> usize {
    MEASURES
        .iter()
        .position(|m| *m == measure)
        .expect("every measure is listed")
}

/// Records one sample of `measure`.
fn record(
    samples: &mut [MeasureSamples],
    bar: &indicatif::ProgressBar,
    run: usize,
    measure: Measure,
    cost: &Cost,
    bytes: f64,
    backup: Option<&serde_json::Value>,
) {
    let mib_per_s = bytes / f64::from(1 << 20) / cost.seconds;
    let slot = &mut samples[index_of(measure)];
    slot.seconds.push(cost.seconds);
    slot.mib_per_s.push(mib_per_s);
    slot.node_cpu_seconds.push(cost.node_cpu);
    slot.store_cpu_seconds.push(cost.store_cpu);
    slot.client_cpu_seconds.push(cost.client_cpu);
    if let Some(backup) = backup {
        slot.sent_bytes.push(backup["stored_bytes"].as_f64().unwrap_or(0.0));
        slot.read_bytes.push(backup["read_bytes"].as_f64().unwrap_or(0.0));
    }
    node::cli::progress::note(
        bar,
        &format!(
            "repetition {}: {}: {:.1} s, {} MiB/s",
            run + 1,
            measure.key(),
            cost.seconds,
            compact(mib_per_s)
        ),
    );
    bar.inc(1);
}

fn row(measure: Measure, samples: &[MeasureSamples], changed: &Samples, volume_bytes: u64) -> Row {
    let index = index_of;
    let own = &samples[index(measure)];
    let ratio_to_baseline = measure.baseline().map(|baseline| {
        let mut ratios = Samples::default();
        for (value, base) in own
            .mib_per_s
            .values
            .iter()
            .zip(&samples[index(baseline)].mib_per_s.values)
        {
            ratios.push(value / base);
        }
        ratios.median()
    });
    let moved_over_changed = measure.incremental().then(|| {
        let mut ratios = Samples::default();
        for ((sent, manifest), changed) in own
            .sent_bytes
            .values
            .iter()
            .zip(&own.manifest_bytes.values)
            .zip(&changed.values)
        {
            ratios.push((sent + manifest) / changed);
        }
        ratios.median()
    });
    let gib = volume_bytes as f64 / f64::from(1 << 30);
    let cpu = own.node_cpu_seconds.median() + own.store_cpu_seconds.median() + own.client_cpu_seconds.median();
    Row {
        key: measure.key(),
        measure: measure.description(),
        seconds: own.seconds.median(),
        mib_per_s: own.mib_per_s.median(),
        ratio_to_baseline,
        cpu_seconds_per_gib: cpu / gib,
        node_cpu_seconds_per_gib: own.node_cpu_seconds.median() / gib,
        moved_over_changed,
        meets_target: moved_over_changed.map(|ratio| ratio <= INCREMENTAL_RATIO_TARGET),
    }
}

fn preflight(ballast: &BallastBinary) -> Result<()> {
    crate::servers::require_binary(&ballast.path)?;
    if ballast.run(&["backup", "create", "--help"]).is_err() {
        bail!(
            "{} has no `backup` command (built before backups?): rebuild it",
            ballast.path.display()
        );
    }
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        bail!("cannot benchmark: {why}");
    }
    crate::servers::require_tools(&[
        ("fio", "apt-get install fio"),
        ("qemu-img", "apt-get install qemu-utils"),
    ])?;
    // moto_server has no --version.
    let moto = Command::new("moto_server").arg("--help").output();
    if !moto.is_ok_and(|o| o.status.success()) {
        bail!("moto_server is not installed (ci/install-deps.sh installs it: pip install 'moto[server]')");
    }
    Ok(())
}

fn render(report: &BackupReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Backups off the cluster: one node, a {} volume of random data, {} repetition(s), median\n",
        node::size::format_size(report.volume_bytes),
        report.repeats
    );
    let _ = writeln!(
        out,
        "{} UTC; {} ({} cores, kernel {}); load average before {}, after {}",
        report.date_utc,
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.machine.load_average_before,
        report.machine.load_average_after
    );
    let _ = writeln!(
        out,
        "binary {} ({}); {}; moto_server {} on 127.0.0.1; the file target and qemu-img's file in /var/tmp\n",
        report.ballast_binary, report.ballast_version, report.qemu_img_version, report.moto_server_version
    );
    let _ = writeln!(
        out,
        "| measure | seconds | MiB/s | over qemu-img | CPU s per GiB (node) | moved / changed |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | --- |");
    for row in &report.table {
        let ratio = row.ratio_to_baseline.map_or_else(String::new, |r| format!("{r:.2}"));
        let moved = match (row.moved_over_changed, row.meets_target) {
            (Some(ratio), Some(true)) => format!("{ratio:.3} (<= {INCREMENTAL_RATIO_TARGET} met)"),
            (Some(ratio), _) => format!("{ratio:.3} (<= {INCREMENTAL_RATIO_TARGET} NOT met)"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {ratio} | {:.2} ({:.2}) | {moved} |",
            row.measure,
            row.seconds,
            compact(row.mib_per_s),
            row.cpu_seconds_per_gib,
            row.node_cpu_seconds_per_gib
        );
    }
    let _ = writeln!(
        out,
        "\nIncrementals: MiB/s is the changed bytes ({}) over the time; moved = chunks and patches sent plus the manifest. CPU: node + moto_server + the client program (ballast CLI or qemu-img).",
        compact(report.changed_bytes.median() / f64::from(1 << 20)) + " MiB"
    );
    out
}
