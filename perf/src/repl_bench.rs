//! `ballast-perf repl`: what synchronous replication costs, measured in one
//! run on one local 3-node cluster. Three volumes, all coordinated by node 1,
//! keep 1, 2 and 3 copies; fio drives each through node 1's NBD export
//! (libnbd, one connection) in turn, rotating which goes first in each
//! repetition; medians are reported as ratios against repl=1.
//!
//! Each volume is written once end to end (1 MiB sequential) before any
//! measure, so the random writes are overwrites, as on a database's volume,
//! with the same store state under every replica count; on a fresh thin
//! volume the first pass over each block would differ from later ones.
//!
//! Then rebuilds, clients idle: the repl=1 volume is raised to 2 copies
//! (the new replica copied from the coordinator alone) and then to 3 (the
//! new one copied from both in-sync copies at once), and lowered to 1
//! again, each repetition; the copy rate of each resync, as `volume
//! inspect` reports it.
//!
//! Then a rebuild under client load, each repetition: a QD1 client (4 KiB
//! random writes, each followed by a FLUSH) on the volume at 3 copies in
//! sync, then the same client while the third copy is rebuilt from the two
//! others (lowered to 2 copies, raised to 3 again). The resync's throttle
//! promises that a client waits at most for one piece of the copy (while
//! clients are busy: one piece of at most 256 KiB at a time, under the
//! volume's range lock, paced to 32 MiB/s): the bound judged is the in-sync
//! p99 plus one such piece's copy time at
//! the idle one-source rate.
//!
//! The three nodes share this machine's cores and its one disk (each loop
//! device is a file on the same filesystem): a replica here costs CPU and
//! disk the coordinator needs too, where on separate hosts it would cost a
//! network round trip and another host's disk.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob, FioResult};
use crate::local_cluster::LocalCluster;
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::BallastBinary;
use crate::stats::{compact, Samples};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct ReplOptions {
    /// Each node's loop-device disk.
    pub node_disk_bytes: u64,
    pub seconds: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
}

/// Nodes in the cluster; the volumes have 1 ..= this many copies.
const NODE_COUNT: usize = 3;
const REPLICA_COUNTS: [usize; NODE_COUNT] = [1, 2, 3];
/// Each volume's size (and fio's span) is this fraction of a node's disk:
/// node 1 holds all three, 3/8 of its disk, under half of the usable 85 %.
const SPAN_DISK_FRACTION: u64 = 8;
/// Smallest volume the jobs may work on.
const SPAN_BYTES_MIN: u64 = 64 << 20;

/// One fio job run against every volume.
struct Measure {
    key: &'static str,
    rw: &'static str,
    iodepth: u32,
    /// fio options beyond the common ones.
    extra: &'static [&'static str],
}

/// In the order they run in each repetition.
const MEASURES: [Measure; 2] = [
    Measure {
        key: "rand_write_4k_qd32",
        rw: "randwrite",
        iodepth: 32,
        extra: &[],
    },
    // --fsync=1: a FLUSH after every write (fio's NBD engine sends
    // NBD_CMD_FLUSH for fsync; it refuses fdatasync).
    Measure {
        key: "write_flush_4k_qd1",
        rw: "randwrite",
        iodepth: 1,
        extra: &["--fsync=1"],
    },
];
const QD32: usize = 0;
const QD1: usize = 1;

/// One volume's results for one measure, one value per repetition.
#[derive(Clone, Debug, Default, Serialize)]
struct VolumeSamples {
    /// Writes per second (at QD1 also write+FLUSH pairs per second).
    iops: Samples,
    write_latency_p50_us: Samples,
    write_latency_p99_us: Samples,
    write_latency_p999_us: Samples,
    /// Empty without --fsync.
    flush_latency_p50_us: Samples,
    flush_latency_p99_us: Samples,
    flush_latency_p999_us: Samples,
    /// CPU time of all three nodes (user + system, all threads) per write.
    cluster_cpu_us_per_write: Samples,
    /// Context switches of all three nodes' threads per write.
    cluster_context_switches_per_write: Samples,
}

impl VolumeSamples {
    fn push(&mut self, result: &FioResult, cluster: Spent) {
        self.iops.push(result.iops);
        self.write_latency_p50_us.push(result.latency_p50_us);
        self.write_latency_p99_us.push(result.latency_p99_us);
        self.write_latency_p999_us.push(result.latency_p999_us);
        if result.flush_count > 0 {
            self.flush_latency_p50_us.push(result.flush_latency_p50_us);
            self.flush_latency_p99_us.push(result.flush_latency_p99_us);
            self.flush_latency_p999_us.push(result.flush_latency_p999_us);
        }
        let writes = result.io_count.max(1) as f64;
        self.cluster_cpu_us_per_write.push(cluster.cpu_seconds * 1e6 / writes);
        self.cluster_context_switches_per_write
            .push(cluster.context_switches as f64 / writes);
    }
}

/// What the nodes spent during one measure.
#[derive(Clone, Copy, Debug, Default)]
struct Spent {
    cpu_seconds: f64,
    context_switches: u64,
}

/// A ratio the issue asks for (reported, not asserted).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Target {
    /// repl=N / repl=1 at least this (throughput).
    AtLeast(f64),
    /// repl=N / repl=1 at most this (latency).
    AtMost(f64),
}

impl Target {
    fn met(self, ratio: f64) -> bool {
        match self {
            Self::AtLeast(bound) => ratio >= bound,
            Self::AtMost(bound) => ratio <= bound,
        }
    }
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Row {
    description: &'static str,
    /// Medians for repl=1, 2, 3.
    medians: [f64; NODE_COUNT],
    /// Ratios of the medians.
    ratio_2_over_1: f64,
    ratio_3_over_1: f64,
    /// Ratios within each repetition (the volumes ran back to back), to show the noise.
    ratios_2_over_1_per_repetition: Vec<f64>,
    ratios_3_over_1_per_repetition: Vec<f64>,
    /// The target, judged on repl=3 / repl=1, the hardest case (issue 24: QD32
    /// IOPS >= 0.4x, QD1 write p99 <= 1.5x; FLUSH p99 <= 2x from before).
    target: Option<Target>,
    /// The repl=3 ratio meets the target.
    meets_target: Option<bool>,
}

fn row(description: &'static str, samples: [&Samples; NODE_COUNT], target: Option<Target>) -> Row {
    let medians = samples.map(Samples::median);
    let ratio = |n: usize| medians[n] / medians[0];
    let per_repetition = |n: usize| {
        samples[n]
            .values
            .iter()
            .zip(&samples[0].values)
            .map(|(value, base)| value / base)
            .collect()
    };
    let (ratio_2_over_1, ratio_3_over_1) = (ratio(1), ratio(2));
    Row {
        description,
        medians,
        ratio_2_over_1,
        ratio_3_over_1,
        ratios_2_over_1_per_repetition: per_repetition(1),
        ratios_3_over_1_per_repetition: per_repetition(2),
        target,
        meets_target: target.map(|t| t.met(ratio_3_over_1)),
    }
}

/// The table: `samples[measure][replica count - 1]`.
fn rows(samples: &[[VolumeSamples; NODE_COUNT]]) -> Vec<Row> {
    let pick = |measure: usize, field: fn(&VolumeSamples) -> &Samples| {
        let volumes = &samples[measure];
        [field(&volumes[0]), field(&volumes[1]), field(&volumes[2])]
    };
    vec![
        row(
            "4 KiB random write IOPS, QD32",
            pick(QD32, |s| &s.iops),
            Some(Target::AtLeast(0.4)),
        ),
        row(
            "QD32 write p99 latency (µs)",
            pick(QD32, |s| &s.write_latency_p99_us),
            None,
        ),
        row(
            "QD32 CPU per write, 3 nodes (µs)",
            pick(QD32, |s| &s.cluster_cpu_us_per_write),
            None,
        ),
        row(
            "QD32 context switches per write, 3 nodes",
            pick(QD32, |s| &s.cluster_context_switches_per_write),
            None,
        ),
        row("QD1 write+FLUSH pairs/s", pick(QD1, |s| &s.iops), None),
        row("QD1 write p50 (µs)", pick(QD1, |s| &s.write_latency_p50_us), None),
        row(
            "QD1 write p99 (µs)",
            pick(QD1, |s| &s.write_latency_p99_us),
            Some(Target::AtMost(1.5)),
        ),
        row("QD1 write p99.9 (µs)", pick(QD1, |s| &s.write_latency_p999_us), None),
        row("QD1 FLUSH p50 (µs)", pick(QD1, |s| &s.flush_latency_p50_us), None),
        row(
            "QD1 FLUSH p99 (µs)",
            pick(QD1, |s| &s.flush_latency_p99_us),
            Some(Target::AtMost(2.0)),
        ),
        row("QD1 FLUSH p99.9 (µs)", pick(QD1, |s| &s.flush_latency_p999_us), None),
    ]
}

/// Rebuild rates (data copied per second), one per repetition.
#[derive(Debug, Default, Serialize)]
struct Rebuilds {
    /// repl=1 -> 2: the new replica copied from the coordinator alone.
    one_source_mib_per_s: Samples,
    /// repl=2 -> 3: from the coordinator and the other in-sync replica.
    two_sources_mib_per_s: Samples,
    /// Median two sources / median one source.
    ratio: f64,
    /// The target for the ratio.
    target_ratio: f64,
    /// The QD1 client: write p99 with 3 copies in sync (µs).
    client_write_p99_in_sync_us: Samples,
    /// The same client while the third copy is rebuilt from two (µs).
    client_write_p99_during_rebuild_us: Samples,
    /// Its FLUSH p99, in sync and during the rebuild (µs).
    client_flush_p99_in_sync_us: Samples,
    client_flush_p99_during_rebuild_us: Samples,
    /// The rebuild's copy rate while the client wrote (MiB/s).
    under_load_mib_per_s: Samples,
    /// Client runs the rebuild did not outlast (their p99 mixes in time after it).
    client_runs_past_rebuild: usize,
    /// Median in-sync write p99 plus one piece's copy at the idle
    /// one-source median rate (µs): the throttle's bound.
    client_write_p99_bound_us: f64,
}

/// Target: two sources rebuild at least this much faster than one.
const REBUILD_TARGET_RATIO: f64 = 1.6;
/// The volume the rebuilds raise and lower (repl=1, written end to end).
const REBUILD_VOLUME: &str = "repl1";

#[derive(Debug, Serialize)]
struct ReplReport {
    date_utc: String,
    machine: Machine,
    ballast_binary: String,
    ballast_version: String,
    nodes: usize,
    node_disk: &'static str,
    node_disk_bytes: u64,
    /// Each volume's size; fio works over all of it.
    volume_bytes: u64,
    preparation: &'static str,
    seconds: u64,
    repeats: usize,
    /// `samples[measure][replica count - 1]`, measures as in `measure_keys`.
    measure_keys: Vec<&'static str>,
    samples: Vec<[VolumeSamples; NODE_COUNT]>,
    table: Vec<Row>,
    rebuilds: Rebuilds,
}

/// Runs the benchmark, prints the table and writes `repl.json` under `out`.
pub fn run(options: &ReplOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(options.seconds > 0, "a measurement needs a runtime");
    assert!(options.repeats > 0, "at least one repetition");
    let volume_bytes = (options.node_disk_bytes / SPAN_DISK_FRACTION) & !((1 << 20) - 1);
    if volume_bytes < SPAN_BYTES_MIN {
        bail!(
            "--size must be at least {} MiB",
            (SPAN_DISK_FRACTION * SPAN_BYTES_MIN) >> 20
        );
    }
    preflight(&options.ballast)?;
    let load_average_before = load_average();
    eprintln!(
        "starting {NODE_COUNT} nodes, {} loop device each",
        node::size::format_size(options.node_disk_bytes)
    );
    let cluster = LocalCluster::start(&options.ballast, NODE_COUNT, options.node_disk_bytes)?;
    let uris = create_and_fill(&cluster, volume_bytes)?;
    let samples = measure_all(&cluster, &uris, options, volume_bytes)?;
    let rebuilds = measure_rebuilds(&cluster, &uris[0], options, volume_bytes)?;
    drop(cluster);
    let report = ReplReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        nodes: NODE_COUNT,
        node_disk: "loop device (direct I/O) over a fully written file in /var/tmp, all on one filesystem",
        node_disk_bytes: options.node_disk_bytes,
        volume_bytes,
        preparation: "each volume written once end to end (fio 1 MiB sequential, QD8) before the measures",
        seconds: options.seconds,
        repeats: options.repeats,
        measure_keys: MEASURES.iter().map(|m| m.key).collect(),
        table: rows(&samples),
        samples,
        rebuilds,
    };
    print_report(&report);
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("repl.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    let png = options.out.join("repl.png");
    let mut bars = chart_bars(&report.table);
    bars.push(crate::chart::Bar {
        label: "rebuild from two in-sync copies / from the coordinator alone".into(),
        ratio: report.rebuilds.ratio,
        target: Some(REBUILD_TARGET_RATIO),
    });
    crate::chart::ratio_chart(&png, "replication cost: repl=2 and repl=3 over repl=1", &bars)?;
    println!("\nJSON: {}, chart: {}", file.display(), png.display());
    Ok(bars)
}

/// Two bars per row (2/1, 3/1); an at-most target (latency) goes into the label.
fn chart_bars(table: &[Row]) -> Vec<crate::chart::Bar> {
    let mut bars = Vec::new();
    for row in table {
        let (target, note) = match row.target {
            Some(Target::AtLeast(bound)) => (Some(bound), String::new()),
            Some(Target::AtMost(bound)) => (None, format!(" (target at most {bound:.1}x)")),
            None => (None, String::new()),
        };
        for (replicas, ratio) in [(2, row.ratio_2_over_1), (3, row.ratio_3_over_1)] {
            bars.push(crate::chart::Bar {
                label: format!("{}, repl={replicas}/1{note}", row.description),
                ratio,
                target,
            });
        }
    }
    bars
}

/// Creates the repl=1, 2, 3 volumes through node 1 and writes each once end to end; their NBD URIs.
fn create_and_fill(cluster: &LocalCluster, volume_bytes: u64) -> Result<Vec<String>> {
    let mut uris = Vec::with_capacity(NODE_COUNT);
    for replicas in REPLICA_COUNTS {
        let name = format!("repl{replicas}");
        let uri = cluster.create_volume(&name, volume_bytes, replicas)?;
        eprintln!("filling {uri} ({replicas} copies)");
        let fill = FioJob::new("fill", "write", "1M", 8, 0, volume_bytes);
        fio::run_on_nbd(&fill, &uri).with_context(|| format!("filling {name}:\n{}", cluster.log_tails()))?;
        uris.push(uri);
    }
    Ok(uris)
}

/// Every measure on every volume, repetition after repetition: `[measure][replica count - 1]`.
fn measure_all(
    cluster: &LocalCluster,
    uris: &[String],
    options: &ReplOptions,
    volume_bytes: u64,
) -> Result<Vec<[VolumeSamples; NODE_COUNT]>> {
    assert_eq!(uris.len(), NODE_COUNT);
    let mut samples: Vec<[VolumeSamples; NODE_COUNT]> = MEASURES.iter().map(|_| Default::default()).collect();
    let steps = (options.repeats * MEASURES.len() * NODE_COUNT) as u64;
    let bar = node::cli::progress::items(steps, "repl measures");
    for run in 0..options.repeats {
        for (index, measure) in MEASURES.iter().enumerate() {
            for turn in 0..NODE_COUNT {
                // Rotated each repetition, so no replica count always runs first (or last).
                let slot = (turn + run) % NODE_COUNT;
                let (result, spent) = run_measure(cluster, measure, &uris[slot], options, volume_bytes)?;
                samples[index][slot].push(&result, spent);
                let flush = if result.flush_count > 0 {
                    format!(", FLUSH p99 {:.0} us", result.flush_latency_p99_us)
                } else {
                    String::new()
                };
                node::cli::progress::note(
                    &bar,
                    &format!(
                        "repetition {}/{}: {} repl={}: {} IOPS, write p99 {:.0} us{flush}",
                        run + 1,
                        options.repeats,
                        measure.key,
                        REPLICA_COUNTS[slot],
                        compact(result.iops),
                        result.latency_p99_us,
                    ),
                );
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    Ok(samples)
}

/// How long after fio starts the copy rate under load is first sampled, and
/// how long before its I/O time ends last (fio connects and sets up first).
const CLIENT_SETTLE: std::time::Duration = std::time::Duration::from_millis(400);

/// Runs one fio job on one volume: fio's result and what all nodes spent meanwhile.
fn run_measure(
    cluster: &LocalCluster,
    measure: &Measure,
    uri: &str,
    options: &ReplOptions,
    volume_bytes: u64,
) -> Result<(FioResult, Spent)> {
    let mut job = FioJob::new(
        measure.key,
        measure.rw,
        "4k",
        measure.iodepth,
        options.seconds,
        volume_bytes,
    );
    job.extra = measure.extra.iter().map(|&option| option.to_owned()).collect();
    let cpu_before = cluster.cpu_seconds()?;
    let switches_before = cluster.context_switches()?;
    let result =
        fio::run_on_nbd(&job, uri).with_context(|| format!("{} on {uri}:\n{}", measure.key, cluster.log_tails()))?;
    let spent = Spent {
        cpu_seconds: cluster.cpu_seconds()? - cpu_before,
        context_switches: cluster.context_switches()?.saturating_sub(switches_before),
    };
    if !measure.extra.is_empty() && result.flush_count == 0 {
        bail!("fio sent no FLUSH on {uri} with {:?}", measure.extra);
    }
    Ok((result, spent))
}

/// Raises the repl=1 volume to 2 and 3 copies, measures the client in
/// sync and during a rebuild of the third copy, and lowers the volume to 1
/// copy again, `repeats` times.
fn measure_rebuilds(cluster: &LocalCluster, uri: &str, options: &ReplOptions, volume_bytes: u64) -> Result<Rebuilds> {
    let repeats = options.repeats;
    let mut rebuilds = Rebuilds {
        target_ratio: REBUILD_TARGET_RATIO,
        ..Rebuilds::default()
    };
    for run in 0..repeats {
        for (replicas, sources) in [(2_usize, 1_u64), (3, 2)] {
            set_copies(cluster, replicas, true)?;
            let rate = resync_rate(&newest_resync(cluster)?, sources)?;
            eprintln!(
                "repetition {}/{repeats}: rebuild to repl={replicas} from {sources} cop{}: {rate:.0} MiB/s",
                run + 1,
                if sources == 1 { "y" } else { "ies" }
            );
            if sources == 1 {
                rebuilds.one_source_mib_per_s.push(rate);
            } else {
                rebuilds.two_sources_mib_per_s.push(rate);
            }
        }
        let client = client_job(options.seconds, volume_bytes);
        let in_sync = fio::run_on_nbd(&client, uri).with_context(|| cluster.log_tails())?;
        set_copies(cluster, 2, false)?;
        let started_ms = unix_ms();
        set_copies(cluster, 3, false)?;
        crate::local_cluster::wait_until("the rebuild of the third copy to start", || {
            let resync = newest_resync(cluster)?;
            if resync["started_unix_ms"].as_u64().unwrap_or(0) < started_ms {
                return Ok(false);
            }
            if resync["state"] != "running" {
                bail!("the rebuild ended before the client began (a larger --size gives a longer one): {resync:#}");
            }
            Ok(true)
        })?;
        // The copy rate while the client's I/O ran (not the whole resync's,
        // nor fio's set-up, when the clients are idle and the copy runs at
        // its idle rate): sampled from CLIENT_SETTLE after fio starts to
        // CLIENT_SETTLE before its I/O time ends.
        let window = std::time::Duration::from_secs(options.seconds).saturating_sub(2 * CLIENT_SETTLE);
        let (during, samples) = std::thread::scope(|scope| {
            let sampler = scope.spawn(|| -> Result<(u64, u64, f64)> {
                std::thread::sleep(CLIENT_SETTLE);
                let copied = |resync: &serde_json::Value| resync["copied_bytes"].as_u64().unwrap_or(0);
                let first = copied(&newest_resync(cluster)?);
                let at = std::time::Instant::now();
                std::thread::sleep(window);
                let last = copied(&newest_resync(cluster)?);
                Ok((first, last, at.elapsed().as_secs_f64()))
            });
            let during = fio::run_on_nbd(&client, uri).with_context(|| cluster.log_tails());
            (during, sampler.join().expect("the sampler does not panic"))
        });
        let during = during?;
        let (first, last, sampled_seconds) = samples?;
        let after = newest_resync(cluster)?;
        if after["state"] != "running" {
            rebuilds.client_runs_past_rebuild += 1;
        }
        let under_load = last.saturating_sub(first) as f64 / f64::from(1 << 20) / sampled_seconds.max(1e-3);
        crate::local_cluster::wait_until("the rebuilt third copy in sync", || {
            Ok(newest_resync(cluster)?["state"] != "running")
        })?;
        resync_rate(&newest_resync(cluster)?, 2)?;
        eprintln!(
            "repetition {}/{repeats}: QD1 client write p99 {:.0} us in sync, {:.0} us during a rebuild from 2 copies (copying {under_load:.0} MiB/s meanwhile)",
            run + 1,
            in_sync.latency_p99_us,
            during.latency_p99_us
        );
        rebuilds.client_write_p99_in_sync_us.push(in_sync.latency_p99_us);
        rebuilds.client_write_p99_during_rebuild_us.push(during.latency_p99_us);
        rebuilds.client_flush_p99_in_sync_us.push(in_sync.flush_latency_p99_us);
        rebuilds
            .client_flush_p99_during_rebuild_us
            .push(during.flush_latency_p99_us);
        rebuilds.under_load_mib_per_s.push(under_load);
        set_copies(cluster, 1, false)?;
    }
    let one = rebuilds.one_source_mib_per_s.median();
    rebuilds.ratio = if one > 0.0 {
        rebuilds.two_sources_mib_per_s.median() / one
    } else {
        0.0
    };
    rebuilds.client_write_p99_bound_us = rebuilds.client_write_p99_in_sync_us.median() + piece_copy_us(one);
    Ok(rebuilds)
}

/// Microseconds to copy one resync piece of busy clients
/// (`BUSY_CHUNK_BLOCKS`) at `mib_per_s`.
fn piece_copy_us(mib_per_s: f64) -> f64 {
    let piece_mib = (node::replication::resync::BUSY_CHUNK_BLOCKS * 4096) as f64 / f64::from(1 << 20);
    if mib_per_s > 0.0 {
        piece_mib * 1e6 / mib_per_s
    } else {
        f64::INFINITY
    }
}

/// The client of the rebuild-under-load measure: QD1 4 KiB random writes, a FLUSH after each.
fn client_job(seconds: u64, volume_bytes: u64) -> FioJob {
    let mut job = FioJob::new("client_during_rebuild", "randwrite", "4k", 1, seconds, volume_bytes);
    job.extra = vec!["--fsync=1".to_owned()];
    job
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sets the rebuild volume's copy count; with `wait`, until the new copy is
/// in sync, else until the count of replica nodes is `replicas` (a raise:
/// the new copy is placed, its resync may still run).
fn set_copies(cluster: &LocalCluster, replicas: usize, wait: bool) -> Result<()> {
    let api = cluster.nodes[0].api();
    let admin = cluster.admin();
    let count = replicas.to_string();
    let mut args = vec!["volume", "update", REBUILD_VOLUME, "--repl", &count];
    if wait {
        args.push("--wait");
    }
    args.extend(["--api", &api]);
    admin.run(&args).with_context(|| cluster.log_tails())?;
    crate::local_cluster::wait_until(&format!("the volume at {replicas} copies"), || {
        Ok(inspect_rebuild_volume(cluster)?["replica_nodes"]
            .as_array()
            .map_or(0, Vec::len)
            == replicas)
    })
}

/// `volume inspect --json` of the rebuild volume, through node 1.
fn inspect_rebuild_volume(cluster: &LocalCluster) -> Result<serde_json::Value> {
    let api = cluster.nodes[0].api();
    Ok(serde_json::from_str(&cluster.admin().run_stdout(&[
        "volume",
        "inspect",
        REBUILD_VOLUME,
        "--json",
        "--api",
        &api,
    ])?)?)
}

/// The rebuild volume's most recently started resync, as `volume inspect --json` lists it.
fn newest_resync(cluster: &LocalCluster) -> Result<serde_json::Value> {
    let info = inspect_rebuild_volume(cluster)?;
    info["resyncs"]
        .as_array()
        .and_then(|resyncs| resyncs.iter().max_by_key(|resync| resync["started_unix_ms"].as_u64()))
        .cloned()
        .with_context(|| format!("no resync listed: {info:#}"))
}

/// A finished resync's copy rate in MiB/s (it must have read from `sources` copies).
fn resync_rate(resync: &serde_json::Value, sources: u64) -> Result<f64> {
    if resync["state"] != "done" || resync["sources"].as_u64() != Some(sources) {
        bail!("the rebuild was not a finished copy from {sources} copies: {resync:#}");
    }
    let field = |name: &str| resync[name].as_u64().unwrap_or(0);
    let elapsed_ms = field("updated_unix_ms").saturating_sub(field("started_unix_ms")).max(1);
    Ok(field("copied_bytes") as f64 / f64::from(1 << 20) * 1000.0 / elapsed_ms as f64)
}

/// Fails early, with a hint, when fio, root or a recent ballast binary is missing.
fn preflight(ballast: &BallastBinary) -> Result<()> {
    let path: &Path = &ballast.path;
    crate::servers::require_binary(path)?;
    if ballast.run(&["cluster", "status", "--help"]).is_err() {
        bail!(
            "{} has no `cluster` command (built before clustering?): rebuild it with `cargo build --release -p node --bin ballast`",
            path.display()
        );
    }
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        bail!("cannot benchmark: {why}");
    }
    crate::servers::require_tools(&[("fio", "ci/install-deps.sh installs it")])
}

fn format_value(value: f64) -> String {
    if value >= 1e4 {
        compact(value)
    } else if value < 10.0 {
        // Small counts (context switches per write) keep a decimal.
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

fn print_report(report: &ReplReport) {
    println!(
        "\n## Replication cost: {} nodes on one machine, volumes coordinated by node 1, fio through NBD (libnbd, 1 connection), {} x {} s per measure, median",
        report.nodes, report.repeats, report.seconds
    );
    println!(
        "{} UTC; {} ({} cores, kernel {}); load average before {}, after {}",
        report.date_utc,
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.machine.load_average_before,
        report.machine.load_average_after
    );
    println!(
        "binary {} ({}); each node a {} loop device, each volume {} (written once end to end first)",
        report.ballast_binary,
        report.ballast_version,
        node::size::format_size(report.node_disk_bytes),
        node::size::format_size(report.volume_bytes)
    );
    println!("\n| measure | repl=1 | repl=2 | repl=3 | ratio 2/1 | ratio 3/1 | target (ratio 3/1) |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in &report.table {
        let target = match (row.target, row.meets_target) {
            (Some(Target::AtLeast(bound)), Some(met)) => format!(">= {bound}x: {}", met_text(met)),
            (Some(Target::AtMost(bound)), Some(met)) => format!("<= {bound}x: {}", met_text(met)),
            _ => "-".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {:.2}x | {:.2}x | {target} |",
            row.description,
            format_value(row.medians[0]),
            format_value(row.medians[1]),
            format_value(row.medians[2]),
            row.ratio_2_over_1,
            row.ratio_3_over_1,
        );
    }
    if report.repeats > 1 {
        println!("\nratios within each repetition (min - max):");
        for row in report.table.iter().filter(|row| row.target.is_some()) {
            println!(
                "  {}: 2/1 {}, 3/1 {}",
                row.description,
                range(&row.ratios_2_over_1_per_repetition),
                range(&row.ratios_3_over_1_per_repetition)
            );
        }
    }
    let rebuilds = &report.rebuilds;
    println!(
        "\nRebuild of a {} replica, clients idle (copy rate of the resync, MiB/s, median of {}): from the coordinator alone {:.0} ({}), \
         from two in-sync copies {:.0} ({}): {:.2}x, target >= {}x: {}",
        node::size::format_size(report.volume_bytes),
        rebuilds.one_source_mib_per_s.values.len(),
        rebuilds.one_source_mib_per_s.median(),
        compact_all(&rebuilds.one_source_mib_per_s.values),
        rebuilds.two_sources_mib_per_s.median(),
        compact_all(&rebuilds.two_sources_mib_per_s.values),
        rebuilds.ratio,
        rebuilds.target_ratio,
        met_text(rebuilds.ratio >= rebuilds.target_ratio)
    );
    let in_sync = rebuilds.client_write_p99_in_sync_us.median();
    let during = rebuilds.client_write_p99_during_rebuild_us.median();
    println!(
        "\nRebuild under client load (QD1 4 KiB random write + FLUSH, median of {}): write p99 {:.0} µs with 3 copies in sync ({}), \
         {:.0} µs while the third is rebuilt from two ({}): {:.2}x; FLUSH p99 {:.0} / {:.0} µs; \
         the rebuild copied {:.0} MiB/s meanwhile ({}); bound (in-sync p99 + one 256 KiB piece at the idle one-source rate) {:.0} µs: {}{}",
        rebuilds.client_write_p99_in_sync_us.values.len(),
        in_sync,
        compact_all(&rebuilds.client_write_p99_in_sync_us.values),
        during,
        compact_all(&rebuilds.client_write_p99_during_rebuild_us.values),
        if in_sync > 0.0 { during / in_sync } else { 0.0 },
        rebuilds.client_flush_p99_in_sync_us.median(),
        rebuilds.client_flush_p99_during_rebuild_us.median(),
        rebuilds.under_load_mib_per_s.median(),
        compact_all(&rebuilds.under_load_mib_per_s.values),
        rebuilds.client_write_p99_bound_us,
        met_text(during <= rebuilds.client_write_p99_bound_us),
        if rebuilds.client_runs_past_rebuild > 0 {
            format!(
                " ({} client run(s) outlasted their rebuild: a larger --size gives a longer one)",
                rebuilds.client_runs_past_rebuild
            )
        } else {
            String::new()
        }
    );
    println!(
        "\nThe nodes share the machine's cores and one disk: a replica here costs the coordinator's own CPU and disk, \
         not another host's. fio reports a write and its FLUSH separately (no latency of the pair)."
    );
}

fn compact_all(values: &[f64]) -> String {
    values
        .iter()
        .map(|value| format!("{value:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn met_text(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

fn range(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}-{max:.2}x")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> Samples {
        Samples {
            values: values.to_vec(),
        }
    }

    #[test]
    fn ratios_use_medians_and_the_repl3_ratio_is_judged_against_the_target() {
        let (one, two, three) = (
            samples(&[100.0, 90.0, 110.0]),
            samples(&[70.0, 60.0, 80.0]),
            samples(&[50.0, 40.0, 60.0]),
        );
        let throughput = row("iops", [&one, &two, &three], Some(Target::AtLeast(0.6)));
        assert!((throughput.ratio_2_over_1 - 0.7).abs() < 1e-12);
        assert!((throughput.ratio_3_over_1 - 0.5).abs() < 1e-12);
        assert_eq!(
            throughput.meets_target,
            Some(false),
            "repl=3 at 0.5x misses 0.6x although repl=2 meets it"
        );
        let throughput = row("iops", [&one, &two, &three], Some(Target::AtLeast(0.4)));
        assert_eq!(throughput.meets_target, Some(true));
        assert_eq!(throughput.ratios_2_over_1_per_repetition.len(), 3);
        assert!((throughput.ratios_3_over_1_per_repetition[1] - 40.0 / 90.0).abs() < 1e-12);
        let latency = row("p99", [&one, &two, &three], Some(Target::AtMost(2.0)));
        assert_eq!(latency.meets_target, Some(true));
        assert_eq!(row("cpu", [&one, &two, &three], None).meets_target, None);
    }

    #[test]
    fn the_table_covers_every_measure_and_flushes_only_at_qd1() {
        let mut all: Vec<[VolumeSamples; NODE_COUNT]> = MEASURES.iter().map(|_| Default::default()).collect();
        let write_only = FioResult {
            iops: 1000.0,
            io_count: 1000,
            latency_p50_us: 100.0,
            latency_p99_us: 400.0,
            latency_p999_us: 900.0,
            ..FioResult::default()
        };
        let with_flush = FioResult {
            flush_count: 1000,
            flush_latency_p50_us: 20.0,
            flush_latency_p99_us: 50.0,
            flush_latency_p999_us: 80.0,
            ..write_only
        };
        let spent = Spent {
            cpu_seconds: 0.01,
            context_switches: 2500,
        };
        for volume in &mut all[QD32] {
            volume.push(&write_only, spent);
        }
        for volume in &mut all[QD1] {
            volume.push(&with_flush, spent);
        }
        assert!(all[QD32][0].flush_latency_p99_us.values.is_empty());
        assert!((all[QD1][2].cluster_cpu_us_per_write.median() - 10.0).abs() < 1e-9);
        assert!((all[QD32][1].cluster_context_switches_per_write.median() - 2.5).abs() < 1e-9);
        let table = rows(&all);
        assert_eq!(table.iter().filter(|row| row.target.is_some()).count(), 3);
        assert!(table.iter().all(|row| (row.ratio_3_over_1 - 1.0).abs() < 1e-12));
        assert!(MEASURES[QD1].extra.contains(&"--fsync=1"));
        assert_eq!(MEASURES[QD32].iodepth, 32);
    }
}
