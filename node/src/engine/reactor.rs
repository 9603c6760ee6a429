//! One reactor thread: pinned to a core, owns an I/O engine (io_uring) and
//! the stores of its disks, takes requests from a channel, queues them in
//! each disk's scheduler (`sched`), hands the store what the scheduler
//! lets go and answers through callbacks. No locks on the data path: the
//! stores are only ever touched by this thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use disk_layout::{Done, IoBuf, Store};
use kernel_iface::IoEngine;

use super::disk_io::{file_of, to_store_completion, DiskIo};
use super::guest::{self, Guest, GuestState};
use super::sched::{DiskScheduler, IoClass, Key, SchedStats, Ticket};
use super::{Command, Control, ReplyFn};

/// What waits in a disk's scheduler.
enum Pending {
    Request(Command, ReplyFn),
    Query(Box<dyn FnOnce(&Store) + Send>),
}

/// Requests taken from the channel per loop turn (bounds latency of acks).
const REQUESTS_PER_TURN_MAX: usize = 1024;
/// Housekeeping (cleaner, checkpoints) runs at least this often when idle.
/// Milliseconds between the stores' `interval` calls.
pub(crate) const TICK_INTERVAL_MS: u64 = 100;
const TICK_INTERVAL: Duration = Duration::from_millis(TICK_INTERVAL_MS);
/// A clean shutdown waits at most this long for the final checkpoint.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct Reactor {
    pub(super) engine: Box<dyn IoEngine<IoBuf>>,
    pub(super) stores: Vec<Store>,
    pub(super) receiver: Receiver<Control>,
    pub(super) sleeping: Arc<AtomicBool>,
    scheds: Vec<DiskScheduler<Pending>>,
    /// Tag -> (answer, disk, scheduler ticket).
    replies: HashMap<u64, (ReplyFn, usize, Ticket)>,
    next_tag: u64,
    done: Vec<Done>,
    completions: Vec<kernel_iface::Completion<IoBuf>>,
    /// Socket polls that completed (`socket`).
    polls: Vec<(u64, i32)>,
    guests: Vec<Box<dyn Guest>>,
}

impl Reactor {
    pub(super) fn new(
        engine: Box<dyn IoEngine<IoBuf>>,
        stores: Vec<Store>,
        sched_stats: Vec<Arc<SchedStats>>,
        receiver: Receiver<Control>,
        sleeping: Arc<AtomicBool>,
    ) -> Self {
        assert_eq!(stores.len(), sched_stats.len(), "a scheduler per store");
        Self {
            engine,
            stores,
            receiver,
            sleeping,
            scheds: sched_stats.into_iter().map(DiskScheduler::new).collect(),
            replies: HashMap::new(),
            next_tag: 0,
            done: Vec::new(),
            completions: Vec::new(),
            polls: Vec::new(),
            guests: Vec::new(),
        }
    }

    /// Serves until told to shut down (or every sender is gone).
    pub(super) fn run(mut self) {
        let mut last_tick = Instant::now();
        loop {
            let (shutdown, took_any) = self.take_requests();
            if shutdown {
                self.shut_down();
                return;
            }
            self.release(false);
            self.tick_all(false);
            let idle = !took_any && self.engine.in_flight() == 0;
            let timeout = if idle { TICK_INTERVAL } else { Duration::from_millis(10) };
            self.wait(timeout);
            self.complete();
            self.serve_guests();
            if last_tick.elapsed() >= TICK_INTERVAL {
                self.tick_all(true);
                for sched in &mut self.scheds {
                    sched.publish();
                }
                last_tick = Instant::now();
            }
        }
    }

    fn wait(&mut self, timeout: Duration) {
        // Announce sleep, then re-check the channel, so a sender that saw
        // us awake has its request seen here, and one that saw us asleep wakes us.
        self.sleeping.store(true, Ordering::SeqCst);
        // With work waiting on this thread (or in the channel) the turn
        // must not sleep, but what the stores queued must still reach the
        // device: submit without waiting.
        let (min_complete, timeout) = if self.receiver.is_empty() && !guest::local_work() {
            (1, timeout)
        } else {
            (0, Duration::ZERO)
        };
        // Sockets the guests found not ready: their polls go with this submit.
        super::socket::arm_asked(self.engine.as_mut());
        if let Err(error) = self.engine.submit_and_wait(min_complete, Some(timeout)) {
            tracing::error!(%error, "I/O engine wait failed");
        }
        self.sleeping.store(false, Ordering::SeqCst);
        super::socket::wake_ready(self.engine.as_mut(), &mut self.polls);
    }

    /// Takes queued requests (first those this thread sent itself);
    /// returns (shutdown requested, took any).
    fn take_requests(&mut self) -> (bool, bool) {
        let mut took = false;
        for control in guest::take_local() {
            took = true;
            if self.take(control) {
                return (true, took);
            }
        }
        for _ in 0..REQUESTS_PER_TURN_MAX {
            match self.receiver.try_recv() {
                Ok(control) => {
                    took = true;
                    if self.take(control) {
                        return (true, took);
                    }
                }
                Err(TryRecvError::Disconnected) => return (true, took),
                Err(TryRecvError::Empty) => break,
            }
        }
        (false, took)
    }

    /// Acts on one control message; true when it asks to shut down.
    fn take(&mut self, control: Control) -> bool {
        match control {
            Control::Request {
                disk,
                class,
                command,
                reply,
            } => self.enqueue(disk, class, command, reply),
            Control::Query { disk, run } => {
                self.scheds[disk].enqueue(None, Pending::Query(run), Instant::now());
            }
            Control::Guest(guest) => {
                self.guests.push(guest);
                guest::wake_here();
            }
            Control::Shutdown => return true,
        }
        false
    }

    /// Serves every guest once; drops those that finished.
    fn serve_guests(&mut self) {
        if self.guests.is_empty() {
            return;
        }
        guest::take_guest_work();
        self.guests.retain_mut(|guest| guest.serve() == GuestState::Serving);
    }

    /// Queues a request in its disk's scheduler: a large write of a class
    /// the scheduler protects others from goes in pieces.
    fn enqueue(&mut self, disk: usize, class: IoClass, command: Command, reply: ReplyFn) {
        let now = Instant::now();
        let sched = &mut self.scheds[disk];
        let Some(key) = key_of(&command, class) else {
            sched.enqueue(None, Pending::Request(command, reply), now);
            return;
        };
        if let (Some(piece), Command::Write { data, .. }) = (sched.split_bytes(class, now), &command) {
            if data.len() as u64 > piece {
                for (command, reply) in split_write(command, piece, reply) {
                    let key = key_of(&command, class);
                    sched.enqueue(key, Pending::Request(command, reply), now);
                }
                return;
            }
        }
        sched.enqueue(Some(key), Pending::Request(command, reply), now);
    }

    /// Hands the stores what their schedulers let go now (`all`: everything).
    fn release(&mut self, all: bool) {
        let now = Instant::now();
        for disk in 0..self.scheds.len() {
            while let Some((pending, ticket)) = self.scheds[disk].next(now, all) {
                match pending {
                    Pending::Request(command, reply) => self.dispatch(disk, command, reply, ticket),
                    Pending::Query(run) => run(&self.stores[disk]),
                }
            }
        }
    }

    fn dispatch(&mut self, disk: usize, command: Command, reply: ReplyFn, ticket: Ticket) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.replies.insert(tag, (reply, disk, ticket));
        let file = u32::try_from(disk).expect("few disks per reactor");
        let store = &mut self.stores[disk];
        match command {
            Command::Write {
                volume_id,
                lba,
                data,
                epoch,
                volume_sequence,
            } => {
                store.write(tag, volume_id, lba, &data, epoch, volume_sequence);
                // A batch this write filled goes to the disk now, while
                // the rest of the turn's requests are copied.
                let mut io = DiskIo {
                    engine: self.engine.as_mut(),
                    file,
                };
                store.submit_full_batches(&mut io);
                self.engine.submit();
            }
            Command::Read {
                volume_id,
                lba,
                block_count,
            } => self.read(disk, tag, (volume_id, lba, block_count), true),
            Command::Scan {
                volume_id,
                lba,
                block_count,
            } => self.read(disk, tag, (volume_id, lba, block_count), false),
            Command::Zero {
                volume_id,
                lba,
                block_count,
                epoch,
                volume_sequence,
            } => {
                store.zero(tag, volume_id, lba, block_count, epoch, volume_sequence);
            }
            Command::Flush => store.flush(tag),
            Command::DeleteVolume { volume_id } => store.delete_volume(tag, volume_id),
            Command::Clone {
                source,
                target,
                epoch,
                volume_sequence,
            } => store.clone_volume(tag, source, target, epoch, volume_sequence),
            Command::Checkpoint => {
                store.request_checkpoint();
                store.flush(tag);
            }
        }
    }

    /// A client's read (`Store::read`) or a pass's (`Store::scan`) of
    /// `(volume, lba, block_count)`.
    fn read(&mut self, disk: usize, tag: u64, (volume_id, lba, block_count): (u64, u64, u64), client: bool) {
        let file = u32::try_from(disk).expect("few disks per reactor");
        let mut io = DiskIo {
            engine: self.engine.as_mut(),
            file,
        };
        let store = &mut self.stores[disk];
        if client {
            store.read(&mut io, tag, volume_id, lba, block_count);
        } else {
            store.scan(&mut io, tag, volume_id, lba, block_count);
        }
    }

    /// Every turn; with `interval` (every `TICK_INTERVAL`) also the
    /// stores' background work that runs only after a whole interval
    /// without requests (`Store::interval`).
    fn tick_all(&mut self, interval: bool) {
        for (disk, store) in self.stores.iter_mut().enumerate() {
            let file = u32::try_from(disk).expect("few disks per reactor");
            let mut io = DiskIo {
                engine: self.engine.as_mut(),
                file,
            };
            store.tick(&mut io);
            if interval {
                store.interval(&mut io);
            }
            store.drain_done(&mut self.done);
        }
        self.answer();
    }

    fn complete(&mut self) {
        self.engine.drain(&mut self.completions);
        for completion in std::mem::take(&mut self.completions) {
            let file = file_of(completion.user_data);
            let disk = file as usize;
            let mut io = DiskIo {
                engine: self.engine.as_mut(),
                file,
            };
            self.stores[disk].on_completion(&mut io, to_store_completion(completion));
            self.stores[disk].drain_done(&mut self.done);
        }
        self.answer();
    }

    fn answer(&mut self) {
        if self.done.is_empty() {
            return;
        }
        for Done { tag, result } in self.done.drain(..) {
            match self.replies.remove(&tag) {
                Some((reply, disk, ticket)) => {
                    self.scheds[disk].complete(ticket);
                    reply(result);
                }
                None => tracing::error!(tag, "store answered a request nobody waits for"),
            }
        }
        // What the answers freed may let queued requests go.
        self.release(false);
    }

    /// Final checkpoint of every store, bounded in time. Guests are dropped
    /// first (their connections end); requests they already sent this
    /// reactor are still carried out.
    fn shut_down(&mut self) {
        self.guests.clear();
        guest::take_guest_work();
        for control in guest::take_local() {
            if !matches!(control, Control::Guest(_) | Control::Shutdown) {
                self.take(control);
            }
        }
        self.release(true);
        for store in &mut self.stores {
            store.request_checkpoint();
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let target: Vec<u64> = self.stores.iter().map(|s| s.checkpoints_done() + 1).collect();
        loop {
            self.tick_all(false);
            let finished =
                self.stores.iter().zip(&target).all(|(store, want)| {
                    store.is_failed() || (store.checkpoints_done() >= *want && store.is_quiescent())
                });
            if finished && self.engine.in_flight() == 0 {
                tracing::info!("reactor stopped cleanly");
                return;
            }
            if Instant::now() > deadline {
                tracing::warn!("reactor stopped before its final checkpoint finished; replay will cover it");
                return;
            }
            self.wait(Duration::from_millis(10));
            self.complete();
            self.release(true);
        }
    }
}

/// How the scheduler sees a request (None: a barrier).
fn key_of(command: &Command, class: IoClass) -> Option<Key> {
    let (volume, lba, blocks, bytes) = match command {
        Command::Write {
            volume_id, lba, data, ..
        } => (*volume_id, *lba, data.len() as u64 / 4096, data.len() as u64),
        Command::Read {
            volume_id,
            lba,
            block_count,
        }
        | Command::Scan {
            volume_id,
            lba,
            block_count,
        } => (*volume_id, *lba, *block_count, block_count * 4096),
        Command::Zero {
            volume_id,
            lba,
            block_count,
            ..
        } => (*volume_id, *lba, *block_count, 0),
        Command::Flush | Command::DeleteVolume { .. } | Command::Clone { .. } | Command::Checkpoint => return None,
    };
    Some(Key {
        volume,
        class,
        lba,
        blocks: blocks.max(1),
        bytes,
    })
}

/// A write cut into pieces of at most `piece` bytes (whole blocks), in
/// order; `reply` runs once every piece is answered (with the first error).
fn split_write(command: Command, piece: u64, reply: ReplyFn) -> Vec<(Command, ReplyFn)> {
    let Command::Write {
        volume_id,
        lba,
        data,
        epoch,
        volume_sequence,
    } = command
    else {
        unreachable!("only writes are split")
    };
    let piece = usize::try_from(piece).expect("small").max(4096) & !4095;
    let count = data.len().div_ceil(piece);
    let join = Arc::new(parking_lot::Mutex::new(Join {
        left: count,
        error: None,
        reply: Some(reply),
    }));
    (0..count)
        .map(|index| {
            let at = index * piece;
            let command = Command::Write {
                volume_id,
                lba: lba + (at / 4096) as u64,
                data: data.slice(at..(at + piece).min(data.len())),
                epoch,
                volume_sequence,
            };
            let join = Arc::clone(&join);
            let reply: ReplyFn = Box::new(move |result| {
                let finished = {
                    let mut join = join.lock();
                    join.left -= 1;
                    if let Err(error) = result {
                        join.error.get_or_insert(error);
                    }
                    (join.left == 0).then(|| (join.reply.take(), join.error.take()))
                };
                if let Some((Some(reply), error)) = finished {
                    reply(error.map_or(Ok(disk_layout::Reply::Written), Err));
                }
            });
            (command, reply)
        })
        .collect()
}

/// The pieces of a split write still unanswered.
struct Join {
    left: usize,
    error: Option<disk_layout::StoreError>,
    reply: Option<ReplyFn>,
}
