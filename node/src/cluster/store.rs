//! Raft's durable storage: the log, the vote and the state machine in one
//! redb database (`cluster.redb` in the data directory). Every write is a
//! redb transaction committed with an fsync before openraft is told it is
//! done, so a kill -9 loses nothing Raft counted as persisted.
//!
//! The state machine is small (nodes, volumes, tokens): it is kept whole in
//! memory and written whole with the applied log id in one transaction per
//! apply batch; a snapshot is its JSON.

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
    /// Opens (or creates) `DIR/cluster.redb`.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Self>> {
        let path = dir.join(CLUSTER_FILE);
        let db =
            Database::create(&path).map_err(|error| anyhow::anyhow!("cluster metadata {}: {error}", path.display()))?;
        let store = Self { db, path };
        store
            .write(|_, _| Ok(()))
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

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(META).map_err(|e| e.to_string())?;
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

/// What the state machine persists, and what a snapshot carries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state machine over `ClusterDb`; `state` is what the node reads.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<ClusterDb>,
    persisted: Arc<RwLock<Persisted>>,
    /// The applied state, shared with the rest of the node.
    pub state: Arc<RwLock<ClusterState>>,
    /// Bumps after every applied batch (readers wait on it).
    pub applied: Arc<watch::Sender<u64>>,
}

impl StateMachine {
    /// Loads the last persisted state.
    pub fn open(db: Arc<ClusterDb>) -> anyhow::Result<Self> {
        let persisted: Persisted = db.get_meta(MACHINE).map_err(anyhow::Error::msg)?.unwrap_or_default();
        let state = Arc::new(RwLock::new(persisted.state.clone()));
        let index = persisted.last_applied.map_or(0, |id| id.index);
        Ok(Self {
            db,
            persisted: Arc::new(RwLock::new(persisted)),
            state,
            applied: Arc::new(watch::channel(index).0),
        })
    }

    async fn save(&self) -> Result<(), SError> {
        let bytes = serde_json::to_vec(&*self.persisted.read()).map_err(write_machine)?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            db.write(|_, meta| {
                meta.insert(MACHINE, bytes.as_slice()).map_err(|e| e.to_string())?;
                Ok(())
            })
            .map_err(write_machine)
        })
        .await
    }

    /// Keeps the latest snapshot (what `get_current_snapshot` hands out).
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

    fn publish(&self) {
        let persisted = self.persisted.read();
        *self.state.write() = persisted.state.clone();
        let index = persisted.last_applied.map_or(0, |id| id.index);
        self.applied.send_replace(index);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        let (data, meta) = {
            let persisted = self.persisted.read();
            let data = serde_json::to_vec(&*persisted).map_err(read_machine)?;
            let snapshot_id = format!(
                "{}-{}",
                persisted.last_applied.map_or(0, |id| id.index),
                uuid::Uuid::new_v4().simple()
            );
            let meta = SnapshotMeta {
                last_log_id: persisted.last_applied,
                last_membership: persisted.membership.clone(),
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
        let persisted = self.persisted.read();
        Ok((persisted.last_applied, persisted.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        {
            let mut persisted = self.persisted.write();
            for entry in entries {
                persisted.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => Outcome::Done,
                    EntryPayload::Normal(command) => persisted.state.apply(command),
                    EntryPayload::Membership(membership) => {
                        persisted.membership = StoredMembership::new(Some(entry.log_id), membership);
                        Outcome::Done
                    }
                };
                outcomes.push(outcome);
            }
        }
        self.save().await?;
        self.publish();
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        let data = snapshot.into_inner();
        let installed: Persisted = serde_json::from_slice(&data).map_err(write_machine)?;
        *self.persisted.write() = Persisted {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: installed.state,
        };
        self.save().await?;
        self.store_snapshot(meta, data).await?;
        self.publish();
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
