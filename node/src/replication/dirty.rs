//! The coordinator's dirty-region map, kept durable (`dirty.redb` in the
//! data directory) so that a coordinator that restarts while a replica is
//! out of sync still resyncs it incrementally.
//!
//! Rows: per (volume id, replica node) that fell out of sync under this
//! node, a *tracking* row holding its `Identity` (the coordinator tenure it
//! started in, `ClusterVolume::coordinator_since`, and the replica's
//! incarnation, `replica_added`), and one row per 64 KiB region mutated
//! since. The map is only trusted for the same identity: a node that lost
//! the volume to another coordinator and got it back (writes it never
//! saw), or a replica removed and added again (empty), gets a full copy.
//!
//! Ordering, which is what makes it sound: a region newly dirty is durable
//! here before the write that dirtied it is acknowledged, and the tracking
//! row (with the missed write's regions) is durable before the `ReplicaOut`
//! that takes the replica out is proposed. Writes to regions already dirty
//! wait for nothing. Changes from concurrent writers are committed together
//! (one redb transaction per batch) by one thread.

// redb's error is large; it is rare here and turned into text at the edge.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use redb::TableDefinition;

pub const DIRTY_FILE: &str = "dirty.redb";

/// (volume id, node) → (coordinator_since, replica_added) of the tracking.
const TRACKED: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("tracked");
/// (volume id, node, region) → ().
const REGIONS: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("regions");

/// What a replica's tracking describes: the coordinator tenure it was
/// kept in and the incarnation of the replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub coordinator_since: u64,
    pub replica_added: u64,
}

#[derive(Debug)]
enum Change {
    Track {
        volume: u64,
        node: u64,
        identity: Identity,
    },
    Regions {
        volume: u64,
        node: u64,
        regions: Vec<u64>,
    },
    /// Forget `node` (Some) or every node (None) of `volume`.
    Forget {
        volume: u64,
        node: Option<u64>,
    },
}

#[derive(Default)]
struct Queue {
    changes: Vec<Change>,
    /// Generation the queued changes will be durable at.
    next: u64,
    /// Every change queued up to this generation is durable.
    durable: u64,
    /// Set when a commit failed: nothing is durable any more.
    failed: Option<String>,
    stop: bool,
}

/// The durable dirty-region map of this node's coordinated volumes.
pub struct DirtyLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::ops::Deref for DirtyLog {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// What the writer thread and the callers share.
pub struct Shared {
    db: redb::Database,
    queue: Mutex<Queue>,
    /// Wakes the writer thread (changes queued).
    queued: Condvar,
    /// Wakes waiters (a generation became durable).
    durable: tokio::sync::watch::Sender<u64>,
}

/// A volume's tracking as stored: per node, its identity and regions.
pub type Tracked = Vec<(u64, Identity, BTreeSet<u64>)>;

impl DirtyLog {
    /// Opens (or creates) `DIR/dirty.redb` and starts its writer thread.
    pub fn open(data_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let path = data_dir.join(DIRTY_FILE);
        let db = redb::Database::create(&path)
            .map_err(|error| anyhow::anyhow!("cannot open {}: {error}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(TRACKED)?;
        txn.open_table(REGIONS)?;
        txn.commit()?;
        let shared = Arc::new(Shared {
            db,
            queue: Mutex::new(Queue {
                next: 1,
                ..Queue::default()
            }),
            queued: Condvar::new(),
            durable: tokio::sync::watch::channel(0).0,
        });
        let writer = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ballast-dirty".into())
            .spawn(move || writer.write_loop())?;
        Ok(Arc::new(Self {
            shared,
            writer: Mutex::new(Some(thread)),
        }))
    }

    /// Stops the writer thread once what is queued is written.
    pub fn stop(&self) {
        self.shared.queue.lock().stop = true;
        self.shared.queued.notify_one();
        if let Some(thread) = self.writer.lock().take() {
            let _ = thread.join();
        }
        // Anyone still waiting learns that nothing more becomes durable.
        let mut queue = self.shared.queue.lock();
        if !queue.changes.is_empty() || queue.failed.is_some() {
            queue.failed.get_or_insert_with(|| "the node is stopping".into());
        }
        drop(queue);
        self.shared.durable.send_modify(|_| {});
    }
}

impl Shared {
    fn write_loop(&self) {
        loop {
            let (changes, generation) = {
                let mut queue = self.queue.lock();
                while queue.changes.is_empty() && !queue.stop {
                    self.queued.wait(&mut queue);
                }
                if queue.changes.is_empty() {
                    return;
                }
                let generation = queue.next;
                queue.next += 1;
                (std::mem::take(&mut queue.changes), generation)
            };
            let result = self.commit(&changes);
            let mut queue = self.queue.lock();
            match result {
                Ok(()) => queue.durable = generation,
                Err(error) => {
                    tracing::error!(%error, "cannot write the dirty-region map; replicated writes fail until restart");
                    queue.failed = Some(error.to_string());
                }
            }
            drop(queue);
            self.durable.send_replace(generation);
        }
    }

    fn commit(&self, changes: &[Change]) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut tracked = txn.open_table(TRACKED)?;
            let mut regions = txn.open_table(REGIONS)?;
            for change in changes {
                match change {
                    Change::Track { volume, node, identity } => {
                        tracked.insert((*volume, *node), (identity.coordinator_since, identity.replica_added))?;
                    }
                    Change::Regions {
                        volume,
                        node,
                        regions: list,
                    } => {
                        for region in list {
                            regions.insert((*volume, *node, *region), ())?;
                        }
                    }
                    Change::Forget { volume, node } => {
                        let (first, last) = node.map_or((0, u64::MAX), |node| (node, node));
                        tracked.retain_in((*volume, first)..=(*volume, last), |_, _| false)?;
                        regions.retain_in((*volume, first, 0)..=(*volume, last, u64::MAX), |_, ()| false)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn queue(&self, change: Change) -> u64 {
        let mut queue = self.queue.lock();
        queue.changes.push(change);
        let generation = queue.next;
        drop(queue);
        self.queued.notify_one();
        generation
    }

    /// Starts tracking `node` of `volume` (replacing older tracking), with `regions`.
    pub fn track(&self, volume: u64, node: u64, identity: Identity, regions: Vec<u64>) -> u64 {
        self.queue(Change::Forget {
            volume,
            node: Some(node),
        });
        self.queue(Change::Track { volume, node, identity });
        self.queue(Change::Regions { volume, node, regions })
    }

    /// Records more dirty regions of a tracked node.
    pub fn add(&self, volume: u64, node: u64, regions: Vec<u64>) -> u64 {
        self.queue(Change::Regions { volume, node, regions })
    }

    /// Forgets `node`'s tracking (it is in sync again), or every node's.
    pub fn forget(&self, volume: u64, node: Option<u64>) {
        self.queue(Change::Forget { volume, node });
    }

    /// Waits until every change up to `generation` is durable.
    pub async fn durable(&self, generation: u64) -> Result<(), String> {
        let mut watch = self.durable.subscribe();
        loop {
            {
                let queue = self.queue.lock();
                if let Some(error) = &queue.failed {
                    return Err(format!("the dirty-region map cannot be written: {error}"));
                }
                if queue.durable >= generation {
                    return Ok(());
                }
            }
            if watch.changed().await.is_err() {
                return Err("the dirty-region map stopped".into());
            }
        }
    }

    /// The tracking of `volume` an earlier run left (the caller checks
    /// each identity before trusting it).
    pub fn load(&self, volume: u64) -> Result<Tracked, redb::Error> {
        let txn = self.db.begin_read()?;
        let tracked = txn.open_table(TRACKED)?;
        let regions = txn.open_table(REGIONS)?;
        let mut out = Vec::new();
        for row in tracked.range((volume, 0)..=(volume, u64::MAX))? {
            let (key, value) = row?;
            let (_, node) = key.value();
            let (coordinator_since, replica_added) = value.value();
            let mut set = BTreeSet::new();
            for region in regions.range((volume, node, 0)..=(volume, node, u64::MAX))? {
                set.insert(region?.0.value().2);
            }
            let identity = Identity {
                coordinator_since,
                replica_added,
            };
            out.push((node, identity, set));
        }
        Ok(out)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn identity(coordinator_since: u64) -> Identity {
        Identity {
            coordinator_since,
            replica_added: 1,
        }
    }

    #[test]
    fn tracked_regions_survive_a_reopen_with_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = DirtyLog::open(dir.path()).unwrap();
            log.track(7, 2, identity(3), vec![10, 11]);
            let generation = log.add(7, 2, vec![11, 40]);
            log.track(7, 5, identity(4), vec![1]);
            let last = log.track(8, 2, identity(1), vec![99]);
            block_on(log.durable(generation.max(last))).unwrap();
            log.stop();
        }
        let log = DirtyLog::open(dir.path()).unwrap();
        assert_eq!(
            log.load(7).unwrap(),
            vec![
                (2, identity(3), BTreeSet::from([10, 11, 40])),
                (5, identity(4), BTreeSet::from([1]))
            ]
        );
        // Tracking a node again starts from nothing.
        let generation = log.track(7, 2, identity(6), vec![3]);
        block_on(log.durable(generation)).unwrap();
        assert_eq!(log.load(7).unwrap()[0], (2, identity(6), BTreeSet::from([3])));
    }

    #[test]
    fn forgetting_a_node_drops_its_rows_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = DirtyLog::open(dir.path()).unwrap();
        log.track(7, 2, identity(3), vec![10]);
        log.track(7, 5, identity(3), vec![20]);
        log.forget(7, Some(2));
        let generation = log.add(7, 5, vec![21]);
        block_on(log.durable(generation)).unwrap();
        assert_eq!(log.load(7).unwrap(), vec![(5, identity(3), BTreeSet::from([20, 21]))]);
        log.forget(7, None);
        let generation = log.add(9, 1, vec![]);
        block_on(log.durable(generation)).unwrap();
        assert!(log.load(7).unwrap().is_empty());
    }
}
