//! Synchronous replication (like DRBD protocol C): the coordinator of a
//! volume applies each mutation locally and on every other in-sync
//! replica at once, over a multiplexed peer connection, and acknowledges
//! it only when all have it durable. A replica that fails or does not
//! answer within `replica_timeout_ms` is first removed from the in-sync set
//! through Raft (an epoch bump) and only then is the write acknowledged
//! without it; if Raft cannot commit that, the write fails.
//!
//! Replicas refuse mutations carrying an epoch older than the one they
//! know, and mutations for a volume they coordinate themselves: an old
//! coordinator (partitioned, paused) cannot get writes accepted once Raft
//! named a new one and the replicas applied it.

pub mod dirty;
pub mod resync;
pub mod scrub;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;

use crate::cluster::state::Command;
use crate::cluster::Cluster;
use crate::peer::frame::FrameKind;
use crate::peer::mux::MuxLink;
use crate::volume::{Replicator, Volumes};
use dirty::{DirtyLog, Identity};
use wire::ReplicaOp;

/// Default of `replica_timeout_ms`: a replica that has not made a mutation
/// durable within this long is dropped from the in-sync set.
pub const REPLICA_TIMEOUT_DEFAULT: Duration = Duration::from_millis(5000);

/// How often (50 ms apart) a replica looks again for a volume it does not have yet.
const REPLICA_WAIT_TRIES: usize = 40;

/// The coordinator's copy of one volume's mutations to its in-sync replicas.
pub struct VolumeReplication {
    cluster: Weak<Cluster>,
    name: String,
    volume_id: u64,
    /// How long a replica may take to answer (`replica_timeout_ms`).
    pub timeout: Duration,
    targets: RwLock<Vec<(u64, Arc<MuxLink>)>>,
    /// Replicas being resynced: they get every mutation too, but a failure
    /// there only ends their resync (they are not in sync yet)...
    catching_up: RwLock<Vec<(u64, Arc<MuxLink>)>>,
    /// ...unless the resync has proposed taking them back (`ReplicaIn`):
    /// from then on Raft may list them in sync, so a failure there drops
    /// them through Raft (`ReplicaOut`) before the mutation is acknowledged.
    joining: parking_lot::Mutex<std::collections::HashSet<u64>>,
    /// Held shared by every `replicate` call; a resync takes it exclusively
    /// once (after it starts catching up, before it reads the dirty
    /// regions) so no mutation sent earlier can mark a region after that.
    in_flight: tokio::sync::RwLock<()>,
    /// Per replica that fell out of sync under this coordinator: the
    /// regions (`DIRTY_REGION_BLOCKS` each) mutated since, so its resync
    /// copies only those. Durable in `log` (see `dirty`).
    dirty: parking_lot::Mutex<HashMap<u64, Tracking>>,
    log: Arc<DirtyLog>,
    /// One removal through Raft at a time.
    fencing: tokio::sync::Mutex<()>,
    /// The epoch of the last in-sync change this node made itself (ReplicaIn
    /// or ReplicaOut committed): a reconciler pass over an older state must
    /// not undo it.
    changed_at: std::sync::atomic::AtomicU64,
    /// Time for mutations to be durable on every in-sync replica.
    round_trips: crate::metrics::OpStats,
    /// Targets that failed a mutation and are not out through Raft yet
    /// (their removal could not commit): this copy may be ahead of
    /// theirs, so the volume is served again only after `fence` dropped
    /// them (their dirty tracking is kept for their resync).
    missed: parking_lot::Mutex<std::collections::HashSet<u64>>,
    /// Whether the reconciler installed targets here yet (see `note_missed_at_start`).
    installed: std::sync::atomic::AtomicBool,
}

/// The dirty regions of one out-of-sync replica.
struct Tracking {
    /// Which coordinator tenure and which replica incarnation it describes.
    identity: Identity,
    /// Region → the dirty log generation it is durable at.
    regions: BTreeMap<u64, u64>,
}

/// Blocks per dirty-tracking region (64 KiB).
pub const DIRTY_REGION_BLOCKS: u64 = 16;

impl VolumeReplication {
    /// The replication of volume `volume_id`, with the dirty regions this
    /// node's earlier run left in `log`.
    #[must_use]
    pub fn new(cluster: Weak<Cluster>, name: String, volume_id: u64, timeout: Duration, log: Arc<DirtyLog>) -> Self {
        let dirty = match log.load(volume_id) {
            Ok(rows) => rows
                .into_iter()
                .map(|(node, identity, regions)| {
                    let regions = regions.into_iter().map(|region| (region, 0)).collect();
                    (node, Tracking { identity, regions })
                })
                .collect(),
            Err(error) => {
                tracing::warn!(volume = %name, %error, "cannot read the dirty-region map; resyncs will be full copies");
                HashMap::new()
            }
        };
        Self {
            cluster,
            name,
            volume_id,
            timeout,
            targets: RwLock::new(Vec::new()),
            catching_up: RwLock::new(Vec::new()),
            joining: parking_lot::Mutex::new(std::collections::HashSet::new()),
            in_flight: tokio::sync::RwLock::new(()),
            dirty: parking_lot::Mutex::new(dirty),
            log,
            fencing: tokio::sync::Mutex::new(()),
            changed_at: std::sync::atomic::AtomicU64::new(0),
            round_trips: crate::metrics::OpStats::default(),
            missed: parking_lot::Mutex::new(std::collections::HashSet::new()),
            installed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a target missed a mutation and is not out through Raft yet:
    /// the volume must not be served before `fence` dropped it.
    #[must_use]
    pub fn has_missed(&self) -> bool {
        !self.missed.lock().is_empty()
    }

    /// On the reconciler's first pass over this replication (made anew,
    /// as after a restart): a target the dirty log tracks for this very
    /// coordinator tenure and replica incarnation missed a mutation whose
    /// removal did not commit before this node stopped; it counts as
    /// `missed`. Tracking from another tenure is stale and goes as before.
    pub fn note_missed_at_start(&self, targets: &[u64]) {
        if self.installed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let tracked: Vec<(u64, Identity)> = {
            let dirty = self.dirty.lock();
            targets
                .iter()
                .filter_map(|node| dirty.get(node).map(|tracking| (*node, tracking.identity)))
                .collect()
        };
        for (node, identity) in tracked {
            if identity == self.identity_now(node) {
                tracing::warn!(volume = %self.name, replica = node, "this replica missed a write before the restart and is still listed in sync; it goes out of sync before the volume is served");
                self.missed.lock().insert(node);
            }
        }
    }

    /// Which tenure and incarnation tracking of `node` starts in now.
    fn identity_now(&self, node: u64) -> Identity {
        let Some(cluster) = self.cluster.upgrade() else {
            return Identity::default();
        };
        let state = cluster.state();
        state
            .volumes
            .get(&self.name)
            .map_or_else(Identity::default, |volume| Identity {
                coordinator_since: volume.coordinator_since,
                replica_added: volume.replica_added.get(&node).copied().unwrap_or(0),
            })
    }

    /// Marks `[lba, lba + count)` dirty for every tracked replica not in
    /// sync (and for `also`, starting to track it); returns the dirty log
    /// generation to wait for before the mutation may be acknowledged
    /// (0: nothing new).
    fn mark_dirty(&self, lba: u64, count: u64, also: Option<u64>) -> u64 {
        self.mark_dirty_against(lba, count, also, None)
    }

    /// `mark_dirty` for a mutation that goes to `snapshot` (None: the
    /// current targets, read under the dirty map's lock).
    fn mark_dirty_against(
        &self,
        lba: u64,
        count: u64,
        also: Option<u64>,
        snapshot: Option<&[(u64, Arc<MuxLink>)]>,
    ) -> u64 {
        let mut dirty = self.dirty.lock();
        let mut fresh_tracking = None;
        if let Some(node) = also {
            if let std::collections::hash_map::Entry::Vacant(entry) = dirty.entry(node) {
                entry.insert(Tracking {
                    identity: self.identity_now(node),
                    regions: BTreeMap::new(),
                });
                fresh_tracking = Some(node);
            }
        }
        if dirty.is_empty() {
            return 0;
        }
        let current;
        let targets = match snapshot {
            Some(targets) => targets,
            None => {
                current = self.targets.read();
                current.as_slice()
            }
        };
        let first = lba / DIRTY_REGION_BLOCKS;
        let end = (lba + count).div_ceil(DIRTY_REGION_BLOCKS);
        let mut wait = 0;
        for (node, tracking) in dirty.iter_mut() {
            if Some(*node) != also && targets.iter().any(|(id, _)| id == node) {
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
            let generation = if fresh_tracking == Some(*node) {
                self.log.track(self.volume_id, *node, tracking.identity, fresh.clone())
            } else if fresh.is_empty() {
                continue;
            } else {
                self.log.add(self.volume_id, *node, fresh.clone())
            };
            tracking
                .regions
                .extend(fresh.into_iter().map(|region| (region, generation)));
            wait = wait.max(generation);
        }
        wait
    }

    /// Marks a mutation's regions dirty and waits until that is durable.
    async fn mark_dirty_durably(&self, lba: u64, count: u64, also: Option<u64>) -> Result<(), String> {
        match self.mark_dirty(lba, count, also) {
            0 => Ok(()),
            generation => self.log.durable(generation).await,
        }
    }

    /// The regions mutated since `node` fell out of sync, if tracked in
    /// this coordinator tenure for this incarnation of the replica (else a
    /// resync must copy everything; stale tracking is dropped).
    #[must_use]
    pub fn dirty_regions(&self, node: u64, identity: Identity) -> Option<Vec<u64>> {
        let mut dirty = self.dirty.lock();
        let tracking = dirty.get(&node)?;
        if tracking.identity != identity {
            tracing::info!(volume = %self.name, replica = node, "dirty regions were tracked for another coordinator tenure or replica; resync copies everything");
            dirty.remove(&node);
            self.log.forget(self.volume_id, Some(node));
            return None;
        }
        Some(tracking.regions.keys().copied().collect())
    }

    /// How long mutations took to be durable on the in-sync replicas.
    #[must_use]
    pub fn round_trips(&self) -> &crate::metrics::OpStats {
        &self.round_trips
    }

    /// Forgets all tracking: this node no longer coordinates the volume.
    pub fn forget_all(&self) {
        self.dirty.lock().clear();
        self.log.forget(self.volume_id, None);
    }

    /// Replaces the in-sync targets from a state at `epoch` (the
    /// reconciler); ignored when this node itself changed the set at a
    /// later epoch than that state shows (the pass is stale).
    pub fn set_targets_at(&self, targets: Vec<(u64, Arc<MuxLink>)>, epoch: u64) {
        if epoch < self.changed_at.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        self.set_targets(targets);
    }

    /// Notes an in-sync change this node committed at `epoch`.
    pub fn note_change(&self, epoch: u64) {
        self.changed_at.fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
    }

    /// Replaces the in-sync targets (the reconciler, after Raft changed the
    /// in-sync set); a node that joined them stops catching up and its
    /// tracking goes (unless it missed a mutation since: `missed`).
    pub fn set_targets(&self, targets: Vec<(u64, Arc<MuxLink>)>) {
        let mut catching_up = self.catching_up.write();
        catching_up.retain(|(id, _)| !targets.iter().any(|(target, _)| target == id));
        self.joining
            .lock()
            .retain(|id| !targets.iter().any(|(target, _)| target == id));
        let missed = self.missed.lock().clone();
        self.dirty.lock().retain(|id, _| {
            let in_sync = targets.iter().any(|(target, _)| target == id) && !missed.contains(id);
            if in_sync {
                self.log.forget(self.volume_id, Some(*id));
            }
            !in_sync
        });
        *self.targets.write() = targets;
    }

    /// The in-sync replicas and their links (the sources a resync may read from).
    #[must_use]
    pub fn in_sync_links(&self) -> Vec<(u64, Arc<MuxLink>)> {
        self.targets.read().clone()
    }

    /// Starts copying every mutation to `node` as well (resync begins).
    pub fn start_catching_up(&self, node: u64, link: Arc<MuxLink>) {
        let mut catching_up = self.catching_up.write();
        if !catching_up.iter().any(|(id, _)| *id == node) {
            catching_up.push((node, link));
        }
    }

    /// Whether `node` still gets every mutation (no failure since it started).
    #[must_use]
    pub fn is_catching_up(&self, node: u64) -> bool {
        self.catching_up.read().iter().any(|(id, _)| *id == node)
    }

    /// Stops copying mutations to `node` (resync failed or gave up). A
    /// joining node is not let go this way: Raft may list it in sync, so it
    /// is dropped through Raft first (Err if that fails; it keeps getting
    /// every mutation then).
    pub async fn stop_catching_up(&self, node: u64, reason: &str) -> Result<(), String> {
        if self.is_joining(node) {
            self.fence_out(node, reason).await?;
        }
        self.catching_up.write().retain(|(id, _)| *id != node);
        Ok(())
    }

    /// Waits until every `replicate` call already running has finished.
    pub async fn drain(&self) {
        drop(self.in_flight.write().await);
    }

    /// Marks `node` as proposed for the in-sync set (see `joining`).
    pub fn set_joining(&self, node: u64) {
        self.joining.lock().insert(node);
    }

    #[must_use]
    pub fn is_joining(&self, node: u64) -> bool {
        self.joining.lock().contains(&node)
    }

    /// Raft took `node` back: it is a target from now on (the reconciler
    /// would do the same once it sees the change).
    pub fn promote(&self, node: u64) {
        let mut catching_up = self.catching_up.write();
        let Some(index) = catching_up.iter().position(|(id, _)| *id == node) else {
            return;
        };
        let entry = catching_up.remove(index);
        self.joining.lock().remove(&node);
        if self.dirty.lock().remove(&node).is_some() {
            self.log.forget(self.volume_id, Some(node));
        }
        let mut targets = self.targets.write();
        if !targets.iter().any(|(id, _)| *id == node) {
            targets.push(entry);
        }
    }

    /// Drops `node` from the in-sync set through Raft; Ok once committed (or
    /// it is neither a target nor joining, so not in sync as far as this
    /// coordinator let Raft know).
    async fn fence_out(&self, node: u64, reason: &str) -> Result<(), String> {
        let _one_at_a_time = self.fencing.lock().await;
        if !self.targets.read().iter().any(|(id, _)| *id == node) && !self.is_joining(node) {
            self.missed.lock().remove(&node);
            return Ok(());
        }
        let cluster = self.cluster.upgrade().ok_or("the node is shutting down")?;
        tracing::warn!(volume = %self.name, replica = node, %reason, "replica failed; removing it from the in-sync set");
        let command = Command::ReplicaOut {
            name: self.name.clone(),
            node,
            by: cluster.local.id,
        };
        match cluster.change(command).await {
            Ok(outcome) => {
                if let crate::cluster::state::Outcome::Volume(volume) = &outcome {
                    self.note_change(volume.epoch);
                }
                self.targets.write().retain(|(id, _)| *id != node);
                self.catching_up.write().retain(|(id, _)| *id != node);
                self.joining.lock().remove(&node);
                self.missed.lock().remove(&node);
                tracing::warn!(volume = %self.name, replica = node, "replica out of sync; writes continue without it");
                Ok(())
            }
            Err(error) => Err(format!(
                "replica {node} failed ({reason}) and could not be removed from the in-sync set: {error}"
            )),
        }
    }
}

impl Replicator for VolumeReplication {
    fn prepare(
        &self,
        lba: u64,
        block_count: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        // Before the mutation goes anywhere (and before `replicate` reads the
        // catching-up list: a resync that starts catching up and then reads
        // the dirty regions misses no write).
        Box::pin(self.mark_dirty_durably(lba, block_count, None))
    }

    fn replicate(
        &self,
        op: ReplicaOp,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let _in_flight = self.in_flight.read().await;
            // Header and data go straight into each link's send buffer.
            let (header, data) = wire::encode_parts(&op);
            let payload: [&[u8]; 2] = [&header, &data];
            let targets = self.targets.read().clone();
            let catching_up = self.catching_up.read().clone();
            // A replica that left the targets since `prepare` (and is tracked)
            // gets this mutation's regions now, durably, before it is sent:
            // it is in neither the targets nor the dirty regions otherwise.
            match self.mark_dirty_against(op.lba, op.block_count, None, Some(&targets)) {
                0 => {}
                generation => self.log.durable(generation).await?,
            }
            let catch_up_sends = catching_up.iter().map(|(node, link)| {
                let payload = &payload;
                async move {
                    (
                        *node,
                        link.call_parts(FrameKind::ReplicaWrite, payload, self.timeout).await,
                    )
                }
            });
            let sends = targets.iter().map(|(node, link)| {
                let payload = &payload;
                async move {
                    let result = match link.call_parts(FrameKind::ReplicaWrite, payload, self.timeout).await {
                        Ok(_) => Ok(()),
                        Err(error) => Err(error.to_string()),
                    };
                    (*node, result)
                }
            });
            let started = std::time::Instant::now();
            let (results, catch_up_results) = futures::future::join(
                futures::future::join_all(sends),
                futures::future::join_all(catch_up_sends),
            )
            .await;
            let ok = results.iter().all(|(_, result)| result.is_ok());
            self.round_trips.record(op.block_count * 4096, started.elapsed(), ok);
            for (node, result) in catch_up_results {
                if let Err(error) = result {
                    // Joining, or promoted since the send: Raft may list it in sync.
                    let maybe_in_sync = self.is_joining(node) || self.targets.read().iter().any(|(id, _)| *id == node);
                    if maybe_in_sync {
                        // Raft may already list it in sync: out through Raft before the ack.
                        self.missed.lock().insert(node);
                        self.mark_dirty_durably(op.lba, op.block_count, Some(node)).await?;
                        self.fence_out(node, &error.to_string()).await?;
                    } else {
                        tracing::warn!(volume = %self.name, replica = node, %error, "replica failed during resync; resync stops");
                        self.catching_up.write().retain(|(id, _)| *id != node);
                    }
                }
            }
            for (node, result) in results {
                if let Err(reason) = result {
                    // Tracking starts with the write it missed, durably before Raft hears of it.
                    self.missed.lock().insert(node);
                    self.mark_dirty_durably(op.lba, op.block_count, Some(node)).await?;
                    self.fence_out(node, &reason).await?;
                }
            }
            Ok(())
        })
    }

    fn targets(&self) -> Vec<u64> {
        self.targets.read().iter().map(|(id, _)| *id).collect()
    }

    fn fetch(
        &self,
        volume_id: u64,
        lba: u64,
        block_count: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        Box::pin(async move {
            let request = wire::encode_read(volume_id, lba, block_count);
            let targets = self.targets.read().clone();
            let mut last_error = "no in-sync replica to read from".to_owned();
            for (node, link) in targets {
                match link.call(FrameKind::ReplicaRead, &request, self.timeout).await {
                    Ok(data) => return Ok(data),
                    Err(error) => last_error = format!("replica {node}: {error}"),
                }
            }
            Err(last_error)
        })
    }
}

impl VolumeReplication {
    /// Raises every in-sync replica's epoch to `epoch` before this node
    /// serves the volume: from then on they refuse the old coordinator's
    /// writes even if Raft has not told them yet. A replica that does not
    /// confirm is dropped from the in-sync set; Err if that fails too.
    /// Replicas that missed a mutation (`missed`) are dropped first.
    pub async fn fence(&self, volume_id: u64, epoch: u64) -> Result<(), String> {
        let missed: Vec<u64> = self.missed.lock().iter().copied().collect();
        for node in missed {
            self.fence_out(node, "it missed a write while its removal could not commit")
                .await?;
        }
        let request = wire::encode_read(volume_id, epoch, 1);
        let targets = self.targets.read().clone();
        let fences = targets.iter().map(|(node, link)| {
            let request = &request;
            async move { (*node, link.call(FrameKind::ReplicaFence, request, self.timeout).await) }
        });
        for (node, result) in futures::future::join_all(fences).await {
            if let Err(error) = result {
                self.fence_out(node, &format!("did not confirm the new epoch: {error}"))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Why a replica refuses a coordinator's request (the fencing rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This node coordinates the volume itself: the sender was fenced.
    Coordinating { epoch: u64 },
    /// The request carries an epoch older than this replica knows.
    StaleEpoch { sent: u64, known: u64 },
}

impl Refusal {
    #[must_use]
    pub fn describe(&self, volume: &str) -> String {
        match *self {
            Self::Coordinating { epoch } => format!(
                "this node coordinates volume {volume} at epoch {epoch}; it takes no replica writes (the sender was fenced)"
            ),
            Self::StaleEpoch { sent, known } => format!(
                "stale epoch {sent} for volume {volume} (this replica knows epoch {known}); the sender is no longer its coordinator"
            ),
        }
    }
}

/// Whether a replica whose fence floor is `floor` (and that coordinates
/// the volume itself when `coordinating`) applies a mutation sent at
/// epoch `sent`. The floor is the epoch the current coordinator took over
/// at (or a newer coordinator's fence): epoch bumps within one tenure
/// (replicas dropped or taken back) fence nobody.
pub fn admit_mutation(sent: u64, floor: u64, coordinating: bool) -> Result<(), Refusal> {
    if coordinating {
        return Err(Refusal::Coordinating { epoch: floor });
    }
    if sent < floor {
        return Err(Refusal::StaleEpoch { sent, known: floor });
    }
    Ok(())
}

/// Whether a replica whose epoch is `known` takes a new coordinator's
/// fence at `new`: a node refuses while it coordinates the volume at that
/// epoch or later (a coordinator at an older epoch stops serving).
pub fn admit_fence(new: u64, known: u64, coordinating: bool) -> Result<(), Refusal> {
    if coordinating && known >= new {
        return Err(Refusal::Coordinating { epoch: known });
    }
    Ok(())
}

/// Raises this node's replica to a new coordinator's epoch, durably. Waits
/// for mutations already admitted at the old epoch to finish first, so
/// none lands after the new coordinator has been told the replica is fenced.
pub async fn raise_epoch(volumes: &Volumes, payload: &[u8]) -> Result<(), String> {
    // Same layout as a read request: volume id, epoch, 1.
    let (volume_id, epoch, _) = wire::decode_read(payload).map_err(|error| error.to_string())?;
    let volume = replica_of(volumes, volume_id).await?;
    let _no_mutation_in_flight = volume.epoch_gate.write().await;
    admit_fence(epoch, volume.epoch(), volume.is_served()).map_err(|refusal| refusal.describe(&volume.name))?;
    if volume.is_served() {
        // A newer coordinator exists and this node has not heard from Raft yet.
        tracing::warn!(volume = %volume.name, epoch, "fenced by a newer coordinator; no longer serving");
        volumes.set_served(&volume.name, false);
    }
    volumes.fence(&volume.name, epoch).map_err(|error| error.to_string())
}

/// Serves blocks of this node's replica to a coordinator repairing its copy.
pub async fn read(volumes: &Volumes, payload: &[u8]) -> Result<Vec<u8>, String> {
    let (volume_id, lba, block_count) = wire::decode_read(payload).map_err(|error| error.to_string())?;
    let volume = volumes
        .get_by_id(volume_id)
        .ok_or_else(|| format!("this node holds no replica of volume id {volume_id}"))?;
    volume
        .read_for_repair(lba, block_count)
        .await
        .map_err(|error| error.to_string())
}

/// This node's replica of `volume_id`, waiting a moment for the reconciler
/// when it is new (a new volume's first write may beat it).
async fn replica_of(volumes: &Volumes, volume_id: u64) -> Result<Arc<crate::volume::Volume>, String> {
    for _ in 0..REPLICA_WAIT_TRIES {
        if let Some(volume) = volumes.get_by_id(volume_id) {
            return Ok(volume);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    volumes
        .get_by_id(volume_id)
        .ok_or_else(|| format!("this node holds no replica of volume id {volume_id}"))
}

/// Applies a mutation sent by a coordinator to this node's replica. The
/// epoch check and the write hold the volume's epoch gate (shared), so a
/// fence or a switch to serving waits for admitted mutations to land.
/// `tenure` gives the cluster's `coordinator_since` of a volume by name, in
/// case the reconciler has not passed it on yet.
///
/// `holds(volume, snapshot_id)` tells whether the cluster lists this node as
/// a holder of that snapshot: a restore is refused otherwise (a copy taken
/// while this replica was still being resynced is not one to restore from;
/// the refusal makes the coordinator mark the whole volume for it).
pub async fn apply(
    volumes: &Volumes,
    payload: Vec<u8>,
    tenure: impl Fn(&str) -> u64,
    holds: impl Fn(&str, u64) -> bool,
) -> Result<(), String> {
    let background = wire::is_background(&payload);
    let op = wire::decode(payload).map_err(|error| error.to_string())?;
    let volume = replica_of(volumes, op.volume_id).await?;
    let _admitted = volume.epoch_gate.read().await;
    let floor = volume.fence_floor().max(tenure(&volume.name));
    admit_mutation(op.epoch, floor, volume.is_served()).map_err(|refusal| refusal.describe(&volume.name))?;
    match op.kind {
        wire::OpKind::Snapshot { id, ref name } => volumes
            .take_snapshot(&volume, name, id, op.epoch, op.volume_sequence)
            .await
            .map_err(|error| error.to_string()),
        wire::OpKind::Restore { id } => {
            if !holds(&volume.name, id) {
                return Err(format!(
                    "this node is not a holder of snapshot data id {id} of {}: it copies the restored volume instead",
                    volume.name
                ));
            }
            volumes
                .restore_snapshot(&volume, id, op.epoch, op.volume_sequence)
                .await
                .map_err(|error| error.to_string())
        }
        // A resync's copy takes what this disk's clients leave.
        _ if background => {
            crate::engine::sched::as_background(crate::engine::Work::Resync, volume.apply_replica_op(op))
                .await
                .map_err(|error| error.to_string())
        }
        _ => volume.apply_replica_op(op).await.map_err(|error| error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_refuses_mutations_from_an_older_epoch_or_while_it_coordinates() {
        assert_eq!(admit_mutation(5, 5, false), Ok(()));
        assert_eq!(admit_mutation(6, 5, false), Ok(()));
        assert_eq!(
            admit_mutation(4, 5, false),
            Err(Refusal::StaleEpoch { sent: 4, known: 5 })
        );
        assert_eq!(admit_mutation(9, 5, true), Err(Refusal::Coordinating { epoch: 5 }));
    }

    #[test]
    fn a_coordinator_refuses_a_fence_at_or_below_its_own_epoch() {
        assert_eq!(admit_fence(6, 5, false), Ok(()));
        assert_eq!(admit_fence(3, 5, false), Ok(()));
        assert_eq!(admit_fence(5, 5, true), Err(Refusal::Coordinating { epoch: 5 }));
        assert_eq!(admit_fence(6, 5, true), Ok(()));
    }
}
