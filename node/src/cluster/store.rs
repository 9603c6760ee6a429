//! Raft's durable storage: the log, the vote and the state machine in one
//! redb database (`cluster.redb` in the data directory). Every write is a
//! redb transaction committed with an fsync before openraft is told it is
//! done, so a kill -9 loses nothing Raft counted as persisted.
//!
//! The state machine (nodes, volumes, tokens) is kept whole in memory and is
//! not written when entries are applied: it is written only as a snapshot
//! (its JSON, every `SNAPSHOT_LOGS_SINCE_LAST` entries, or when one is
//! installed from the leader). The committed index is saved before any entry
//! is applied, so a restart loads the last snapshot and re-applies the
//! committed entries after it from the log (openraft's `get_initial_state`);
//! `ClusterState::apply` is deterministic, so that rebuilds the same state.
//! Before, the whole state was serialized and fsynced per applied batch
//! (~2 MB at 2,000 volumes): that capped a leader at ~60 commits/s.
//! A data directory from before keeps its state under `state_machine`; it is
//! turned into a snapshot when opened.

// openraft's storage traits fix the (large) error type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::RwLock;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{ClusterState, Outcome};
use super::TypeConfig;

type NodeId = u64;
type Node = openraft::BasicNode;
type SError = StorageError<NodeId>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const CLUSTER_ID: &str = "cluster_id";
const FORMAT: &str = "format_version";

/// Version of what this file holds (tables, keys, JSON records: see
/// `node/CLUSTER-FORMAT.md`). A data directory from before versioning has
/// none and counts as 1.
pub const CLUSTER_FORMAT_VERSION: u32 = 1;
const MACHINE: &str = "state_machine";
const SNAPSHOT: &str = "snapshot";

/// File name inside the data directory.
pub const CLUSTER_FILE: &str = "cluster.redb";

fn io_error(make: fn(AnyError) -> StorageIOError<NodeId>, error: impl std::fmt::Display) -> SError {
    StorageError::IO {
        source: make(AnyError::error(error.to_string())),
    }
}

fn write_logs(error: impl std::fmt::Display) -> SError {
    io_error(StorageIOError::write_logs, error)
}
fn read_logs(error: impl std::fmt::Display) -> SError {
    io_error(StorageIOError::read_logs, error)
}
fn write_machine(error: impl std::fmt::Display) -> SError {
    io_error(StorageIOError::write_state_machine, error)
}
fn read_machine(error: impl std::fmt::Display) -> SError {
    io_error(StorageIOError::read_state_machine, error)
}

/// The open database, shared by the log store and the state machine.
pub struct ClusterDb {
    db: Database,
    path: PathBuf,
}

impl ClusterDb {
    /// Opens (or creates) `DIR/cluster.redb`. A file in a newer format
    /// than this build reads is refused before anything is written to it.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Self>> {
        let path = dir.join(CLUSTER_FILE);
        let db =
            Database::create(&path).map_err(|error| anyhow::anyhow!("cluster metadata {}: {error}", path.display()))?;
        let store = Self { db, path };
        let found: Option<u32> = store
            .get_meta(FORMAT)
            .map_err(|error| anyhow::anyhow!("cluster metadata {}: {error}", store.path.display()))?;
        if let Some(found) = found.filter(|found| *found > CLUSTER_FORMAT_VERSION) {
            anyhow::bail!(
                "cluster metadata {}: format version {found} is not supported by ballast {}, which reads format {CLUSTER_FORMAT_VERSION}; \
                 nothing in it was changed: run the ballast that wrote it (or a newer one)",
                store.path.display(),
                env!("CARGO_PKG_VERSION"),
            );
        }
        let version = serde_json::to_vec(&CLUSTER_FORMAT_VERSION)?;
        store
            .write(|_, meta| {
                if found.is_none() {
                    meta.insert(FORMAT, version.as_slice()).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .map_err(|error| anyhow::anyhow!("cluster metadata {}: {error}", store.path.display()))?;
        Ok(Arc::new(store))
    }

    /// Runs `f` in one write transaction (both tables open), committed durably.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, u64, &[u8]>, &mut redb::Table<'_, &str, &[u8]>) -> Result<T, String>,
    ) -> Result<T, String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let value = {
            let mut log = txn.open_table(LOG).map_err(|e| e.to_string())?;
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            f(&mut log, &mut meta)?
        };
        txn.commit().map_err(|e| e.to_string())?;
        Ok(value)
    }

    /// A `raft_meta` record; None when it (or, in a new file, the table) is absent.
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.to_string()),
        };
        let Some(value) = table.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|error| format!("unreadable {key} in {}: {error}", self.path.display()))
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.write(|_, meta| {
            meta.insert(key, bytes.as_slice()).map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    /// The cluster this node belongs to (set by init or join).
    pub fn cluster_id(&self) -> anyhow::Result<Option<uuid::Uuid>> {
        self.get_meta(CLUSTER_ID).map_err(anyhow::Error::msg)
    }

    /// Records (or clears, after a failed join) the cluster this node belongs to.
    pub fn set_cluster_id(&self, cluster_id: Option<uuid::Uuid>) -> anyhow::Result<()> {
        self.put_meta(CLUSTER_ID, &cluster_id).map_err(anyhow::Error::msg)
    }
}

/// The Raft log (and vote) over `ClusterDb`.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<ClusterDb>,
}

impl LogStore {
    pub fn new(db: Arc<ClusterDb>) -> Self {
        Self { db }
    }
}

fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, SError> {
    serde_json::from_slice(bytes).map_err(read_logs)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        let db = Arc::clone(&self.db);
        blocking(move || {
            let txn = db.db.begin_read().map_err(read_logs)?;
            let table = txn.open_table(LOG).map_err(read_logs)?;
            let mut entries = Vec::new();
            for item in table.range::<u64>(bounds).map_err(read_logs)? {
                let (_, value) = item.map_err(read_logs)?;
                entries.push(decode_entry(value.value())?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let purged: Option<LogId<NodeId>> = db.get_meta(PURGED).map_err(read_logs)?.flatten();
            let txn = db.db.begin_read().map_err(read_logs)?;
            let table = txn.open_table(LOG).map_err(read_logs)?;
            let last = match table.last().map_err(read_logs)? {
                Some((_, value)) => Some(decode_entry(value.value())?.log_id),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        let (db, vote) = (Arc::clone(&self.db), *vote);
        blocking(move || {
            db.put_meta(VOTE, &vote)
                .map_err(|e| io_error(StorageIOError::write_vote, e))
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        let db = Arc::clone(&self.db);
        blocking(move || db.get_meta(VOTE).map_err(|e| io_error(StorageIOError::read_vote, e))).await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        let db = Arc::clone(&self.db);
        blocking(move || db.put_meta(COMMITTED, &committed).map_err(write_logs)).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            Ok(db
                .get_meta::<Option<LogId<NodeId>>>(COMMITTED)
                .map_err(read_logs)?
                .flatten())
        })
        .await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|entry| serde_json::to_vec(&entry).map(|bytes| (entry.log_id.index, bytes)))
            .collect::<Result<_, _>>()
            .map_err(write_logs)?;
        let db = Arc::clone(&self.db);
        let result = blocking(move || {
            db.write(|log, _| {
                for (index, bytes) in &encoded {
                    log.insert(*index, bytes.as_slice()).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .map_err(write_logs)
        })
        .await;
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(error) => callback.log_io_completed(Err(std::io::Error::other(error.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            db.write(|log, _| log.retain(|index, _| index < log_id.index).map_err(|e| e.to_string()))
                .map_err(write_logs)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let purged = serde_json::to_vec(&Some(log_id)).map_err(write_logs)?;
            db.write(|log, meta| {
                meta.insert(PURGED, purged.as_slice()).map_err(|e| e.to_string())?;
                log.retain(|index, _| index > log_id.index).map_err(|e| e.to_string())
            })
            .map_err(write_logs)
        })
        .await
    }
}

/// What a snapshot carries (and what a data directory from before this
/// version kept under `state_machine`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    state: ClusterState,
}

/// `Persisted` by reference: a snapshot is serialized without a copy of the state.
#[derive(Serialize)]
struct PersistedRef<'a> {
    last_applied: &'a Option<LogId<NodeId>>,
    membership: &'a StoredMembership<NodeId, Node>,
    state: &'a ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// Where the applied entries stand (the state itself is in `StateMachine::state`).
#[derive(Clone, Debug, Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

/// The state machine over `ClusterDb`; `state` is what the node reads.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<ClusterDb>,
    /// Lock order: `applied` before `state`.
    applied_at: Arc<RwLock<Applied>>,
    /// The applied state, shared with the rest of the node (the only copy).
    pub state: Arc<RwLock<ClusterState>>,
    /// Bumps after every applied batch (readers wait on it).
    pub applied: Arc<watch::Sender<u64>>,
}

impl StateMachine {
    /// Loads the last snapshot (the committed entries after it are
    /// re-applied by openraft when the node's Raft starts).
    pub fn open(db: Arc<ClusterDb>) -> anyhow::Result<Self> {
        let snapshot: Option<StoredSnapshot> = db.get_meta(SNAPSHOT).map_err(anyhow::Error::msg)?;
        let legacy: Option<Persisted> = db.get_meta(MACHINE).map_err(anyhow::Error::msg)?;
        let from_snapshot = match &snapshot {
            Some(stored) => Some(
                serde_json::from_slice::<Persisted>(&stored.data)
                    .map_err(|error| anyhow::anyhow!("unreadable Raft snapshot in {}: {error}", db.path.display()))?,
            ),
            None => None,
        };
        let persisted = match (from_snapshot, legacy) {
            // A data directory from before: its whole state, saved per apply, is
            // at least as new as its last snapshot; it becomes the snapshot.
            (from_snapshot, Some(legacy))
                if from_snapshot
                    .as_ref()
                    .is_none_or(|s| s.last_applied <= legacy.last_applied) =>
            {
                Self::convert_legacy(&db, &legacy)?;
                legacy
            }
            (Some(from_snapshot), _) => from_snapshot,
            (None, _) => Persisted::default(),
        };
        let index = persisted.last_applied.map_or(0, |id| id.index);
        Ok(Self {
            db,
            applied_at: Arc::new(RwLock::new(Applied {
                last_applied: persisted.last_applied,
                membership: persisted.membership,
            })),
            state: Arc::new(RwLock::new(persisted.state)),
            applied: Arc::new(watch::channel(index).0),
        })
    }

    /// Stores a data directory's old whole-state record as its snapshot and
    /// drops the record, in one transaction.
    fn convert_legacy(db: &ClusterDb, legacy: &Persisted) -> anyhow::Result<()> {
        let data = serde_json::to_vec(legacy)?;
        let stored = serde_json::to_vec(&StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: legacy.last_applied,
                last_membership: legacy.membership.clone(),
                snapshot_id: format!("{}-converted", legacy.last_applied.map_or(0, |id| id.index)),
            },
            data,
        })?;
        db.write(|_, meta| {
            meta.insert(SNAPSHOT, stored.as_slice()).map_err(|e| e.to_string())?;
            meta.remove(MACHINE).map_err(|e| e.to_string())?;
            Ok(())
        })
        .map_err(|error| anyhow::anyhow!("cluster metadata {}: {error}", db.path.display()))
    }

    /// Keeps the latest snapshot (what `get_current_snapshot` hands out, and
    /// what a restart starts from).
    async fn store_snapshot(&self, meta: &SnapshotMeta<NodeId, Node>, data: Vec<u8>) -> Result<(), SError> {
        let stored = serde_json::to_vec(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .map_err(write_machine)?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            db.write(|_, table| {
                table.insert(SNAPSHOT, stored.as_slice()).map_err(|e| e.to_string())?;
                Ok(())
            })
            .map_err(write_machine)
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        let (data, meta) = {
            let applied = self.applied_at.read();
            let state = self.state.read();
            let data = serde_json::to_vec(&PersistedRef {
                last_applied: &applied.last_applied,
                membership: &applied.membership,
                state: &state,
            })
            .map_err(read_machine)?;
            let snapshot_id = format!(
                "{}-{}",
                applied.last_applied.map_or(0, |id| id.index),
                uuid::Uuid::new_v4().simple()
            );
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        self.store_snapshot(&meta, data.clone()).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), SError> {
        let applied = self.applied_at.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    /// Applies in memory only: openraft saved the committed index before
    /// calling this, and a restart re-applies from the log.
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        let index = {
            let mut applied = self.applied_at.write();
            let mut state = self.state.write();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => Outcome::Done,
                    EntryPayload::Normal(command) => state.apply(command),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Outcome::Done
                    }
                };
                outcomes.push(outcome);
            }
            applied.last_applied.map_or(0, |id| id.index)
        };
        self.applied.send_replace(index);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// Stores the snapshot first: a restart starts from it.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let installed: Persisted = serde_json::from_slice(&data).map_err(write_machine)?;
        self.store_snapshot(meta, data).await?;
        {
            let mut applied = self.applied_at.write();
            let mut state = self.state.write();
            *applied = Applied {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            *state = installed.state;
        }
        self.applied.send_replace(meta.last_log_id.map_or(0, |id| id.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        let db = Arc::clone(&self.db);
        let stored: Option<StoredSnapshot> = blocking(move || db.get_meta(SNAPSHOT).map_err(read_machine)).await?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

/// Runs redb work (fsyncs) off the async workers.
///
/// On a current-thread runtime the work runs inline instead. The daemon
/// never uses one (it runs a multi-thread runtime); the deterministic
/// simulation (`tests/cluster_sim.rs`) does, and there a blocking-pool
/// thread would let the order of the other tasks depend on how long an
/// fsync takes in real time, which would make a seed not reproduce.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, SError> + Send + 'static) -> Result<T, SError> {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| io_error(StorageIOError::write_logs, format!("storage task failed: {error}")))?
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership, StorageHelper};

    use super::*;
    use crate::cluster::state::{Command, NodeAdmin, NodeRecord};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), SError> {
            let dir = tempfile::tempdir().map_err(write_logs)?;
            let (_, log, machine) = open(dir.path());
            Ok((dir, log, machine))
        }
    }

    /// The store in `dir`, as a node opens it (before Raft re-applies the log).
    fn open(dir: &Path) -> (Arc<ClusterDb>, LogStore, StateMachine) {
        let db = ClusterDb::open(dir).expect("the store opens");
        let machine = StateMachine::open(Arc::clone(&db)).expect("the state machine opens");
        (Arc::clone(&db), LogStore::new(db), machine)
    }

    /// What Raft does when it starts: the committed entries after the snapshot re-applied.
    async fn replay(log: &mut LogStore, machine: &mut StateMachine) {
        StorageHelper::new(log, machine)
            .get_initial_state()
            .await
            .expect("initial state");
    }

    /// openraft's own conformance suite for storage (log, vote, committed
    /// index, re-applying committed entries at start-up, snapshots).
    #[test]
    fn the_store_passes_openraft_storage_suite() {
        Suite::test_all(Builder).expect("openraft's storage suite");
    }

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn init() -> Command {
        Command::Init {
            cluster_id: uuid::Uuid::from_u128(9),
            node: NodeRecord {
                id: 1,
                uuid: uuid::Uuid::from_u128(1),
                name: "n1".into(),
                peer_address: "127.0.0.1:1".into(),
                api_address: "127.0.0.1:2".into(),
                nbd_address: "127.0.0.1:3".into(),
                labels: BTreeMap::new(),
                admin: NodeAdmin::Active,
                joined_unix_seconds: 0,
            },
        }
    }

    /// Entry 0 a membership (as openraft's first entry), 1 the init, then a volume per entry.
    fn entries(from: u64, to: u64) -> Vec<Entry<TypeConfig>> {
        (from..=to)
            .map(|index| Entry {
                log_id: log_id(index),
                payload: match index {
                    0 => EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], None)),
                    1 => EntryPayload::Normal(init()),
                    _ => EntryPayload::Normal(Command::CreateVolume {
                        name: format!("vol-{index}"),
                        size_bytes: 1 << 30,
                        block_size_bytes: 4096,
                        replica_nodes: vec![1],
                        created_unix_seconds: index,
                        encryption: None,
                    }),
                },
            })
            .collect()
    }

    async fn append(log: &mut LogStore, entries: Vec<Entry<TypeConfig>>) {
        log.blocking_append(entries).await.expect("append");
    }

    /// Applying writes nothing: the state comes back at a restart from the
    /// committed log (and from the last snapshot, once there is one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_entries_are_not_written_and_a_restart_rebuilds_them_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut log, mut machine) = open(dir.path());
        append(&mut log, entries(0, 30)).await;
        log.save_committed(Some(log_id(20))).await.unwrap();
        machine.apply(entries(0, 20)).await.unwrap();
        let before = machine.state.read().clone();
        assert_eq!(before.volumes.len(), 19);
        assert!(
            db.get_meta::<Persisted>(MACHINE).unwrap().is_none(),
            "no whole state per apply"
        );
        assert!(
            db.get_meta::<StoredSnapshot>(SNAPSHOT).unwrap().is_none(),
            "no snapshot yet"
        );
        drop((log, machine, db));

        let (db, mut log, mut machine) = open(dir.path());
        assert_eq!(*machine.applied.borrow(), 0, "nothing but the log was kept");
        replay(&mut log, &mut machine).await;
        assert_eq!(
            machine.applied_state().await.unwrap().0,
            Some(log_id(20)),
            "re-applied up to the committed index, not beyond"
        );
        assert_eq!(*machine.state.read(), before, "the same state");
        assert_eq!(*machine.applied.borrow(), 20);

        // A snapshot, then more entries: a restart starts from the snapshot.
        machine.build_snapshot().await.unwrap();
        log.save_committed(Some(log_id(30))).await.unwrap();
        machine.apply(entries(21, 30)).await.unwrap();
        let after = machine.state.read().clone();
        assert_eq!(after.volumes.len(), 29);
        drop((log, machine, db));
        let (_db, mut log, mut machine) = open(dir.path());
        assert_eq!(*machine.applied.borrow(), 20, "loaded from the snapshot");
        replay(&mut log, &mut machine).await;
        assert_eq!(*machine.state.read(), after);
        assert_eq!(*machine.applied.borrow(), 30);
    }

    #[test]
    fn a_cluster_file_in_a_newer_format_is_refused_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let db = ClusterDb::open(dir.path()).unwrap();
        assert_eq!(
            db.get_meta::<u32>(FORMAT).unwrap(),
            Some(CLUSTER_FORMAT_VERSION),
            "recorded at creation"
        );
        db.put_meta(FORMAT, &(CLUSTER_FORMAT_VERSION + 1)).unwrap();
        drop(db);
        let path = dir.path().join(CLUSTER_FILE);
        let before = std::fs::read(&path).unwrap();
        let Err(error) = ClusterDb::open(dir.path()) else {
            panic!("a newer format opened")
        };
        let error = error.to_string();
        for part in [
            &format!("format version {}", CLUSTER_FORMAT_VERSION + 1),
            &format!("ballast {}", env!("CARGO_PKG_VERSION")),
            &format!("reads format {CLUSTER_FORMAT_VERSION}"),
        ] {
            assert!(error.contains(part.as_str()), "{part:?} missing: {error}");
        }
        assert!(std::fs::read(&path).unwrap() == before, "the file was changed");
    }

    /// A data directory from before this version kept the whole state under
    /// `state_machine`; it opens with that state, which becomes its snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_data_directory_from_before_opens_with_its_state_as_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let db = ClusterDb::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        assert_eq!(state.apply(init()), Outcome::Done);
        let legacy = Persisted {
            last_applied: Some(log_id(7)),
            membership: StoredMembership::new(Some(log_id(1)), Membership::new(vec![BTreeSet::from([1])], None)),
            state: state.clone(),
        };
        db.put_meta(MACHINE, &legacy).unwrap();
        drop(db);

        let db = ClusterDb::open(dir.path()).unwrap();
        let mut machine = StateMachine::open(Arc::clone(&db)).unwrap();
        assert_eq!(*machine.state.read(), state);
        assert_eq!(machine.applied_state().await.unwrap().0, Some(log_id(7)));
        assert!(
            db.get_meta::<Persisted>(MACHINE).unwrap().is_none(),
            "the old record is gone"
        );
        let snapshot = machine.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(7)));
        drop((machine, db));
        let db = ClusterDb::open(dir.path()).unwrap();
        let machine = StateMachine::open(db).unwrap();
        assert_eq!(*machine.state.read(), state, "and opens again from the snapshot");
    }
}
