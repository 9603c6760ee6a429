//! `ballast-perf failover`: how long a replicated volume is out of service
//! when the node serving it fails, and whether a node that is merely slow
//! (paused, its CPU saturated, its disk stalled) keeps it. One local 3-node
//! cluster (nodes on 127.0.0.11-13, so a
//! partition can cut one node off without touching this process's own
//! traffic, which leaves from 127.0.0.1), one repl=3 volume, and a writer
//! that never stops: 4 KiB FUA writes at random offsets, one at a time,
//! through NBD to whichever node serves the volume (it tries each node the
//! fault did not hit; only the coordinator opens the export).
//!
//! Each trial faults the node serving the volume at that moment:
//! - `kill9`: SIGKILL; the node is started again after the trial;
//! - `stop`: SIGSTOP past the failover timeout; SIGCONT after the trial;
//! - `partition`: iptables drops every packet from and to the node's address;
//!   healed after the trial;
//!
//! and measures the time from the fault to the first write acknowledged by
//! another node. Between trials the cluster settles (all three copies in
//! sync again), so each trial starts alike. Then trials of a node that is
//! merely slow, none of which may move the volume (a false failover), each
//! with the writer's longest stall:
//! - `pause`: SIGSTOP of the serving node for half the failover timeout;
//! - `cpu`: busy loops, two per core, for twice the failover timeout;
//! - `disk stall`: the serving node's disk holds every request for 2 s (a
//!   `stall` rule of the node's fault plan, `kernel_iface::faults`);
//! - `clock jump`: the machine's wall clock steps an hour forward, then two
//!   hours back, then forward to the true time again (as an NTP step at boot
//!   or a wrong RTC does), each step a third of twice the failover timeout
//!   apart; restored from the monotonic clock when the trial ends, whatever
//!   happens (`date -s`, needs CAP_SYS_TIME; the kind is left out where the
//!   clock cannot be set, and says so).

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::local_cluster::{ClusterLayout, LocalCluster};
use crate::machine::{command_line, load_average, machine, Machine};
use crate::servers::BallastBinary;

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct FailoverOptions {
    /// Trials of each fault kind (kill9, stop, partition) and of each slow node.
    pub trials: usize,
    /// The nodes' `failover_after_s` (None: the binary's default).
    pub failover_after_s: Option<u64>,
    pub out: PathBuf,
    pub ballast: BallastBinary,
    /// Only these kinds (`kill9`, `stop`, `partition`, `pause`, `cpu_load`,
    /// `disk_stall`, `clock_jump`); empty: all.
    pub kinds: Vec<String>,
}

/// Names of the trial kinds (`--kinds`).
pub const KINDS: [&str; 7] = [
    "kill9",
    "stop",
    "partition",
    "pause",
    "cpu_load",
    "disk_stall",
    "clock_jump",
];

/// The `--kinds` name of a fault or slow kind (its JSON name).
fn kind_name(kind: impl Serialize) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

const NODE_COUNT: usize = 3;
/// The nodes' first address byte (127.0.0.11 ..).
const FIRST_HOST: u8 = 11;
const NODE_DISK_BYTES: u64 = 1 << 30;
const VOLUME_BYTES: u64 = 256 << 20;
const VOLUME: &str = "failover";
const BLOCK_BYTES: u64 = 4096;
const BLOCK_LEN: u32 = 4096;
/// The failover timeout when the binary does not say (ballast's default).
const FAILOVER_AFTER_DEFAULT_S: u64 = 4;
/// A write, or an NBD handshake, that takes longer than this counts as failed.
const WRITER_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest a trial may take to see a write on another node, or to settle.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(50);
/// Targets of the issue: fault to first acknowledged write, p99.
const TARGET_P99_S: f64 = 8.0;

/// One fault kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    Kill9,
    Stop,
    Partition,
}

impl Fault {
    const ALL: [Self; 3] = [Self::Kill9, Self::Stop, Self::Partition];

    fn describe(self) -> &'static str {
        match self {
            Self::Kill9 => "kill -9 of the serving node",
            Self::Stop => "SIGSTOP of the serving node past the timeout",
            Self::Partition => "the serving node cut off (iptables, both ways)",
        }
    }
}

/// Times of one fault kind, seconds.
#[derive(Clone, Debug, Serialize)]
struct FaultRow {
    fault: Fault,
    description: &'static str,
    trials: usize,
    p50_s: f64,
    p99_s: f64,
    max_s: f64,
    /// Within the target (p99 <= 8 s), where the issue sets one.
    target_met: bool,
    samples_s: Vec<f64>,
}

/// How a node is made slow without failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Slow {
    /// SIGSTOP for half the failover timeout.
    Pause,
    /// Busy loops on every core for twice the failover timeout.
    CpuLoad,
    /// The serving node's disk stalls.
    DiskStall,
    /// The machine's wall clock steps forward and back.
    ClockJump,
}

impl Slow {
    const ALL: [Self; 4] = [Self::Pause, Self::CpuLoad, Self::DiskStall, Self::ClockJump];
}

/// How far the clock-jump trials step the wall clock.
const CLOCK_STEP_S: i64 = 3600;

/// The machine's wall clock, set off from the true time for a trial and
/// put back (from the monotonic clock) when dropped.
struct WallClock {
    true_at: std::time::SystemTime,
    since: Instant,
}

impl WallClock {
    /// Notes the true time now; None (and why) when this process cannot set the clock.
    fn take() -> Result<Self> {
        let clock = Self {
            true_at: std::time::SystemTime::now(),
            since: Instant::now(),
        };
        // Setting it to the true time checks that it can be set, changing nothing.
        clock.set_off(0)?;
        Ok(clock)
    }

    /// Sets the wall clock `offset_s` seconds off the true time.
    fn set_off(&self, offset_s: i64) -> Result<()> {
        let true_now = self.true_at + self.since.elapsed();
        let unix = true_now
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?;
        let seconds = i64::try_from(unix.as_secs()).context("time out of range")? + offset_s;
        let to = format!("@{seconds}.{:09}", unix.subsec_nanos());
        let output = Command::new("date")
            .args(["-u", "-s", &to])
            .output()
            .context("running date -s")?;
        if !output.status.success() {
            bail!(
                "date -s {to} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for WallClock {
    fn drop(&mut self) {
        if let Err(error) = self.set_off(0) {
            eprintln!("failover: could not put the wall clock back: {error:#}; set it by hand (e.g. from NTP)");
        }
    }
}

/// How long the disk stall trials hold the disk.
const DISK_STALL: Duration = Duration::from_secs(2);
/// Busy loops per core in the CPU trials.
const BUSY_LOOPS_PER_CORE: usize = 2;

/// A slow node's trials: none may move the volume.
#[derive(Clone, Debug, Serialize)]
struct SlowRow {
    slow: Slow,
    description: String,
    trials: usize,
    /// How long the node was slow, each trial.
    slow_s: f64,
    false_failovers: usize,
    /// The writer's longest wait for an acknowledgement, per trial.
    stall_p50_s: f64,
    stall_max_s: f64,
}

#[derive(Serialize)]
struct FailoverReport {
    date_utc: String,
    machine: Machine,
    ballast_binary: String,
    ballast_version: String,
    nodes: usize,
    failover_after_s: u64,
    writer: &'static str,
    faults: Vec<FaultRow>,
    slow: Vec<SlowRow>,
}

/// Acknowledged writes: when, and which node (position) acknowledged.
#[derive(Default)]
struct Acks {
    list: Mutex<Vec<(Instant, usize)>>,
}

impl Acks {
    fn clear(&self) {
        self.list.lock().expect("acks lock").clear();
    }

    /// The first acknowledgement at or after `since` by a node other than `not`.
    fn first_elsewhere(&self, since: Instant, not: usize) -> Option<Instant> {
        self.list
            .lock()
            .expect("acks lock")
            .iter()
            .find(|(at, node)| *at >= since && *node != not)
            .map(|(at, _)| *at)
    }

    /// The first acknowledgement at or after `since` by `node`.
    fn first_by(&self, since: Instant, node: usize) -> Option<Instant> {
        self.list
            .lock()
            .expect("acks lock")
            .iter()
            .find(|(at, by)| *at >= since && *by == node)
            .map(|(at, _)| *at)
    }

    /// The longest gap between acknowledgements (from `since`).
    fn longest_gap(&self, since: Instant) -> Duration {
        let list = self.list.lock().expect("acks lock");
        let mut previous = since;
        let mut longest = Duration::ZERO;
        for (at, _) in list.iter().filter(|(at, _)| *at >= since) {
            longest = longest.max(at.duration_since(previous));
            previous = *at;
        }
        longest
    }
}

/// The writer thread and what it shares.
struct Writer {
    stop: Arc<AtomicBool>,
    /// A node (position) the writer leaves alone (usize::MAX: none).
    avoid: Arc<AtomicUsize>,
    acks: Arc<Acks>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(uris: Vec<String>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let avoid = Arc::new(AtomicUsize::new(usize::MAX));
        let acks = Arc::new(Acks::default());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (thread_stop, thread_avoid, thread_acks) = (Arc::clone(&stop), Arc::clone(&avoid), Arc::clone(&acks));
        let thread = std::thread::Builder::new()
            .name("failover-writer".into())
            .spawn(move || runtime.block_on(write_forever(uris, &thread_stop, &thread_avoid, &thread_acks)))?;
        Ok(Self {
            stop,
            avoid,
            acks,
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes until `stop`, to whichever node opens the export.
async fn write_forever(uris: Vec<String>, stop: &AtomicBool, avoid: &AtomicUsize, acks: &Acks) {
    use node::nbd::client::{connect, ExportUri};
    let parsed: Vec<ExportUri> = uris
        .iter()
        .map(|uri| ExportUri::parse(uri).expect("the benchmark's own NBD URIs parse"))
        .collect();
    let data = vec![0x5a_u8; BLOCK_LEN as usize];
    let blocks = VOLUME_BYTES / BLOCK_BYTES;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let mut cookie = 0_u64;
    while !stop.load(Ordering::Acquire) {
        for (position, uri) in parsed.iter().enumerate() {
            if stop.load(Ordering::Acquire) || avoid.load(Ordering::Acquire) == position {
                continue;
            }
            let Ok(mut connection) = connect(uri, WRITER_TIMEOUT).await else {
                continue;
            };
            while !stop.load(Ordering::Acquire) && avoid.load(Ordering::Acquire) != position {
                cookie += 1;
                let offset_bytes = rand::Rng::gen_range(&mut rng, 0..blocks) * BLOCK_BYTES;
                if write_fua(&mut connection, cookie, offset_bytes, &data, WRITER_TIMEOUT)
                    .await
                    .is_err()
                {
                    break;
                }
                acks.list.lock().expect("acks lock").push((Instant::now(), position));
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One write of `data` at `offset_bytes` with FUA; Ok once its reply
/// (matching `cookie`, no error) came within `timeout`.
pub(crate) async fn write_fua(
    connection: &mut node::nbd::client::Connection,
    cookie: u64,
    offset_bytes: u64,
    data: &[u8],
    timeout: Duration,
) -> Result<()> {
    let request = node::nbd::proto::Request {
        flags: node::nbd::proto::CMD_FLAG_FUA,
        command: node::nbd::proto::CMD_WRITE,
        cookie,
        offset_bytes,
        length_bytes: u32::try_from(data.len()).context("a write of over 4 GiB")?,
    };
    let reply = tokio::time::timeout(timeout, async {
        connection.sender.request(&request, data).await?;
        connection.receiver.reply(|_| None).await
    })
    .await
    .context("no answer in time")??;
    if reply.error != 0 || reply.cookie != cookie {
        bail!("NBD error {} (cookie {} for {cookie})", reply.error, reply.cookie);
    }
    Ok(())
}

/// iptables rules of this run's own chain, removed on drop.
struct Partition {
    chain: String,
}

impl Partition {
    fn new() -> Result<Self> {
        let chain = format!("BALLAST-PERF-{}", std::process::id());
        iptables(&["-N", &chain])?;
        let partition = Self { chain };
        iptables(&["-I", "INPUT", "-j", &partition.chain])?;
        Ok(partition)
    }

    fn cut(&self, host: &str) -> Result<()> {
        iptables(&["-A", &self.chain, "-s", host, "-j", "DROP"])?;
        iptables(&["-A", &self.chain, "-d", host, "-j", "DROP"])
    }

    fn heal(&self) -> Result<()> {
        iptables(&["-F", &self.chain])
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-D", "INPUT", "-j", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}

fn iptables(args: &[&str]) -> Result<()> {
    let output = Command::new("iptables")
        .args(args)
        .output()
        .context("iptables (ci/install-deps.sh installs it)")?;
    if !output.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The volume as the nodes that answer see it: the newest view (highest
/// epoch; a node just restarted may not have caught up yet).
fn inspect(cluster: &LocalCluster, skip: Option<usize>) -> Result<serde_json::Value> {
    let mut last_error = None;
    let mut newest: Option<serde_json::Value> = None;
    for (position, node) in cluster.nodes.iter().enumerate() {
        if Some(position) == skip {
            continue;
        }
        match cluster
            .admin()
            .run_stdout(&["volume", "inspect", VOLUME, "--json", "--api", &node.api()])
        {
            Ok(text) => {
                let view: serde_json::Value = serde_json::from_str(&text).context("volume inspect printed no JSON")?;
                let epoch = |view: &serde_json::Value| view["epoch"].as_u64().unwrap_or(0);
                if newest.as_ref().is_none_or(|seen| epoch(&view) > epoch(seen)) {
                    newest = Some(view);
                }
            }
            Err(error) => last_error = Some(error),
        }
    }
    newest.ok_or_else(|| last_error.unwrap_or_else(|| anyhow::anyhow!("no node to ask")))
}

/// The position of the node coordinating the volume, and the epoch.
fn coordinator(cluster: &LocalCluster, skip: Option<usize>) -> Result<(usize, u64)> {
    let info = inspect(cluster, skip)?;
    let id = info["coordinator_nbd"].as_str().unwrap_or_default().to_owned();
    let position = cluster
        .nodes
        .iter()
        .position(|node| node.nbd_address() == id)
        .with_context(|| format!("the volume is served at {id:?}, not by a node of this cluster"))?;
    Ok((position, info["epoch"].as_u64().unwrap_or(0)))
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let started = Instant::now();
    let mut last_error = None;
    while started.elapsed() < TRIAL_TIMEOUT {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        std::thread::sleep(POLL);
    }
    match last_error {
        Some(error) => Err(error.context(format!("{what}: not within {TRIAL_TIMEOUT:?}"))),
        None => bail!("{what}: not within {TRIAL_TIMEOUT:?}"),
    }
}

/// Waits until all three copies are in sync and the writer writes again.
fn settle(cluster: &LocalCluster, writer: &Writer) -> Result<usize> {
    let mut seen = serde_json::Value::Null;
    wait_for("all three copies in sync", || {
        seen = inspect(cluster, None)?;
        Ok((seen["in_sync"].as_array().map_or(0, Vec::len) == NODE_COUNT).then_some(()))
    })
    .with_context(|| format!("the volume as last seen: {seen:#}\n{}", cluster.log_tails()))?;
    let (serving, _) = coordinator(cluster, None)?;
    let since = Instant::now();
    wait_for("the writer writes to the serving node", || {
        Ok(writer.acks.first_by(since, serving))
    })
    .with_context(|| {
        let acks = writer.acks.list.lock().expect("acks lock");
        let last = acks
            .last()
            .map(|(at, node)| format!("node{} {:?} ago", node + 1, at.elapsed()));
        format!(
            "node{} serves; the writer's last acknowledgement: {last:?}\n{}",
            serving + 1,
            cluster.log_tails()
        )
    })?;
    Ok(serving)
}

/// One fault trial: seconds from the fault to the first write acknowledged elsewhere.
fn fault_trial(cluster: &mut LocalCluster, writer: &Writer, partition: &Partition, fault: Fault) -> Result<f64> {
    let serving = settle(cluster, writer)?;
    writer.acks.clear();
    let node = &cluster.nodes[serving];
    let faulted = Instant::now();
    eprintln!("{}", command_line("date", &["-u", "+fault at %H:%M:%S.%N UTC"]));
    match fault {
        Fault::Kill9 => node.signal("-KILL")?,
        Fault::Stop => node.signal("-STOP")?,
        Fault::Partition => partition.cut(&node.host)?,
    }
    writer.avoid.store(serving, Ordering::Release);
    let first = wait_for("a write acknowledged by another node", || {
        Ok(writer.acks.first_elsewhere(faulted, serving))
    });
    let healed = match fault {
        Fault::Kill9 => cluster.restart_node(serving),
        Fault::Stop => cluster.nodes[serving].signal("-CONT"),
        Fault::Partition => partition.heal(),
    };
    writer.avoid.store(usize::MAX, Ordering::Release);
    let first = first.with_context(|| cluster.log_tails())?;
    healed?;
    Ok(first.duration_since(faulted).as_secs_f64())
}

/// Busy loops (child shells, stopped by pid when dropped).
struct BusyLoops(Vec<std::process::Child>);

impl BusyLoops {
    fn start(count: usize) -> Result<Self> {
        let mut loops = Self(Vec::new());
        for _ in 0..count {
            loops.0.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .context("starting a busy loop")?,
            );
        }
        Ok(loops)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One trial of a slow node: (whether the volume moved, the writer's longest stall).
fn slow_trial(cluster: &LocalCluster, writer: &Writer, slow: Slow, slow_for: Duration) -> Result<(bool, f64)> {
    let serving = settle(cluster, writer)?;
    let (_, epoch) = coordinator(cluster, None)?;
    writer.acks.clear();
    let paused = Instant::now();
    let node = &cluster.nodes[serving];
    match slow {
        Slow::Pause => {
            node.signal("-STOP")?;
            std::thread::sleep(slow_for);
            node.signal("-CONT")?;
        }
        Slow::CpuLoad => {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            let busy = BusyLoops::start(BUSY_LOOPS_PER_CORE * cores)?;
            std::thread::sleep(slow_for);
            drop(busy);
        }
        Slow::DiskStall => {
            node.set_faults("stall 0\n")?;
            std::thread::sleep(slow_for);
            node.set_faults("")?;
        }
        Slow::ClockJump => {
            let clock = WallClock::take()?;
            clock.set_off(CLOCK_STEP_S)?;
            std::thread::sleep(slow_for / 3);
            clock.set_off(-CLOCK_STEP_S)?;
            std::thread::sleep(slow_for / 3);
            clock.set_off(0)?;
            std::thread::sleep(slow_for / 3);
        }
    }
    let resumed = Instant::now();
    let again = wait_for("a write acknowledged again after the slow spell", || {
        Ok(writer
            .acks
            .first_by(resumed, serving)
            .or_else(|| writer.acks.first_elsewhere(resumed, serving)))
    })?;
    // A failover decided during the slow spell is committed by now.
    std::thread::sleep(Duration::from_millis(500));
    let (now_serving, now_epoch) = coordinator(cluster, None)?;
    let moved = now_serving != serving || now_epoch != epoch;
    // The longest wait for an acknowledgement from the start of the spell
    // (`again` is among them). Not `again - paused`: that is at least the
    // spell's length even when the writer never stopped (a saturated CPU,
    // a clock jump), which is how the CPU trials once reported 8 s stalls.
    debug_assert!(again >= paused);
    let stall = writer.acks.longest_gap(paused);
    Ok((moved, stall.as_secs_f64()))
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub(crate) fn percentile(sorted: &[f64], percent: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank: p99 of fewer than 100 trials is the largest.
    let rank = (1..=sorted.len())
        .find(|rank| *rank as f64 >= percent / 100.0 * sorted.len() as f64)
        .unwrap_or(sorted.len());
    sorted[rank - 1]
}

fn fault_row(fault: Fault, samples: Vec<f64>) -> FaultRow {
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = percentile(&sorted, 99.0);
    FaultRow {
        fault,
        description: fault.describe(),
        trials: samples.len(),
        p50_s: percentile(&sorted, 50.0),
        p99_s: p99,
        max_s: sorted.last().copied().unwrap_or(0.0),
        target_met: p99 <= TARGET_P99_S,
        samples_s: samples,
    }
}

pub fn run(options: &FailoverOptions) -> Result<Vec<crate::chart::Bar>> {
    assert!(options.trials > 0, "at least one trial");
    crate::servers::require_binary(&options.ballast.path)?;
    let failover_after_s = options.failover_after_s.unwrap_or(FAILOVER_AFTER_DEFAULT_S);
    let load_average_before = load_average();
    let partition = Partition::new().context("the partition trials need iptables and root")?;
    let layout = ClusterLayout {
        first_host: FIRST_HOST,
        fault_plans: true,
        node_args: crate::local_cluster::failover_after_args(options.failover_after_s),
    };
    eprintln!("starting {NODE_COUNT} nodes on 127.0.0.{FIRST_HOST}-{}", FIRST_HOST + 2);
    eprintln!("{}", command_line("date", &["-u", "+started at %H:%M:%S.%N UTC"]));
    let mut cluster = LocalCluster::start_with(&options.ballast, NODE_COUNT, NODE_DISK_BYTES, &layout)?;
    cluster.create_volume(VOLUME, VOLUME_BYTES, NODE_COUNT)?;
    let uris: Vec<String> = cluster
        .nodes
        .iter()
        .map(|node| format!("nbd://{}/{VOLUME}", node.nbd_address()))
        .collect();
    for uri in &uris {
        let address = uri.trim_start_matches("nbd://").split('/').next().unwrap_or_default();
        address
            .to_socket_addrs()
            .with_context(|| format!("bad node address {address}"))?;
    }
    let writer = Writer::start(uris)?;
    let chosen = |name: String| options.kinds.is_empty() || options.kinds.contains(&name);
    let mut samples: Vec<(Fault, Vec<f64>)> = Fault::ALL
        .iter()
        .filter(|fault| chosen(kind_name(**fault)))
        .map(|fault| (*fault, Vec::new()))
        .collect();
    for trial in 0..options.trials {
        for (fault, times) in &mut samples {
            let seconds = fault_trial(&mut cluster, &writer, &partition, *fault)
                .with_context(|| format!("trial {} ({fault:?})", trial + 1))?;
            eprintln!(
                "trial {} {fault:?}: first write on the new coordinator after {seconds:.2} s",
                trial + 1
            );
            if seconds > TARGET_P99_S {
                // What each node did about it, to see where the time went.
                eprintln!(
                    "  slower than the target; the nodes' log lines on it:\n{}",
                    cluster.log_lines_with(&[
                        "failing over",
                        "fenced",
                        "serving changed",
                        "leader",
                        "lease",
                        "resync",
                        "in-sync",
                        "out of sync"
                    ])
                );
            }
            times.push(seconds);
        }
    }
    let mut slow_rows = Vec::new();
    for slow in Slow::ALL.into_iter().filter(|slow| chosen(kind_name(*slow))) {
        let (slow_for, description) = match slow {
            Slow::Pause => {
                let pause = Duration::from_millis(failover_after_s * 1000 / 2);
                (
                    pause,
                    format!("SIGSTOP of the serving node for {:.1} s", pause.as_secs_f64()),
                )
            }
            Slow::CpuLoad => (
                Duration::from_secs(failover_after_s * 2),
                format!(
                    "every core saturated ({BUSY_LOOPS_PER_CORE} busy loops per core) for {} s",
                    failover_after_s * 2
                ),
            ),
            Slow::DiskStall => (
                DISK_STALL,
                format!(
                    "the serving node's disk holds every request for {} s",
                    DISK_STALL.as_secs()
                ),
            ),
            Slow::ClockJump => {
                if let Err(error) = WallClock::take() {
                    eprintln!(
                        "failover: clock-jump trials left out: this process cannot set the wall clock ({error:#})"
                    );
                    continue;
                }
                let step = Duration::from_secs(failover_after_s * 2) / 3;
                (
                    step * 3,
                    format!(
                        "the wall clock steps {} h forward, {} h back, {} h forward, {:.1} s apart",
                        CLOCK_STEP_S / 3600,
                        2 * CLOCK_STEP_S / 3600,
                        CLOCK_STEP_S / 3600,
                        step.as_secs_f64()
                    ),
                )
            }
        };
        let (mut false_failovers, mut stalls) = (0, Vec::new());
        for trial in 0..options.trials {
            let (moved, stall) = slow_trial(&cluster, &writer, slow, slow_for)
                .with_context(|| format!("{slow:?} trial {}", trial + 1))?;
            eprintln!(
                "{slow:?} {}: writer stalled {stall:.2} s{}",
                trial + 1,
                if moved { ", FALSE FAILOVER" } else { "" }
            );
            false_failovers += usize::from(moved);
            stalls.push(stall);
        }
        stalls.sort_by(f64::total_cmp);
        slow_rows.push(SlowRow {
            slow,
            description,
            trials: stalls.len(),
            slow_s: slow_for.as_secs_f64(),
            false_failovers,
            stall_p50_s: percentile(&stalls, 50.0),
            stall_max_s: stalls.last().copied().unwrap_or(0.0),
        });
    }
    drop(writer);
    drop(cluster);
    drop(partition);
    let report = FailoverReport {
        date_utc: command_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        machine: Machine {
            load_average_before,
            load_average_after: load_average(),
            ..machine()
        },
        ballast_binary: options.ballast.path.display().to_string(),
        ballast_version: command_line(&options.ballast.path.display().to_string(), &["--version"]),
        nodes: NODE_COUNT,
        failover_after_s,
        writer: "4 KiB FUA writes at random offsets, QD1, through NBD to whichever node opens the export; 1 s timeout per write",
        faults: samples.into_iter().map(|(fault, times)| fault_row(fault, times)).collect(),
        slow: slow_rows,
    };
    let table = markdown(&report);
    println!("\n{table}");
    std::fs::create_dir_all(&options.out)?;
    let file = options.out.join("failover.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out.join("failover.md"), &table)?;
    println!("JSON: {}", file.display());
    // Bars for `all`'s summary: the target over the measured p99 (>= 1: met).
    Ok(report
        .faults
        .iter()
        .map(|row| crate::chart::Bar {
            label: format!("failover {:?}: 8 s / p99", row.fault),
            ratio: if row.p99_s > 0.0 { TARGET_P99_S / row.p99_s } else { 0.0 },
            target: Some(1.0),
        })
        .collect())
}

fn markdown(report: &FailoverReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Failover of a repl=3 volume ({}, {} nodes on one host, failover_after_s = {}; writer: {})\n",
        report.date_utc, report.nodes, report.failover_after_s, report.writer
    );
    // A table only for the kinds that ran (`--kinds`).
    if !report.faults.is_empty() {
        let _ = writeln!(
            out,
            "| fault | trials | fault to first write on the new coordinator: p50 | p99 | max | target p99 <= {TARGET_P99_S} s |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | --- |");
    }
    for row in &report.faults {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} s | {:.2} s | {:.2} s | {} |",
            row.description,
            row.trials,
            row.p50_s,
            row.p99_s,
            row.max_s,
            if row.target_met { "met" } else { "**not met**" }
        );
    }
    if !report.slow.is_empty() {
        let _ = writeln!(
            out,
            "\n| a node merely slow | trials | false failovers (target 0) | the writer's longest stall: p50 | max |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    }
    for row in &report.slow {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} s | {:.2} s |",
            row.description, row.trials, row.false_failovers, row.stall_p50_s, row.stall_max_s
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trial_kind_has_its_kinds_name_and_no_name_is_left_over() {
        let names: Vec<String> = Fault::ALL
            .iter()
            .map(|fault| kind_name(*fault))
            .chain(Slow::ALL.iter().map(|slow| kind_name(*slow)))
            .collect();
        assert_eq!(names, KINDS.map(str::to_owned).to_vec());
    }

    #[test]
    fn percentiles_are_nearest_rank_and_p99_of_few_trials_is_the_largest() {
        let sorted: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 5.0);
        assert_eq!(percentile(&sorted, 99.0), 10.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        let row = fault_row(Fault::Kill9, vec![9.0, 5.0, 6.0]);
        assert_eq!((row.p50_s, row.p99_s, row.max_s), (6.0, 9.0, 9.0));
        assert!(!row.target_met, "a p99 of 9 s misses the 8 s target");
    }

    #[test]
    fn the_writers_gaps_and_first_acknowledgements_are_found() {
        let acks = Acks::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        acks.list
            .lock()
            .unwrap()
            .extend([(at(10), 0), (at(20), 0), (at(520), 1), (at(530), 0)]);
        assert_eq!(acks.first_elsewhere(start, 0), Some(at(520)));
        assert_eq!(acks.first_by(at(21), 0), Some(at(530)));
        assert_eq!(acks.longest_gap(start), Duration::from_millis(500));
    }
}
