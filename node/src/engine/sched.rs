//! Where requests meet a disk (issue 26): a per-disk scheduler between
//! the reactor's queue and the store, so a quiet high-priority volume is
//! not stuck behind megabytes another volume queued, and background work
//! (resync, scrub, drain, backup) takes what the clients leave.
//!
//! Each request belongs to a flow, (volume, class). Flows share the disk
//! by start-time fair queuing: a request's tag is its flow's last finish
//! tag (or the disk's virtual clock, for a flow that was idle) plus its
//! cost over its class's weight, and the smallest tag goes first. Weights:
//! high 8, medium 4, low 2, background 1.
//!
//! Sharing alone does not protect latency: what matters to a QD1 commit is
//! how much lower-priority data the store and the device hold when it
//! arrives (the log makes a write durable in order, behind every batch
//! before it). So each class has a level (high 0, medium 1, low 2,
//! background 3), and while a request of a higher level arrived within
//! `ACTIVE_WINDOW`, the requests of a level and those below it may hold
//! only `PROTECTED_BYTES` in flight together, with their large writes cut
//! into pieces of that size (`split_bytes`); one request is always let go
//! when none of them is in flight, so every class keeps progressing (the
//! floor). With no higher level active a class runs as deep as the disk
//! takes (`DISK_BYTES_MAX`): alone, nothing changes.
//!
//! Order: requests of one flow go in the order they came. A request never
//! passes an earlier queued one of the same volume (in another class) whose
//! blocks it overlaps. Requests without a class (flushes, snapshots and
//! clones, deletes, queries of the store) are barriers: they go once every
//! request that came before them went, and nothing after them goes first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::volume::qos::IoPriority;

/// How long a request keeps its level "active" (protecting it from the
/// levels below).
pub const ACTIVE_WINDOW: Duration = Duration::from_millis(100);
/// What the levels below an active one may hold in flight together.
pub const PROTECTED_BYTES: u64 = 64 << 10;
/// What the disk's requests may hold in flight when no level is protected
/// (above what a store pipeline of 1-MiB batches holds, so no class alone
/// is slowed).
pub const DISK_BYTES_MAX: u64 = 32 << 20;
/// The cost of a request beyond its bytes (seek, interrupt, batch header).
pub const REQUEST_COST_BYTES: u64 = 16 << 10;

/// Background work a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Work {
    /// Copying a volume to a replica that missed writes or is new (resync, rebuild).
    Resync,
    /// Comparing replicas and reading data back to check it.
    Scrub,
    /// Moving a volume to another disk.
    Drain,
    /// Backups, restores and standby updates.
    Backup,
}

/// Whose a request is: a client's (by its volume's priority) or background work's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoClass {
    Client(IoPriority),
    Background(Work),
}

impl Default for IoClass {
    fn default() -> Self {
        Self::Client(IoPriority::Medium)
    }
}

/// Number of classes (`IoClass::index`).
pub const CLASSES: usize = 7;
/// Levels: high, medium, low, background.
const LEVELS: usize = 4;

impl IoClass {
    /// Every class, in `index` order.
    pub const ALL: [IoClass; CLASSES] = [
        IoClass::Client(IoPriority::High),
        IoClass::Client(IoPriority::Medium),
        IoClass::Client(IoPriority::Low),
        IoClass::Background(Work::Resync),
        IoClass::Background(Work::Scrub),
        IoClass::Background(Work::Drain),
        IoClass::Background(Work::Backup),
    ];

    #[must_use]
    pub fn index(self) -> usize {
        match self {
            Self::Client(IoPriority::High) => 0,
            Self::Client(IoPriority::Medium) => 1,
            Self::Client(IoPriority::Low) => 2,
            Self::Background(Work::Resync) => 3,
            Self::Background(Work::Scrub) => 4,
            Self::Background(Work::Drain) => 5,
            Self::Background(Work::Backup) => 6,
        }
    }

    /// The class's name in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client(priority) => priority.as_str(),
            Self::Background(Work::Resync) => "resync",
            Self::Background(Work::Scrub) => "scrub",
            Self::Background(Work::Drain) => "drain",
            Self::Background(Work::Backup) => "backup",
        }
    }

    fn level(self) -> usize {
        match self {
            Self::Client(IoPriority::High) => 0,
            Self::Client(IoPriority::Medium) => 1,
            Self::Client(IoPriority::Low) => 2,
            Self::Background(_) => 3,
        }
    }

    fn weight(self) -> f64 {
        match self {
            Self::Client(IoPriority::High) => 8.0,
            Self::Client(IoPriority::Medium) => 4.0,
            Self::Client(IoPriority::Low) => 2.0,
            Self::Background(_) => 1.0,
        }
    }
}

tokio::task_local! {
    /// The background work the current task does (`as_background`).
    static BACKGROUND: Work;
}

/// Runs `future` with its disk requests counted as `work` (not as the
/// volume's clients').
pub async fn as_background<F: std::future::Future>(work: Work, future: F) -> F::Output {
    BACKGROUND.scope(work, future).await
}

/// Spawns `future` on the runtime as a task doing `work` (`as_background`).
pub fn spawn_background<F>(work: Work, future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(BACKGROUND.scope(work, future))
}

/// The class of a request the current task makes for a volume of `priority`.
#[must_use]
pub fn class_for(priority: IoPriority) -> IoClass {
    BACKGROUND
        .try_with(|work| IoClass::Background(*work))
        .unwrap_or(IoClass::Client(priority))
}

/// What a request is, as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub volume: u64,
    pub class: IoClass,
    pub lba: u64,
    pub blocks: u64,
    /// Data bytes it moves (0 for a zeroing).
    pub bytes: u64,
}

impl Key {
    fn cost(&self) -> u64 {
        REQUEST_COST_BYTES + self.bytes
    }

    fn overlaps(&self, other: &Key) -> bool {
        self.volume == other.volume && self.lba < other.lba + other.blocks && other.lba < self.lba + self.blocks
    }
}

/// Handed back at completion (`DiskScheduler::complete`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    level: usize,
    cost: u64,
}

impl Ticket {
    /// A barrier's: nothing in flight to release.
    pub const NONE: Ticket = Ticket { level: 0, cost: 0 };
}

struct Queued<T> {
    seq: u64,
    at: Instant,
    key: Key,
    start_tag: f64,
    item: T,
}

struct Flow<T> {
    volume: u64,
    class: IoClass,
    queue: VecDeque<Queued<T>>,
    last_finish: f64,
    /// Queue wait and requests not yet published (`DiskScheduler::publish`).
    waited: Duration,
    requests: u64,
}

/// Counters a disk's scheduler publishes (read by metrics on any thread).
#[derive(Debug, Default)]
pub struct SchedStats {
    /// Per class (`IoClass::index`): requests and bytes sent to the store,
    /// and nanoseconds they waited in the scheduler.
    pub requests: [AtomicU64; CLASSES],
    pub bytes: [AtomicU64; CLASSES],
    pub wait_ns: [AtomicU64; CLASSES],
    /// Per volume, its clients' requests: (nanoseconds waited, requests),
    /// published every tick.
    pub volumes: parking_lot::Mutex<std::collections::HashMap<u64, (u64, u64)>>,
}

/// One disk's scheduler; `T` is what a request carries (the reactor's
/// command and answer).
pub struct DiskScheduler<T> {
    flows: Vec<Flow<T>>,
    /// Barriers, in arrival order: (seq, item).
    barriers: VecDeque<(u64, T)>,
    vclock: f64,
    next_seq: u64,
    in_flight: [u64; LEVELS],
    last_seen: [Option<Instant>; LEVELS],
    stats: std::sync::Arc<SchedStats>,
}

impl<T> DiskScheduler<T> {
    #[must_use]
    pub fn new(stats: std::sync::Arc<SchedStats>) -> Self {
        Self {
            flows: Vec::new(),
            barriers: VecDeque::new(),
            vclock: 0.0,
            next_seq: 0,
            in_flight: [0; LEVELS],
            last_seen: [None; LEVELS],
            stats,
        }
    }

    /// Whether a level above `class`'s is active now: its large writes
    /// should then be cut into pieces of the returned size.
    #[must_use]
    pub fn split_bytes(&self, class: IoClass, now: Instant) -> Option<u64> {
        self.protected(class.level(), now).then_some(PROTECTED_BYTES)
    }

    fn protected(&self, level: usize, now: Instant) -> bool {
        self.last_seen[..level]
            .iter()
            .flatten()
            .any(|seen| now.saturating_duration_since(*seen) < ACTIVE_WINDOW)
    }

    /// Queues a request (`key`), or a barrier (None).
    pub fn enqueue(&mut self, key: Option<Key>, item: T, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(key) = key else {
            self.barriers.push_back((seq, item));
            return;
        };
        let level = key.class.level();
        self.last_seen[level] = Some(now);
        let index = match self
            .flows
            .iter()
            .position(|flow| flow.volume == key.volume && flow.class == key.class)
        {
            Some(index) => index,
            None => {
                self.flows.push(Flow {
                    volume: key.volume,
                    class: key.class,
                    queue: VecDeque::new(),
                    last_finish: self.vclock,
                    waited: Duration::ZERO,
                    requests: 0,
                });
                self.flows.len() - 1
            }
        };
        let flow = &mut self.flows[index];
        let start_tag = if flow.queue.is_empty() {
            flow.last_finish.max(self.vclock)
        } else {
            flow.last_finish
        };
        flow.last_finish = start_tag + key.cost() as f64 / key.class.weight();
        flow.queue.push_back(Queued {
            seq,
            at: now,
            key,
            start_tag,
            item,
        });
    }

    /// Whether anything is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.barriers.is_empty() && self.flows.iter().all(|flow| flow.queue.is_empty())
    }

    /// The next request to send to the store, if one may go now; its
    /// ticket goes back to `complete` when the store answers it. `all`:
    /// every queued request may go (shutting down).
    pub fn next(&mut self, now: Instant, all: bool) -> Option<(T, Ticket)> {
        let oldest_barrier = self.barriers.front().map(|(seq, _)| *seq);
        let oldest_queued = self
            .flows
            .iter()
            .filter_map(|flow| flow.queue.front().map(|queued| queued.seq))
            .min();
        if let Some(barrier) = oldest_barrier {
            if oldest_queued.is_none_or(|seq| seq > barrier) {
                let (_, item) = self.barriers.pop_front().expect("just seen");
                return Some((item, Ticket::NONE));
            }
        }
        let mut best: Option<(usize, f64)> = None;
        for (index, flow) in self.flows.iter().enumerate() {
            let Some(head) = flow.queue.front() else {
                continue;
            };
            if oldest_barrier.is_some_and(|barrier| head.seq > barrier) {
                continue;
            }
            if !all && !self.admissible(head.key.class.level(), head.key.cost(), now) {
                continue;
            }
            if best.is_none_or(|(_, tag)| head.start_tag < tag) {
                best = Some((index, head.start_tag));
            }
        }
        let (mut index, _) = best?;
        // An earlier queued request of the same volume whose blocks overlap
        // goes first (its flow's head is earlier still, so it may go).
        for _ in 0..self.flows.len() {
            let head = self.flows[index].queue.front().expect("chosen flows have a head");
            let (seq, key) = (head.seq, head.key);
            let earlier = self.flows.iter().position(|flow| {
                flow.class != key.class
                    && flow.volume == key.volume
                    && flow
                        .queue
                        .iter()
                        .take_while(|queued| queued.seq < seq)
                        .any(|queued| queued.key.overlaps(&key))
            });
            match earlier {
                Some(other) => index = other,
                None => break,
            }
        }
        let flow = &mut self.flows[index];
        let queued = flow.queue.pop_front().expect("chosen flows have a head");
        let waited = now.saturating_duration_since(queued.at);
        flow.waited += waited;
        flow.requests += 1;
        let class = queued.key.class;
        self.vclock = self.vclock.max(queued.start_tag);
        let ticket = Ticket {
            level: class.level(),
            cost: queued.key.cost(),
        };
        self.in_flight[ticket.level] += ticket.cost;
        let stats = &self.stats;
        stats.requests[class.index()].fetch_add(1, Ordering::Relaxed);
        stats.bytes[class.index()].fetch_add(queued.key.bytes, Ordering::Relaxed);
        stats.wait_ns[class.index()].fetch_add(nanos(waited), Ordering::Relaxed);
        Some((queued.item, ticket))
    }

    fn admissible(&self, level: usize, cost: u64, now: Instant) -> bool {
        let held: u64 = self.in_flight[level..].iter().sum();
        let cap = if self.protected(level, now) {
            PROTECTED_BYTES
        } else {
            DISK_BYTES_MAX
        };
        held == 0 || held + cost <= cap
    }

    /// The store answered a request sent with `ticket`.
    pub fn complete(&mut self, ticket: Ticket) {
        self.in_flight[ticket.level] -= ticket.cost;
    }

    /// Publishes the client flows' queue waits per volume and forgets idle flows.
    pub fn publish(&mut self) {
        let mut volumes = self.stats.volumes.lock();
        for flow in &mut self.flows {
            if flow.requests > 0 && matches!(flow.class, IoClass::Client(_)) {
                let entry = volumes.entry(flow.volume).or_default();
                entry.0 += nanos(flow.waited);
                entry.1 += flow.requests;
                flow.waited = Duration::ZERO;
                flow.requests = 0;
            }
        }
        self.flows.retain(|flow| !flow.queue.is_empty());
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const HIGH: IoClass = IoClass::Client(IoPriority::High);
    const MEDIUM: IoClass = IoClass::Client(IoPriority::Medium);
    const LOW: IoClass = IoClass::Client(IoPriority::Low);
    const RESYNC: IoClass = IoClass::Background(Work::Resync);

    fn key(volume: u64, class: IoClass, lba: u64, bytes: u64) -> Option<Key> {
        Some(Key {
            volume,
            class,
            lba,
            blocks: bytes.div_ceil(4096).max(1),
            bytes,
        })
    }

    fn scheduler() -> DiskScheduler<&'static str> {
        DiskScheduler::new(Arc::new(SchedStats::default()))
    }

    /// Takes every request that may go now.
    fn drain(scheduler: &mut DiskScheduler<&'static str>, now: Instant) -> Vec<(&'static str, Ticket)> {
        std::iter::from_fn(|| scheduler.next(now, false)).collect()
    }

    #[test]
    fn alone_a_class_runs_as_deep_as_the_disk_takes_in_arrival_order() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        for (lba, name) in ["a", "b", "c", "d", "e", "f", "g", "h"].into_iter().enumerate() {
            scheduler.enqueue(key(1, LOW, lba as u64 * 256, 1 << 20), name, now);
        }
        let went: Vec<_> = drain(&mut scheduler, now).into_iter().map(|(name, _)| name).collect();
        assert_eq!(went, ["a", "b", "c", "d", "e", "f", "g", "h"]);
        assert_eq!(scheduler.split_bytes(LOW, now), None, "nothing above it is active");
    }

    #[test]
    fn while_a_higher_level_is_active_the_lower_ones_hold_one_piece_in_flight_and_it_goes_first() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        scheduler.enqueue(key(2, HIGH, 0, 4096), "high-1", now);
        let (_, high_ticket) = scheduler.next(now, false).unwrap();
        for (lba, name) in ["low-a", "low-b", "low-c"].into_iter().enumerate() {
            scheduler.enqueue(key(1, LOW, lba as u64 * 32, PROTECTED_BYTES), name, now);
        }
        assert_eq!(scheduler.split_bytes(LOW, now), Some(PROTECTED_BYTES));
        let went = drain(&mut scheduler, now);
        assert_eq!(
            went.len(),
            1,
            "one low piece in flight: {:?}",
            went.iter().map(|w| w.0).collect::<Vec<_>>()
        );
        scheduler.complete(high_ticket);
        // A second high request passes the queued low ones.
        scheduler.enqueue(key(2, HIGH, 1, 4096), "high-2", now);
        assert_eq!(scheduler.next(now, false).map(|w| w.0), Some("high-2"));
        assert!(scheduler.next(now, false).is_none(), "the low piece is still in flight");
        scheduler.complete(went[0].1);
        assert_eq!(scheduler.next(now, false).map(|w| w.0), Some("low-b"));
        // Once the high volume was quiet for the window, low runs deep again.
        let later = now + ACTIVE_WINDOW;
        assert_eq!(scheduler.next(later, false).map(|w| w.0), Some("low-c"));
    }

    #[test]
    fn background_work_always_keeps_one_request_going_under_busy_clients() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        for round in 0..50u64 {
            scheduler.enqueue(key(1, MEDIUM, round, 4096), "client", now);
        }
        scheduler.enqueue(key(1, RESYNC, 1000, 1 << 20), "resync", now);
        let went: Vec<_> = drain(&mut scheduler, now).into_iter().map(|(name, _)| name).collect();
        assert!(went.contains(&"resync"), "the resync got its floor: {went:?}");
    }

    #[test]
    fn flows_of_one_level_share_the_disk_by_weight_when_it_is_saturated() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        // Two volumes, each with far more queued than the disk takes.
        for lba in 0..400u64 {
            scheduler.enqueue(key(1, MEDIUM, lba * 16, 64 << 10), "one", now);
            scheduler.enqueue(key(2, MEDIUM, lba * 16, 64 << 10), "two", now);
        }
        let mut counts = [0usize; 2];
        for _ in 0..200 {
            let (name, ticket) = scheduler.next(now, false).expect("the disk takes more");
            counts[usize::from(name == "two")] += 1;
            scheduler.complete(ticket);
        }
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
    }

    #[test]
    fn a_request_never_passes_an_earlier_overlapping_one_of_its_volume_in_another_class() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        scheduler.enqueue(key(1, RESYNC, 2000, 1 << 20), "resync-a", now);
        let (_, resync_a) = scheduler.next(now, false).unwrap();
        // The resync's write of blocks 0-255 came before a high client
        // write of block 10: it goes first, though the resync has a piece
        // in flight (the high write must not land before it).
        scheduler.enqueue(key(1, RESYNC, 0, 1 << 20), "resync-b", now);
        scheduler.enqueue(key(1, HIGH, 10, 4096), "high-inside", now);
        scheduler.enqueue(key(1, RESYNC, 4000, 1 << 20), "resync-c", now);
        let went: Vec<_> = drain(&mut scheduler, now).into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            went,
            ["resync-b", "high-inside"],
            "resync-c waits for the resync's pieces"
        );
        scheduler.complete(resync_a);
    }

    #[test]
    fn a_barrier_waits_for_what_came_before_it_and_holds_back_what_came_after() {
        let (mut scheduler, now) = (scheduler(), Instant::now());
        scheduler.enqueue(key(2, HIGH, 0, 4096), "high", now);
        let (_, _high) = scheduler.next(now, false).unwrap();
        scheduler.enqueue(key(1, LOW, 0, PROTECTED_BYTES), "low-1", now);
        scheduler.enqueue(key(1, LOW, 64, PROTECTED_BYTES), "low-2", now);
        scheduler.enqueue(None, "barrier", now);
        scheduler.enqueue(key(2, HIGH, 8, 4096), "high-after", now);
        let (first, low_ticket) = scheduler.next(now, false).unwrap();
        assert_eq!(first, "low-1");
        assert!(
            scheduler.next(now, false).is_none(),
            "low-2 waits for its piece; the rest for the barrier"
        );
        scheduler.complete(low_ticket);
        let went: Vec<_> = drain(&mut scheduler, now).into_iter().map(|(name, _)| name).collect();
        assert_eq!(went, ["low-2", "barrier", "high-after"]);
    }

    #[test]
    fn waits_are_counted_per_class_and_published_per_volume() {
        let stats = Arc::new(SchedStats::default());
        let mut scheduler: DiskScheduler<()> = DiskScheduler::new(Arc::clone(&stats));
        let now = Instant::now();
        scheduler.enqueue(key(7, LOW, 0, 8192), (), now);
        let later = now + Duration::from_millis(3);
        let (_, ticket) = scheduler.next(later, false).unwrap();
        scheduler.complete(ticket);
        scheduler.publish();
        assert_eq!(stats.requests[LOW.index()].load(Ordering::Relaxed), 1);
        assert_eq!(stats.bytes[LOW.index()].load(Ordering::Relaxed), 8192);
        assert_eq!(stats.wait_ns[LOW.index()].load(Ordering::Relaxed), 3_000_000);
        assert_eq!(stats.volumes.lock().get(&7), Some(&(3_000_000, 1)));
        assert!(scheduler.is_empty());
    }

    #[test]
    fn every_class_has_its_own_index_and_name() {
        for (index, class) in IoClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), index);
        }
        let names: std::collections::HashSet<_> = IoClass::ALL.iter().map(|class| class.as_str()).collect();
        assert_eq!(names.len(), CLASSES);
    }
}
