//! Volumes of this node: their durable metadata (`meta`), placement on the
//! enrolled disks, and the live handles the NBD server does I/O through
//! (`io`).
//!
//! Admin operations (create, delete, resize) are serialized and block on
//! fsyncs; callers on an async runtime run them on a blocking thread.
//! Consistency with the data: a volume's metadata is committed before any
//! of its data is written; a delete is first recorded as `deleting`, then
//! its data is released, then its record removed, and start-up finishes any
//! delete a crash interrupted and releases data no record owns.

pub mod crypt;
pub mod drain;
pub mod io;
pub mod lease;
pub mod meta;
pub mod qos;
pub mod range_lock;
pub mod scrub;
pub mod snapshot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use disk_layout::StoreError;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use thiserror::Error;

use crate::engine::{Command, Engine};
use meta::{MetaError, MetaStore, VolumeRecord, VolumeState};

/// Largest volume: the store's LBA range.
pub const VOLUME_SIZE_BYTES_MAX: u64 = disk_layout::LBA_LIMIT * io::BLOCK_BYTES;
/// Block sizes a volume may advertise to its clients.
pub const BLOCK_SIZES_BYTES: [u32; 2] = [512, 4096];
/// Most volumes per node.
pub const VOLUMES_MAX: usize = 4096;

/// Errors of volume administration.
#[derive(Debug, Error)]
pub enum VolumeError {
    /// the name breaks the naming rule
    #[error("invalid volume name {name:?}: names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit")]
    InvalidName { name: String },
    /// the size is not usable
    #[error("invalid size {size_bytes} bytes: {reason}")]
    InvalidSize { size_bytes: u64, reason: String },
    /// an option is not usable
    #[error("{0}")]
    InvalidOption(String),
    /// a volume of that name exists
    #[error("volume {name} already exists")]
    Exists { name: String },
    /// no volume of that name
    #[error("volume {name} does not exist")]
    Missing { name: String },
    /// NBD clients are connected
    #[error("volume {name} is in use by {connections} NBD connection(s); disconnect them first")]
    InUse { name: String, connections: usize },
    /// nowhere to put data
    #[error("this node has no enrolled disk; run `ballast disk enroll` first")]
    NoDisks,
    /// the volume's disk is not enrolled or did not open
    #[error("volume {name} is on disk {disk_uuid}, which is not open on this node")]
    DiskMissing { name: String, disk_uuid: uuid::Uuid },
    /// too many volumes
    #[error("this node already has {VOLUMES_MAX} volumes")]
    TooMany,
    /// the metadata database failed
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// the store failed releasing data
    #[error("volume {name}: {source}")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    /// I/O on the volume failed
    #[error(transparent)]
    Io(#[from] VolumeIoError),
}

impl VolumeError {
    /// Whether the error is the caller's (bad input), as opposed to the node's.
    #[must_use]
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Self::Meta(_) | Self::Store { .. } | Self::DiskMissing { .. } | Self::Io(_)
        )
    }
}

/// Errors of volume I/O.
#[derive(Debug, Error)]
pub enum VolumeIoError {
    /// the request reaches past the end of the volume
    #[error("volume {volume}: {len_bytes} bytes at {offset_bytes} reach past its end ({size_bytes} bytes)")]
    OutOfRange {
        volume: String,
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// the store refused or failed the request
    #[error("volume {volume}: {source}")]
    Store {
        volume: String,
        #[source]
        source: StoreError,
    },
    /// the storage engine stopped (shutdown)
    #[error("the storage engine has stopped")]
    Stopped,
    /// a replica could not take the mutation and could not be fenced out
    #[error("volume {volume}: replication failed: {reason}")]
    Replication { volume: String, reason: String },
    /// the volume is encrypted and its key is not unlocked on this node
    #[error("volume {volume} is encrypted and locked on this node: run `ballast volume unlock {volume} --passphrase-file FILE` against the node serving it")]
    Locked { volume: String },
    /// the export is a snapshot: it cannot be written
    #[error(
        "{volume} is a snapshot and read-only; clone it (`ballast volume clone {volume} NEW`) for a writable copy"
    )]
    ReadOnly { volume: String },
    /// the volume moved to another node while the request was under way
    #[error("volume {volume} is now served by another node (`ballast volume inspect {volume}` shows which)")]
    NotServed { volume: String },
    /// a replicated volume's coordinator could not confirm it still serves it
    #[error("volume {volume}: this node could not confirm with the cluster's Raft leader that it still serves the volume (reads wait for that, so none is ever stale); is the leader reachable? (`ballast cluster status`, `ballast volume inspect {volume}`)")]
    NoLease { volume: String },
}

/// Checks the naming rule `[a-z0-9][a-z0-9_.-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(VolumeError::InvalidName { name: name.to_owned() })
    }
}

/// Checks a volume size: whole 4 KiB blocks, within the store's range.
pub fn validate_size(size_bytes: u64) -> Result<(), VolumeError> {
    let reason = if size_bytes == 0 {
        "a volume needs at least one 4 KiB block".to_owned()
    } else if !size_bytes.is_multiple_of(io::BLOCK_BYTES) {
        "the size must be a multiple of 4 KiB".to_owned()
    } else if size_bytes > VOLUME_SIZE_BYTES_MAX {
        format!(
            "the largest volume is {}",
            crate::size::format_size(VOLUME_SIZE_BYTES_MAX)
        )
    } else {
        return Ok(());
    };
    Err(VolumeError::InvalidSize { size_bytes, reason })
}

/// A live volume: what I/O needs, shared by every connection to it.
pub struct Volume {
    pub name: String,
    pub id: u64,
    pub block_size_bytes: u32,
    /// Fencing epoch written into every record (the cluster's, kept current by the reconciler).
    epoch: AtomicU64,
    /// Replica mutations sent at an older epoch are refused (raised by a
    /// new coordinator's fence, and to the current coordinator's tenure).
    fence_floor: AtomicU64,
    /// The epoch this node started serving at: its replicated mutations
    /// carry it (not the live epoch, which a newer coordinator's fence may
    /// raise while a request is under way).
    serving_epoch: AtomicU64,
    /// Engine disk holding this node's copy (changes once when a drain
    /// moves it: `drain`).
    disk: AtomicUsize,
    /// Held shared by every store request of the volume; exclusively by a
    /// drain for the last copy and the switch to the new disk.
    move_gate: tokio::sync::RwLock<()>,
    /// While a drain moves the volume: the 4 MiB regions changed since it
    /// last copied them.
    moving: Mutex<Option<std::collections::BTreeSet<u64>>>,
    size_bytes: AtomicU64,
    sequence: AtomicU64,
    engine: Arc<Engine>,
    /// Shared by aligned writes, exclusive for read-modify-write.
    rmw: tokio::sync::RwLock<()>,
    connections: AtomicUsize,
    deleted: AtomicBool,
    /// Whether this node serves the volume to clients (it is the cluster's
    /// coordinator for it); other replicas refuse NBD.
    served: AtomicBool,
    /// A standby of another volume's backups: no client may open it.
    standby: AtomicBool,
    /// A backup is being restored into it: no client may open it.
    restoring: AtomicBool,
    /// Where the coordinator copies each mutation (None: no other in-sync replica).
    replication: RwLock<Option<Arc<dyn Replicator>>>,
    /// Orders overlapping mutations while replicating.
    ranges: range_lock::RangeLock,
    /// Held shared by each replica mutation from its epoch check until it
    /// is durable; exclusively to raise the epoch for a fence or to start
    /// serving, so no mutation admitted at an old epoch lands after that.
    pub epoch_gate: tokio::sync::RwLock<()>,
    /// What clients asked of the volume on this node (`/metrics`).
    pub stats: crate::metrics::IoStats,
    /// The volume's I/O limits, paced here while it serves clients (None: unlimited).
    qos: Mutex<Option<qos::Pacer>>,
    limited: AtomicBool,
    /// Its requests' class at the disk (`engine::sched`).
    priority: qos::PriorityCell,
    /// Data is encrypted: client I/O needs `cipher` (replica and resync
    /// traffic moves ciphertext and needs none).
    pub encrypted: bool,
    /// The data key's cipher, once unlocked on this node.
    cipher: RwLock<Option<Arc<crypt::VolumeCipher>>>,
    /// A snapshot's copy: reads only.
    pub read_only: bool,
    /// Reads of a replicated volume need this node's lease (`lease`).
    pub lease: lease::ServingLease,
}

/// Copies a coordinator's mutations to the volume's other in-sync replicas.
pub trait Replicator: Send + Sync {
    /// Runs before a mutation of `[lba, lba + block_count)` is applied
    /// anywhere (records it dirty for out-of-sync replicas, durably). An
    /// error means the mutation must not be made.
    fn prepare(
        &self,
        lba: u64,
        block_count: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;

    /// Applies `op` on every in-sync replica; Ok once each has it durable
    /// (or was removed from the in-sync set through Raft). An error means
    /// the mutation must not be acknowledged.
    fn replicate(
        &self,
        op: crate::replication::wire::ReplicaOp,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>>;

    /// Nodes the mutations go to (for comparison by the reconciler).
    fn targets(&self) -> Vec<u64>;

    /// Reads blocks from an in-sync replica (the local copy failed its checksum).
    fn fetch(
        &self,
        volume_id: u64,
        lba: u64,
        block_count: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send + '_>>;
}

impl Volume {
    /// Sets the volume's I/O limits; the pacing state is kept while they
    /// stay the same (the cluster's state is applied again and again).
    pub fn set_limits(&self, limits: qos::Limits) {
        let mut pacer = self.qos.lock();
        if pacer.as_ref().map_or(qos::Limits::default(), qos::Pacer::limits) == limits {
            return;
        }
        *pacer = (!limits.is_none()).then(|| qos::Pacer::new(limits, std::time::Instant::now()));
        self.limited.store(pacer.is_some(), Ordering::Release);
    }

    /// Sets the volume's priority at the disk.
    pub fn set_priority(&self, priority: qos::IoPriority) {
        self.priority.set(priority);
    }

    #[must_use]
    pub fn priority(&self) -> qos::IoPriority {
        self.priority.get()
    }

    /// The class of a request the current task makes of this volume's
    /// disk: background work's (`engine::sched::as_background`), else the
    /// volume's clients'.
    #[must_use]
    pub fn io_class(&self) -> crate::engine::IoClass {
        crate::engine::sched::class_for(self.priority())
    }

    /// Sends `command` to the volume's disk as `io_class`.
    pub(crate) fn submit(&self, command: Command, reply: crate::engine::ReplyFn) {
        self.engine
            .submit_as(self.disk_index(), self.io_class(), command, reply);
    }

    /// Seconds its clients' requests waited in the disk's scheduler on
    /// this node, and how many requests (published every 100 ms).
    #[must_use]
    pub fn queue_wait(&self) -> (f64, u64) {
        let Some(stats) = self.engine.sched_stats(self.disk_index()) else {
            return (0.0, 0);
        };
        let (nanos, requests) = stats.volumes.lock().get(&self.id).copied().unwrap_or_default();
        (std::time::Duration::from_nanos(nanos).as_secs_f64(), requests)
    }

    /// The volume's limits (all None: unlimited).
    #[must_use]
    pub fn limits(&self) -> qos::Limits {
        self.qos
            .lock()
            .as_ref()
            .map_or(qos::Limits::default(), qos::Pacer::limits)
    }

    /// Waits until the volume's limits let a client request `op` of
    /// `bytes` start: reads and writes count as one operation and their
    /// bytes, trims and write-zeroes as one operation, flushes as nothing.
    pub async fn admit_op(&self, op: crate::metrics::Op, bytes: u64) {
        use crate::metrics::Op;
        let (ops, bytes) = match op {
            Op::Read | Op::Write => (1, bytes),
            Op::Trim | Op::WriteZeroes => (1, 0),
            Op::Flush | Op::Other => (0, 0),
        };
        self.admit(ops, bytes).await;
    }

    /// Waits until the volume's limits let a client request of `ops`
    /// operations and `bytes` bytes start (at once when unlimited).
    async fn admit(&self, ops: u64, bytes: u64) {
        if !self.limited.load(Ordering::Acquire) {
            return;
        }
        let wait = match self.qos.lock().as_mut() {
            Some(pacer) => pacer.reserve(std::time::Instant::now(), ops, bytes),
            None => return,
        };
        if !wait.is_zero() {
            self.stats.throttled(wait);
            tokio::time::sleep(wait).await;
        }
    }

    /// The node's storage engine (host attach serves its queues on its reactors).
    #[must_use]
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Current size (grows with resize).
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Index of the engine disk holding this node's copy.
    #[must_use]
    pub fn disk_index(&self) -> usize {
        self.disk.load(Ordering::Acquire)
    }

    /// True once the volume was deleted (connections still holding it stop).
    #[must_use]
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The fencing epoch records are written with.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The epoch this node started serving the volume at (0: never).
    #[must_use]
    pub fn serving_epoch(&self) -> u64 {
        self.serving_epoch.load(Ordering::Acquire)
    }

    /// Replica mutations sent at an older epoch than this are refused.
    #[must_use]
    pub fn fence_floor(&self) -> u64 {
        self.fence_floor.load(Ordering::Acquire)
    }

    /// The replicator in use, if any.
    #[must_use]
    pub fn replicator(&self) -> Option<Arc<dyn Replicator>> {
        self.replication.read().clone()
    }

    /// Whether this node serves the volume (is its coordinator).
    #[must_use]
    pub fn is_served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    /// Stops serving at once, before the caller lets readers at the range
    /// it wrote: a replicated write whose local part landed but which did
    /// not reach every in-sync replica left this copy holding data no other
    /// copy has (never acknowledged). Shown to a reader, a move of the volume
    /// to a replica would take it back (torture caught a deposed coordinator,
    /// resumed after a pause, answering a read with such a write). The
    /// reconciler serves it again only if the cluster still names this node
    /// the coordinator.
    pub fn stop_serving_after_a_failed_write(&self, reason: &str) {
        if self.served.swap(false, Ordering::AcqRel) {
            tracing::warn!(volume = %self.name, epoch = self.serving_epoch(), %reason, "a write reached this copy but not every replica; not serving until the cluster confirms this node");
            self.lease.wake();
        }
    }

    /// Whether client I/O can run: unencrypted, or the key is here.
    #[must_use]
    pub fn is_unlocked(&self) -> bool {
        !self.encrypted || self.cipher.read().is_some()
    }

    /// Why no client may open it now (a standby, or a restore under way), or None.
    #[must_use]
    pub fn refusal(&self) -> Option<String> {
        if self.restoring.load(Ordering::Acquire) {
            return Some(format!(
                "volume {} is being restored from a backup; it serves clients when that ends (`ballast volume inspect {}`)",
                self.name, self.name
            ));
        }
        self.standby.load(Ordering::Acquire).then(|| {
            format!(
                "volume {} is a standby (it follows another volume's backups) and serves no clients: `ballast volume promote {}` makes it a normal volume",
                self.name, self.name
            )
        })
    }

    /// Marks a restore into it under way (true) or ended; false if one already was.
    pub fn set_restoring(&self, restoring: bool) -> bool {
        self.restoring.swap(restoring, Ordering::AcqRel) != restoring
    }

    /// Installs (or with None, forgets) the data key's cipher.
    pub fn set_cipher(&self, cipher: Option<Arc<crypt::VolumeCipher>>) {
        *self.cipher.write() = cipher;
    }

    /// The cipher client I/O uses: None for an unencrypted volume; an
    /// error for an encrypted one whose key is not unlocked here.
    pub(crate) fn cipher(&self) -> Result<Option<Arc<crypt::VolumeCipher>>, VolumeIoError> {
        if !self.encrypted {
            return Ok(None);
        }
        self.cipher
            .read()
            .clone()
            .map(Some)
            .ok_or_else(|| VolumeIoError::Locked {
                volume: self.name.clone(),
            })
    }

    /// NBD connections open now.
    #[must_use]
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Counts an NBD connection for as long as the guard lives.
    #[must_use]
    pub fn connect(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(Arc::clone(self))
    }
}

/// Keeps a volume's connection count up while alive.
pub struct ConnectionGuard(Arc<Volume>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What `volume inspect` and `volume list` show.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u64,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub block_size_bytes: u32,
    pub replicas: u32,
    pub disk_uuid: uuid::Uuid,
    pub disk_path: String,
    pub connections: usize,
    pub created_unix_seconds: u64,
    pub state: String,
    /// The node serving the volume (0: not known here).
    #[serde(default)]
    pub coordinator: u64,
    /// Its NBD address.
    #[serde(default)]
    pub coordinator_nbd: String,
    /// Nodes holding a replica.
    #[serde(default)]
    pub replica_nodes: Vec<u64>,
    /// Replicas holding every acknowledged write.
    #[serde(default)]
    pub in_sync: Vec<u64>,
    /// Resyncs the coordinator ran or runs (latest per replica).
    #[serde(default)]
    pub resyncs: Vec<crate::replication::resync::ResyncStatus>,
    /// The last (or running) scrub pass, when this node coordinates the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<crate::replication::scrub::ScrubStatus>,
    /// Fencing epoch.
    #[serde(default)]
    pub epoch: u64,
    /// healthy, degraded or unavailable (as `ballast status` says it).
    #[serde(default)]
    pub health: String,
    /// Replica nodes that do not answer.
    #[serde(default)]
    pub replicas_down: Vec<u64>,
    /// Active alerts about this volume.
    #[serde(default)]
    pub alerts: Vec<crate::cluster::alerts::Alert>,
    /// The token subject that owns it ("": the admins').
    #[serde(default)]
    pub owner: String,
    /// Its group ACL: members of this group may use it too ("": none).
    #[serde(default)]
    pub group: String,
    /// How its data key is kept: "" (not encrypted), "cluster-key" or "passphrase".
    #[serde(default)]
    pub encryption: String,
    /// The node whose host has it attached as a block device (0: none).
    #[serde(default)]
    pub attached_to: u64,
    /// Snapshots taken of it (`snapshot list`).
    #[serde(default)]
    pub snapshots: usize,
    /// Scheduled snapshots: every this many seconds (0: none), keeping the newest `snapshot_keep`.
    #[serde(default)]
    pub snapshot_every_seconds: u64,
    #[serde(default)]
    pub snapshot_keep: u32,
    /// Scheduled backups: every this many seconds (0: none) to registered
    /// target `backup_target`, keeping the newest `backup_keep` there.
    #[serde(default)]
    pub backup_every_seconds: u64,
    #[serde(default)]
    pub backup_keep: u32,
    #[serde(default)]
    pub backup_target: String,
    /// A standby: `TARGET/VOLUME` it follows ("" if not one), and the last backup applied.
    #[serde(default)]
    pub standby_of: String,
    #[serde(default)]
    pub standby_applied: String,
    /// `VOLUME@SNAPSHOT` it was cloned from ("" if none, or if that is gone).
    #[serde(default)]
    pub cloned_from: String,
    /// I/O priority class (high, medium, low) and limits (None: unlimited).
    #[serde(default)]
    pub io_priority: qos::IoPriority,
    #[serde(default)]
    pub iops_limit: Option<u64>,
    #[serde(default)]
    pub mib_per_s_limit: Option<u64>,
}

/// An opened disk as placement sees it.
#[derive(Clone, Debug)]
struct PlacedDisk {
    uuid: uuid::Uuid,
    path: String,
}

/// The node's volumes.
pub struct Volumes {
    engine: Arc<Engine>,
    meta: Mutex<MetaStore>,
    /// The engine's disks, by index (grows when a disk is added online).
    disks: RwLock<Vec<PlacedDisk>>,
    live: RwLock<BTreeMap<String, (VolumeRecord, Arc<Volume>)>>,
    /// Local copies of snapshots, by `VOLUME@SNAPSHOT` (`snapshot`).
    snapshots: RwLock<BTreeMap<String, (VolumeRecord, Arc<Volume>)>>,
    /// Drains by engine disk index (`drain`).
    drains: Mutex<BTreeMap<usize, drain::DrainStatus>>,
}

impl Volumes {
    /// The engine the volumes' disks run on.
    #[must_use]
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Loads the metadata, finishes interrupted deletes, releases orphaned
    /// data, and makes every volume ready for I/O.
    pub fn open(engine: Arc<Engine>, meta: MetaStore) -> Result<Self, VolumeError> {
        let disks: Vec<PlacedDisk> = engine
            .disks()
            .iter()
            .map(|disk| PlacedDisk {
                uuid: uuid::Uuid::from_bytes(disk.disk_uuid),
                path: disk.path.display().to_string(),
            })
            .collect();
        let volumes = Self {
            engine,
            meta: Mutex::new(meta),
            disks: RwLock::new(disks),
            live: RwLock::new(BTreeMap::new()),
            snapshots: RwLock::new(BTreeMap::new()),
            drains: Mutex::new(BTreeMap::new()),
        };
        volumes.recover()?;
        Ok(volumes)
    }

    fn disk_index(&self, uuid: uuid::Uuid) -> Option<usize> {
        self.disks.read().iter().position(|disk| disk.uuid == uuid)
    }

    /// Takes disk `index` of the engine (just added to it) for new volumes.
    pub fn add_disk(&self, index: usize) {
        let Some(disk) = self.engine.disks().get(index).cloned() else {
            return;
        };
        let mut disks = self.disks.write();
        if disks.len() == index {
            disks.push(PlacedDisk {
                uuid: uuid::Uuid::from_bytes(disk.disk_uuid),
                path: disk.path.display().to_string(),
            });
        }
    }

    fn disk_path(&self, disk: usize) -> String {
        self.disks.read().get(disk).map(|d| d.path.clone()).unwrap_or_default()
    }

    fn release(&self, disk: usize, name: &str, volume_id: u64) -> Result<(), VolumeError> {
        self.engine
            .call(disk, Command::DeleteVolume { volume_id })
            .map(|_| ())
            .map_err(|source| VolumeError::Store {
                name: name.to_owned(),
                source,
            })
    }

    fn recover(&self) -> Result<(), VolumeError> {
        let records = self.meta.lock().volumes()?;
        let mut owned = std::collections::HashSet::new();
        for record in records {
            let Some(disk) = self.disk_index(record.disk_uuid) else {
                tracing::error!(volume = %record.name, disk = %record.disk_uuid, "volume's disk is not open; it will not serve");
                continue;
            };
            if record.state == VolumeState::Deleting {
                tracing::info!(volume = %record.name, "finishing an interrupted delete");
                self.release(disk, &record.name, record.id)?;
                self.meta.lock().remove(&record.name)?;
                continue;
            }
            owned.insert((disk, record.id));
            let (_, sequence_max) = self
                .engine
                .query(disk, move |store| store.volume_epoch(record.id))
                .map_err(|_| VolumeError::DiskMissing {
                    name: record.name.clone(),
                    disk_uuid: record.disk_uuid,
                })?;
            let volume = self.handle(&record, disk, sequence_max + 1);
            if record.snapshot_of.is_some() {
                self.snapshots.write().insert(record.name.clone(), (record, volume));
            } else {
                self.live.write().insert(record.name.clone(), (record, volume));
            }
        }
        for disk in 0..self.disks.read().len() {
            let ids = self.engine.query(disk, |store| store.volume_ids()).unwrap_or_default();
            for id in ids {
                if !owned.contains(&(disk, id)) {
                    tracing::warn!(volume_id = id, disk = %self.disk_path(disk), "releasing data of a volume with no metadata (a create or delete interrupted by a crash)");
                    self.release(disk, &format!("#{id}"), id)?;
                }
            }
        }
        Ok(())
    }

    fn handle(&self, record: &VolumeRecord, disk: usize, next_sequence: u64) -> Arc<Volume> {
        Arc::new(Volume {
            name: record.name.clone(),
            id: record.id,
            block_size_bytes: record.block_size_bytes,
            epoch: AtomicU64::new(record.epoch),
            fence_floor: AtomicU64::new(record.fence_floor),
            serving_epoch: AtomicU64::new(0),
            disk: AtomicUsize::new(disk),
            move_gate: tokio::sync::RwLock::new(()),
            moving: Mutex::new(None),
            size_bytes: AtomicU64::new(record.size_bytes),
            sequence: AtomicU64::new(next_sequence),
            engine: Arc::clone(&self.engine),
            rmw: tokio::sync::RwLock::new(()),
            connections: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            // A snapshot's copy is served wherever it is (it never changes).
            served: AtomicBool::new(record.snapshot_of.is_some()),
            standby: AtomicBool::new(false),
            restoring: AtomicBool::new(false),
            replication: RwLock::new(None),
            ranges: range_lock::RangeLock::default(),
            epoch_gate: tokio::sync::RwLock::new(()),
            stats: crate::metrics::IoStats::default(),
            qos: Mutex::new(None),
            limited: AtomicBool::new(false),
            priority: qos::PriorityCell::default(),
            encrypted: record.encrypted,
            cipher: RwLock::new(None),
            read_only: record.snapshot_of.is_some(),
            lease: lease::ServingLease::default(),
        })
    }

    /// The live volume called `name`, for I/O.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.live.read().get(name).map(|(_, volume)| Arc::clone(volume))
    }

    /// The live volume called `name` if this node serves it to clients, or
    /// this node's copy of snapshot `VOLUME@SNAPSHOT` (read-only).
    #[must_use]
    pub fn get_served(&self, name: &str) -> Option<Arc<Volume>> {
        if let Some((volume, _)) = snapshot::split_name(name) {
            let copy = self.snapshot(name)?;
            if copy.encrypted {
                // Decrypted only where the volume itself is unlocked (its coordinator).
                let cipher = self.get(volume).and_then(|parent| parent.cipher().ok().flatten());
                copy.set_cipher(cipher);
            }
            return Some(copy);
        }
        self.get(name).filter(|volume| volume.is_served())
    }

    /// Sets `name`'s I/O priority and limits (as the cluster keeps them).
    pub fn set_qos(&self, name: &str, priority: qos::IoPriority, limits: qos::Limits) {
        if let Some(volume) = self.get(name) {
            volume.set_priority(priority);
            volume.set_limits(limits);
        }
    }

    /// Marks `name` a standby (no client may open it) or not.
    pub fn set_standby(&self, name: &str, standby: bool) {
        if let Some(volume) = self.get(name) {
            volume.standby.store(standby, Ordering::Release);
        }
    }

    /// Raises `name`'s fence floor to `epoch` (the cluster's tenure start; in memory).
    pub fn follow_tenure(&self, name: &str, epoch: u64) {
        if let Some(volume) = self.get(name) {
            volume.fence_floor.fetch_max(epoch, Ordering::AcqRel);
        }
    }

    /// Raises `name`'s fence floor and epoch to a new coordinator's `epoch`,
    /// durably (a restart keeps refusing the old coordinator).
    pub fn fence(&self, name: &str, epoch: u64) -> Result<(), VolumeError> {
        let meta = self.meta.lock();
        let (mut record, volume) = self
            .live
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Missing { name: name.to_owned() })?;
        if record.fence_floor < epoch {
            record.fence_floor = epoch;
            meta.update(&record)?;
            if let Some(entry) = self.live.write().get_mut(name) {
                entry.0.fence_floor = epoch;
            }
        }
        volume.fence_floor.fetch_max(epoch, Ordering::AcqRel);
        volume.epoch.fetch_max(epoch, Ordering::AcqRel);
        Ok(())
    }

    /// Marks whether this node serves `name` (the reconciler decides).
    pub fn set_served(&self, name: &str, served: bool) {
        if let Some(volume) = self.get(name) {
            if served && !volume.is_served() {
                volume.serving_epoch.store(volume.epoch(), Ordering::Release);
            }
            if volume.served.swap(served, Ordering::AcqRel) != served {
                tracing::info!(volume = %name, served, epoch = volume.serving_epoch(), "volume serving changed");
            }
            if !served {
                volume.lease.wake(); // reads waiting for a lease end now
            }
        }
    }

    /// Whether reads of `name` need this node's serving lease: everywhere
    /// but on the coordinator of a volume with no other replica.
    pub fn set_lease_required(&self, name: &str, required: bool) {
        if let Some(volume) = self.get(name) {
            volume.lease.set_required(required);
        }
    }

    /// Names and sizes of every volume this node serves, and of its
    /// snapshot copies (NBD_OPT_LIST).
    #[must_use]
    pub fn names(&self) -> Vec<(String, u64)> {
        let mut names: Vec<(String, u64)> = self
            .live
            .read()
            .values()
            .filter(|(_, volume)| volume.is_served())
            .map(|(record, volume)| (record.name.clone(), volume.size_bytes()))
            .collect();
        names.extend(
            self.snapshots
                .read()
                .values()
                .map(|(record, copy)| (record.name.clone(), copy.size_bytes())),
        );
        names
    }

    /// The live volume with data id `id`.
    #[must_use]
    pub fn get_by_id(&self, id: u64) -> Option<Arc<Volume>> {
        self.live
            .read()
            .values()
            .find(|(record, _)| record.id == id)
            .map(|(_, volume)| Arc::clone(volume))
    }

    /// Follows the cluster's epoch for `name` (only ever upwards).
    pub fn set_epoch(&self, name: &str, epoch: u64) {
        if let Some(volume) = self.get(name) {
            volume.epoch.fetch_max(epoch, Ordering::AcqRel);
        }
    }

    /// Sets (or clears) where `name`'s mutations are copied.
    pub fn set_replication(&self, name: &str, replicator: Option<Arc<dyn Replicator>>) {
        if let Some(volume) = self.get(name) {
            *volume.replication.write() = replicator;
        }
    }

    /// The metadata records of every local replica.
    #[must_use]
    pub fn records(&self) -> Vec<VolumeRecord> {
        self.live.read().values().map(|(record, _)| record.clone()).collect()
    }

    /// Number of local replicas.
    #[must_use]
    pub fn count(&self) -> usize {
        self.live.read().len()
    }

    /// Creates the local replica of a cluster volume (id from the cluster),
    /// on the disk with the most free space per volume. A clone's replica
    /// starts as a clone of this node's copy of its snapshot when
    /// `from_snapshot` (then that copy must be here), else empty.
    pub fn create_replica(
        &self,
        wanted: &crate::cluster::state::ClusterVolume,
        from_snapshot: bool,
    ) -> Result<(), VolumeError> {
        validate_name(&wanted.name)?;
        validate_size(wanted.size_bytes)?;
        let meta = self.meta.lock();
        if self.live.read().contains_key(&wanted.name) {
            return Err(VolumeError::Exists {
                name: wanted.name.clone(),
            });
        }
        if self.live.read().len() >= VOLUMES_MAX {
            return Err(VolumeError::TooMany);
        }
        // A clone's data starts as a clone of this node's copy of the
        // snapshot, which must be on the same disk.
        let base = match wanted.clone_of.filter(|_| from_snapshot) {
            Some(snapshot_id) => Some(self.snapshot_by_id(snapshot_id).ok_or_else(|| VolumeError::Missing {
                name: format!(
                    "snapshot with data id {snapshot_id} (the source of clone {})",
                    wanted.name
                ),
            })?),
            None => None,
        };
        let disk = match &base {
            Some(snapshot) => snapshot.disk_index(),
            None => self.pick_disk()?,
        };
        // Data a crash left behind under this id (never reused) goes first.
        let stale = self
            .engine
            .query(disk, |store| store.volume_ids())
            .unwrap_or_default()
            .contains(&wanted.id);
        if stale {
            self.release(disk, &wanted.name, wanted.id)?;
        }
        let record = VolumeRecord {
            name: wanted.name.clone(),
            id: wanted.id,
            size_bytes: wanted.size_bytes,
            block_size_bytes: wanted.block_size_bytes,
            replicas: wanted.replicas,
            disk_uuid: self.disks.read()[disk].uuid,
            epoch: wanted.epoch,
            fence_floor: wanted.coordinator_since,
            created_unix_seconds: wanted.created_unix_seconds,
            state: VolumeState::Ready,
            encrypted: wanted.encryption.is_some(),
            snapshot_of: None,
        };
        if let Some(snapshot) = &base {
            // Data first: a crash before the record leaves an orphan that
            // start-up releases, never a record without its data.
            self.engine
                .call(
                    disk,
                    Command::Clone {
                        source: snapshot.id,
                        target: wanted.id,
                        epoch: wanted.epoch,
                        volume_sequence: 1,
                    },
                )
                .map_err(|source| VolumeError::Store {
                    name: wanted.name.clone(),
                    source,
                })?;
        }
        meta.insert(&record).map_err(|error| match error {
            MetaError::Exists { name } => VolumeError::Exists { name },
            other => VolumeError::Meta(other),
        })?;
        drop(meta);
        tracing::info!(volume = %record.name, id = record.id, size_bytes = record.size_bytes, disk = %self.disk_path(disk), clone_of = ?wanted.clone_of, "local replica created");
        let volume = self.handle(&record, disk, 2);
        self.live.write().insert(record.name.clone(), (record, volume));
        Ok(())
    }

    /// The disk with the most free space per volume placed on it (so empty
    /// disks fill evenly, and a fuller disk gets fewer new volumes).
    fn pick_disk(&self) -> Result<usize, VolumeError> {
        let mut placed = vec![0u64; self.disks.read().len()];
        for (_, volume) in self.live.read().values() {
            placed[volume.disk_index()] += 1;
        }
        let mut best: Option<(u64, usize)> = None;
        for (disk, placed_count) in placed.iter().enumerate() {
            if self.is_retired(disk) {
                continue;
            }
            let Ok(space) = self.engine.query(disk, |store| store.space()) else {
                continue;
            };
            let score = space.capacity_blocks.saturating_sub(space.used_blocks) / (placed_count + 1);
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, disk));
            }
        }
        best.map(|(_, disk)| disk).ok_or(VolumeError::NoDisks)
    }

    /// Deletes a volume and releases its data. Refused while NBD clients are
    /// connected to it.
    pub fn delete(&self, name: &str) -> Result<(), VolumeError> {
        self.delete_from(&self.live, name)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Deletes the volume (or snapshot copy) `name` of `map`: marks its
    /// record deleting, stops serving it, releases its data, removes the
    /// record. Refused while NBD clients are connected to it.
    fn delete_from(
        &self,
        map: &RwLock<BTreeMap<String, (VolumeRecord, Arc<Volume>)>>,
        name: &str,
    ) -> Result<(), VolumeError> {
        let meta = self.meta.lock();
        let (mut record, volume) = map
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Missing { name: name.to_owned() })?;
        let connections = volume.connection_count();
        if connections > 0 {
            return Err(VolumeError::InUse {
                name: name.to_owned(),
                connections,
            });
        }
        record.state = VolumeState::Deleting;
        meta.update(&record)?;
        volume.deleted.store(true, Ordering::Release);
        map.write().remove(name);
        self.release(volume.disk_index(), name, volume.id)?;
        meta.remove(name)?;
        Ok(())
    }

    /// Grows a volume (shrinking would cut off data clients wrote).
    pub fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, VolumeError> {
        validate_size(size_bytes)?;
        let meta = self.meta.lock();
        let (mut record, volume) = self
            .live
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Missing { name: name.to_owned() })?;
        let old_size = record.size_bytes;
        if size_bytes < old_size {
            // Shrinking (the cluster allowed it): no I/O past the new end
            // from now on, and what lay there is discarded on this copy, so a
            // later grow reads zeroes there. The local record keeps the old
            // size until the zeroing is durable: after a crash in between,
            // the reconciler shrinks (and zeroes) again.
            volume.size_bytes.store(size_bytes, Ordering::Release);
            self.discard_tail(&volume, size_bytes, old_size)?;
        }
        record.size_bytes = size_bytes;
        meta.update(&record)?;
        volume.size_bytes.store(size_bytes, Ordering::Release);
        if let Some(entry) = self.live.write().get_mut(name) {
            entry.0.size_bytes = size_bytes;
        }
        drop(meta);
        self.inspect(name)
    }

    /// Makes blocks `[from, to)` (bytes) of this node's copy read as zeroes.
    fn discard_tail(&self, volume: &Volume, from_bytes: u64, to_bytes: u64) -> Result<(), VolumeError> {
        let (first, end) = (from_bytes / io::BLOCK_BYTES, to_bytes.div_ceil(io::BLOCK_BYTES));
        if first >= end {
            return Ok(());
        }
        let command = Command::Zero {
            volume_id: volume.id,
            lba: first,
            block_count: end - first,
            epoch: volume.epoch(),
            volume_sequence: volume.next_sequence(),
        };
        {
            // Called on a blocking thread; a drain must not switch disks under it.
            let _gate = volume.move_gate.blocking_read();
            self.engine
                .call(volume.disk_index(), command)
                .map(|_| ())
                .map_err(|source| VolumeError::Store {
                    name: volume.name.clone(),
                    source,
                })?;
            volume.note_changed(first, end - first);
        }
        tracing::warn!(volume = %volume.name, from_bytes, to_bytes, "volume shrunk: data past its new end discarded on this copy");
        Ok(())
    }

    /// Every live local replica, by name.
    #[must_use]
    pub fn live_volumes(&self) -> Vec<Arc<Volume>> {
        self.live
            .read()
            .values()
            .map(|(_, volume)| Arc::clone(volume))
            .collect()
    }

    /// Bytes of `volume`'s local replica that hold data.
    #[must_use]
    pub fn used_bytes(&self, volume: &Volume) -> u64 {
        let id = volume.id;
        self.engine
            .query(volume.disk_index(), move |store| store.volume_used_blocks(id))
            .unwrap_or(0)
            * io::BLOCK_BYTES
    }

    /// Everything known about one volume.
    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        let (record, volume) = self
            .live
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::Missing { name: name.to_owned() })?;
        let id = record.id;
        let used_blocks = self
            .engine
            .query(volume.disk_index(), move |store| store.volume_used_blocks(id))
            .unwrap_or(0);
        Ok(VolumeInfo {
            name: record.name.clone(),
            id,
            size_bytes: record.size_bytes,
            used_bytes: used_blocks * io::BLOCK_BYTES,
            block_size_bytes: record.block_size_bytes,
            replicas: record.replicas,
            disk_uuid: record.disk_uuid,
            disk_path: self.disk_path(volume.disk_index()),
            connections: volume.connections.load(Ordering::Acquire),
            created_unix_seconds: record.created_unix_seconds,
            state: "ready".into(),
            coordinator: 0,
            coordinator_nbd: String::new(),
            replica_nodes: Vec::new(),
            in_sync: Vec::new(),
            resyncs: Vec::new(),
            scrub: None,
            health: String::new(),
            replicas_down: Vec::new(),
            alerts: Vec::new(),
            owner: String::new(),
            group: String::new(),
            encryption: String::new(),
            attached_to: 0,
            epoch: record.epoch,
            snapshots: 0,
            snapshot_every_seconds: 0,
            snapshot_keep: 0,
            backup_every_seconds: 0,
            backup_keep: 0,
            backup_target: String::new(),
            standby_of: String::new(),
            standby_applied: String::new(),
            cloned_from: String::new(),
            io_priority: crate::volume::qos::IoPriority::default(),
            iops_limit: None,
            mib_per_s_limit: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "0", "pg-data_1.x", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "_a", ".a", "A", "a b", "a/b", &"a".repeat(64), "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_must_be_whole_blocks_within_the_limit() {
        assert!(validate_size(4096).is_ok());
        assert!(validate_size(0).is_err());
        assert!(validate_size(4097).is_err());
        assert!(validate_size(VOLUME_SIZE_BYTES_MAX + 4096).is_err());
    }
}
