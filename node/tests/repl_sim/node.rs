//! One simulated node: its disk (real Store), its replica of the volume
//! (epoch, fence floor, serving flag, epoch gate, range lock, sequence),
//! its dirty log and, while it coordinates, the replication state. The
//! control flow mirrors the real code step by step: `apply`/`raise_epoch`
//! (replica side, with the real `admit_mutation`/`admit_fence`),
//! `Volume::mutate` (with `prepare`), `VolumeReplication::replicate`,
//! `mark_dirty`, `fence_out`, `fence`, `set_targets`, `promote`, `drain`,
//! `stop_catching_up`, the reconciler's `wire_serving`/`fence_and_serve`,
//! and `resync` (catch up, drain, copy under the range lock, reading from
//! the coordinator and, with `multi_source_resync`, the other in-sync
//! replicas (`replication::read`), `ReplicaIn` at the epoch seen, promote).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use ::node::cluster::state::{ClusterState, Command, Outcome};
use ::node::replication::dirty::Identity;
use ::node::replication::resync::{
    cut_pieces, piece_pause, run_worker, Copied, PieceCopier, Sent, RESYNC_BYTES_PER_S_MAX,
};
use ::node::replication::wire::{self, OpKind, ReplicaOp};
use ::node::replication::{admit_fence, admit_mutation, Refusal, DIRTY_REGION_BLOCKS};
use tokio::sync::{Notify, RwLock};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::dirty::DirtyLog;
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

/// The dirty regions of one out-of-sync replica (`replication::Tracking`).
struct Tracking {
    identity: Identity,
    /// Region -> the dirty log generation it is durable at.
    regions: BTreeMap<u64, u64>,
}

/// `VolumeReplication` (in memory, lost on restart; its dirty map is
/// loaded from the node's `DirtyLog` when it is made).
pub struct Repl {
    pub targets: RefCell<Vec<u64>>,
    pub catching_up: RefCell<Vec<u64>>,
    /// Catching-up replicas whose `ReplicaIn` is proposed: a failure there
    /// drops them through Raft before the mutation is acknowledged.
    pub joining: RefCell<BTreeSet<u64>>,
    /// Held shared by every `replicate`; a resync takes it exclusively once.
    in_flight: RwLock<()>,
    dirty: RefCell<BTreeMap<u64, Tracking>>,
    log: Rc<DirtyLog>,
    fencing: tokio::sync::Mutex<()>,
    /// (Proposed fix only: the epoch of the Raft change that last moved
    /// the targets here, `ReplicaIn` or `ReplicaOut`; the reconciler does
    /// not apply targets from an older state.)
    targets_epoch: Cell<u64>,
    /// (`fix_fence_out_missed`) Targets that failed a mutation and are
    /// not out through Raft yet: `fence` drops them before serving.
    missed: RefCell<BTreeSet<u64>>,
    /// Whether the reconciler set targets on this replication yet.
    installed: Cell<bool>,
}

impl Repl {
    /// `VolumeReplication::new`: the tracking this node's log holds.
    fn new(log: Rc<DirtyLog>) -> Self {
        let dirty = log
            .load()
            .into_iter()
            .map(|(node, identity, regions)| {
                let regions = regions.into_iter().map(|region| (region, 0)).collect();
                (node, Tracking { identity, regions })
            })
            .collect();
        Self {
            targets: RefCell::new(Vec::new()),
            catching_up: RefCell::new(Vec::new()),
            joining: RefCell::new(BTreeSet::new()),
            in_flight: RwLock::new(()),
            dirty: RefCell::new(dirty),
            log,
            fencing: tokio::sync::Mutex::new(()),
            targets_epoch: Cell::new(0),
            missed: RefCell::new(BTreeSet::new()),
            installed: Cell::new(false),
        }
    }

    /// Whether a target missed a mutation and is not out through Raft yet.
    pub fn has_missed(&self) -> bool {
        !self.missed.borrow().is_empty()
    }

    /// `note_missed_at_start` (`fix_fence_out_missed`): made anew (after a
    /// restart), a target the log tracks in this very tenure and
    /// incarnation missed a write whose removal did not commit.
    fn note_missed_at_start(&self, targets: &[u64], identity_of: impl Fn(u64) -> Identity) {
        if self.installed.replace(true) {
            return;
        }
        let dirty = self.dirty.borrow();
        for node in targets {
            if dirty
                .get(node)
                .is_some_and(|tracking| tracking.identity == identity_of(*node))
            {
                self.missed.borrow_mut().insert(*node);
            }
        }
    }

    pub fn is_catching_up(&self, node: u64) -> bool {
        self.catching_up.borrow().contains(&node)
    }

    fn is_joining(&self, node: u64) -> bool {
        self.joining.borrow().contains(&node)
    }

    /// `forget_all`: this node no longer coordinates the volume.
    fn forget_all(&self) {
        self.dirty.borrow_mut().clear();
        self.log.forget(None);
    }

    /// `set_targets`: a node that joined them stops catching up; its
    /// tracking goes (unless it missed a write since: `missed`).
    fn set_targets(&self, targets: Vec<u64>) {
        self.catching_up.borrow_mut().retain(|id| !targets.contains(id));
        self.joining.borrow_mut().retain(|id| !targets.contains(id));
        let missed = self.missed.borrow().clone();
        self.dirty.borrow_mut().retain(|id, _| {
            let in_sync = targets.contains(id) && !missed.contains(id);
            if in_sync {
                self.log.forget(Some(*id));
            }
            !in_sync
        });
        *self.targets.borrow_mut() = targets;
    }

    fn start_catching_up(&self, node: u64) {
        let mut catching_up = self.catching_up.borrow_mut();
        if !catching_up.contains(&node) {
            catching_up.push(node);
        }
    }

    /// `drain`: waits for every `replicate` already running.
    async fn drain(&self) {
        drop(self.in_flight.write().await);
    }

    /// `promote`: Raft took `node` back; it is a target at once.
    fn promote(&self, node: u64) {
        let mut catching_up = self.catching_up.borrow_mut();
        let Some(index) = catching_up.iter().position(|id| *id == node) else {
            return;
        };
        catching_up.remove(index);
        self.joining.borrow_mut().remove(&node);
        if self.dirty.borrow_mut().remove(&node).is_some() {
            self.log.forget(Some(node));
        }
        let mut targets = self.targets.borrow_mut();
        if !targets.contains(&node) {
            targets.push(node);
        }
    }

    /// `dirty_regions`: the tracked regions of `node` if tracked for this
    /// identity; stale tracking is dropped (a full copy follows).
    fn dirty_regions(&self, node: u64, identity: Identity) -> Option<Vec<u64>> {
        let mut dirty = self.dirty.borrow_mut();
        let tracking = dirty.get(&node)?;
        if tracking.identity != identity {
            dirty.remove(&node);
            self.log.forget(Some(node));
            return None;
        }
        Some(tracking.regions.keys().copied().collect())
    }
}

pub struct Node {
    pub up: bool,
    pub paused_until: Option<Instant>,
    pub tasks: Vec<AbortHandle>,
    pub disk: Disk,
    // The local replica (memory: lost on a crash).
    pub epoch: u64,
    /// `Volume::fence_floor` in memory (raised by fences and `follow_tenure`).
    pub fence_floor: u64,
    pub served: bool,
    /// `Volume::serving_epoch`: the epoch at which it last started serving.
    pub serving_epoch: u64,
    pub sequence: u64,
    pub gate: Rc<RwLock<()>>,
    pub ranges: Rc<RangeLock>,
    pub repl: Option<Rc<Repl>>,
    pub resyncing: BTreeSet<u64>,
    /// `Scrubs::compared_epoch` (memory): the epoch the last compare started at.
    pub compared_epoch: Option<u64>,
    /// A compare runs (`Scrubs::begin`).
    pub comparing: bool,
    pub reconcile_wake: Rc<Notify>,
    /// Client requests in flight (`IoStats::in_flight`; per incarnation).
    pub client_in_flight: Rc<Cell<u64>>,
    // Survives a crash: the metadata record's fence floor, the Raft state
    // this node last applied, and the durable dirty log.
    pub fence_floor_durable: u64,
    pub known: ClusterState,
    pub dirty_log: Rc<DirtyLog>,
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
            // The metadata record `create_replica` wrote: the creation's
            // epoch, and its coordinator_since as the fence floor.
            epoch: 1,
            fence_floor: 1,
            served: false,
            serving_epoch: 0,
            sequence: 1,
            gate: Rc::new(RwLock::new(())),
            ranges: Rc::new(RangeLock::default()),
            repl: None,
            resyncing: BTreeSet::new(),
            compared_epoch: None,
            comparing: false,
            reconcile_wake: Rc::new(Notify::new()),
            client_in_flight: Rc::new(Cell::new(0)),
            fence_floor_durable: 1,
            known: ClusterState::default(),
            dirty_log: Rc::new(DirtyLog::default()),
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
    // A restarted volume starts at its metadata record's epoch (creation's)
    // and fence floor (the highest fence it took).
    node.epoch = 1;
    node.fence_floor = node.fence_floor_durable;
    node.dirty_log.crash();
    node.served = false;
    node.serving_epoch = 0;
    node.sequence = node.disk.store.volume_epoch(VOLUME_ID).1 + 1;
    node.gate = Rc::new(RwLock::new(()));
    node.ranges = Rc::new(RangeLock::default());
    node.repl = None;
    node.resyncing.clear();
    node.compared_epoch = None;
    node.comparing = false;
    node.reconcile_wake = Rc::new(Notify::new());
    node.client_in_flight = Rc::new(Cell::new(0));
    sim.counters.borrow_mut().crashes += 1;
}

/// Starts node `id`'s processes (after creation or a crash).
pub fn start(sim: &Rc<Sim>, id: u64) {
    sim.node(id).up = true;
    spawn_on(sim, id, disk::driver(Rc::clone(sim), id));
    spawn_on(sim, id, super::dirty::writer(Rc::clone(sim), id));
    spawn_on(sim, id, reconcile_loop(Rc::clone(sim), id));
}

/// A peer request arriving at node `id`.
pub async fn handle(sim: &Rc<Sim>, id: u64, kind: Kind, payload: &[u8]) -> Result<Vec<u8>, String> {
    match kind {
        Kind::Write => apply(sim, id, payload).await.map(|()| Vec::new()),
        Kind::Fence => raise_epoch(sim, id, payload).await.map(|()| Vec::new()),
        Kind::Read => read_for_repair(sim, id, payload).await,
    }
}

/// `replication::read`: this replica's stored blocks (no gate, like the code).
async fn read_for_repair(sim: &Rc<Sim>, id: u64, payload: &[u8]) -> Result<Vec<u8>, String> {
    let (_, lba, count) = wire::decode_read(payload).map_err(|error| error.to_string())?;
    if lba + count > sim.config.volume_blocks {
        return Err("out of range".into());
    }
    let reply = disk::call(sim, id, Request::Read { lba, count }).await?;
    Ok(disk::reply_bytes(&reply))
}

/// `replication::apply`: epoch check and write under the shared epoch gate.
async fn apply(sim: &Rc<Sim>, id: u64, payload: &[u8]) -> Result<(), String> {
    let op = wire::decode(payload.to_vec()).map_err(|error| error.to_string())?;
    let gate = Rc::clone(&sim.node(id).gate);
    let _admitted = gate.read().await;
    let (floor, served, confirmed) = {
        let node = sim.node(id);
        // `tenure`: the coordinator_since of the Raft state this node applied.
        let tenure = node.known.volumes.get(VOLUME).map_or(0, |v| v.coordinator_since);
        (node.fence_floor.max(tenure), node.served, node.fence_confirmed)
    };
    if let Err(refusal) = admit_mutation(op.epoch, floor, served) {
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
        // The simulated coordinator never takes snapshots.
        OpKind::Snapshot { .. } | OpKind::Restore { .. } => return Err("snapshots are not simulated".into()),
    };
    let request = match op.kind {
        OpKind::Write(data) => Request::Write {
            lba: op.lba,
            data: data.to_vec(),
            epoch: op.epoch,
            sequence: op.volume_sequence,
        },
        OpKind::Zero => Request::Zero {
            lba: op.lba,
            count: op.block_count,
            epoch: op.epoch,
            sequence: op.volume_sequence,
        },
        OpKind::Snapshot { .. } | OpKind::Restore { .. } => unreachable!("refused above"),
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
    // `Volumes::fence`: the floor durably (metadata record), then in memory.
    node.fence_floor_durable = node.fence_floor_durable.max(epoch);
    node.fence_floor = node.fence_floor.max(epoch);
    node.epoch = node.epoch.max(epoch);
    node.fence_confirmed = node.fence_confirmed.max(epoch);
    Ok(())
}

/// `VolumeReplication::identity_now`: from the Raft state this node applied.
fn identity_now(sim: &Rc<Sim>, id: u64, replica: u64) -> Identity {
    identity_in(&sim.node(id).known, replica)
}

/// The identity tracking of `replica` starts in, as `known` says.
fn identity_in(known: &ClusterState, replica: u64) -> Identity {
    known
        .volumes
        .get(VOLUME)
        .map_or_else(Identity::default, |volume| Identity {
            coordinator_since: volume.coordinator_since,
            replica_added: volume.replica_added.get(&replica).copied().unwrap_or(0),
        })
}

/// `VolumeReplication::mark_dirty`: marks the regions for every tracked
/// replica that is not a target (and for `also`, tracking it from now);
/// returns the dirty log generation to wait for (0: nothing).
fn mark_dirty(sim: &Rc<Sim>, id: u64, repl: &Repl, lba: u64, count: u64, also: Option<u64>) -> u64 {
    let identity = also.map(|replica| identity_now(sim, id, replica));
    let mut dirty = repl.dirty.borrow_mut();
    let mut fresh_tracking = None;
    if let (Some(replica), Some(identity)) = (also, identity) {
        if let std::collections::btree_map::Entry::Vacant(entry) = dirty.entry(replica) {
            entry.insert(Tracking {
                identity,
                regions: BTreeMap::new(),
            });
            fresh_tracking = Some(replica);
        }
    }
    if dirty.is_empty() {
        return 0;
    }
    let targets = repl.targets.borrow();
    let (first, end) = (lba / DIRTY_REGION_BLOCKS, (lba + count).div_ceil(DIRTY_REGION_BLOCKS));
    let mut wait = 0;
    for (replica, tracking) in dirty.iter_mut() {
        if Some(*replica) != also && targets.contains(replica) {
            continue;
        }
        let fresh: Vec<u64> = (first..end)
            .filter(|region| match tracking.regions.get(region) {
                Some(generation) => {
                    wait = wait.max(*generation);
                    false
                }
                None => true,
            })
            .collect();
        let generation = if fresh_tracking == Some(*replica) {
            repl.log.track(*replica, tracking.identity, fresh.clone())
        } else if fresh.is_empty() {
            continue;
        } else {
            repl.log.add(*replica, fresh.clone())
        };
        tracking
            .regions
            .extend(fresh.into_iter().map(|region| (region, generation)));
        wait = wait.max(generation);
    }
    wait
}

/// `VolumeReplication::mark_dirty_durably`.
async fn mark_dirty_durably(sim: &Rc<Sim>, id: u64, repl: &Repl, lba: u64, count: u64, also: Option<u64>) {
    match mark_dirty(sim, id, repl, lba, count, also) {
        0 => {}
        generation => repl.log.durable(generation).await,
    }
}

/// `VolumeReplication::replicate`.
/// Ok with the replicas that confirmed the mutation (in sync or catching up).
async fn replicate(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, op: &ReplicaOp) -> Result<BTreeSet<u64>, String> {
    let _in_flight = repl.in_flight.read().await;
    let targets = repl.targets.borrow().clone();
    let catching_up = repl.catching_up.borrow().clone();
    send_and_settle(sim, id, repl, op, &targets, &catching_up).await
}

/// The body of `replicate` after its snapshot of the targets and the
/// catching-up replicas: send to all, then settle the failures.
async fn send_and_settle(
    sim: &Rc<Sim>,
    id: u64,
    repl: &Rc<Repl>,
    op: &ReplicaOp,
    targets: &[u64],
    catching_up: &[u64],
) -> Result<BTreeSet<u64>, String> {
    let payload = wire::encode(op);
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
        match result {
            Ok(_) => {
                confirmed.insert(node);
            }
            // (Proposed fix: a replica promoted meanwhile counts too.)
            Err(error)
                if repl.is_joining(node)
                    || (sim.config.fix_promoted_catch_up_failure && repl.targets.borrow().contains(&node)) =>
            {
                sim.log(format!(
                    "node {id}: joining replica {node} failed ({error}); out through Raft before the ack"
                ));
                note_missed(sim, repl, node);
                mark_dirty_durably(sim, id, repl, op.lba, op.block_count, Some(node)).await;
                fence_out(sim, id, repl, node, &error).await?;
            }
            Err(error) => {
                sim.log(format!(
                    "node {id}: replica {node} failed during resync ({error}); resync stops"
                ));
                repl.catching_up.borrow_mut().retain(|other| *other != node);
            }
        }
    }
    for (node, result) in results {
        match result {
            Ok(_) => {
                confirmed.insert(node);
            }
            Err(reason) => {
                note_missed(sim, repl, node);
                mark_dirty_durably(sim, id, repl, op.lba, op.block_count, Some(node)).await;
                fence_out(sim, id, repl, node, &reason).await?;
            }
        }
    }
    Ok(confirmed)
}

/// (`fix_fence_out_missed`) `node` failed a mutation: until its removal
/// commits, the volume is not served again.
fn note_missed(sim: &Rc<Sim>, repl: &Repl, node: u64) {
    if sim.config.fix_fence_out_missed {
        repl.missed.borrow_mut().insert(node);
    }
}

/// `VolumeReplication::fence_out`: drops `node` from the in-sync set through Raft.
async fn fence_out(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, node: u64, reason: &str) -> Result<(), String> {
    let _one_at_a_time = repl.fencing.lock().await;
    if !repl.targets.borrow().contains(&node) && !repl.is_joining(node) {
        repl.missed.borrow_mut().remove(&node);
        return Ok(());
    }
    sim.log(format!("node {id}: replica {node} failed ({reason}); ReplicaOut"));
    let command = Command::ReplicaOut {
        name: VOLUME.into(),
        node,
        by: id,
    };
    match raft::change(sim, id, command).await {
        Ok(outcome) => {
            repl.targets_epoch
                .set(repl.targets_epoch.get().max(outcome_epoch(&outcome)));
            repl.targets.borrow_mut().retain(|target| *target != node);
            repl.catching_up.borrow_mut().retain(|other| *other != node);
            repl.joining.borrow_mut().remove(&node);
            repl.missed.borrow_mut().remove(&node);
            sim.counters.borrow_mut().replica_outs += 1;
            Ok(())
        }
        Err(error) => Err(format!(
            "replica {node} failed ({reason}) and could not be removed from the in-sync set: {error}"
        )),
    }
}

fn outcome_epoch(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Volume(volume) => volume.epoch,
        _ => 0,
    }
}

/// `VolumeReplication::stop_catching_up`: a joining node goes out through Raft first.
async fn stop_catching_up(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, node: u64, reason: &str) -> Result<(), String> {
    if repl.is_joining(node) {
        fence_out(sim, id, repl, node, reason).await?;
    }
    repl.catching_up.borrow_mut().retain(|other| *other != node);
    Ok(())
}

/// `VolumeReplication::fence`: raises every in-sync replica's epoch.
async fn fence(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, epoch: u64) -> Result<(), String> {
    // Replicas that missed a mutation go out through Raft first.
    let missed: Vec<u64> = repl.missed.borrow().iter().copied().collect();
    for node in missed {
        fence_out(
            sim,
            id,
            repl,
            node,
            "it missed a mutation while its removal could not commit",
        )
        .await?;
    }
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
    let (epoch, sequence, repl, tenure) = {
        let mut node = sim.node(id);
        let sequence = node.sequence;
        node.sequence += 1;
        (node.epoch, sequence, node.repl.clone(), node.serving_epoch)
    };
    let (request, kind) = match data {
        Some(data) => (
            Request::Write {
                lba,
                data: data.clone(),
                epoch,
                sequence,
            },
            OpKind::Write(data.into()),
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
        // No replication: this node stopped coordinating (the reconciler
        // stops serving before it drops the replicator).
        if !sim.node(id).served {
            return Err(format!("node {id} no longer coordinates the volume"));
        }
        return disk::call(sim, id, request).await.map(|_| BTreeSet::new());
    };
    let (local, remote) = if sim.config.fix_prepare_snapshot {
        // (Proposed fix: `prepare` holds the in-flight guard, marks and
        // takes the snapshot `replicate` sends to at one instant.)
        let _in_flight = repl.in_flight.read().await;
        let generation = mark_dirty(sim, id, &repl, lba, count, None);
        let targets = repl.targets.borrow().clone();
        let catching_up = repl.catching_up.borrow().clone();
        if generation > 0 {
            repl.log.durable(generation).await;
        }
        futures::future::join(
            disk::call(sim, id, request),
            send_and_settle(sim, id, &repl, &op, &targets, &catching_up),
        )
        .await
    } else {
        // `Replicator::prepare`: new dirty regions durable before the mutation goes anywhere.
        mark_dirty_durably(sim, id, &repl, lba, count, None).await;
        futures::future::join(disk::call(sim, id, request), replicate(sim, id, &repl, &op)).await
    };
    if sim.config.fix_stop_serving && local.is_ok() && remote.is_err() {
        // `stop_serving_after_a_failed_write`, before the range lock goes.
        let mut node = sim.node(id);
        if node.served {
            node.served = false;
            drop(node);
            sim.log(format!(
                "node {id}: a write reached this copy but not every replica; not serving"
            ));
        }
    }
    local?;
    let confirmed = remote?;
    // `Volume::mutate`: deposed and serving again since the write was made,
    // its copy here may have been replaced meanwhile: not acknowledged.
    if sim.config.fix_tenure_ack && sim.node(id).serving_epoch != tenure {
        return Err(format!(
            "node {id} served the volume anew while the write was in flight"
        ));
    }
    check_acknowledgement(sim, id, epoch, lba, count, &confirmed);
    Ok(confirmed)
}

/// At the moment a write is acknowledged, the replicas that matter must
/// have it: all in sync (per Raft) when this node still coordinates, else
/// the new coordinator, or every replica in sync when the write's epoch
/// ended (a coordinator paused after its replicas confirmed a write
/// acknowledges it late, after failovers: every later in-sync copy
/// descends from those replicas).
fn check_acknowledgement(sim: &Rc<Sim>, id: u64, epoch: u64, lba: u64, count: u64, confirmed: &BTreeSet<u64>) {
    let Some(volume) = sim.raft.borrow().state.volumes.get(VOLUME).cloned() else {
        return;
    };
    let carried = sim
        .raft
        .borrow()
        .in_sync_at_end_of_epoch
        .get(&epoch)
        .is_some_and(|in_sync| in_sync.iter().all(|node| *node == id || confirmed.contains(node)));
    let missing: Vec<u64> = if volume.coordinator == id {
        volume
            .in_sync
            .iter()
            .copied()
            .filter(|other| *other != id && !confirmed.contains(other))
            .collect()
    } else if confirmed.contains(&volume.coordinator) || (volume.epoch > epoch && carried) {
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
    let _counted = InFlight::new(&sim.node(id).client_in_flight);
    match op {
        ClientOp::Write { lba, data } => {
            let count = data.len() as u64 / disk::BLOCK_BYTES as u64;
            mutate(sim, id, lba, count, Some(data)).await.map(|_| Vec::new())
        }
        ClientOp::Zero { lba, count } => mutate(sim, id, lba, count, None).await.map(|_| Vec::new()),
        ClientOp::Read { lba, count } => {
            // `Volume::read_leased` on a replicated volume: under the range
            // lock (shared there; exclusive here), so no write that is not
            // durable everywhere yet is seen, and served only if still
            // serving after the read.
            let ranges = Rc::clone(&sim.node(id).ranges);
            let _held = ranges.lock(lba, count).await;
            let reply = disk::call(sim, id, Request::Read { lba, count }).await?;
            if !sim.node(id).served {
                return Err(format!("node {id} stopped serving the volume during the read"));
            }
            Ok(disk::reply_bytes(&reply))
        }
        ClientOp::Flush => disk::call(sim, id, Request::Flush).await.map(|_| Vec::new()),
    }
}

/// Counts a client request for as long as it lives.
struct InFlight(Rc<Cell<u64>>);

impl InFlight {
    fn new(count: &Rc<Cell<u64>>) -> Self {
        count.set(count.get() + 1);
        Self(Rc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
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
        start_compare_needed(&sim, id);
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
    // `follow_tenure` (in memory).
    node.fence_floor = node.fence_floor.max(volume.coordinator_since);
    if volume.coordinator != id {
        node.served = false;
        // `drop_replication`: its tracking goes (another coordinator took over).
        match node.repl.take() {
            Some(repl) => repl.forget_all(),
            None => node.dirty_log.forget(None),
        }
        return None;
    }
    if volume.replica_nodes.len() > 1 {
        let log = Rc::clone(&node.dirty_log);
        let repl = Rc::clone(node.repl.get_or_insert_with(|| Rc::new(Repl::new(log))));
        let mut targets: Vec<u64> = volume.in_sync.iter().copied().filter(|other| *other != id).collect();
        targets.sort_unstable();
        let mut current = repl.targets.borrow().clone();
        current.sort_unstable();
        let stale = sim.config.fix_stale_demotion && volume.epoch < repl.targets_epoch.get();
        if sim.config.fix_fence_out_missed && !stale {
            repl.note_missed_at_start(&targets, |replica| identity_in(&node.known, replica));
        }
        if current != targets && !stale {
            repl.set_targets(targets);
        }
    } else {
        node.repl = None;
    }
    let missed = node.repl.as_ref().is_some_and(|repl| repl.has_missed());
    if node.served || (!missed && (volume.replica_nodes.len() == 1 || volume.epoch <= 1)) {
        if !node.served {
            node.serving_epoch = node.epoch;
            let epoch = node.epoch;
            drop(node);
            sim.log(format!("node {id}: serving at epoch {epoch} (nothing to fence)"));
            sim.node(id).served = true;
            return None;
        }
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
            let mut node = sim.node(id);
            if !node.served {
                // `Volumes::set_served`.
                node.serving_epoch = node.epoch;
            }
            node.served = true;
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
        let identity = Identity {
            coordinator_since: volume.coordinator_since,
            replica_added: volume.replica_added.get(&replica).copied().unwrap_or(0),
        };
        let (task_sim, repl) = (Rc::clone(sim), Rc::clone(&repl));
        spawn_on(sim, id, async move {
            let sim = task_sim;
            sim.log(format!("node {id}: resync of replica {replica} starts"));
            match resync(&sim, id, &repl, replica, identity).await {
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
                    if let Err(stuck) = stop_catching_up(&sim, id, &repl, replica, &error).await {
                        sim.log(format!(
                            "node {id}: replica {replica} may be in sync and cannot be dropped ({stuck}); it keeps getting every write"
                        ));
                    }
                    sim.counters.borrow_mut().resyncs_failed += 1;
                    sim.log(format!("node {id}: resync of replica {replica} failed: {error}"));
                }
            }
            sim.node(id).resyncing.remove(&replica);
        });
    }
}

/// `resync::resync`: catch up, drain, copy (dirty regions or all), then
/// `ReplicaIn` at the epoch seen. Ok(true) when it was incremental.
async fn resync(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>, replica: u64, identity: Identity) -> Result<bool, String> {
    // (Proposed fix: copies carry the epoch this resync started in, so a
    // coordinator deposed meanwhile cannot stamp them with a newer one.)
    let started_epoch = sim.config.fix_resync_epoch.then(|| sim.node(id).epoch);
    repl.start_catching_up(replica);
    repl.drain().await;
    let size_blocks = sim.config.volume_blocks;
    let dirty = repl.dirty_regions(replica, identity);
    let incremental = dirty.is_some();
    let spans: Vec<(u64, u64)> = match dirty {
        Some(regions) => merge_regions(&regions, size_blocks),
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
    // `resync::sources`: this node, then the other in-sync replicas.
    let mut sources = vec![None];
    if sim.config.multi_source_resync {
        sources.extend(
            repl.targets
                .borrow()
                .iter()
                .filter(|node| **node != replica)
                .map(|node| Some(*node)),
        );
    }
    let bytes_per_s = RESYNC_BYTES_PER_S_MAX * sources.len() as u64;
    let started = Instant::now();
    let queue = RefCell::new(spans.into_iter());
    let copied_bytes = Cell::new(0);
    let source_count = sources.len();
    // The real schedule (`resync::run_worker`), one worker per source.
    let workers = sources.iter().map(|source| {
        let worker = SimWorker {
            sim,
            id,
            replica,
            repl,
            reader: *source,
            reader_failed: Cell::new(false),
            epoch: started_epoch,
            queue: &queue,
            copied_bytes: &copied_bytes,
            started,
            bytes_per_s,
            sources: source_count,
        };
        async move { run_worker(&worker, worker.reader.is_some()).await }
    });
    futures::future::try_join_all(workers).await?;
    repl.joining.borrow_mut().insert(replica);
    if !repl.is_catching_up(replica) {
        return Err("the replica failed a live write during the resync".into());
    }
    let expect_epoch = sim.node(id).known.volumes.get(VOLUME).map(|v| v.epoch);
    let command = Command::ReplicaIn {
        name: VOLUME.into(),
        node: replica,
        by: id,
        expect_epoch,
    };
    let outcome = match raft::change(sim, id, command).await {
        Ok(outcome) => outcome,
        Err(error) => {
            if error.contains("while node") {
                sim.counters.borrow_mut().replica_ins_refused += 1;
            }
            return Err(error);
        }
    };
    repl.targets_epoch
        .set(repl.targets_epoch.get().max(outcome_epoch(&outcome)));
    repl.promote(replica);
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

/// The real `resync::cut_pieces` over this node's allocation of `count` blocks from
/// `lba`: `(first block, blocks, allocated)`, data cut at `CHUNK_BLOCKS`,
/// each hole whole.
fn plan_pieces(sim: &Rc<Sim>, id: u64, lba: u64, count: u64) -> Vec<(u64, u64, bool)> {
    // The store's runs are contiguous from `lba`, as the volume's allocation map is.
    let runs: Vec<(u64, bool)> = sim
        .node(id)
        .disk
        .store
        .block_status(VOLUME_ID, lba, count)
        .into_iter()
        .map(|(_, run_count, allocated)| (run_count * disk::BLOCK_BYTES as u64, allocated))
        .collect();
    cut_pieces(lba, &runs)
}

/// `resync::Worker`: one resync worker of node `id`, reading from `reader`
/// (an in-sync replica) or from this node.
struct SimWorker<'a> {
    sim: &'a Rc<Sim>,
    id: u64,
    replica: u64,
    repl: &'a Repl,
    reader: Option<u64>,
    /// Set by the first failed read from `reader`.
    reader_failed: Cell<bool>,
    epoch: Option<u64>,
    queue: &'a RefCell<std::vec::IntoIter<(u64, u64)>>,
    copied_bytes: &'a Cell<u64>,
    started: Instant,
    bytes_per_s: u64,
    sources: usize,
}

impl PieceCopier for SimWorker<'_> {
    fn next_span(&self) -> Option<(u64, u64)> {
        self.queue.borrow_mut().next()
    }

    async fn plan(&self, (lba, count): (u64, u64)) -> Result<Vec<(u64, u64, bool)>, String> {
        // `resync::plan_pieces`: planned without the lock, each piece locked on its own.
        Ok(plan_pieces(self.sim, self.id, lba, count))
    }

    async fn copy(&self, piece: (u64, u64), from_reader: bool) -> Result<Copied, String> {
        let reader = self.reader.filter(|_| from_reader);
        let (sim, id, replica) = (self.sim, self.id, self.replica);
        let data_bytes = copy_piece(sim, id, replica, piece, self.epoch, reader, &self.reader_failed).await?;
        Ok(Copied {
            sent: Sent {
                data_bytes,
                ..Sent::default()
            },
            reader_failed: self.reader_failed.get(),
        })
    }

    fn clients_busy(&self) -> bool {
        self.sim.node(self.id).client_in_flight.get() > 0
    }

    fn check(&self) -> Result<(), String> {
        if self.repl.is_catching_up(self.replica) {
            Ok(())
        } else {
            Err("the replica failed a live write during the resync".into())
        }
    }

    fn copied(&self, copied: &Copied, busy: bool) -> std::time::Duration {
        // Paced like the real resync (its rate, and yielding to busy clients).
        self.copied_bytes.set(self.copied_bytes.get() + copied.sent.data_bytes);
        let elapsed = self.started.elapsed();
        piece_pause(
            copied.sent.data_bytes,
            self.copied_bytes.get(),
            elapsed,
            self.bytes_per_s,
            self.sources,
            busy,
        )
    }
}

/// `resync::copy_piece`: one piece to `replica` under its own range lock,
/// its allocation looked at again under it; holes as zeroings, data as
/// writes, read here or from the in-sync replica `reader` until a read
/// from it fails (then `reader_failed` is set and the data read here).
/// Ok with the bytes of data sent. Each op carries `volume.epoch()` now
/// (or `epoch` when given).
async fn copy_piece(
    sim: &Rc<Sim>,
    id: u64,
    replica: u64,
    (lba, count): (u64, u64),
    epoch: Option<u64>,
    reader: Option<u64>,
    reader_failed: &Cell<bool>,
) -> Result<u64, String> {
    let ranges = Rc::clone(&sim.node(id).ranges);
    let _held = ranges.lock(lba, count).await;
    let mut copied_bytes = 0;
    for (at, blocks, allocated) in plan_pieces(sim, id, lba, count) {
        let kind = if allocated {
            copied_bytes += blocks * disk::BLOCK_BYTES as u64;
            let mut data = None;
            if let Some(source) = reader.filter(|_| !reader_failed.get()) {
                let request = wire::encode_read(VOLUME_ID, at, blocks);
                match net::call(sim, id, source, Kind::Read, request, sim.config.replica_timeout).await {
                    Ok(bytes) => {
                        sim.counters.borrow_mut().pieces_from_replicas += 1;
                        data = Some(bytes);
                    }
                    Err(error) => {
                        sim.log(format!(
                            "node {id}: resync read of {at}+{blocks} from replica {source} failed ({error}); reading here"
                        ));
                        reader_failed.set(true);
                    }
                }
            }
            let data = match data {
                Some(data) => data,
                None => disk::reply_bytes(&disk::call(sim, id, Request::Read { lba: at, count: blocks }).await?),
            };
            OpKind::Write(data.into())
        } else {
            OpKind::Zero
        };
        let (epoch, sequence) = {
            let mut node = sim.node(id);
            node.sequence += 1;
            (epoch.unwrap_or(node.epoch), node.sequence - 1)
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
    }
    Ok(copied_bytes)
}

/// Blocks compared under one hold of the range lock (the real pass takes
/// 64 MiB; the simulated volume is a few hundred blocks).
const COMPARE_REGION_BLOCKS: u64 = 32;

/// `scrub::start_needed` for the compare: once per epoch (again after a
/// restart, or after a pass that stopped), while this node serves.
fn start_compare_needed(sim: &Rc<Sim>, id: u64) {
    if !sim.config.compare_after_epoch_change {
        return;
    }
    let repl = {
        let mut node = sim.node(id);
        let Some(volume) = node.known.volumes.get(VOLUME).cloned() else {
            return;
        };
        if volume.coordinator != id || !node.served || node.serving_epoch == 0 || node.comparing {
            return;
        }
        if node.compared_epoch.is_some_and(|epoch| volume.epoch <= epoch) {
            return;
        }
        let Some(repl) = node.repl.clone() else {
            return;
        };
        node.compared_epoch = Some(volume.epoch);
        node.comparing = true;
        repl
    };
    let task_sim = Rc::clone(sim);
    spawn_on(sim, id, async move {
        let sim = task_sim;
        match compare(&sim, id, &repl).await {
            Ok(repaired) => sim.log(format!("node {id}: compare done, {repaired} blocks repaired")),
            Err(error) => {
                sim.log(format!("node {id}: compare stopped: {error}"));
                sim.node(id).compared_epoch = None;
            }
        }
        sim.node(id).comparing = false;
    });
}

/// `scrub::scrub_volume` in `Mode::Compare`: region by region under the
/// range lock, each in-sync replica's copy against this node's; every
/// block a replica holds differently gets this node's version, in runs
/// (`repair_replica`: zeroings for zeroes, writes for data, at the serving
/// epoch). The real pass compares the index's block states (hole or the
/// data's crc); the model compares the bytes. Ok with the blocks repaired.
async fn compare(sim: &Rc<Sim>, id: u64, repl: &Rc<Repl>) -> Result<u64, String> {
    let blocks = sim.config.volume_blocks;
    let timeout = sim.config.replica_timeout;
    fn block_of(image: &[u8], at: u64) -> &[u8] {
        let at = at as usize * disk::BLOCK_BYTES;
        &image[at..at + disk::BLOCK_BYTES]
    }
    let mut repaired = 0;
    let mut lba = 0;
    while lba < blocks {
        if !sim.node(id).served {
            return Err("this node stopped serving the volume".into());
        }
        let count = COMPARE_REGION_BLOCKS.min(blocks - lba);
        let ranges = Rc::clone(&sim.node(id).ranges);
        let _held = ranges.lock(lba, count).await;
        let mine = disk::reply_bytes(&disk::call(sim, id, Request::Read { lba, count }).await?);
        let targets = repl.targets.borrow().clone();
        let asks = targets.iter().map(|&node| async move {
            let request = wire::encode_read(VOLUME_ID, lba, count);
            (node, net::call(sim, id, node, Kind::Read, request, timeout).await)
        });
        for (node, answer) in futures::future::join_all(asks).await {
            let theirs = match answer {
                Ok(theirs) if theirs.len() == mine.len() => theirs,
                Ok(_) => continue,
                Err(error) => {
                    sim.log(format!("node {id}: compare: replica {node} did not answer ({error})"));
                    continue;
                }
            };
            let differs = |at: u64| block_of(&mine, at) != block_of(&theirs, at);
            let zero = |at: u64| block_of(&mine, at).iter().all(|byte| *byte == 0);
            let mut at = 0;
            while at < count {
                if !differs(at) {
                    at += 1;
                    continue;
                }
                let mut end = at + 1;
                while end < count && differs(end) && zero(end) == zero(at) {
                    end += 1;
                }
                let kind = if zero(at) {
                    OpKind::Zero
                } else {
                    let (from, to) = (at as usize * disk::BLOCK_BYTES, end as usize * disk::BLOCK_BYTES);
                    OpKind::Write(mine[from..to].to_vec().into())
                };
                let (epoch, sequence) = {
                    let mut local = sim.node(id);
                    local.sequence += 1;
                    (local.serving_epoch, local.sequence - 1)
                };
                let op = ReplicaOp {
                    volume_id: VOLUME_ID,
                    epoch,
                    lba: lba + at,
                    block_count: end - at,
                    volume_sequence: sequence,
                    kind,
                };
                match net::call(sim, id, node, Kind::Write, wire::encode(&op), timeout).await {
                    Ok(_) => {
                        repaired += end - at;
                        sim.counters.borrow_mut().compare_repaired += end - at;
                        sim.log(format!(
                            "node {id}: compare: blocks {}+{} rewritten on replica {node}",
                            lba + at,
                            end - at
                        ));
                    }
                    Err(error) => sim.log(format!(
                        "node {id}: compare: could not rewrite blocks {}+{} on replica {node} ({error})",
                        lba + at,
                        end - at
                    )),
                }
                at = end;
            }
        }
        lba += count;
    }
    Ok(repaired)
}
