//! `ballast-perf fleet`: a node that coordinates many volumes fails, and
//! every one of them must move. A local cluster of up to 9 nodes
//! (127.0.0.21 ..), many thin volumes (`--volumes`, default 2,000, each with
//! `--repl` copies), `--on-victim` of them created through node 1 so node 1
//! coordinates them (placement puts a volume's first copy on the node
//! asked), the rest spread over the other nodes. Measured:
//!
//! - metadata operations: each `volume create` (a CLI call, through Raft,
//!   until the command returns), p50/p99 and the total;
//! - `ballast cluster status --json` on the whole fleet: wall time of the
//!   command (median and slowest of 5) and the size of its answer;
//! - memory per node: resident set size (`VmRSS`) of each node process;
//! - failover at scale: node 1 killed with SIGKILL; for each of its volumes
//!   the time from the kill to the first 4 KiB FUA write acknowledged
//!   through NBD by the node that serves it then (the probe asks
//!   `cluster status` of a surviving node where the volume is, and writes
//!   there), p50/p99/max over all of them, and how many did not move
//!   within the deadline.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::failover_bench::percentile;
use crate::local_cluster::{ClusterLayout, LocalCluster};
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::BallastBinary;

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub nodes: usize,
    pub volumes: usize,
    /// Volumes node 1 (the one killed) coordinates.
    pub on_victim: usize,
    pub replicas: usize,
    pub volume_bytes: u64,
    /// The nodes' `failover_after_s` (None: the binary's default).
    pub failover_after_s: Option<u64>,
    pub out: PathBuf,
    pub ballast: BallastBinary,
}

/// The nodes' first address byte (127.0.0.21 ..).
const FIRST_HOST: u8 = 21;
/// Each node's loop device (thin volumes: only metadata lands on it).
const NODE_DISK_BYTES: u64 = 2 << 30;
/// `volume create` calls in flight at once.
const CREATORS: usize = 4;
/// Probes writing to the moved volumes at once.
const PROBES: usize = 32;
/// How long the moved volumes have to be served again before the run gives up on the rest.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(180);
/// How often the probes' view of the cluster is refreshed.
const STATUS_POLL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Targets (issue 30): every moved volume served again within 15 s (p99),
/// `cluster status` on the whole fleet in under a second.
const TARGET_FAILOVER_P99_S: f64 = 15.0;
const TARGET_STATUS_S: f64 = 1.0;

#[derive(Debug, Serialize)]
struct FleetReport {
    date_utc: String,
    machine: Machine,
    ballast_binary: String,
    ballast_version: String,
    nodes: usize,
    volumes: usize,
    replicas: usize,
    volume_bytes: u64,
    on_victim: usize,
    failover_after_s: Option<u64>,
    create_p50_ms: f64,
    create_p99_ms: f64,
    create_total_s: f64,
    status_median_s: f64,
    status_max_s: f64,
    status_bytes: usize,
    rss_mib_per_node: Vec<f64>,
    moved: usize,
    not_moved: usize,
    failover_p50_s: f64,
    failover_p99_s: f64,
    failover_max_s: f64,
    /// When the first and the last moved volume took its first write.
    first_served_s: f64,
    /// The nodes' log lines of each failover phase, timed from the kill.
    phases: Vec<Phase>,
}

/// One phase of the failovers as the surviving nodes logged it.
#[derive(Debug, Serialize)]
struct Phase {
    what: &'static str,
    lines: usize,
    first_s: f64,
    last_s: f64,
}

/// What each phase's log line says (`cluster::automation`, `cluster::reconcile`).
const PHASES: [(&str, &str); 2] = [
    ("the leader proposes the failover", "failing over"),
    (
        "the new coordinator has fenced the replicas and serves",
        "replicas fenced at the new epoch; serving",
    ),
];

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp
/// (`2026-12-06T11:45:01.123456Z ...`), if it starts with one.
fn line_seconds(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split('Z').next()?;
    let mut parts = time.split(':');
    let (hours, minutes, seconds) = (parts.next()?, parts.next()?, parts.next()?);
    Some(hours.parse::<f64>().ok()? * 3600.0 + minutes.parse::<f64>().ok()? * 60.0 + seconds.parse::<f64>().ok()?)
}

/// Each phase's lines logged after `killed_day_s` (seconds since midnight UTC).
fn phases(cluster: &LocalCluster, killed_day_s: f64) -> Vec<Phase> {
    PHASES
        .iter()
        .map(|(what, needle)| {
            let mut times: Vec<f64> = cluster
                .log_lines_with(&[needle])
                .lines()
                .filter_map(|line| line.split_once(": ").and_then(|(_, rest)| line_seconds(rest)))
                .map(|at| (at - killed_day_s).rem_euclid(86_400.0))
                .filter(|after| *after < FAILOVER_DEADLINE.as_secs_f64())
                .collect();
            times.sort_by(f64::total_cmp);
            Phase {
                what,
                lines: times.len(),
                first_s: times.first().copied().unwrap_or(0.0),
                last_s: times.last().copied().unwrap_or(0.0),
            }
        })
        .collect()
}

fn volume_name(index: usize) -> String {
    format!("fleet-{index:05}")
}

/// Resident set size of a process, MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// Creates every volume, `CREATORS` at a time; the create times, ms.
fn create_all(cluster: &LocalCluster, options: &FleetOptions) -> Result<Vec<f64>> {
    let next = Mutex::new(0_usize);
    let times = Mutex::new(Vec::with_capacity(options.volumes));
    let failure = Mutex::new(None);
    let admin = cluster.admin();
    let (size, replicas) = (options.volume_bytes.to_string(), options.replicas.to_string());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CREATORS {
            scope.spawn(|| loop {
                let index = {
                    let mut next = next.lock().expect("lock");
                    if *next >= options.volumes || failure.lock().expect("lock").is_some() {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                // The first `on_victim` through node 1, the rest round-robin over the others.
                let node = if index < options.on_victim || cluster.nodes.len() == 1 {
                    0
                } else {
                    1 + (index - options.on_victim) % (cluster.nodes.len() - 1)
                };
                let api = cluster.nodes[node].api();
                let name = volume_name(index);
                let at = Instant::now();
                let created = admin.run(&[
                    "volume", "create", &name, "--size", &size, "--repl", &replicas, "--api", &api,
                ]);
                match created {
                    Ok(_) => times.lock().expect("lock").push(at.elapsed().as_secs_f64() * 1000.0),
                    Err(error) => {
                        *failure.lock().expect("lock") = Some(error.context(format!("creating {name}")));
                        return;
                    }
                }
                let done = times.lock().expect("lock").len();
                if done % 100 == 0 {
                    eprintln!(
                        "created {done} of {} volumes in {:.0} s",
                        options.volumes,
                        started.elapsed().as_secs_f64()
                    );
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().expect("lock") {
        return Err(error);
    }
    Ok(times.into_inner().expect("lock"))
}

/// `cluster status --json` of the node at `api`, and how long it took.
fn status(cluster: &LocalCluster, api: &str) -> Result<(serde_json::Value, f64, usize)> {
    let at = Instant::now();
    let text = cluster
        .admin()
        .run_stdout(&["cluster", "status", "--json", "--api", api])?;
    let seconds = at.elapsed().as_secs_f64();
    let value = serde_json::from_str(&text).context("cluster status printed no JSON")?;
    Ok((value, seconds, text.len()))
}

/// Volume name -> (coordinator id, its NBD address), from a status answer.
fn placements(status: &serde_json::Value) -> std::collections::HashMap<String, (u64, String)> {
    status["volumes"]
        .as_array()
        .map(|volumes| {
            volumes
                .iter()
                .filter_map(|volume| {
                    Some((
                        volume["name"].as_str()?.to_owned(),
                        (
                            volume["coordinator"].as_u64()?,
                            volume["nbd_address"].as_str()?.to_owned(),
                        ),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One 4 KiB FUA write to `name` at `address`; Ok when acknowledged.
async fn probe_write(address: &str, name: &str) -> Result<()> {
    use node::nbd::client::{connect, ExportUri};
    let uri = ExportUri::parse(&format!("nbd://{address}/{name}")).map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut connection = connect(&uri, PROBE_TIMEOUT).await?;
    crate::failover_bench::write_fua(&mut connection, 1, 0, &[0x5a; 4096], PROBE_TIMEOUT).await
}

/// After the kill: the seconds until each of `names` took a write on another node (None: not within the deadline).
fn wait_moved(
    cluster: &LocalCluster,
    killed_id: u64,
    names: &[String],
    killed_at: Instant,
) -> Result<Vec<Option<f64>>> {
    let survivor = cluster.nodes[1].api();
    let view = Arc::new(Mutex::new(std::collections::HashMap::<String, (u64, String)>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Option<f64>>>> = Arc::new(Mutex::new(vec![None; names.len()]));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    std::thread::scope(|scope| -> Result<()> {
        let (view_writer, done_flag) = (Arc::clone(&view), Arc::clone(&done));
        let poller = scope.spawn(move || {
            while !done_flag.load(std::sync::atomic::Ordering::Acquire) && killed_at.elapsed() < FAILOVER_DEADLINE {
                if let Ok((answer, _, _)) = status(cluster, &survivor) {
                    *view_writer.lock().expect("lock") = placements(&answer);
                }
                std::thread::sleep(STATUS_POLL);
            }
        });
        runtime.block_on(async {
            let queue = Arc::new(Mutex::new((0..names.len()).collect::<std::collections::VecDeque<_>>()));
            let mut probes = Vec::new();
            for _ in 0..PROBES {
                let (queue, view, results, names) = (
                    Arc::clone(&queue),
                    Arc::clone(&view),
                    Arc::clone(&results),
                    names.to_vec(),
                );
                probes.push(tokio::spawn(async move {
                    while killed_at.elapsed() < FAILOVER_DEADLINE {
                        let Some(index) = queue.lock().expect("lock").pop_front() else {
                            return;
                        };
                        let place = view.lock().expect("lock").get(&names[index]).cloned();
                        let served = match place {
                            Some((coordinator, address)) if coordinator != killed_id => {
                                probe_write(&address, &names[index]).await.is_ok()
                            }
                            _ => false,
                        };
                        if served {
                            results.lock().expect("lock")[index] = Some(killed_at.elapsed().as_secs_f64());
                        } else {
                            queue.lock().expect("lock").push_back(index);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }));
            }
            for probe in probes {
                let _ = probe.await;
            }
        });
        done.store(true, std::sync::atomic::Ordering::Release);
        poller
            .join()
            .map_err(|_| anyhow::anyhow!("the status poller panicked"))?;
        Ok(())
    })?;
    let results = results.lock().expect("lock").clone();
    Ok(results)
}

pub fn run(options: &FleetOptions) -> Result<Vec<crate::chart::Bar>> {
    if options.nodes < options.replicas.max(2) || options.nodes > crate::local_cluster::NODE_COUNT_MAX {
        bail!(
            "--nodes must be from max(2, --repl) to {}",
            crate::local_cluster::NODE_COUNT_MAX
        );
    }
    if options.replicas < 2 || options.on_victim == 0 || options.on_victim > options.volumes {
        bail!("--repl must be at least 2 (a volume must have somewhere to move), and 1 <= --on-victim <= --volumes");
    }
    crate::servers::require_binary(&options.ballast.path)?;
    let load_average_before = load_average();
    let layout = ClusterLayout {
        first_host: FIRST_HOST,
        fault_plans: false,
        node_args: crate::local_cluster::failover_after_args(options.failover_after_s),
    };
    eprintln!(
        "starting {} nodes on 127.0.0.{FIRST_HOST}-{}",
        options.nodes,
        usize::from(FIRST_HOST) + options.nodes - 1
    );
    let cluster = LocalCluster::start_with(&options.ballast, options.nodes, NODE_DISK_BYTES, &layout)?;
    let started = Instant::now();
    let mut create_ms = create_all(&cluster, options)?;
    let create_total_s = started.elapsed().as_secs_f64();
    create_ms.sort_by(f64::total_cmp);
    eprintln!("created {} volumes in {create_total_s:.1} s", options.volumes);

    // Every volume listed, node 1 coordinating its share, before the kill.
    let first_api = cluster.nodes[0].api();
    let (answer, _, _) = status(&cluster, &first_api)?;
    let killed_id = answer["this_node"].as_u64().context("status names this node")?;
    let victims: Vec<String> = placements(&answer)
        .into_iter()
        .filter(|(_, (coordinator, _))| *coordinator == killed_id)
        .map(|(name, _)| name)
        .collect();
    if victims.len() < options.on_victim {
        bail!(
            "node 1 coordinates {} volumes, not the {} created through it",
            victims.len(),
            options.on_victim
        );
    }
    let mut status_times = Vec::new();
    let mut status_bytes = 0;
    for _ in 0..5 {
        let (_, seconds, bytes) = status(&cluster, &cluster.nodes[1].api())?;
        status_times.push(seconds);
        status_bytes = bytes;
    }
    status_times.sort_by(f64::total_cmp);
    let rss_mib_per_node = cluster
        .nodes
        .iter()
        .map(|node| node.pid().map_or(Ok(0.0), rss_mib))
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "cluster status: median {:.3} s ({status_bytes} bytes); RSS per node (MiB): {rss_mib_per_node:.0?}",
        status_times[2]
    );

    eprintln!(
        "{}",
        command_line("date", &["-u", "+kill -9 of node 1 at %H:%M:%S.%N UTC"])
    );
    let killed_at = Instant::now();
    let killed_day_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        .rem_euclid(86_400.0);
    cluster.nodes[0].signal("-KILL")?;
    let moved = wait_moved(&cluster, killed_id, &victims, killed_at)?;
    let mut times: Vec<f64> = moved.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    let not_moved = moved.len() - times.len();
    eprintln!(
        "{} of {} volumes served again by another node; p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        times.len(),
        moved.len(),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times.last().copied().unwrap_or(0.0)
    );
    if not_moved > 0 {
        eprintln!(
            "{not_moved} volumes not served again within {FAILOVER_DEADLINE:?}; the nodes' log lines on it:\n{}",
            cluster.log_lines_with(&["failing over", "cannot fence", "not serving"])
        );
    }
    let phases = phases(&cluster, killed_day_s);
    drop(cluster);
    let report = FleetReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        nodes: options.nodes,
        volumes: options.volumes,
        replicas: options.replicas,
        volume_bytes: options.volume_bytes,
        on_victim: victims.len(),
        failover_after_s: options.failover_after_s,
        create_p50_ms: percentile(&create_ms, 50.0),
        create_p99_ms: percentile(&create_ms, 99.0),
        create_total_s,
        status_median_s: status_times[2],
        status_max_s: status_times[4],
        status_bytes,
        rss_mib_per_node,
        moved: times.len(),
        not_moved,
        failover_p50_s: percentile(&times, 50.0),
        failover_p99_s: percentile(&times, 99.0),
        failover_max_s: times.last().copied().unwrap_or(0.0),
        first_served_s: times.first().copied().unwrap_or(0.0),
        phases,
    };
    let table = markdown(&report);
    println!("\n{table}");
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("fleet.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out.join("fleet.md"), &table)?;
    println!("JSON: {}", file.display());
    let ratio = |target: f64, measured: f64| if measured > 0.0 { target / measured } else { 0.0 };
    Ok(vec![
        crate::chart::Bar {
            label: "fleet failover: 15 s / p99".into(),
            ratio: if not_moved > 0 {
                0.0
            } else {
                ratio(TARGET_FAILOVER_P99_S, report.failover_p99_s)
            },
            target: Some(1.0),
        },
        crate::chart::Bar {
            label: "fleet status: 1 s / median".into(),
            ratio: ratio(TARGET_STATUS_S, report.status_median_s),
            target: Some(1.0),
        },
    ])
}

fn markdown(report: &FleetReport) -> String {
    let verdict = |met: bool| if met { "met" } else { "not met" };
    let mut out = format!(
        "## Fleet: {} volumes (repl={}, {} MiB thin each) on {} local nodes, {} of them coordinated by node 1, which is killed; {}, {} cores\n\n",
        report.volumes,
        report.replicas,
        report.volume_bytes >> 20,
        report.nodes,
        report.on_victim,
        report.date_utc,
        report.machine.cores
    );
    out.push_str("| measure | value | target |\n| --- | ---: | --- |\n");
    out.push_str(&format!(
        "| `volume create` (CLI call, through Raft), p50 / p99 | {:.0} / {:.0} ms | - |\n",
        report.create_p50_ms, report.create_p99_ms
    ));
    out.push_str(&format!(
        "| all {} creates, {} at a time | {:.1} s | - |\n",
        report.volumes, CREATORS, report.create_total_s
    ));
    out.push_str(&format!(
        "| `cluster status --json` of the whole fleet, median / slowest of 5 | {:.3} / {:.3} s ({} KiB) | < {TARGET_STATUS_S} s: {} |\n",
        report.status_median_s,
        report.status_max_s,
        report.status_bytes / 1024,
        verdict(report.status_median_s < TARGET_STATUS_S)
    ));
    let rss: Vec<String> = report.rss_mib_per_node.iter().map(|mib| format!("{mib:.0}")).collect();
    out.push_str(&format!(
        "| resident memory per node (MiB), node 1 first | {} | - |\n",
        rss.join(" / ")
    ));
    out.push_str(&format!(
        "| node 1's volumes served again elsewhere (first write acknowledged) | {} of {} | all |\n",
        report.moved,
        report.moved + report.not_moved
    ));
    out.push_str(&format!(
        "| kill -9 to first acknowledged write, p50 / p99 / max | {:.2} / {:.2} / {:.2} s (first {:.2} s) | p99 <= {TARGET_FAILOVER_P99_S} s: {} |\n",
        report.failover_p50_s,
        report.failover_p99_s,
        report.failover_max_s,
        report.first_served_s,
        verdict(report.not_moved == 0 && report.failover_p99_s <= TARGET_FAILOVER_P99_S)
    ));
    for phase in &report.phases {
        out.push_str(&format!(
            "| {} ({} log lines): first / last after the kill | {:.2} / {:.2} s | - |\n",
            phase.what, phase.lines, phase.first_s, phase.last_s
        ));
    }
    out.push_str(&format!(
        "\nfailover_after_s: {}. Each probe asks a surviving node's `cluster status` (refreshed every {} ms) where a volume is served and writes 4 KiB with FUA there; {PROBES} probes at once.\n",
        report
            .failover_after_s
            .map_or_else(|| "the binary's default".to_owned(), |s| s.to_string()),
        STATUS_POLL.as_millis()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_read_from_the_rfc3339_stamp() {
        let at = line_seconds("2026-12-06T11:45:01.500000Z  WARN failing over").unwrap();
        assert!((at - (11.0 * 3600.0 + 45.0 * 60.0 + 1.5)).abs() < 1e-6);
        assert_eq!(line_seconds("no stamp here"), None);
    }

    #[test]
    fn placements_read_each_volumes_coordinator_and_address() {
        let status = serde_json::json!({"volumes": [
            {"name": "a", "coordinator": 3, "nbd_address": "127.0.0.23:1"},
            {"name": "b", "coordinator": 1}
        ]});
        let found = placements(&status);
        assert_eq!(found.get("a"), Some(&(3, "127.0.0.23:1".to_owned())));
        assert!(!found.contains_key("b"), "an entry without an address is skipped");
    }
}
