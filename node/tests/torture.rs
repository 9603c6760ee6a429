//! Torture trials with a checker (`scripts/torture.sh --trials N --seed S`
//! runs more of them): a local 3-node cluster; per trial a repl=3 volume,
//! a writer that records every write it sends and every one acknowledged
//! (block, version), and one or two faults at seeded random times: kill -9
//! of the coordinator or of a replica (restarted after a while, sometimes
//! killed again during its resync), SIGSTOP/SIGCONT of a node for longer
//! or shorter than the replica time-out, a network partition of a node
//! (iptables), a forced failover to another node under the writes, a disk
//! that fails every I/O with EIO for a while (the fault layer of
//! kernel-iface, `--inject-faults`; the node is restarted after), bit rot
//! (bytes flipped in data blocks of a node's disk file), full disks (a
//! repl=3 filler volume written until ENOSPC, then deleted). After
//! the faults heal, every replica is back in sync and every node reports the
//! same metadata for the volume, the checker reads
//! every written block from the coordinator: it must hold the last
//! acknowledged version of the block, or a newer one that was sent (its
//! acknowledgement lost with the fault), never an older one (lost), nor
//! bytes that are no version at all (torn, foreign). Then the volume is
//! served from each other replica in turn, and every block must read back
//! the same: the replicas converged. Prints
//! `trials: N, faults: F, acked writes checked: W, lost: 0, corrupt: 0`.
//!
//! A write in flight when its coordinator is killed may reach some
//! replicas and not others (no acknowledged write is at stake); the new
//! coordinator's automatic compare of the copies (`replication::scrub`,
//! whenever the epoch moves) makes them agree. The checker waits for that
//! compare, and replicas that still disagree fail the run ("diverged").
//!
//! Beside the writer, `READERS` readers on connections of their own (each
//! following the volume to whichever node serves it) read random blocks of
//! the same range throughout the faults. Every write and read is recorded
//! with when it was sent and answered, and the whole history is checked for
//! linearizability (`node::linearizable`: each block a register): a read
//! that returns an older version after a newer one was acknowledged or seen
//! (a stale read from a deposed coordinator, a dirty read of a write later
//! lost) fails the run with the operations involved.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::cluster::{wait_until, TestCluster, CONVERGE_TIMEOUT};
use common::firewall::Firewall;
use common::nbd::NbdClient;
use common::record_skip;
use node::nbd::proto;

const BLOCK: u64 = 4096;
/// The same, as a length.
const BLOCK_LEN: usize = 4096;
/// The same, as an NBD request length.
const BLOCK_U32: u32 = 4096;
/// Blocks the writer picks from (4 MiB): every block is written many times.
const BLOCKS: u64 = 1024;
const MAGIC: &[u8; 8] = b"BTORTURE";
/// How long the writer runs around the faults of one trial.
const TRIAL_WRITES: Duration = Duration::from_secs(6);
/// NBD socket time-out: a stopped coordinator must not hang the writer forever.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The replica time-out the nodes run with (pauses shorter and longer than it are tried).
const REPLICA_TIMEOUT_MS: u64 = 1500;
/// Readers beside the writer, each on its own connection.
const READERS: u32 = 2;

/// Every operation of a trial, for the linearizability check; times in
/// microseconds since the trial started.
#[derive(Clone)]
struct Recorder {
    started: Instant,
    ops: Arc<Mutex<Vec<node::linearizable::Op>>>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            ops: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn now_us(&self) -> u64 {
        // Never 0: time 0 is the blocks' state before any write.
        u64::try_from(self.started.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn record(
        &self,
        client: u32,
        block: u64,
        kind: node::linearizable::Kind,
        invoked_us: u64,
        completed_us: Option<u64>,
    ) {
        self.ops.lock().push(node::linearizable::Op {
            client,
            block,
            kind,
            invoked_us,
            completed_us,
        });
    }
}

/// The content of version `version` of block `lba` in trial `trial`:
/// a header naming them, then bytes derived from them.
fn content(trial: u64, lba: u64, version: u64) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK_LEN);
    block.extend_from_slice(MAGIC);
    block.extend_from_slice(&trial.to_le_bytes());
    block.extend_from_slice(&lba.to_le_bytes());
    block.extend_from_slice(&version.to_le_bytes());
    let mut state = trial.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.rotate_left(17) ^ version.rotate_left(41) | 1;
    while block.len() < BLOCK_LEN {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        block.extend_from_slice(&state.to_le_bytes());
    }
    block.truncate(BLOCK_LEN);
    block
}

/// What a block read back holds.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Zeroes,
    Version(u64),
    /// Neither zeroes nor any version of this block: torn or foreign.
    Garbage,
}

fn identify(trial: u64, lba: u64, data: &[u8]) -> Found {
    if data.iter().all(|&byte| byte == 0) {
        return Found::Zeroes;
    }
    if &data[..8] != MAGIC {
        return Found::Garbage;
    }
    let version = u64::from_le_bytes(data[24..32].try_into().unwrap());
    if data == content(trial, lba, version).as_slice() {
        Found::Version(version)
    } else {
        Found::Garbage
    }
}

/// Where each node's NBD listener is.
#[derive(Clone)]
struct Endpoints(Vec<(String, u16)>);

impl Endpoints {
    /// A connection to whichever node serves `volume` now (others refuse
    /// the export), trying for at most `CONVERGE_TIMEOUT`.
    fn connect(&self, volume: &str) -> NbdClient {
        let started = Instant::now();
        loop {
            for (host, port) in &self.0 {
                if let Ok(client) = NbdClient::connect(&format!("{host}:{port}"), volume, IO_TIMEOUT) {
                    return client;
                }
            }
            assert!(
                started.elapsed() < CONVERGE_TIMEOUT,
                "no node served volume {volume} for {CONVERGE_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Per block: the newest version acknowledged, the newest sent, and how
/// many writes were acknowledged (each is checked: the block must hold the
/// newest acknowledged version or a newer one sent).
#[derive(Default, Clone, Copy, Debug)]
struct History {
    acked: u64,
    sent: u64,
    acks: u64,
}

/// Writes random blocks until `stop`, recording each; reconnects after failures.
fn writer(
    trial: u64,
    seed: u64,
    volume: String,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
    book: Arc<Mutex<BTreeMap<u64, History>>>,
    recorder: Recorder,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = endpoints.connect(&volume);
    while !stop.load(Ordering::Acquire) {
        let lba = rng.gen_range(0..BLOCKS);
        let version = {
            let mut book = book.lock();
            let history = book.entry(lba).or_default();
            history.sent += 1;
            history.sent
        };
        let kind = node::linearizable::Kind::Write { value: version };
        let invoked = recorder.now_us();
        match client.request(proto::CMD_WRITE, lba * BLOCK, BLOCK_U32, &content(trial, lba, version)) {
            Ok((0, _)) => {
                recorder.record(0, lba, kind, invoked, Some(recorder.now_us()));
                let mut book = book.lock();
                let history = book.get_mut(&lba).unwrap();
                history.acked = history.acked.max(version);
                history.acks += 1;
            }
            // Refused or cut off: this version may or may not be there.
            Ok(_) | Err(_) => {
                recorder.record(0, lba, kind, invoked, None);
                std::thread::sleep(Duration::from_millis(50));
                client = endpoints.connect(&volume);
            }
        }
    }
}

/// Reads random blocks until `stop`, recording each read and what it
/// returned; reconnects after failures (a failed read returned nothing).
fn concurrent_reader(
    client_id: u32,
    trial: u64,
    seed: u64,
    volume: String,
    endpoints: Endpoints,
    stop: Arc<AtomicBool>,
    recorder: Recorder,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = endpoints.connect(&volume);
    let mut garbage = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let lba = rng.gen_range(0..BLOCKS);
        let invoked = recorder.now_us();
        match client.request(proto::CMD_READ, lba * BLOCK, BLOCK_U32, &[]) {
            Ok((0, data)) => {
                let completed = recorder.now_us();
                let value = match identify(trial, lba, &data) {
                    Found::Zeroes => 0,
                    Found::Version(version) => version,
                    Found::Garbage => {
                        garbage.push(format!(
                            "trial {trial} block {lba}: reader {client_id} read bytes that are no version"
                        ));
                        continue;
                    }
                };
                let kind = node::linearizable::Kind::Read { value };
                recorder.record(client_id, lba, kind, invoked, Some(completed));
            }
            Ok(_) | Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                client = endpoints.connect(&volume);
            }
        }
    }
    garbage
}

/// A reader of `volume` that follows it to whichever node serves it: a
/// node that stopped serving answers errors (ESHUTDOWN), and then the
/// read is retried on a new connection (bounded).
struct Reader {
    endpoints: Endpoints,
    volume: String,
    client: NbdClient,
}

impl Reader {
    fn new(endpoints: &Endpoints, volume: &str) -> Self {
        Self {
            client: endpoints.connect(volume),
            endpoints: endpoints.clone(),
            volume: volume.to_owned(),
        }
    }

    fn block(&mut self, lba: u64) -> Vec<u8> {
        let started = Instant::now();
        loop {
            match self.client.request(proto::CMD_READ, lba * BLOCK, BLOCK_U32, &[]) {
                Ok((0, data)) => return data,
                outcome => assert!(
                    started.elapsed() < CONVERGE_TIMEOUT,
                    "{}: block {lba} unreadable for {CONVERGE_TIMEOUT:?}: {outcome:?}",
                    self.volume
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
            self.client = self.endpoints.connect(&self.volume);
        }
    }
}

/// Tallies of the whole run.
#[derive(Default)]
struct Tally {
    faults: usize,
    checked: u64,
    lost: Vec<String>,
    corrupt: Vec<String>,
    /// Blocks whose replicas hold different unacknowledged versions.
    diverged: Vec<String>,
    /// Operations checked for linearizability, and the histories that were not.
    linearizable_ops: usize,
    not_linearizable: Vec<String>,
}

/// Reads every written block through `reader`; checks it against `book`; the blocks read.
fn check(trial: u64, reader: &mut Reader, book: &BTreeMap<u64, History>, tally: &mut Tally) -> BTreeMap<u64, Vec<u8>> {
    let mut seen = BTreeMap::new();
    for (&lba, history) in book {
        let data = reader.block(lba);
        match identify(trial, lba, &data) {
            Found::Version(version) if version >= history.acked && version <= history.sent => {}
            Found::Version(version) if version < history.acked => {
                tally.lost.push(format!(
                    "trial {trial} block {lba}: version {version}, acknowledged {}",
                    history.acked
                ));
            }
            Found::Zeroes if history.acked == 0 => {}
            Found::Zeroes => tally.lost.push(format!(
                "trial {trial} block {lba}: zeroes, acknowledged {}",
                history.acked
            )),
            found => tally.corrupt.push(format!(
                "trial {trial} block {lba}: {found:?} (sent up to {})",
                history.sent
            )),
        }
        tally.checked += history.acks;
        seen.insert(lba, data);
    }
    seen
}

fn signal(node: &common::node::TestNode, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(node.pid()).unwrap());
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// The faults a trial may inject.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillCoordinator,
    KillReplica,
    /// Kill a replica, restart it, kill it again while it resyncs.
    KillReplicaDuringResync,
    Pause,
    Partition,
    ForcedFailover,
    /// The disk of the coordinator or a replica fails every I/O with EIO
    /// for a while (its store stops); then the node is restarted.
    DiskFailure,
    /// Bytes of this trial's data blocks flipped in a node's disk file.
    BitRot,
    /// Every disk fills up (a repl=3 volume written until ENOSPC), then
    /// the space comes back (the filler is deleted).
    DiskFull,
}

const FAULTS: [Fault; 9] = [
    Fault::KillCoordinator,
    Fault::KillReplica,
    Fault::KillReplicaDuringResync,
    Fault::Pause,
    Fault::Partition,
    Fault::ForcedFailover,
    Fault::DiskFailure,
    Fault::BitRot,
    Fault::DiskFull,
];

/// What faults are injected with.
struct Faults<'a> {
    firewall: Option<&'a Firewall>,
    endpoints: &'a Endpoints,
    /// Each node's fault plan file.
    plans: &'a [std::path::PathBuf],
    trial: u64,
}

/// Flips a byte in up to `count` random blocks of `path` that hold data of `trial`; returns how many.
fn rot(path: &std::path::Path, trial: u64, count: usize, rng: &mut StdRng) -> usize {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut block = vec![0u8; BLOCK_LEN];
    let (mut offset, mut found) = (0u64, Vec::new());
    while file.read_exact(&mut block).is_ok() {
        if &block[..8] == MAGIC && block[8..16] == trial.to_le_bytes() {
            found.push(offset);
        }
        offset += BLOCK;
    }
    let mut flipped = 0;
    for _ in 0..count.min(found.len()) {
        let at = found.swap_remove(rng.gen_range(0..found.len())) + 2048;
        file.seek(SeekFrom::Start(at)).unwrap();
        let mut byte = [0u8];
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&[!byte[0]]).unwrap();
        flipped += 1;
    }
    file.sync_all().unwrap();
    flipped
}

fn coordinator_index(cluster: &TestCluster, volume: &str) -> usize {
    let started = Instant::now();
    loop {
        for node in cluster.nodes.iter().filter(|node| node.is_running()) {
            let output = node.cli(&["volume", "inspect", volume, "--json"]);
            if let Ok(info) = serde_json::from_slice::<serde_json::Value>(&output.stdout) {
                if let Some(id) = info["coordinator"].as_u64() {
                    return cluster.index_of(id);
                }
            }
        }
        assert!(started.elapsed() < CONVERGE_TIMEOUT, "no node answers for {volume}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Injects `fault` and heals it (every node running and reachable again).
fn inject(fault: Fault, cluster: &mut TestCluster, faults: &Faults, volume: &str, rng: &mut StdRng) -> Fault {
    let firewall = faults.firewall;
    let coordinator = coordinator_index(cluster, volume);
    let replica = (coordinator + rng.gen_range(1..cluster.nodes.len())) % cluster.nodes.len();
    println!(
        "trial {}: {fault:?} (coordinator node {}, replica node {})",
        faults.trial, cluster.nodes[coordinator].host, cluster.nodes[replica].host
    );
    let pause = Duration::from_millis(rng.gen_range(300..(REPLICA_TIMEOUT_MS * 3)));
    match fault {
        Fault::KillCoordinator | Fault::KillReplica => {
            let index = if matches!(fault, Fault::KillCoordinator) {
                coordinator
            } else {
                replica
            };
            cluster.nodes[index].kill9();
            std::thread::sleep(pause);
            cluster.nodes[index].restart();
        }
        Fault::KillReplicaDuringResync => {
            cluster.nodes[replica].kill9();
            std::thread::sleep(pause);
            cluster.nodes[replica].restart();
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..800)));
            cluster.nodes[replica].kill9();
            std::thread::sleep(pause);
            cluster.nodes[replica].restart();
        }
        Fault::Pause => {
            let index = if rng.gen_bool(0.5) { coordinator } else { replica };
            signal(&cluster.nodes[index], nix::sys::signal::Signal::SIGSTOP);
            std::thread::sleep(pause);
            signal(&cluster.nodes[index], nix::sys::signal::Signal::SIGCONT);
        }
        Fault::Partition => {
            let Some(firewall) = firewall else {
                return inject(Fault::Pause, cluster, faults, volume, rng);
            };
            let index = if rng.gen_bool(0.5) { coordinator } else { replica };
            let cut = &cluster.nodes[index];
            firewall.drop_tcp(None, &cut.host, cut.peer_port);
            for (other_index, other) in cluster.nodes.iter().enumerate() {
                if other_index != index {
                    firewall.drop_tcp(Some(&cut.host), &other.host, other.peer_port);
                }
            }
            std::thread::sleep(pause);
            firewall.heal();
        }
        Fault::ForcedFailover => {
            // To an in-sync replica (another is refused: it lacks writes);
            // the writer's connection to the old coordinator is cut by the takeover.
            let info = cluster.nodes[coordinator].inspect(volume);
            let in_sync: Vec<usize> = info["in_sync"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_u64)
                .map(|id| cluster.index_of(id))
                .filter(|&index| index != coordinator)
                .collect();
            if in_sync.is_empty() {
                return inject(Fault::Pause, cluster, faults, volume, rng);
            }
            let target = in_sync[rng.gen_range(0..in_sync.len())];
            let taken = cluster.nodes[target].cli(&["volume", "attach", volume, "--force"]);
            assert!(taken.status.success(), "forced failover: {}", common::text(&taken));
        }
        Fault::DiskFailure => {
            let index = if rng.gen_bool(0.5) { coordinator } else { replica };
            std::fs::write(&faults.plans[index], "any 0\n").unwrap();
            // The node reads its plan every 100 ms.
            std::thread::sleep(pause + Duration::from_millis(300));
            std::fs::write(&faults.plans[index], "").unwrap();
            // A failed store stays stopped until its disk is opened again:
            // the operator replaces the disk or restarts the node.
            std::thread::sleep(Duration::from_millis(300));
            cluster.nodes[index].kill9();
            cluster.nodes[index].restart();
        }
        Fault::BitRot => {
            let index = rng.gen_range(0..cluster.nodes.len());
            let disk = cluster.nodes[index].dir.path().join("disk0.img");
            rot(&disk, faults.trial, 16, rng);
        }
        Fault::DiskFull => {
            let filler = format!("fill{}", faults.trial);
            cluster.nodes[coordinator].cli_ok(&["volume", "create", &filler, "--size", "400MiB", "--repl", "3"]);
            let mut client = faults.endpoints.connect(&filler);
            let chunk = vec![0x5Au8; 1 << 20];
            let mut full = false;
            for mib in 0..400u64 {
                match client.request(proto::CMD_WRITE, mib << 20, 1 << 20, &chunk) {
                    Ok((0, _)) => {}
                    Ok((errno, _)) => {
                        assert_eq!(errno, 28, "a full disk answers ENOSPC, not errno {errno}");
                        full = true;
                        break;
                    }
                    Err(error) => panic!("the filler's connection failed: {error}"),
                }
            }
            assert!(full, "400 MiB fitted on 256 MiB disks");
            std::thread::sleep(pause);
            drop(client);
            wait_until(&format!("{filler} deleted"), || {
                cluster.nodes[coordinator]
                    .cli(&["volume", "delete", &filler])
                    .status
                    .success()
            });
        }
    }
    fault
}

/// Waits until all three replicas of `volume` are in sync (every node up).
/// Waits until every replica is in sync and the coordinator's automatic
/// compare of the copies at that epoch is done (it makes replicas that
/// took a write the others missed agree with the coordinator).
fn wait_converged(cluster: &TestCluster, volume: &str) {
    wait_until(&format!("{volume}: every replica back in sync and compared"), || {
        // Asked anew each time: a failover may still move the volume (a
        // coordinator killed just before the writer stopped), and only the
        // coordinator reports the compare of the current epoch.
        let node = &cluster.nodes[coordinator_index(cluster, volume)];
        let output = node.cli(&["volume", "inspect", volume, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&output.stdout).is_ok_and(|info| {
            info["in_sync"].as_array().is_some_and(|nodes| nodes.len() == 3)
                && info["replicas_down"].as_array().is_none_or(Vec::is_empty)
                && info["scrub"]["state"] == "done"
                && info["scrub"]["epoch"] == info["epoch"]
        })
    });
}

/// Waits until every node reports the same metadata for `volume` (epoch,
/// coordinator, replicas, in-sync set, size): Raft converged.
fn metadata_agrees(cluster: &TestCluster, volume: &str) {
    wait_until(&format!("{volume}: every node's metadata agrees"), || {
        let views: Vec<Option<Vec<serde_json::Value>>> = (0..cluster.nodes.len())
            .map(|index| {
                let status = cluster.status(index)?;
                let record = status["volumes"]
                    .as_array()?
                    .iter()
                    .find(|v| v["name"] == volume)?
                    .clone();
                Some(
                    ["epoch", "coordinator", "replica_nodes", "in_sync", "size_bytes"]
                        .iter()
                        .map(|field| record[*field].clone())
                        .collect(),
                )
            })
            .collect();
        views.iter().all(|view| view.is_some() && *view == views[0])
    });
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[test]
fn torture_trials_lose_and_corrupt_no_acknowledged_write() {
    let test = "torture_trials_lose_and_corrupt_no_acknowledged_write";
    if let Some(why) = common::unavailable_reason() {
        record_skip(test, &why);
        return;
    }
    // 8 in CI (about 75 s); long runs: scripts/torture.sh --trials N (README).
    let trials = setting("BALLAST_TORTURE_TRIALS", 8);
    let seed = setting(
        "BALLAST_TORTURE_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    println!("torture: {trials} trials, seed {seed} (BALLAST_TORTURE_SEED={seed} repeats the fault schedule)");
    let firewall = Firewall::new();
    if firewall.is_none() {
        record_skip(
            &format!("{test} (partitions)"),
            "iptables is not usable here; pauses stand in for partitions",
        );
    }
    let timeout = REPLICA_TIMEOUT_MS.to_string();
    // Each node's fault plan for its disk (`kernel_iface::faults`), empty until a DiskFailure.
    let plans_dir = common::scratch();
    let plans: Vec<std::path::PathBuf> = (0..3)
        .map(|index| plans_dir.path().join(format!("faults-{index}")))
        .collect();
    let flags: Vec<Vec<&str>> = plans
        .iter()
        .map(|plan| {
            vec![
                "--replica-timeout-ms",
                timeout.as_str(),
                "--failover-after-s",
                "3",
                "--inject-faults",
                plan.to_str().unwrap(),
            ]
        })
        .collect();
    let flags: Vec<&[&str]> = flags.iter().map(Vec::as_slice).collect();
    let mut cluster = TestCluster::start(test, 3, &flags);
    let endpoints = Endpoints(
        cluster
            .nodes
            .iter()
            .map(|node| (node.host.clone(), node.nbd_port))
            .collect(),
    );
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(seed);
    for trial in 0..trials {
        let volume = format!("t{trial}");
        let creator = coordinator_free_node(&cluster);
        cluster.nodes[creator].cli_ok(&["volume", "create", &volume, "--size", "8MiB", "--repl", "3"]);
        let book = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let recorder = Recorder::new();
        let writing = {
            let (volume, endpoints, stop, book, recorder) = (
                volume.clone(),
                endpoints.clone(),
                Arc::clone(&stop),
                Arc::clone(&book),
                recorder.clone(),
            );
            let writer_seed = rng.gen();
            std::thread::spawn(move || writer(trial, writer_seed, volume, endpoints, stop, book, recorder))
        };
        let reading: Vec<_> = (1..=READERS)
            .map(|client_id| {
                let (volume, endpoints, stop, recorder) =
                    (volume.clone(), endpoints.clone(), Arc::clone(&stop), recorder.clone());
                let reader_seed = rng.gen();
                std::thread::spawn(move || {
                    concurrent_reader(client_id, trial, reader_seed, volume, endpoints, stop, recorder)
                })
            })
            .collect();
        let started = Instant::now();
        let mut injected = Vec::new();
        for _ in 0..rng.gen_range(1..=2) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
            let fault = FAULTS[rng.gen_range(0..FAULTS.len())];
            let faults = Faults {
                firewall: firewall.as_ref(),
                endpoints: &endpoints,
                plans: &plans,
                trial,
            };
            injected.push(inject(fault, &mut cluster, &faults, &volume, &mut rng));
        }
        if let Some(rest) = TRIAL_WRITES.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        stop.store(true, Ordering::Release);
        writing.join().expect("the writer panicked");
        for reader in reading {
            tally.corrupt.extend(reader.join().expect("a reader panicked"));
        }
        let history = recorder.ops.lock().clone();
        match node::linearizable::check(&history) {
            Ok(checked) => tally.linearizable_ops += checked.reads + checked.writes,
            Err(violation) => tally
                .not_linearizable
                .push(format!("trial {trial} (faults {injected:?}): {violation}")),
        }
        tally.faults += injected.len();
        wait_converged(&cluster, &volume);
        metadata_agrees(&cluster, &volume);
        let book = book.lock().clone();
        let mut reader = Reader::new(&endpoints, &volume);
        let served = check(trial, &mut reader, &book, &mut tally);
        drop(reader);
        // Serve the volume from each other replica in turn: each must hold the same bytes.
        let coordinator = coordinator_index(&cluster, &volume);
        let others: Vec<usize> = (1..cluster.nodes.len())
            .map(|step| (coordinator + step) % cluster.nodes.len())
            .collect();
        for &other in &others {
            // A takeover drops the old coordinator from the in-sync set until
            // it is resynced: the next takeover waits for that.
            wait_converged(&cluster, &volume);
            cluster.nodes[other].cli_ok(&["volume", "attach", &volume, "--force"]);
            let mut reader = Reader::new(&endpoints, &volume);
            for (lba, data) in &served {
                let again = reader.block(*lba);
                if &again == data {
                    continue;
                }
                let history = book[lba];
                let valid = match identify(trial, *lba, &again) {
                    Found::Version(version) => version >= history.acked && version <= history.sent,
                    Found::Zeroes => history.acked == 0,
                    Found::Garbage => false,
                };
                let line = format!(
                    "trial {trial} block {lba}: node {other} serves {:?}, node {coordinator} served {:?} (acknowledged {}, sent {})",
                    identify(trial, *lba, &again),
                    identify(trial, *lba, data),
                    history.acked,
                    history.sent
                );
                if valid {
                    // Both copies hold writes the client sent (the newer one never
                    // acknowledged), but the compare after the fault should have
                    // made the replicas agree.
                    tally.diverged.push(line);
                } else {
                    tally.corrupt.push(line);
                }
            }
        }
        let last = *others.last().expect("three nodes");
        let acked = book.values().filter(|history| history.acked > 0).count();
        println!(
            "trial {trial}: faults {injected:?}, {acked} blocks acknowledged, {} writes sent",
            book.values().map(|h| h.sent).sum::<u64>()
        );
        // The readers just closed their connections; the node may not have seen it yet.
        wait_until(&format!("{volume} deleted"), || {
            cluster.nodes[last].cli(&["volume", "delete", &volume]).status.success()
        });
    }
    println!(
        "trials: {trials}, faults: {}, acked writes checked: {}, lost: {}, corrupt: {}",
        tally.faults,
        tally.checked,
        tally.lost.len(),
        tally.corrupt.len()
    );
    println!(
        "replicas that disagree after the compare: {} block(s){}",
        tally.diverged.len(),
        if tally.diverged.is_empty() {
            String::new()
        } else {
            format!(":\n  {}", tally.diverged.join("\n  "))
        }
    );
    println!(
        "linearizability: {} operations of one writer and {READERS} readers checked, {} violation(s){}",
        tally.linearizable_ops,
        tally.not_linearizable.len(),
        if tally.not_linearizable.is_empty() {
            String::new()
        } else {
            format!(":\n{}", tally.not_linearizable.join("\n"))
        }
    );
    assert!(
        tally.lost.is_empty()
            && tally.corrupt.is_empty()
            && tally.diverged.is_empty()
            && tally.not_linearizable.is_empty(),
        "seed {seed}: lost {:#?}\ncorrupt {:#?}\ndiverged {:#?}\nnot linearizable {:#?}",
        tally.lost,
        tally.corrupt,
        tally.diverged,
        tally.not_linearizable
    );
}

/// A node to create volumes through (any running one).
fn coordinator_free_node(cluster: &TestCluster) -> usize {
    cluster
        .nodes
        .iter()
        .position(common::node::TestNode::is_running)
        .expect("a running node")
}
