//! `replication::dirty::DirtyLog` modeled: the coordinator's durable
//! dirty-region map (`dirty.redb`). Changes are queued and committed in
//! batches by one writer (a task of the node): a batch takes what is
//! queued, then takes a commit's time, then is durable at once (one redb
//! transaction). The generation a change is durable at is the one the
//! writer gives the next batch when it is queued (as in the real queue).
//! A crash loses the queue and a batch being committed; the committed
//! tables survive. Commits do not fail here (no fault on the data
//! directory's disk).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use ::node::replication::dirty::Identity;
use tokio::sync::Notify;

use super::Sim;

#[derive(Clone, Debug)]
enum Change {
    Track {
        node: u64,
        identity: Identity,
    },
    Regions {
        node: u64,
        regions: Vec<u64>,
    },
    /// One node's rows (Some) or every node's (None).
    Forget {
        node: Option<u64>,
    },
}

/// The committed tables (`tracked` and `regions` of the one volume).
#[derive(Clone, Debug, Default)]
struct Tables {
    tracked: BTreeMap<u64, Identity>,
    regions: BTreeSet<(u64, u64)>,
}

impl Tables {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Track { node, identity } => {
                self.tracked.insert(*node, *identity);
            }
            Change::Regions { node, regions } => {
                self.regions.extend(regions.iter().map(|region| (*node, *region)));
            }
            Change::Forget { node: Some(node) } => {
                self.tracked.remove(node);
                self.regions.retain(|(other, _)| other != node);
            }
            Change::Forget { node: None } => {
                self.tracked.clear();
                self.regions.clear();
            }
        }
    }
}

/// What a process holds in memory (lost on a crash).
struct Queue {
    changes: Vec<Change>,
    next: u64,
    durable: u64,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            changes: Vec::new(),
            next: 1,
            durable: 0,
        }
    }
}

/// One node's dirty log (one per node for its whole life: `crash` drops
/// what was not committed).
#[derive(Default)]
pub struct DirtyLog {
    tables: RefCell<Tables>,
    queue: RefCell<Queue>,
    queued: Notify,
    committed: Notify,
}

impl DirtyLog {
    /// Power cut: queued and committing changes are lost.
    pub fn crash(&self) {
        *self.queue.borrow_mut() = Queue::default();
    }

    fn queue(&self, change: Change) -> u64 {
        let mut queue = self.queue.borrow_mut();
        queue.changes.push(change);
        let generation = queue.next;
        drop(queue);
        self.queued.notify_one();
        generation
    }

    /// `DirtyLog::track`: tracking of `node` starts anew, with `regions`.
    pub fn track(&self, node: u64, identity: Identity, regions: Vec<u64>) -> u64 {
        self.queue(Change::Forget { node: Some(node) });
        self.queue(Change::Track { node, identity });
        self.queue(Change::Regions { node, regions })
    }

    pub fn add(&self, node: u64, regions: Vec<u64>) -> u64 {
        self.queue(Change::Regions { node, regions })
    }

    pub fn forget(&self, node: Option<u64>) {
        self.queue(Change::Forget { node });
    }

    /// `DirtyLog::durable`.
    pub async fn durable(&self, generation: u64) {
        loop {
            let committed = self.committed.notified();
            if self.queue.borrow().durable >= generation {
                return;
            }
            committed.await;
        }
    }

    /// `DirtyLog::load`: the committed tracking (rows without a tracking
    /// row are not returned, as in the real table walk).
    pub fn load(&self) -> Vec<(u64, Identity, BTreeSet<u64>)> {
        let tables = self.tables.borrow();
        tables
            .tracked
            .iter()
            .map(|(node, identity)| {
                let regions = tables
                    .regions
                    .iter()
                    .filter(|(other, _)| other == node)
                    .map(|(_, region)| *region)
                    .collect();
                (*node, *identity, regions)
            })
            .collect()
    }
}

/// The writer thread of node `id`'s log (a task: it dies with the node).
pub async fn writer(sim: Rc<Sim>, id: u64) {
    let log = Rc::clone(&sim.node(id).dirty_log);
    loop {
        loop {
            let queued = log.queued.notified();
            if !log.queue.borrow().changes.is_empty() {
                break;
            }
            queued.await;
        }
        let (changes, generation) = {
            let mut queue = log.queue.borrow_mut();
            let generation = queue.next;
            queue.next += 1;
            (std::mem::take(&mut queue.changes), generation)
        };
        // An fsync'd redb commit; now and then a slow one.
        let took = if sim.percent(3) {
            sim.range_ms(5, 25)
        } else {
            sim.range_ms(0, 2)
        };
        tokio::time::sleep(took).await;
        {
            let mut tables = log.tables.borrow_mut();
            for change in &changes {
                tables.apply(change);
            }
        }
        log.queue.borrow_mut().durable = generation;
        log.committed.notify_waiters();
    }
}
