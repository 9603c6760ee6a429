//! `ballast-perf nbd`: fio through NBD against ballast, qemu-nbd and nbdkit,
//! all serving the same loop device, one server at a time, alternated
//! (ballast, qemu-nbd, nbdkit, ballast, ...), median of the repetitions.
//!
//! Each server gets a fresh start per repetition. ballast is enrolled anew
//! and its volume written once end to end first, so reads hit the disk (a
//! thin volume answers unwritten blocks from memory); the peers serve the
//! raw device, which the backing file already holds fully written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::fio::{self, FioJob, FioResult};
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::{self, BallastBinary, Server};
use crate::stats::{compact, Samples};

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    pub device_bytes: u64,
    pub seconds: u64,
    pub repeats: usize,
    pub out: PathBuf,
    pub ballast: BallastBinary,
}

/// Smallest region the fio jobs may work on.
const SPAN_BYTES_MIN: u64 = 64 << 20;

/// The servers, in the order they take turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    Ballast,
    QemuNbd,
    Nbdkit,
}

const SERVERS: [ServerKind; 3] = [ServerKind::Ballast, ServerKind::QemuNbd, ServerKind::Nbdkit];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Unit {
    Iops,
    BytesPerSecond,
}

/// One fio job run against every server.
struct Measure {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    block_size: &'static str,
    iodepth: u32,
    unit: Unit,
    /// The target for ballast / qemu-nbd (reported, not asserted).
    target_ratio: Option<f64>,
}

/// In the order they run on each server: the sequential read follows the
/// sequential write (its layout), the last row reads after random overwrites.
const MEASURES: [Measure; 5] = [
    Measure {
        key: "seq_write_1m_qd8",
        label: "1 MiB sequential write, QD8",
        rw: "write",
        block_size: "1M",
        iodepth: 8,
        unit: Unit::BytesPerSecond,
        target_ratio: Some(1.2),
    },
    Measure {
        key: "seq_read_1m_qd8",
        label: "1 MiB sequential read, QD8",
        rw: "read",
        block_size: "1M",
        iodepth: 8,
        unit: Unit::BytesPerSecond,
        target_ratio: Some(1.2),
    },
    Measure {
        key: "rand_write_4k_qd32",
        label: "4 KiB random write, QD32",
        rw: "randwrite",
        block_size: "4k",
        iodepth: 32,
        unit: Unit::Iops,
        target_ratio: Some(2.0),
    },
    Measure {
        key: "rand_read_4k_qd32",
        label: "4 KiB random read, QD32",
        rw: "randread",
        block_size: "4k",
        iodepth: 32,
        unit: Unit::Iops,
        target_ratio: Some(2.0),
    },
    Measure {
        key: "seq_read_1m_qd8_after_random_writes",
        label: "1 MiB sequential read after the random writes, QD8",
        rw: "read",
        block_size: "1M",
        iodepth: 8,
        unit: Unit::BytesPerSecond,
        target_ratio: None,
    },
];

/// One server's results for one measure.
#[derive(Clone, Debug, Default, Serialize)]
struct ServerSamples {
    /// IOPS or bytes per second (see the measure's unit).
    value: Samples,
    latency_p50_us: Samples,
    latency_p99_us: Samples,
    /// Server CPU time (user + system, all its threads) per request: less
    /// sensitive than throughput to other work on the machine.
    server_cpu_us_per_request: Samples,
}

impl ServerSamples {
    fn push(&mut self, unit: Unit, result: &FioResult, server_cpu_seconds: f64) {
        self.value.push(match unit {
            Unit::Iops => result.iops,
            Unit::BytesPerSecond => result.bandwidth_bytes_per_second,
        });
        self.latency_p50_us.push(result.latency_p50_us);
        self.latency_p99_us.push(result.latency_p99_us);
        self.server_cpu_us_per_request
            .push(server_cpu_seconds * 1e6 / result.io_count.max(1) as f64);
    }
}

#[derive(Debug, Serialize)]
struct MeasureReport {
    name: &'static str,
    description: &'static str,
    unit: Unit,
    ballast: ServerSamples,
    qemu_nbd: ServerSamples,
    nbdkit: ServerSamples,
    /// Medians: ballast / qemu-nbd.
    ratio_ballast_over_qemu_nbd: f64,
    ratio_ballast_over_nbdkit: f64,
    target_ratio_over_qemu_nbd: Option<f64>,
    meets_target: Option<bool>,
}

#[derive(Debug, Serialize)]
struct NbdReport {
    date_utc: String,
    machine: Machine,
    device: &'static str,
    device_bytes: u64,
    /// Bytes of each export the fio jobs touch.
    span_bytes: u64,
    seconds: u64,
    repeats: usize,
    ballast_binary: String,
    ballast_env: Vec<String>,
    qemu_nbd: String,
    nbdkit: String,
    measures: Vec<MeasureReport>,
}

/// Runs the benchmark, prints the table and writes `nbd.json` under `out`.
pub fn run(options: &NbdOptions) -> Result<()> {
    assert!(options.seconds > 0, "a measurement needs a runtime");
    assert!(options.repeats > 0, "at least one repetition");
    // Half the device: ballast's log needs room beyond the live data (85 % usable, cleaning).
    let span_bytes = (options.device_bytes / 2) & !((1 << 20) - 1);
    if span_bytes < SPAN_BYTES_MIN {
        bail!("--size must be at least {} MiB", (2 * SPAN_BYTES_MIN) >> 20);
    }
    preflight(&options.ballast.path)?;
    let load_average_before = load_average();
    let target = crate::target(options.device_bytes)?;
    let mut samples: Vec<[ServerSamples; 3]> = MEASURES.iter().map(|_| Default::default()).collect();
    let mut qemu_label = String::new();
    let mut nbdkit_label = String::new();
    let bar = node::cli::progress::items((options.repeats * SERVERS.len()) as u64, "servers measured");
    for run in 0..options.repeats {
        for (slot, kind) in SERVERS.iter().enumerate() {
            let server = start(*kind, options, &target, run, span_bytes)?;
            node::cli::progress::note(
                &bar,
                &format!("repetition {}/{}: {}", run + 1, options.repeats, server.label),
            );
            bar.inc(1);
            match kind {
                ServerKind::Ballast => {}
                ServerKind::QemuNbd => qemu_label.clone_from(&server.label),
                ServerKind::Nbdkit => nbdkit_label.clone_from(&server.label),
            }
            for (index, measure) in MEASURES.iter().enumerate() {
                let job = FioJob::new(
                    measure.key,
                    measure.rw,
                    measure.block_size,
                    measure.iodepth,
                    options.seconds,
                    span_bytes,
                );
                let cpu_before = server.cpu_seconds()?;
                let result = fio::run_on_nbd(&job, &server.uri())
                    .with_context(|| format!("{} on {}:\n{}", measure.key, server.label, server.log_text()))?;
                let cpu_seconds = server.cpu_seconds()? - cpu_before;
                samples[index][slot].push(measure.unit, &result, cpu_seconds);
            }
            drop(server);
        }
    }
    let report = NbdReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        device: "loop device (direct I/O) over a fully written file in /var/tmp",
        device_bytes: options.device_bytes,
        span_bytes,
        seconds: options.seconds,
        repeats: options.repeats,
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_env: options.ballast.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        qemu_nbd: format!("{qemu_label}, --cache=none --format=raw --shared=8"),
        nbdkit: nbdkit_label,
        measures: MEASURES
            .iter()
            .zip(samples)
            .map(|(m, s)| measure_report(m, s))
            .collect(),
    };
    print_report(&report);
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("nbd.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    let png = options.out.join("nbd.png");
    let bars: Vec<crate::chart::Bar> = report
        .measures
        .iter()
        .map(|measure| crate::chart::Bar {
            label: format!("{} / qemu-nbd", measure.description),
            ratio: measure.ratio_ballast_over_qemu_nbd,
            target: measure.target_ratio_over_qemu_nbd,
        })
        .collect();
    crate::chart::ratio_chart(&png, "ballast vs qemu-nbd over NBD (fio, same loop device)", &bars)?;
    println!("\nJSON: {}, chart: {}", file.display(), png.display());
    Ok(())
}

/// Fails early, with a hint, when a tool or the ballast binary is missing.
fn preflight(ballast: &Path) -> Result<()> {
    crate::servers::require_binary(ballast)?;
    let hint = "ci/install-deps.sh installs it";
    crate::servers::require_tools(&[("fio", hint), ("qemu-nbd", hint), ("nbdkit", hint)])
}

/// Starts one server on the target's loop device; ballast's volume is then
/// written once over the span.
fn start(kind: ServerKind, options: &NbdOptions, target: &crate::Target, run: usize, span: u64) -> Result<Server> {
    let scratch = target.dir.path();
    let device = target.device.path();
    match kind {
        ServerKind::Ballast => {
            let server = servers::start_ballast(&options.ballast, scratch, run, device, span)?;
            let fill = FioJob::new("fill", "write", "1M", 8, 0, span);
            fio::run_on_nbd(&fill, &server.uri())
                .with_context(|| format!("filling the ballast volume:\n{}", server.log_text()))?;
            Ok(server)
        }
        ServerKind::QemuNbd => servers::start_qemu_nbd(scratch, run, device),
        ServerKind::Nbdkit => servers::start_nbdkit(scratch, run, device),
    }
}

fn measure_report(measure: &Measure, samples: [ServerSamples; 3]) -> MeasureReport {
    let [ballast, qemu_nbd, nbdkit] = samples;
    let ratio = |other: &ServerSamples| ballast.value.median() / other.value.median();
    let ratio_ballast_over_qemu_nbd = ratio(&qemu_nbd);
    let ratio_ballast_over_nbdkit = ratio(&nbdkit);
    MeasureReport {
        name: measure.key,
        description: measure.label,
        unit: measure.unit,
        ratio_ballast_over_qemu_nbd,
        ratio_ballast_over_nbdkit,
        target_ratio_over_qemu_nbd: measure.target_ratio,
        meets_target: measure.target_ratio.map(|t| ratio_ballast_over_qemu_nbd >= t),
        ballast,
        qemu_nbd,
        nbdkit,
    }
}

fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Iops => format!("{} IOPS", compact(value)),
        Unit::BytesPerSecond => format!("{:.0} MiB/s", value / f64::from(1u32 << 20)),
    }
}

fn print_report(report: &NbdReport) {
    println!(
        "\n## NBD through fio (libnbd, 1 connection), {} x {} s per measure, median; {}, {} cores, {} loop device, fio over {}",
        report.repeats,
        report.seconds,
        report.date_utc,
        report.machine.cores,
        node::size::format_size(report.device_bytes),
        node::size::format_size(report.span_bytes),
    );
    println!(
        "servers: ballast ({}), {}, {}",
        report.ballast_binary, report.qemu_nbd, report.nbdkit
    );
    println!(
        "machine: {} ({} cores, kernel {}); load average before {}, after {}",
        report.machine.cpu,
        report.machine.cores,
        report.machine.kernel,
        report.machine.load_average_before,
        report.machine.load_average_after
    );
    if !report.ballast_env.is_empty() {
        println!("ballast environment: {}", report.ballast_env.join(" "));
    }
    println!("\n| measure | ballast | qemu-nbd | nbdkit | ratio ballast/qemu-nbd | target | spread b / q / n |");
    println!("| --- | ---: | ---: | ---: | ---: | --- | ---: |");
    for measure in &report.measures {
        let target = match (measure.target_ratio_over_qemu_nbd, measure.meets_target) {
            (Some(t), Some(true)) => format!(">= {t}x: met"),
            (Some(t), _) => format!(">= {t}x: not met"),
            (None, _) => "-".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {:.2}x | {target} | {:.0}% / {:.0}% / {:.0}% |",
            measure.description,
            format_value(measure.unit, measure.ballast.value.median()),
            format_value(measure.unit, measure.qemu_nbd.value.median()),
            format_value(measure.unit, measure.nbdkit.value.median()),
            measure.ratio_ballast_over_qemu_nbd,
            measure.ballast.value.spread_percent(),
            measure.qemu_nbd.value.spread_percent(),
            measure.nbdkit.value.spread_percent(),
        );
    }
    for measure in report.measures.iter().filter(|m| m.unit == Unit::Iops) {
        println!(
            "| {} p99 latency (us) | {:.0} | {:.0} | {:.0} | {:.2}x | | |",
            measure.description,
            measure.ballast.latency_p99_us.median(),
            measure.qemu_nbd.latency_p99_us.median(),
            measure.nbdkit.latency_p99_us.median(),
            measure.ballast.latency_p99_us.median() / measure.qemu_nbd.latency_p99_us.median(),
        );
    }
    println!("\nserver CPU per request (us, user + system over all its threads; median):\n");
    println!("| measure | ballast | qemu-nbd | nbdkit | ratio ballast/qemu-nbd |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for measure in &report.measures {
        let cpu = |samples: &ServerSamples| samples.server_cpu_us_per_request.median();
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2}x |",
            measure.description,
            cpu(&measure.ballast),
            cpu(&measure.qemu_nbd),
            cpu(&measure.nbdkit),
            cpu(&measure.ballast) / cpu(&measure.qemu_nbd),
        );
    }
    println!(
        "\nballast acknowledges a write only once it is durable (flushed); qemu-nbd and nbdkit acknowledge when the \
         device accepted it (no flush is sent by these jobs)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(values: &[f64]) -> ServerSamples {
        ServerSamples {
            value: Samples {
                values: values.to_vec(),
            },
            ..ServerSamples::default()
        }
    }

    #[test]
    fn ratios_use_medians_and_targets_are_reported() {
        let write = &MEASURES[2];
        assert_eq!(write.unit, Unit::Iops);
        let report = measure_report(
            write,
            [
                samples(&[30.0, 10.0, 20.0]),
                samples(&[10.0, 10.0, 100.0]),
                samples(&[40.0]),
            ],
        );
        assert!((report.ratio_ballast_over_qemu_nbd - 2.0).abs() < 1e-12);
        assert!((report.ratio_ballast_over_nbdkit - 0.5).abs() < 1e-12);
        assert_eq!(report.meets_target, Some(true));
        let after_random = measure_report(&MEASURES[4], [samples(&[1.0]), samples(&[2.0]), samples(&[2.0])]);
        assert_eq!(after_random.meets_target, None);
    }

    #[test]
    fn values_print_with_units() {
        assert_eq!(format_value(Unit::Iops, 36_300.0), "36.3k IOPS");
        assert_eq!(format_value(Unit::BytesPerSecond, 1_048_576.0 * 1432.4), "1432 MiB/s");
    }
}
