//! `ballast-perf`: benchmarks that report ratios against baselines measured
//! in the same run, on the same device (A/B alternation, median of repeats).

#![forbid(unsafe_code)]

mod attach_bench;
mod backup_bench;
mod chart;
mod engine_bench;
mod failover_bench;
mod fio;
mod fleet_bench;
mod local_cluster;
mod machine;
mod nbd_bench;
mod qos_bench;
mod repl_bench;
mod security_bench;
mod servers;
mod stats;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kernel_iface::loopdev::LoopDevice;
use node::datadir::DataDir;
use node::engine::{DiskSpec, Engine, EngineConfig};
use node::enroll::{enroll, EnrollOptions};
use serde::Serialize;

use engine_bench::Pattern;
use fio::FioJob;
use stats::{compact, Samples};

#[derive(Parser, Debug)]
#[command(
    name = "ballast-perf",
    about = "ballast benchmarks: ratios against baselines measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Every benchmark below in one run (engine, nbd, attach, repl, security), then one summary of every ratio against its baseline and target: perf/results/summary.md and summary.png beside each benchmark's own files.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. A full run takes about an hour; --quick about five minutes.
    All {
        /// Each benchmark's --quick.
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the results.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// The storage engine without network: 4k random writes/reads at QD32 vs raw fio on the same loop device, write amplification at 50 % and 80 % full, a 1 MiB sequential scan after random writes (at once, and after the idle store re-sequenced it) vs the raw device, and a fill + overwrite + delete with discards off and on (the backing file's allocation).
    Engine {
        /// Size of the loop-device backing file.
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Alternating repetitions (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// One short repetition on a small device (about a minute).
        #[arg(long)]
        quick: bool,
        /// Only the discard cycle (off, then on).
        #[arg(long)]
        discards_only: bool,
        /// Only the index memory of sequential, random and mixed fills.
        #[arg(long)]
        index_only: bool,
        /// Where to write the JSON result.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// The fio matrix: ballast, qemu-nbd and nbdkit through NBD and fio on the raw device, all on the same loop device (4k random read/write QD1 and QD32, 64k random 70/30, 1M sequential read/write, database-like 8k 70/30 with fsync), alternated, median, ratios against qemu-nbd and the raw device, requests per CPU-second of each server; writes nbd.json, nbd.md and nbd.png.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`.
    Nbd {
        /// Size of the loop-device backing file (fio touches half of it).
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Alternating repetitions (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// One repetition of 1 s per measure on a 1 GiB device (about a minute and a half): checks that everything runs, the numbers are rough.
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// KEY=VALUE added to the ballast node's environment (repeatable), for experiment builds.
        #[arg(long = "ballast-env", value_parser = parse_env_pair)]
        ballast_env: Vec<(String, String)>,
        /// Where to write the JSON result.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Host attach, the path containers take: fio (io_uring, O_DIRECT) on a volume attached with `volume attach --device` (FUSE over io_uring and plain FUSE, each a repl=1 volume; a repl=3 volume of a local 3-node cluster) against the raw device, alternated, median, ratios; pgbench on PostgreSQL over ext4 on a `volume mount`ed volume against ext4 on the raw device; CPU per request of the nodes; writes attach.json, attach.md and attach.png.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. Needs root, FUSE; PostgreSQL for pgbench (skipped, and said so, without it).
    Attach {
        /// Size of the loop-device backing file (fio touches half of it).
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Alternating repetitions (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Backends to measure, comma-separated (default: fuse-uring when the kernel has it on, and fuse).
        #[arg(long, value_delimiter = ',')]
        backends: Vec<String>,
        /// pgbench's run, seconds.
        #[arg(long, default_value_t = 20)]
        pgbench_seconds: u64,
        /// pgbench's scale (-s).
        #[arg(long, default_value_t = 10)]
        pgbench_scale: u32,
        /// One repetition of 1 s per measure on a 1 GiB device, pgbench 3 s at scale 1: checks that everything runs, the numbers are rough.
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the JSON result.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Replication cost on a local 3-node cluster: 4k random writes at QD32 and write+FLUSH latency at QD1 on repl=1, 2 and 3 volumes coordinated by node 1, alternated, median, ratios against repl=1; writes repl.json.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`.
    Repl {
        /// Size of each node's loop device (each volume is 1/8 of it).
        #[arg(long, default_value = "2GiB")]
        size: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Alternating repetitions (median reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Two repetitions of 4 s per measure on 1 GiB devices (about a minute).
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// KEY=VALUE added to every node's environment (repeatable), for experiment builds.
        #[arg(long = "ballast-env", value_parser = parse_env_pair)]
        ballast_env: Vec<(String, String)>,
        /// Where to write the JSON result.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Failover of a repl=3 volume on a local 3-node cluster (127.0.0.11-13) under a writer that never stops: per trial a kill -9, a SIGSTOP past the timeout and a partition (iptables) of the serving node, each timed from the fault to the first write acknowledged by another node (p50/p99/max); then trials of a serving node merely slow (SIGSTOP of half the timeout, every core saturated for twice the timeout, its disk stalled for 2 s), counting false failovers; writes failover.json and failover.md.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. Needs root (loop devices, iptables). About 40 s per trial of each kind: the default 50 trials take about 35 minutes.
    Failover {
        /// Trials of each fault kind, and pauses.
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// The nodes' failover timeout (default: the binary's own).
        #[arg(long)]
        failover_after_s: Option<u64>,
        /// Only these kinds, comma-separated: kill9, stop, partition (faults);
        /// pause, cpu_load, disk_stall, clock_jump (a node merely slow; clock_jump
        /// steps this machine's wall clock and puts it back). Default: all.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Two trials of each kind (about three minutes).
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the results.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Failover at fleet scale: a local cluster of --nodes nodes (127.0.0.21 ..) with --volumes thin volumes, --on-victim of them coordinated by node 1; times every `volume create`, `cluster status --json` of the whole fleet and each node's memory, then kills node 1 with SIGKILL and times, for each of its volumes, the first 4 KiB write acknowledged by the node serving it afterwards (p50/p99/max); writes fleet.json and fleet.md.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. Needs root (loop devices). The default 2,000 volumes on 9 nodes take about 3 minutes, most of it creating them.
    Fleet {
        /// Nodes of the local cluster (at most 9).
        #[arg(long, default_value_t = 9)]
        nodes: usize,
        /// Volumes in all.
        #[arg(long, default_value_t = 2000)]
        volumes: usize,
        /// Of them, coordinated by node 1 (the one killed).
        #[arg(long, default_value_t = 500)]
        on_victim: usize,
        /// Copies of each volume.
        #[arg(long, default_value_t = 3)]
        repl: usize,
        /// Size of each (thin) volume.
        #[arg(long, default_value = "64MiB")]
        volume_size: String,
        /// The nodes' failover timeout (default: the binary's own).
        #[arg(long)]
        failover_after_s: Option<u64>,
        /// 3 nodes, 60 volumes, 20 on node 1 (about a minute).
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the results.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Cost of NBD over TLS and of encryption at rest on one node: 4k random write/read at QD32 and 1M sequential write on a plain and an encrypted volume, each over plaintext and TLS NBD, alternated, median, ratios against plain + plaintext; writes security.json.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`.
    Security {
        /// Size of the node's loop device (each volume is 1/8 of it).
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Alternating repetitions (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// One repetition of 3 s per measure on a 1 GiB device (about a minute).
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the JSON result.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
    /// Off-cluster backups: full backup of a volume of random data to an S3-compatible server (moto_server, started on 127.0.0.1) and to a file:// target beside `qemu-img convert` of the same volume (NBD) to a file; an incremental after 1 % of the volume changed in random 4-KiB writes (bytes moved over bytes changed, target <= 1.2); restore from each beside `qemu-img convert` of the file into a new volume. CPU of the node, the store and the client beside each. Writes backup.json and backup.md.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. Needs fio, qemu-img and moto_server (ci/install-deps.sh installs them). Not part of `all`.
    /// Quality of service: the cost of the pacer when its limit is not reached (4 KiB random writes, no limit vs a 10 M IOPS limit, alternated; target < 2 %), how an IOPS and a bandwidth limit at half the unlimited rate hold over 10-s windows (target within 10 %), and a quiet volume's QD1 write+fsync p99 beside a volume saturating the disk, both `medium` and as `high` beside `low` (target <= 2x alone). Writes qos.json and qos.md.
    ///
    /// Runs the release binary: build it first with `cargo build --release -p node --bin ballast`. Not part of `all`.
    Qos {
        /// Size of the node's loop device (the volume is a quarter of it).
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Seconds per measurement of the unreached limit's cost.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Alternating repetitions of that measurement (median reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the results.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
        /// Run one part only: `limits` (the pacer) or `latency` (a quiet volume beside a noisy one, without and with priority classes).
        #[arg(long, value_enum)]
        only: Option<qos_bench::Part>,
    },
    Backup {
        /// Size of the volume backed up.
        #[arg(long, default_value = "1GiB")]
        volume: String,
        /// Repetitions (median reported; the order of the measures rotates).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// One repetition on a 128 MiB volume (well under a minute).
        #[arg(long)]
        quick: bool,
        /// The ballast binary to benchmark.
        #[arg(long, default_value = "target/release/ballast")]
        ballast: PathBuf,
        /// Where to write the results.
        #[arg(long, default_value = "perf/results")]
        out: PathBuf,
    },
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Bench::All { quick, ballast, out } => all(quick, &ballast, &out),
        bench => run_bench(bench).map(drop),
    }
}

/// Runs every benchmark with its defaults (or --quick), then writes the
/// summary of all their ratios: `summary.md` and `summary.png`.
fn all(quick: bool, ballast: &Path, out: &Path) -> Result<()> {
    let ballast = ballast.to_str().context("--ballast is not UTF-8")?;
    let out_text = out.to_str().context("--out is not UTF-8")?;
    let started = std::time::Instant::now();
    let mut sections = Vec::new();
    for name in ["engine", "nbd", "attach", "repl", "security"] {
        // Through clap, so each benchmark's defaults are the ones its own subcommand has.
        let mut args = vec!["ballast-perf", name, "--out", out_text];
        if quick {
            args.push("--quick");
        }
        if name != "engine" {
            args.extend(["--ballast", ballast]);
        }
        let Cli { command } = Cli::try_parse_from(&args)?;
        println!("\n# ballast-perf {}", args[1..].join(" "));
        let bars = run_bench(command).with_context(|| format!("benchmark {name}"))?;
        sections.push((name, bars));
    }
    let table = summary_table(&sections, quick, started.elapsed());
    println!("\n{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("summary.md"), &table)?;
    let bars: Vec<chart::Bar> = sections
        .into_iter()
        .flat_map(|(name, bars)| {
            bars.into_iter().map(move |bar| chart::Bar {
                label: format!("{name}: {}", bar.label),
                ..bar
            })
        })
        .collect();
    let png = out.join("summary.png");
    chart::ratio_chart(&png, "ballast: every ratio against its baseline, one run", &bars)?;
    println!(
        "summary: {}, chart: {}",
        out.join("summary.md").display(),
        png.display()
    );
    Ok(())
}

/// Every benchmark's ratios in one markdown table, with the targets met.
fn summary_table(sections: &[(&str, Vec<chart::Bar>)], quick: bool, took: std::time::Duration) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let machine = machine::machine();
    let _ = writeln!(
        out,
        "## ballast-perf all{}: {}, {} ({} cores), {} min\n",
        if quick { " --quick" } else { "" },
        machine::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine.cpu,
        machine.cores,
        took.as_secs() / 60,
    );
    let _ = writeln!(out, "| benchmark | ratio (ballast / baseline) | value | target |");
    let _ = writeln!(out, "| --- | --- | ---: | --- |");
    for (name, bars) in sections {
        for bar in bars {
            let target = match bar.target {
                Some(target) if bar.ratio >= target => format!(">= {target}x: met"),
                Some(target) => format!(">= {target}x: **not met**"),
                None => "-".to_owned(),
            };
            let _ = writeln!(out, "| {name} | {} | {:.2}x | {target} |", bar.label, bar.ratio);
        }
    }
    let _ = writeln!(
        out,
        "\nEach benchmark's own table (medians, spread, latency, CPU) is in its .md or printed output and its .json."
    );
    out
}

/// Runs one benchmark; returns the bars of its chart.
fn run_bench(bench: Bench) -> Result<Vec<chart::Bar>> {
    match bench {
        Bench::All { .. } => anyhow::bail!("`all` runs the other benchmarks; it is not one of them"),
        Bench::Attach {
            size,
            seconds,
            repeats,
            backends,
            pgbench_seconds,
            pgbench_scale,
            quick,
            ballast,
            out,
        } => {
            let (size, seconds, repeats, pgbench_seconds, pgbench_scale) = if quick {
                ("256MiB".to_owned(), 1, 1, 3, 1)
            } else {
                (size, seconds, repeats, pgbench_seconds, pgbench_scale)
            };
            if seconds == 0 || repeats == 0 || pgbench_seconds == 0 {
                anyhow::bail!("--seconds, --repeats and --pgbench-seconds must be at least 1");
            }
            attach_bench::run(&attach_bench::AttachOptions {
                device_bytes: node::size::parse_size(&size)?,
                seconds,
                repeats,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: Vec::new(),
                },
                backends: if backends.is_empty() {
                    attach_bench::available_backends()
                } else {
                    backends
                },
                pgbench_seconds,
                pgbench_scale,
            })
        }
        Bench::Engine {
            size,
            seconds,
            repeats,
            quick,
            discards_only,
            index_only,
            out,
        } => {
            // Quick: a 256 MiB device (the overwrite cycles scale with it).
            let (size, seconds, repeats) = if quick {
                ("256MiB".to_owned(), 3, 1)
            } else {
                (size, seconds, repeats)
            };
            engine(&size, seconds, repeats, (discards_only, index_only), &out)
        }
        Bench::Nbd {
            size,
            seconds,
            repeats,
            quick,
            ballast,
            ballast_env,
            out,
        } => {
            let (size, seconds, repeats) = if quick {
                ("256MiB".to_owned(), 1, 1)
            } else {
                (size, seconds, repeats)
            };
            if seconds == 0 || repeats == 0 {
                anyhow::bail!("--seconds and --repeats must be at least 1");
            }
            nbd_bench::run(&nbd_bench::NbdOptions {
                device_bytes: node::size::parse_size(&size)?,
                seconds,
                repeats,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: ballast_env,
                },
            })
        }
        Bench::Repl {
            size,
            seconds,
            repeats,
            quick,
            ballast,
            ballast_env,
            out,
        } => {
            // Two repetitions even when quick: the second starts with another replica count.
            let (size, seconds, repeats) = if quick {
                ("1GiB".to_owned(), 4, 2)
            } else {
                (size, seconds, repeats)
            };
            if seconds == 0 || repeats == 0 {
                anyhow::bail!("--seconds and --repeats must be at least 1");
            }
            repl_bench::run(&repl_bench::ReplOptions {
                node_disk_bytes: node::size::parse_size(&size)?,
                seconds,
                repeats,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: ballast_env,
                },
            })
        }
        Bench::Failover {
            trials,
            failover_after_s,
            kinds,
            quick,
            ballast,
            out,
        } => {
            let trials = if quick { 2 } else { trials };
            if trials == 0 || failover_after_s == Some(0) {
                anyhow::bail!("--trials and --failover-after-s must be at least 1");
            }
            if let Some(unknown) = kinds
                .iter()
                .find(|kind| !failover_bench::KINDS.contains(&kind.as_str()))
            {
                anyhow::bail!(
                    "--kinds: no trial kind {unknown:?}; the kinds are {}",
                    failover_bench::KINDS.join(", ")
                );
            }
            failover_bench::run(&failover_bench::FailoverOptions {
                trials,
                failover_after_s,
                kinds,
                out,
                // Info: a slow trial prints what each node did about the fault.
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: vec![("BALLAST_LOG".into(), "info".into())],
                },
            })
        }
        Bench::Fleet {
            nodes,
            volumes,
            on_victim,
            repl,
            volume_size,
            failover_after_s,
            quick,
            ballast,
            out,
        } => {
            let (nodes, volumes, on_victim) = if quick {
                (3, 60, 20)
            } else {
                (nodes, volumes, on_victim)
            };
            if failover_after_s == Some(0) {
                anyhow::bail!("--failover-after-s must be at least 1");
            }
            fleet_bench::run(&fleet_bench::FleetOptions {
                nodes,
                volumes,
                on_victim,
                replicas: repl,
                volume_bytes: node::size::parse_size(&volume_size)?,
                failover_after_s,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: vec![("BALLAST_LOG".into(), "info".into())],
                },
            })
        }
        Bench::Security {
            size,
            seconds,
            repeats,
            quick,
            ballast,
            out,
        } => {
            let (size, seconds, repeats) = if quick {
                ("1GiB".to_owned(), 3, 1)
            } else {
                (size, seconds, repeats)
            };
            if seconds == 0 || repeats == 0 {
                anyhow::bail!("--seconds and --repeats must be at least 1");
            }
            security_bench::run(&security_bench::SecurityOptions {
                disk_bytes: node::size::parse_size(&size)?,
                seconds,
                repeats,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: Vec::new(),
                },
            })
        }
        Bench::Qos {
            size,
            seconds,
            repeats,
            ballast,
            out,
            only,
        } => {
            if seconds == 0 || repeats == 0 {
                anyhow::bail!("--seconds and --repeats must be at least 1");
            }
            qos_bench::run(&qos_bench::QosOptions {
                disk_bytes: node::size::parse_size(&size)?,
                seconds,
                repeats,
                out,
                only,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: Vec::new(),
                },
            })
        }
        Bench::Backup {
            volume,
            repeats,
            quick,
            ballast,
            out,
        } => {
            let (volume, repeats) = if quick {
                ("128MiB".to_owned(), 1)
            } else {
                (volume, repeats)
            };
            if repeats == 0 {
                anyhow::bail!("--repeats must be at least 1");
            }
            backup_bench::run(&backup_bench::BackupOptions {
                volume_bytes: node::size::parse_size(&volume)?,
                repeats,
                out,
                ballast: servers::BallastBinary {
                    path: ballast,
                    env: Vec::new(),
                },
            })
        }
    }
}

/// A scratch directory with a fully written backing file on a loop device.
/// Fully written: a sparse file would charge the first write of every block
/// with filesystem metadata work, which a real disk does not have.
struct Target {
    dir: tempfile::TempDir,
    device: LoopDevice,
}

fn target(size_bytes: u64) -> Result<Target> {
    if let Some(why) = kernel_iface::loopdev::unavailable_reason() {
        anyhow::bail!("cannot benchmark: {why}");
    }
    let dir = tempfile::tempdir_in("/var/tmp").context("scratch directory")?;
    let path = dir.path().join("disk.img");
    write_backing_file(&path, size_bytes)?;
    let device = LoopDevice::attach(&path, true)?;
    Ok(Target { dir, device })
}

/// Creates `path` with `size_bytes` (rounded up to 8 MiB) of zeroes, written
/// and synced: no holes (see `Target`).
fn write_backing_file(path: &Path, size_bytes: u64) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let chunk = disk_layout::IoBuf::new(8 << 20);
    let mut written = 0;
    while written < size_bytes {
        file.write_all(chunk.as_slice())?;
        written += chunk.len() as u64;
    }
    file.sync_all()?;
    Ok(())
}

fn start_ballast(target: &Target, run: usize) -> Result<(DataDir, Engine)> {
    // As enrollment below: the raw runs between ours use the same file.
    start_engine(target, &format!("data-{run}"), 0)
}

/// Enrolls the target's device into the data directory `name` (without
/// discarding it) and starts an engine on it that discards freed segments
/// at `discard_bytes_per_s` (0: never).
fn start_engine(target: &Target, name: &str, discard_bytes_per_s: u64) -> Result<(DataDir, Engine)> {
    let data = DataDir::open(&target.dir.path().join(name), true)?;
    let options = EnrollOptions {
        force: true,
        create_size_bytes: None,
        segment_size_bytes: 8 << 20,
        // The raw baselines run over the same backing file, fully allocated:
        // a discarded (sparse) file would make ballast's first writes pay
        // the filesystem's allocation that the baselines do not.
        discard: false,
    };
    enroll(&data, target.device.path(), &options)?;
    let disks = vec![DiskSpec {
        path: target.device.path().to_owned(),
    }];
    let mut config = EngineConfig::new(*data.node.node_uuid.as_bytes());
    config.discard_bytes_per_s = discard_bytes_per_s;
    let engine = Engine::start(&disks, &config)?;
    Ok((data, engine))
}

#[derive(Default, Serialize)]
struct EngineReport {
    raw_randwrite_iops: Samples,
    ballast_randwrite_iops: Samples,
    raw_randread_iops: Samples,
    ballast_randread_iops: Samples,
    ballast_randwrite_p99_us: Samples,
    raw_randwrite_p99_us: Samples,
    write_amplification_50_percent: f64,
    write_amplification_80_percent: f64,
    /// At 80 % full with 1 MiB sequential reads between the overwrites:
    /// the reads re-sequence what the overwrites scattered.
    write_amplification_80_percent_with_sequential_reads: f64,
    /// 1 MiB sequential reads (QD8) of a volume read in order once and then
    /// overwritten at random: on the raw device, right after the writes
    /// (first contact), and after the idle store's background re-sequencing.
    raw_sequential_read_mib_s: Samples,
    scan_first_contact_mib_s: Samples,
    scan_after_idle_mib_s: Samples,
    /// Seconds the idle store's background pass took (until it stopped).
    background_pass_seconds: Samples,
    /// Blocks it moved per block of the volume.
    background_moved_per_volume_block: Samples,
    /// Discards (issue 27): the same fill, overwrite and delete with
    /// discards off and on (`measure_discards`).
    discards: Vec<DiscardRun>,
    /// Index memory per kind of fill (issue 27).
    index: Vec<IndexFill>,
    device_bytes: u64,
    seconds: u64,
    repeats: usize,
}

/// One fill + overwrite + delete cycle with discards off or on.
#[derive(Clone, Debug, Default, Serialize)]
struct DiscardRun {
    discards: bool,
    /// Backing file allocated before, after the fill and overwrite, and once
    /// the idle store has settled after the delete.
    allocated_before_mib: f64,
    allocated_full_mib: f64,
    allocated_after_delete_mib: f64,
    /// Seconds from the delete until the allocation stopped falling (or the wait ended).
    settle_seconds: f64,
    discarded_mib: f64,
    /// fio 4 KiB random writes QD32 on the loop device before the cycle
    /// (file fully written) and after it (what the discards left).
    raw_randwrite_before_iops: f64,
    raw_randwrite_after_iops: f64,
}

/// Index memory after one kind of fill.
#[derive(Clone, Debug, Default, Serialize)]
struct IndexFill {
    fill: &'static str,
    data_mib: f64,
    index_bytes: u64,
    /// Index bytes per byte of data held, in percent.
    percent_of_data: f64,
}

/// The in-memory index's size per data held after four fills of their own
/// volume, each a fifth of the disk's capacity: sequential (1 MiB writes
/// in order), random (4 KiB writes to every block once in a random order),
/// sparse random (4 KiB writes at random, as many as the fill has blocks:
/// about 63 % of it ends up written) and mixed (the fill written in order,
/// then a quarter of its blocks overwritten at random).
fn measure_index(size_bytes: u64) -> Result<Vec<IndexFill>> {
    let target = target(size_bytes)?;
    let (_data, engine) = start_ballast(&target, 300)?;
    let quarter = (engine_bench::capacity_blocks(&engine, 0)? / 5) & !255;
    let index_bytes = |engine: &Engine| -> Result<u64> { Ok(engine.query(0, disk_layout::Store::index_memory_bytes)?) };
    let mut fills = Vec::new();
    for (volume, fill) in [
        (1u64, "sequential"),
        (2, "random 4 KiB"),
        (4, "sparse random 4 KiB"),
        (3, "mixed"),
    ] {
        let before = index_bytes(&engine)?;
        match volume {
            1 => engine_bench::fill(&engine, 0, volume, quarter)?,
            2 => {
                engine_bench::run_requests(&engine, 0, volume, quarter, 32, quarter, Pattern::ShuffledWrite, 11)?;
            }
            4 => {
                engine_bench::run_requests(&engine, 0, volume, quarter, 32, quarter, Pattern::RandomWrite, 13)?;
            }
            _ => {
                engine_bench::fill(&engine, 0, volume, quarter)?;
                engine_bench::run_requests(&engine, 0, volume, quarter, 32, quarter / 4, Pattern::RandomWrite, 12)?;
            }
        }
        let bytes = index_bytes(&engine)? - before;
        let data = engine.query(0, move |store| store.volume_used_blocks(volume))? * 4096;
        let run = IndexFill {
            fill,
            data_mib: data as f64 / f64::from(1 << 20),
            index_bytes: bytes,
            percent_of_data: bytes as f64 * 100.0 / data.max(1) as f64,
        };
        eprintln!("index after a {fill} fill: {run:?}");
        fills.push(run);
    }
    engine.shutdown();
    Ok(fills)
}

/// The index table (empty without fills).
fn index_table(fills: &[IndexFill]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if fills.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\nIn-memory index per data held (each fill a fifth of the disk's capacity, its own volume):"
    );
    let _ = writeln!(out, "| fill | data | index | index / data | target |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    for fill in fills {
        let target = if fill.fill == "sequential" {
            "<= 0.05 %"
        } else if fill.fill != "random 4 KiB" {
            ""
        } else {
            "<= 0.2 %"
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} MiB | {:.0} KiB | {:.3} % | {target} |",
            fill.fill,
            fill.data_mib,
            fill.index_bytes as f64 / 1024.0,
            fill.percent_of_data
        );
    }
    out
}

/// Longest wait for the idle store to discard a deleted volume's segments.
const DISCARD_SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn allocated_mib(path: &Path) -> Result<f64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() as f64 * 512.0 / f64::from(1 << 20))
}

/// A volume filling 80 % of the disk is written, overwritten at random
/// (every block once on average) and deleted, with discards off and then
/// on (each on a fresh, fully written backing file); the backing file's
/// allocation shows what the device was told, and fio's random writes on
/// the raw loop device before and after show what a device that keeps
/// (off) or forgets (on) the dead data does next. A loop device over a
/// file is not an SSD: the punched holes cost the file system allocations
/// on the next write, where an SSD's flash translation layer gains free
/// blocks; the allocation is the part that carries over.
fn measure_discards(size_bytes: u64, seconds: u64) -> Result<Vec<DiscardRun>> {
    let mut runs = Vec::new();
    for discards in [false, true] {
        let target = target(size_bytes)?;
        let backing = target.dir.path().join("disk.img");
        let span = size_bytes / 2;
        let mut run = DiscardRun {
            discards,
            allocated_before_mib: allocated_mib(&backing)?,
            ..DiscardRun::default()
        };
        run.raw_randwrite_before_iops = fio::run_on_device(
            &FioJob::new("raw-randwrite", "randwrite", "4k", 32, seconds, span),
            target.device.path(),
        )?
        .iops;
        let rate = if discards {
            node::engine::DISCARD_BYTES_PER_S_DEFAULT
        } else {
            0
        };
        let (_data, engine) = start_engine(&target, "data-discard", rate)?;
        let blocks = engine_bench::capacity_blocks(&engine, 0)? * 80 / 100;
        engine_bench::fill(&engine, 0, 1, blocks)?;
        engine_bench::run_requests(&engine, 0, 1, blocks, 32, blocks, Pattern::RandomWrite, 7)?;
        run.allocated_full_mib = allocated_mib(&backing)?;
        let (sender, receiver) = crossbeam_channel::bounded(1);
        engine.submit(
            0,
            node::engine::Command::DeleteVolume { volume_id: 1 },
            Box::new(move |result| {
                let _ = sender.send(result.map(|_| ()));
            }),
        );
        receiver.recv_timeout(std::time::Duration::from_secs(60))??;
        let deleted = std::time::Instant::now();
        let mut last = allocated_mib(&backing)?;
        let mut stable_since = deleted;
        while deleted.elapsed() < DISCARD_SETTLE_TIMEOUT {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = allocated_mib(&backing)?;
            if (now - last).abs() > 1.0 {
                last = now;
                stable_since = std::time::Instant::now();
            } else if stable_since.elapsed() > std::time::Duration::from_secs(5) {
                break;
            }
        }
        run.settle_seconds = (stable_since - deleted).as_secs_f64();
        run.allocated_after_delete_mib = last;
        run.discarded_mib = engine_bench::stats(&engine, 0)?.discarded_bytes as f64 / f64::from(1 << 20);
        engine.shutdown();
        run.raw_randwrite_after_iops = fio::run_on_device(
            &FioJob::new("raw-randwrite", "randwrite", "4k", 32, seconds, span),
            target.device.path(),
        )?
        .iops;
        eprintln!("discards {}: {run:?}", if discards { "on" } else { "off" });
        runs.push(run);
    }
    Ok(runs)
}

fn engine(size: &str, seconds: u64, repeats: usize, only: (bool, bool), out: &Path) -> Result<Vec<chart::Bar>> {
    let (discards_only, index_only) = only;
    let size_bytes = node::size::parse_size(size)?;
    let target = target(size_bytes)?;
    let mut report = EngineReport {
        device_bytes: size_bytes,
        seconds,
        repeats,
        ..EngineReport::default()
    };
    if index_only {
        report.index = measure_index(size_bytes)?;
        print!("{}", index_table(&report.index));
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("engine-index.json"),
            serde_json::to_string_pretty(&report.index)?,
        )?;
        return Ok(Vec::new());
    }
    if discards_only {
        report.discards = measure_discards(size_bytes, seconds)?;
        print!("{}", discard_table(&report.discards));
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("engine-discards.json"),
            serde_json::to_string_pretty(&report.discards)?,
        )?;
        return Ok(Vec::new());
    }
    let fio_span = size_bytes / 2;
    let bar = node::cli::progress::items(repeats as u64, "engine repetitions");
    for run in 0..repeats {
        node::cli::progress::note(&bar, &format!("repetition {}/{repeats}", run + 1));
        bar.inc(1);
        let raw_write = fio::run_on_device(
            &FioJob::new("raw-randwrite", "randwrite", "4k", 32, seconds, fio_span),
            target.device.path(),
        )?;
        report.raw_randwrite_iops.push(raw_write.iops);
        report.raw_randwrite_p99_us.push(raw_write.latency_p99_us);
        let (_data, engine) = start_ballast(&target, run)?;
        let blocks = engine_bench::capacity_blocks(&engine, 0)? / 2;
        engine_bench::fill(&engine, 0, 1, blocks)?;
        let write = engine_bench::run(
            &engine,
            0,
            1,
            blocks,
            32,
            seconds as f64,
            Pattern::RandomWrite,
            run as u64,
        )?;
        report.ballast_randwrite_iops.push(write.iops);
        report.ballast_randwrite_p99_us.push(write.latency_p99_us);
        let read = engine_bench::run(
            &engine,
            0,
            1,
            blocks,
            32,
            seconds as f64,
            Pattern::RandomRead,
            run as u64 + 1000,
        )?;
        report.ballast_randread_iops.push(read.iops);
        engine.shutdown();
        let raw_read = fio::run_on_device(
            &FioJob::new("raw-randread", "randread", "4k", 32, seconds, fio_span),
            target.device.path(),
        )?;
        report.raw_randread_iops.push(raw_read.iops);
        measure_scans(&target, run, seconds, fio_span, &mut report)?;
    }
    for (percent, slot, reads) in [(50u64, 0usize, false), (80, 1, false), (80, 2, true)] {
        let (_data, engine) = start_ballast(&target, 100 + slot)?;
        let blocks = engine_bench::capacity_blocks(&engine, 0)? * percent / 100;
        engine_bench::fill(&engine, 0, 1, blocks)?;
        let before = engine_bench::stats(&engine, 0)?;
        // Overwrite twice the volume at random: long enough to reach steady-state cleaning.
        let target_writes = before.user_blocks_written + blocks * 2;
        let mut seed = 0;
        while engine_bench::stats(&engine, 0)?.user_blocks_written < target_writes {
            seed += 1;
            engine_bench::run(&engine, 0, 1, blocks, 32, 2.0, Pattern::RandomWrite, seed)?;
            if reads {
                engine_bench::run(&engine, 0, 1, blocks, 8, 1.0, Pattern::SequentialRead, seed)?;
            }
        }
        let after = engine_bench::stats(&engine, 0)?;
        let amplification = engine_bench::write_amplification(&before, &after);
        eprintln!(
            "write amplification at {percent} % full (sequential reads: {reads}): {amplification:.2} ({after:?})"
        );
        match slot {
            0 => report.write_amplification_50_percent = amplification,
            1 => report.write_amplification_80_percent = amplification,
            _ => report.write_amplification_80_percent_with_sequential_reads = amplification,
        }
        engine.shutdown();
    }
    report.discards = measure_discards(size_bytes, seconds)?;
    report.index = measure_index(size_bytes)?;
    let table = engine_table(&report);
    print!("{table}");
    std::fs::create_dir_all(out)?;
    let file = out.join("engine.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    let markdown = out.join("engine.md");
    std::fs::write(&markdown, &table)?;
    let png = out.join("engine.png");
    let bars = engine_bars(&report);
    chart::ratio_chart(&png, "ballast engine-direct vs raw device (4 KiB, QD32)", &bars)?;
    println!(
        "\nJSON: {}, table: {}, chart: {}",
        file.display(),
        markdown.display(),
        png.display()
    );
    Ok(bars)
}

/// Longest the background re-sequencing may take before the scan after it.
const BACKGROUND_PASS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// A table scan after a day of random writes: a volume (half the disk)
/// written and read in order once, then overwritten at random (every block
/// once on average), read in 1 MiB pieces at QD8 at once (first contact:
/// one disk read per block, and the reads re-sequence), overwritten again,
/// and read after the idle store's background pass put it back in order.
/// Beside it, fio's 1 MiB sequential reads on the raw device.
fn measure_scans(target: &Target, run: usize, seconds: u64, fio_span: u64, report: &mut EngineReport) -> Result<()> {
    let raw = fio::run_on_device(
        &FioJob::new("raw-seqread", "read", "1m", 8, seconds, fio_span),
        target.device.path(),
    )?;
    report
        .raw_sequential_read_mib_s
        .push(raw.bandwidth_bytes_per_second / f64::from(1 << 20));
    let (_data, engine) = start_ballast(target, 200 + run)?;
    let blocks = (engine_bench::capacity_blocks(&engine, 0)? / 2) & !255;
    engine_bench::fill(&engine, 0, 1, blocks)?;
    // One pass in order over the volume, 1 MiB per request.
    engine_bench::run_requests(&engine, 0, 1, blocks, 8, blocks / 256, Pattern::SequentialRead, 0)?;
    let mib_per_s = |result: engine_bench::EngineResult| result.iops; // 1 MiB per request
    engine_bench::run_requests(&engine, 0, 1, blocks, 32, blocks, Pattern::RandomWrite, run as u64 + 1)?;
    let first = engine_bench::run(&engine, 0, 1, blocks, 8, seconds as f64, Pattern::SequentialRead, 0)?;
    report.scan_first_contact_mib_s.push(mib_per_s(first));
    engine_bench::run_requests(
        &engine,
        0,
        1,
        blocks,
        32,
        blocks,
        Pattern::RandomWrite,
        run as u64 + 100,
    )?;
    let before = engine_bench::stats(&engine, 0)?;
    let idle_started = std::time::Instant::now();
    while engine.query(0, disk_layout::Store::background_work_pending)? {
        if idle_started.elapsed() > BACKGROUND_PASS_TIMEOUT {
            eprintln!(
                "the background re-sequencing pass had not finished after {BACKGROUND_PASS_TIMEOUT:?}; scanning anyway"
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let after = engine_bench::stats(&engine, 0)?;
    report
        .background_pass_seconds
        .push(idle_started.elapsed().as_secs_f64());
    report
        .background_moved_per_volume_block
        .push((after.resequenced_blocks_written - before.resequenced_blocks_written) as f64 / blocks as f64);
    let idle = engine_bench::run(&engine, 0, 1, blocks, 8, seconds as f64, Pattern::SequentialRead, 0)?;
    report.scan_after_idle_mib_s.push(mib_per_s(idle));
    engine.shutdown();
    eprintln!(
        "scan: raw {:.0} MiB/s, first contact {:.0}, after the idle pass {:.0} (pass {:.1} s, {:.2} blocks moved per volume block)",
        raw.bandwidth_bytes_per_second / f64::from(1 << 20),
        first.iops,
        idle.iops,
        report.background_pass_seconds.values.last().copied().unwrap_or(0.0),
        report.background_moved_per_volume_block.values.last().copied().unwrap_or(0.0),
    );
    Ok(())
}

/// The chart's bars: ballast / raw device, with the targets.
fn engine_bars(report: &EngineReport) -> Vec<chart::Bar> {
    let ratio = |a: &Samples, b: &Samples| a.median() / b.median();
    vec![
        chart::Bar {
            label: "random write IOPS / raw".into(),
            ratio: ratio(&report.ballast_randwrite_iops, &report.raw_randwrite_iops),
            target: Some(1.0),
        },
        chart::Bar {
            label: "random read IOPS / raw".into(),
            ratio: ratio(&report.ballast_randread_iops, &report.raw_randread_iops),
            target: None,
        },
        chart::Bar {
            label: "random write p99 latency / raw (lower is better)".into(),
            ratio: ratio(&report.ballast_randwrite_p99_us, &report.raw_randwrite_p99_us),
            target: None,
        },
    ]
}

/// The report as a markdown table of ratios (printed, and saved as engine.md).
fn engine_table(report: &EngineReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    macro_rules! line {
        ($($arg:tt)*) => {
            writeln!(out, $($arg)*).expect("writing to a String")
        };
    }
    let ratio = |a: &Samples, b: &Samples| a.median() / b.median();
    line!(
        "\n## Engine-direct, 4 KiB, QD32, loop device ({} of backing file, {} s x {})",
        node::size::format_size(report.device_bytes),
        report.seconds,
        report.repeats
    );
    line!("| measurement | ballast | raw device (fio io_uring) | ratio | spread ballast / raw |");
    line!("| --- | ---: | ---: | ---: | ---: |");
    line!(
        "| random write IOPS (ballast acks only durable writes) | {} | {} | {:.2}x | {:.0}% / {:.0}% |",
        compact(report.ballast_randwrite_iops.median()),
        compact(report.raw_randwrite_iops.median()),
        ratio(&report.ballast_randwrite_iops, &report.raw_randwrite_iops),
        report.ballast_randwrite_iops.spread_percent(),
        report.raw_randwrite_iops.spread_percent()
    );
    line!(
        "| random read IOPS | {} | {} | {:.2}x | {:.0}% / {:.0}% |",
        compact(report.ballast_randread_iops.median()),
        compact(report.raw_randread_iops.median()),
        ratio(&report.ballast_randread_iops, &report.raw_randread_iops),
        report.ballast_randread_iops.spread_percent(),
        report.raw_randread_iops.spread_percent()
    );
    line!(
        "| random write p99 latency (us) | {:.0} | {:.0} | {:.2}x | |",
        report.ballast_randwrite_p99_us.median(),
        report.raw_randwrite_p99_us.median(),
        ratio(&report.ballast_randwrite_p99_us, &report.raw_randwrite_p99_us)
    );
    line!(
        "\nwrite amplification under random overwrite: {:.2} at 50 % full, {:.2} at 80 % full; {:.2} at 80 % full with 1 MiB sequential reads between the overwrites, which re-sequence what they scattered (target <= 2.0)",
        report.write_amplification_50_percent,
        report.write_amplification_80_percent,
        report.write_amplification_80_percent_with_sequential_reads
    );
    line!(
        "\n1 MiB sequential reads (QD8) of a volume read in order once, then overwritten at random: raw device {:.0} MiB/s; ballast at once (first contact) {:.0} MiB/s ({:.2}x raw); after the idle store's background re-sequencing {:.0} MiB/s ({:.2}x raw, target >= 0.8x); the pass took {:.1} s and moved {:.2} blocks per volume block",
        report.raw_sequential_read_mib_s.median(),
        report.scan_first_contact_mib_s.median(),
        ratio(&report.scan_first_contact_mib_s, &report.raw_sequential_read_mib_s),
        report.scan_after_idle_mib_s.median(),
        ratio(&report.scan_after_idle_mib_s, &report.raw_sequential_read_mib_s),
        report.background_pass_seconds.median(),
        report.background_moved_per_volume_block.median()
    );
    out.push_str(&discard_table(&report.discards));
    out.push_str(&index_table(&report.index));
    out
}

/// The discard cycle's table (empty without runs).
fn discard_table(runs: &[DiscardRun]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    macro_rules! line {
        ($($arg:tt)*) => {
            writeln!(out, $($arg)*).expect("writing to a String")
        };
    }
    if !runs.is_empty() {
        line!("\nA volume of 80 % of the disk written, overwritten at random and deleted; the loop device's backing file (MiB allocated) and fio 4 KiB random writes QD32 on the raw loop device before and after:");
        line!("| discards | allocated before / full / after delete | settled after | discarded | raw write IOPS before / after |");
        line!("| --- | ---: | ---: | ---: | ---: |");
        for run in runs {
            line!(
                "| {} | {:.0} / {:.0} / {:.0} | {:.1} s | {:.0} MiB | {} / {} |",
                if run.discards { "on" } else { "off" },
                run.allocated_before_mib,
                run.allocated_full_mib,
                run.allocated_after_delete_mib,
                run.settle_seconds,
                run.discarded_mib,
                compact(run.raw_randwrite_before_iops),
                compact(run.raw_randwrite_after_iops)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_pairs() {
        assert_eq!(parse_env_pair("A=1=2").unwrap(), ("A".to_owned(), "1=2".to_owned()));
        assert_eq!(parse_env_pair("A=").unwrap(), ("A".to_owned(), String::new()));
        assert!(parse_env_pair("=1").is_err());
        assert!(parse_env_pair("A").is_err());
    }

    #[test]
    fn the_summary_lists_every_ratio_with_its_target_verdict() {
        let bar = |label: &str, ratio: f64, target: Option<f64>| chart::Bar {
            label: label.to_owned(),
            ratio,
            target,
        };
        let sections = vec![
            ("engine", vec![bar("random write / raw", 1.15, Some(1.0))]),
            (
                "nbd",
                vec![
                    bar("4 KiB random write, QD32 / qemu-nbd", 1.25, Some(2.0)),
                    bar("QD1", 0.9, None),
                ],
            ),
        ];
        let table = summary_table(&sections, true, std::time::Duration::from_secs(480));
        assert!(table.starts_with("## ballast-perf all --quick:"), "{table}");
        assert!(
            table.contains("| engine | random write / raw | 1.15x | >= 1x: met |"),
            "{table}"
        );
        assert!(
            table.contains("| nbd | 4 KiB random write, QD32 / qemu-nbd | 1.25x | >= 2x: **not met** |"),
            "{table}"
        );
        assert!(table.contains("| nbd | QD1 | 0.90x | - |"), "{table}");
        assert!(table.contains(", 8 min"), "{table}");
    }

    #[test]
    fn all_runs_each_benchmark_with_its_own_defaults() {
        let Cli { command } = Cli::try_parse_from(["ballast-perf", "repl", "--out", "x", "--quick"]).unwrap();
        assert!(matches!(
            command,
            Bench::Repl {
                quick: true,
                repeats: 5,
                ..
            }
        ));
        assert!(run_bench(Bench::All {
            quick: true,
            ballast: PathBuf::from("b"),
            out: PathBuf::from("o"),
        })
        .is_err());
    }
}
