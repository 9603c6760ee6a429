//! One simulated node: its disk (real Store), its replica of the volume
//! (epoch, serving flag, epoch gate, range lock, sequence), and, while it
//! coordinates, the replication state. The control flow mirrors the real
//! code step by step: `apply`/`raise_epoch` (replica side, with the real
//! `admit_mutation`/`admit_fence`), `VolumeReplication::replicate`,
//! `fence_out`, `fence`, `mark_dirty`, `Volume::mutate`, the reconciler's
//! `wire_serving`/`fence_and_serve`, and `resync` (catch up, copy under the
//! range lock, `ReplicaIn`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use ::node::cluster::state::{ClusterState, Command};
use ::node::replication::wire::{self, OpKind, ReplicaOp};
use ::node::replication::{admit_fence, admit_mutation, Refusal, DIRTY_REGION_BLOCKS};
use tokio::sync::{Notify, RwLock};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::disk::{self, Disk, Request, VOLUME_ID};
use super::net::{self, Kind};
use super::{raft, spawn_on, Sim};

pub const VOLUME: &str = "v";
/// Copies of resync.rs's private constants.
const CHUNK_BLOCKS: u64 = 256;
const WINDOW_BLOCKS: u64 = 16384;
/// The reconciler also runs this often without a change (scaled down from 5 s).
const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// A range lock like `volume::range_lock` (overlapping holders wait).
#[derive(Default)]
pub struct RangeLock {
    held: RefCell<Vec<(u64, u64, u64)>>,
    next: Cell<u64>,
    notify: Notify,
}

pub struct RangeGuard {
    lock: Rc<RangeLock>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock.held.borrow_mut().retain(|(id, _, _)| *id != self.id);
        self.lock.notify.notify_waiters();
    }
}

impl RangeLock {
    pub async fn lock(self: &Rc<Self>, lba: u64, count: u64) -> RangeGuard {
        loop {
            let notified = self.notify.notified();
            {
                let mut held = self.held.borrow_mut();
                if !held.iter().any(|(_, at, len)| lba < at + len && *at < lba + count) {
                    let id = self.next.get();
                    self.next.set(id + 1);
                    held.push((id, lba, count));
                    return RangeGuard {
                        lock: Rc::clone(self),
                        id,
                    };
                }
            }
            notified.await;
        }
    }
}

/// `VolumeReplication` (in memory, lost on restart).
#[derive(Default)]
pub struct Repl {
    pub targets: RefCell<Vec<u64>>,
    pub catching_up: RefCell<Vec<u64>>,
    /// Proposed fix only (`Config::fix_join_race`): catching-up replicas
    /// whose `ReplicaIn` may have committed; a failure there drops them
    /// through Raft before the write is acknowledged.
    pub joining: RefCell<BTreeSet<u64>>,
    fencing: tokio::sync::Mutex<()>,
}

impl Repl {
    pub fn is_catching_up(&self, node: u64) -> bool {
        self.catching_up.borrow().contains(&node)
    }
    fn stop_catching_up(&self, node: u64) {
        self.catching_up.borrow_mut().retain(|id| *id != node);
    }
}

pub struct Node {
    pub up: bool,
    pub paused_until: Option<Instant>,
    pub tasks: Vec<AbortHandle>,
    pub disk: Disk,
    // The local replica (memory: lost on a crash).
    pub epoch: u64,
    pub served: bool,
    pub sequence: u64,
    pub gate: Rc<RwLock<()>>,
    pub ranges: Rc<RangeLock>,
    pub repl: Option<Rc<Repl>>,
    pub resyncing: BTreeSet<u64>,
    pub reconcile_wake: Rc<Notify>,
    // Survives a crash: the Raft state this node last applied, and the
    // coordinator's persisted dirty-region map.
    pub known: ClusterState,
    pub dirty: BTreeMap<u64, BTreeSet<u64>>,
    // Checker bookkeeping: the highest epoch this replica confirmed to a
    // fencing coordinator; no write at a lower epoch may land afterwards.
    pub fence_confirmed: u64,
    pub crashes: u64,
}

impl Node {
    pub fn new(id: u64, disk: Disk) -> Self {
        let _ = id;
        Self {
            up: true,
            paused_until: None,
            tasks: Vec::new(),
            disk,
            epoch: 1,
            served: false,
            sequence: 1,
            gate: Rc::new(RwLock::new(())),
            ranges: Rc::new(RangeLock::default()),
            repl: None,
            resyncing: BTreeSet::new(),
            reconcile_wake: Rc::new(Notify::new()),
            known: ClusterState::default(),
            dirty: BTreeMap::new(),
            fence_confirmed: 0,
            crashes: 0,
        }
    }
}

/// Waits while node `id` is paused (SIGSTOP-like: it handles nothing).
pub async fn wait_unpaused(sim: &Rc<Sim>, id: u64) {
    loop {
        let until = sim.node(id).paused_until;
        match until {
            Some(until) if Instant::now() < until => tokio::time::sleep_until(until).await,
            _ => return,
        }
    }
}

/// Power cut: tasks die, memory is lost, the disk keeps what was durable.
pub fn crash(sim: &Rc<Sim>, id: u64) {
    let tasks = std::mem::take(&mut sim.node(id).tasks);
    for task in tasks {
        task.abort();
    }
    let mut node = sim.node(id);
    node.crashes += 1;
    let crash_number = node.crashes;
    node.disk
        .crash_and_reopen(sim.config.seed, id, sim.config.durable_writes, crash_number);
    node.up = false;
    node.paused_until = None;
    // A restarted volume starts at its metadata record's epoch (creation's).
    node.epoch = 1;
    node.served = false;
    node.sequence = node.disk.store.volume_epoch(VOLUME_ID).1 + 1;
    node.gate = Rc::new(RwLock::new(()));
    node.ranges = Rc::new(RangeLock::default());
    node.repl = None;
    node.resyncing.clear();
    node.reconcile_wake = Rc::new(Notify::new());
    sim.counters.borrow_mut().crashes += 1;
}

/// Starts node `id`'s processes (after creation or a crash).
pub fn start(sim: &Rc<Sim>, id: u64) {
    sim.node(id).up = true;
    spawn_on(sim, id, disk::driver(Rc::clone(sim), id));
    spawn_on(sim, id, reconcile_loop(Rc::clone(sim), id));
}

/// A peer request arriving at node `id`.
pub async fn handle(sim: &Rc<Sim>, id: u64, kind: Kind, payload: &[u8]) -> Result<Vec<u8>, String> {
    match kind {
        Kind::Write => apply(sim, id, payload).await.map(|()| Vec::new()),
        Kind::Fence => raise_epoch(sim, id, payload).await.map(|()| Vec::new()),
    }
}

/// `replication::apply`: epoch check and write under the shared epoch gate.
async fn apply(sim: &Rc<Sim>, id: u64, payload: &[u8]) -> Result<(), String> {
    let op = wire::decode(payload).map_err(|error| error.to_string())?;
    let gate = Rc::clone(&sim.node(id).gate);
    let _admitted = gate.read().await;
    let (known, served, confirmed) = {
        let node = sim.node(id);
        (node.epoch, node.served, node.fence_confirmed)
    };
    if let Err(refusal) = admit_mutation(op.epoch, known, served) {
        if matches!(refusal, Refusal::StaleEpoch { .. }) {
            sim.counters.borrow_mut().refused_stale += 1;
        }
        return Err(refusal.describe(VOLUME));
    }
    if op.lba + op.block_count > sim.config.volume_blocks {
        return Err("out of range".into());
    }
    let header = OpHeader {
        epoch: op.epoch,
        lba: op.lba,
        block_count: op.block_count,
        volume_sequence: op.volume_sequence,
    };
    if op.epoch < confirmed {
        fencing_violation(sim, id, &header, confirmed, "admitted");
    }
    let content = match &op.kind {
        OpKind::Write(data) => format!("w{}", u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"))),
        OpKind::Zero => "zero".into(),
    };
    let request = match op.kind {
        OpKind::Write(data) => Request::Write {
            lba: op.lba,
            data,
            epoch: op.epoch,
            sequence: op.volume_sequence,
        },
        OpKind::Zero => Request::Zero {
            lba: op.lba,
            count: op.block_count,
            epoch: op.epoch,
            sequence: op.volume_sequence,
        },
    };
    {
        let mut node = sim.node(id);
        node.sequence = node.sequence.max(op.volume_sequence + 1);
    }
    let result = disk::call(sim, id, request).await.map(|_| ());
    if sim.config.verbose {
        sim.log(format!(
            "node {id}: replica op blocks {}+{} epoch {} sequence {} ({}): {result:?}",
            header.lba, header.block_count, header.epoch, header.volume_sequence, content
        ));
    }
    let confirmed = sim.node(id).fence_confirmed;
    if result.is_ok() && header.epoch < confirmed {
        fencing_violation(sim, id, &header, confirmed, "landed");
    }
    result
}

/// The header of a replica op (for messages, after its data moved on).
#[derive(Clone, Copy)]
struct OpHeader {
    epoch: u64,
    lba: u64,
    block_count: u64,
    volume_sequence: u64,
}

fn fencing_violation(sim: &Rc<Sim>, id: u64, op: &OpHeader, confirmed: u64, what: &str) {
    sim.counters.borrow_mut().fencing_violations += 1;
    sim.fail(format!(
        "fencing: node {id} {what} a mutation at epoch {} (blocks {}+{}, sequence {}) after confirming epoch {confirmed} to a new coordinator",
        op.epoch, op.lba, op.block_count, op.volume_sequence
    ));
}

/// `replication::raise_epoch`: under the exclusive epoch gate.
async fn raise_epoch(sim: &Rc<Sim>, id: u64, payload: &[u8]) -> Result<(), String> {
    let (_volume_id, epoch, _) = wire::decode_read(payload).map_err(|error| error.to_string())?;
    let gate = Rc::clone(&sim.node(id).gate);
    let _no_mutation_in_flight = gate.write().await;
    let mut node = sim.node(id);
    admit_fence(epoch, node.epoch, node.served).map_err(|refusal| refusal.describe(VOLUME))?;
    if node.served {
        drop(node);
        sim.log(format!(
            "node {id}: fenced by a newer coordinator at epoch {epoch}; no longer serving"
        ));
        node = sim.node(id);
        node.served = false;
    }
    node.epoch = node.epoch.max(epoch);
    node.fence_confirmed = node.fence_confirmed.max(epoch);
    Ok(())
}

/// `VolumeReplication::mark_dirty` over the node's persisted map.
fn mark_dirty(sim: &Rc<Sim>, id: u64, repl: &Repl, lba: u64, count: u64, also: Option<u64>) {
    let mut node = sim.node(id);
    if let Some(replica) = also {
        node.dirty.entry(replica).or_default();
    }
    if node.dirty.is_empty() {
        return;
    }
    let targets = repl.targets.borrow();
    let (first, end) = (lba / DIRTY_REGION_BLOCKS, (lba + count).div_ceil(DIRTY_REGION_BLOCKS));
    for (replica, regions) in &mut node.dirty {
        if Some(*replica) == also || !targets.contains(replica) {
            regions.extend(first..end);
        }
    }
}

/// `VolumeReplication::replicate`.
/// Ok with the replicas that confirmed the mutation (in sync or catching up).
async fn replicate(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, op: &ReplicaOp) -> Result<BTreeSet<u64>, String> {
    mark_dirty(sim, id, repl, op.lba, op.block_count, None);
    let payload = wire::encode(op);
    let targets = repl.targets.borrow().clone();
    let catching_up = repl.catching_up.borrow().clone();
    let timeout = sim.config.replica_timeout;
    let sends = targets.iter().map(|&node| {
        let payload = payload.clone();
        async move { (node, net::call(sim, id, node, Kind::Write, payload, timeout).await) }
    });
    let catch_up_sends = catching_up.iter().map(|&node| {
        let payload = payload.clone();
        async move { (node, net::call(sim, id, node, Kind::Write, payload, timeout).await) }
    });
    let (results, catch_up_results) = futures::future::join(
        futures::future::join_all(sends),
        futures::future::join_all(catch_up_sends),
    )
    .await;
    let mut confirmed = BTreeSet::new();
    for (node, result) in catch_up_results {
        if result.is_ok() {
            confirmed.insert(node);
        }
        if let Err(error) = result {
            sim.log(format!(
                "node {id}: replica {node} failed during resync ({error}); resync stops"
            ));
            repl.stop_catching_up(node);
            // (Fix only: it may be in sync by now: its ReplicaIn committed,
            // or the reconciler already made it a target.)
            let joined = repl.joining.borrow().contains(&node) || repl.targets.borrow().contains(&node);
            if joined && sim.config.fix_join_race {
                mark_dirty(sim, id, repl, op.lba, op.block_count, Some(node));
                fence_out(sim, id, repl, node, &error).await?;
            }
        }
    }
    for (node, result) in results {
        match result {
            Ok(_) => {
                confirmed.insert(node);
            }
            Err(reason) => {
                mark_dirty(sim, id, repl, op.lba, op.block_count, Some(node));
                fence_out(sim, id, repl, node, &reason).await?;
            }
        }
    }
    Ok(confirmed)
}

/// `VolumeReplication::fence_out`: drops `node` from the in-sync set through Raft.
async fn fence_out(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, node: u64, reason: &str) -> Result<(), String> {
    let _one_at_a_time = repl.fencing.lock().await;
    if !repl.targets.borrow().contains(&node) && !repl.joining.borrow().contains(&node) {
        return Ok(());
    }
    sim.log(format!("node {id}: replica {node} failed ({reason}); ReplicaOut"));
    let command = Command::ReplicaOut {
        name: VOLUME.into(),
        node,
        by: id,
    };
    match raft::change(sim, id, command).await {
        Ok(_) => {
            repl.targets.borrow_mut().retain(|target| *target != node);
            repl.joining.borrow_mut().remove(&node);
            sim.counters.borrow_mut().replica_outs += 1;
            Ok(())
        }
        Err(error) => Err(format!(
            "replica {node} failed ({reason}) and could not be removed from the in-sync set: {error}"
        )),
    }
}

/// `VolumeReplication::fence`: raises every in-sync replica's epoch.
async fn fence(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, epoch: u64) -> Result<(), String> {
    let request = wire::encode_read(VOLUME_ID, epoch, 1);
    let targets = repl.targets.borrow().clone();
    let timeout = sim.config.replica_timeout;
    let fences = targets.iter().map(|&node| {
        let request = request.clone();
        async move { (node, net::call(sim, id, node, Kind::Fence, request, timeout).await) }
    });
    for (node, result) in futures::future::join_all(fences).await {
        if let Err(error) = result {
            fence_out(sim, id, repl, node, &format!("did not confirm the new epoch: {error}")).await?;
        }
    }
    Ok(())
}

/// `Volume::mutate`: local write and replication joined, under the range lock.
/// Ok with the replicas that confirmed it.
async fn mutate(sim: &Rc<Sim>, id: u64, lba: u64, count: u64, data: Option<Vec<u8>>) -> Result<BTreeSet<u64>, String> {
    let ranges = Rc::clone(&sim.node(id).ranges);
    let _range = ranges.lock(lba, count).await;
    let (epoch, sequence, repl) = {
        let mut node = sim.node(id);
        let sequence = node.sequence;
        node.sequence += 1;
        (node.epoch, sequence, node.repl.clone())
    };
    let (request, kind) = match data {
        Some(data) => (
            Request::Write {
                lba,
                data: data.clone(),
                epoch,
                sequence,
            },
            OpKind::Write(data),
        ),
        None => (
            Request::Zero {
                lba,
                count,
                epoch,
                sequence,
            },
            OpKind::Zero,
        ),
    };
    let op = ReplicaOp {
        volume_id: VOLUME_ID,
        epoch,
        lba,
        block_count: count,
        volume_sequence: sequence,
        kind,
    };
    let Some(repl) = repl else {
        let replicated = sim.config.replicas > 1;
        if replicated && sim.config.fix_deposed_local_ack {
            // (Fix only: a replicated volume without replication here means
            // this node stopped coordinating after the request passed the
            // serving check; the current code writes locally and acks.)
            return Err(format!("node {id} no longer coordinates the volume"));
        }
        if replicated {
            sim.log(format!(
                "node {id}: write of blocks {lba}+{count} is local only (no replication any more)"
            ));
        }
        return disk::call(sim, id, request).await.map(|_| BTreeSet::new());
    };
    let (local, remote) = futures::future::join(disk::call(sim, id, request), replicate(sim, id, &repl, &op)).await;
    local?;
    let confirmed = remote?;
    check_acknowledgement(sim, id, lba, count, &confirmed);
    Ok(confirmed)
}

/// At the moment a write is acknowledged, the replicas that matter must
/// have it: all in sync (per Raft) when this node still coordinates, else
/// at least the new coordinator.
fn check_acknowledgement(sim: &Rc<Sim>, id: u64, lba: u64, count: u64, confirmed: &BTreeSet<u64>) {
    let Some(volume) = sim.raft.borrow().state.volumes.get(VOLUME).cloned() else {
        return;
    };
    let missing: Vec<u64> = if volume.coordinator == id {
        volume
            .in_sync
            .iter()
            .copied()
            .filter(|other| *other != id && !confirmed.contains(other))
            .collect()
    } else if confirmed.contains(&volume.coordinator) {
        Vec::new()
    } else {
        vec![volume.coordinator]
    };
    if !missing.is_empty() {
        sim.counters.borrow_mut().unconfirmed_acks += 1;
        sim.fail(format!(
            "node {id} acknowledged a write of blocks {lba}+{count} that in-sync node(s) {missing:?} never confirmed (epoch {}, in sync {:?}, coordinator {})",
            volume.epoch, volume.in_sync, volume.coordinator
        ));
    }
}

/// A client (NBD) request to the node.
pub enum ClientOp {
    Write { lba: u64, data: Vec<u8> },
    Zero { lba: u64, count: u64 },
    Read { lba: u64, count: u64 },
    Flush,
}

/// Serves a client request, if this node serves the volume.
pub async fn serve(sim: &Rc<Sim>, id: u64, op: ClientOp) -> Result<Vec<u8>, String> {
    wait_unpaused(sim, id).await;
    if !sim.node(id).served {
        return Err(format!("node {id} does not serve the volume"));
    }
    match op {
        ClientOp::Write { lba, data } => {
            let count = data.len() as u64 / disk::BLOCK_BYTES as u64;
            mutate(sim, id, lba, count, Some(data)).await.map(|_| Vec::new())
        }
        ClientOp::Zero { lba, count } => mutate(sim, id, lba, count, None).await.map(|_| Vec::new()),
        ClientOp::Read { lba, count } => disk::call(sim, id, Request::Read { lba, count })
            .await
            .map(|reply| disk::reply_bytes(&reply)),
        ClientOp::Flush => disk::call(sim, id, Request::Flush).await.map(|_| Vec::new()),
    }
}

/// `reconcile_loop`: after every applied change and on a timer.
async fn reconcile_loop(sim: Rc<Sim>, id: u64) {
    loop {
        wait_unpaused(&sim, id).await;
        if sim.raft.borrow().reaches(id) {
            let state = sim.raft.borrow().state.clone();
            sim.node(id).known = state;
        }
        if let Some(epoch) = wire_serving(&sim, id) {
            fence_and_serve(&sim, id, epoch).await;
        }
        start_needed(&sim, id);
        let wake = Rc::clone(&sim.node(id).reconcile_wake);
        tokio::select! {
            biased;
            () = wake.notified() => {}
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
        }
    }
}

/// `reconcile::wire_serving` for the one volume; Some(epoch) to fence first.
fn wire_serving(sim: &Rc<Sim>, id: u64) -> Option<u64> {
    let mut node = sim.node(id);
    let volume = node.known.volumes.get(VOLUME)?.clone();
    if !volume.replica_nodes.contains(&id) {
        return None;
    }
    node.epoch = node.epoch.max(volume.epoch);
    if volume.coordinator != id {
        node.served = false;
        node.repl = None;
        node.dirty.clear();
        return None;
    }
    if volume.replica_nodes.len() > 1 {
        let repl = Rc::clone(node.repl.get_or_insert_with(|| Rc::new(Repl::default())));
        let mut targets: Vec<u64> = volume.in_sync.iter().copied().filter(|other| *other != id).collect();
        targets.sort_unstable();
        let mut current = repl.targets.borrow().clone();
        current.sort_unstable();
        if current != targets {
            // `set_targets`: a node that joined stops catching up; its dirty map goes.
            repl.catching_up.borrow_mut().retain(|other| !targets.contains(other));
            repl.joining.borrow_mut().retain(|other| !targets.contains(other));
            node.dirty.retain(|other, _| !targets.contains(other));
            *repl.targets.borrow_mut() = targets;
        }
        // A join that ended without the replica in sync is over.
        let resyncing = node.resyncing.clone();
        let over: Vec<u64> = repl
            .joining
            .borrow()
            .iter()
            .copied()
            .filter(|other| !resyncing.contains(other) && !volume.in_sync.contains(other))
            .collect();
        for other in over {
            repl.joining.borrow_mut().remove(&other);
            repl.stop_catching_up(other);
        }
    } else {
        node.repl = None;
    }
    if node.served || volume.replica_nodes.len() == 1 || volume.epoch <= 1 {
        node.served = true;
        None
    } else {
        Some(volume.epoch)
    }
}

/// `reconcile::fence_and_serve`.
async fn fence_and_serve(sim: &Rc<Sim>, id: u64, epoch: u64) {
    let Some(repl) = sim.node(id).repl.clone() else {
        return;
    };
    match fence(sim, id, &repl, epoch).await {
        Ok(()) => {
            let gate = Rc::clone(&sim.node(id).gate);
            let _drained = gate.write().await;
            sim.log(format!("node {id}: replicas fenced at epoch {epoch}; serving"));
            sim.node(id).served = true;
        }
        Err(error) => sim.log(format!(
            "node {id}: cannot fence at epoch {epoch}: {error}; not serving"
        )),
    }
}

/// What the health checker would say of `node`, seen from `from`.
fn liveness(sim: &Rc<Sim>, from: u64, node: u64) -> bool {
    let other = sim.node(node);
    other.up && other.paused_until.is_none_or(|until| Instant::now() >= until) && !sim.net.borrow().is_cut(from, node)
}

/// `resync::start_needed` for the one volume.
fn start_needed(sim: &Rc<Sim>, id: u64) {
    let (volume, repl) = {
        let node = sim.node(id);
        let Some(volume) = node.known.volumes.get(VOLUME).cloned() else {
            return;
        };
        let Some(repl) = node.repl.clone() else {
            return;
        };
        (volume, repl)
    };
    if volume.coordinator != id {
        return;
    }
    for &replica in volume
        .replica_nodes
        .iter()
        .filter(|other| !volume.in_sync.contains(other))
    {
        if !liveness(sim, id, replica) || !sim.node(id).resyncing.insert(replica) {
            continue;
        }
        let (task_sim, repl) = (Rc::clone(sim), Rc::clone(&repl));
        spawn_on(sim, id, async move {
            let sim = task_sim;
            sim.log(format!("node {id}: resync of replica {replica} starts"));
            match resync(&sim, id, &repl, replica).await {
                Ok(incremental) => {
                    let mut counters = sim.counters.borrow_mut();
                    if incremental {
                        counters.resyncs_incremental += 1;
                    } else {
                        counters.resyncs_full += 1;
                    }
                    drop(counters);
                    let mode = if incremental { "incremental" } else { "full" };
                    sim.log(format!("node {id}: resync of replica {replica} done ({mode})"));
                }
                Err(error) => {
                    // (Fix: a ReplicaIn that may have committed keeps it
                    // caught up until the reconciler knows.)
                    if !repl.joining.borrow().contains(&replica) {
                        repl.stop_catching_up(replica);
                    }
                    sim.counters.borrow_mut().resyncs_failed += 1;
                    sim.log(format!("node {id}: resync of replica {replica} failed: {error}"));
                }
            }
            sim.node(id).resyncing.remove(&replica);
        });
    }
}

/// `resync::resync`: catch up, copy (dirty regions or all), then `ReplicaIn`.
/// Ok(true) when it was incremental.
async fn resync(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, replica: u64) -> Result<bool, String> {
    {
        let mut catching_up = repl.catching_up.borrow_mut();
        if !catching_up.contains(&replica) {
            catching_up.push(replica);
        }
    }
    let size_blocks = sim.config.volume_blocks;
    if sim.config.fix_resync_drain {
        // (Fix only: mutations in flight since before catching up began
        // mark their regions dirty only when their send fails; wait for
        // them (each holds its range) before reading the dirty regions.)
        let ranges = Rc::clone(&sim.node(id).ranges);
        drop(ranges.lock(0, size_blocks).await);
    }
    let dirty = sim.node(id).dirty.get(&replica).cloned();
    let incremental = dirty.is_some();
    let spans: Vec<(u64, u64)> = match dirty {
        Some(regions) => merge_regions(&regions.into_iter().collect::<Vec<_>>(), size_blocks),
        None => (0..size_blocks.div_ceil(WINDOW_BLOCKS))
            .map(|chunk| {
                (
                    chunk * WINDOW_BLOCKS,
                    WINDOW_BLOCKS.min(size_blocks - chunk * WINDOW_BLOCKS),
                )
            })
            .collect(),
    };
    sim.log(format!("node {id}: resync of {replica}: spans {spans:?}"));
    for (lba, count) in spans {
        if !repl.is_catching_up(replica) {
            return Err("the replica failed a live write during the resync".into());
        }
        copy_span(sim, id, replica, lba, count).await?;
    }
    if !repl.is_catching_up(replica) {
        return Err("the replica failed a live write during the resync".into());
    }
    if sim.config.fix_join_race {
        repl.joining.borrow_mut().insert(replica);
    }
    let command = Command::ReplicaIn {
        expect_epoch: None,
        name: VOLUME.into(),
        node: replica,
        by: id,
    };
    raft::change(sim, id, command).await?;
    Ok(incremental)
}

/// `resync::merge_regions`.
fn merge_regions(regions: &[u64], size_blocks: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &region in regions {
        let lba = region * DIRTY_REGION_BLOCKS;
        if lba >= size_blocks {
            continue;
        }
        let count = DIRTY_REGION_BLOCKS.min(size_blocks - lba);
        match spans.last_mut() {
            Some((start, len)) if *start + *len == lba && *len + count <= CHUNK_BLOCKS => *len += count,
            _ => spans.push((lba, count)),
        }
    }
    spans
}

/// `resync::copy_span`: allocated data as writes, holes as zeroings.
async fn copy_span(sim: &Rc<Sim>, id: u64, replica: u64, lba: u64, count: u64) -> Result<(), String> {
    let ranges = Rc::clone(&sim.node(id).ranges);
    let _held = ranges.lock(lba, count).await;
    let runs = sim.node(id).disk.store.block_status(VOLUME_ID, lba, count);
    for (start, run_count, allocated) in runs {
        let run_end = start + run_count;
        let mut at = start;
        while at < run_end {
            let blocks = if allocated {
                CHUNK_BLOCKS.min(run_end - at)
            } else {
                run_end - at
            };
            let kind = if allocated {
                let reply = disk::call(sim, id, Request::Read { lba: at, count: blocks }).await?;
                OpKind::Write(disk::reply_bytes(&reply))
            } else {
                OpKind::Zero
            };
            let (epoch, sequence) = {
                let mut node = sim.node(id);
                node.sequence += 1;
                (node.epoch, node.sequence - 1)
            };
            let op = ReplicaOp {
                volume_id: VOLUME_ID,
                epoch,
                lba: at,
                block_count: blocks,
                volume_sequence: sequence,
                kind,
            };
            net::call(
                sim,
                id,
                replica,
                Kind::Write,
                wire::encode(&op),
                sim.config.replica_timeout,
            )
            .await?;
            at += blocks;
        }
    }
    Ok(())
}
