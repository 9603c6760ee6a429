//! FUSE over io_uring, served on the reactors: a queue per possible CPU
//! (the kernel hands a request to the queue of the CPU its caller runs
//! on), each hosted by the reactor pinned to that CPU (or, on a CPU
//! without one, by another) as a guest (`engine::guest`). A request
//! arrives as the completion of one of the queue's entries, which the
//! kernel signals on the reactor's eventfd; the reactor polls it at once
//! on its own thread, so the store gets its I/O with no channel and no
//! wake-up, and when the store answers (on the same thread), the answer
//! is written into the entry and sent with COMMIT_AND_FETCH, which arms
//! the entry again. For a volume on the reactor's own disk a request never
//! leaves the core; one on another reactor's disk costs one hand-off.
//!
//! Requests reach the rings only once every queue has an entry
//! registered; before that (and for interrupts and forgets, always) they
//! come through /dev/fuse, which the session's channel threads keep serving.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use kernel_iface::fuse::FuseChannel;
use kernel_iface::fuse_uring::{FuseUringQueue, COMMIT_ID_AT, OP_IN_AT, OP_IN_BYTES, PAYLOAD_SIZE_AT};
use parking_lot::Mutex;

use super::proto::{self, IN_HEADER_BYTES, OUT_HEADER_BYTES};
use super::{Answer, AttachFs, Pending, Reply, MAX_WRITE_BYTES};
use crate::engine::{Engine, Guest, GuestState, ReactorWaker};

/// Entries (requests in flight) per queue. Their payload buffers are
/// `MAX_WRITE_BYTES` each, touched only as far as requests fill them.
const QUEUE_ENTRIES: u16 = 64;
/// How long a queue waits for the session's INIT before giving up.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Registration refused while INIT is being processed (EAGAIN) is retried
/// after this long, at most `REGISTER_ATTEMPTS_MAX` times.
const REGISTER_RETRY: Duration = Duration::from_millis(10);
const REGISTER_ATTEMPTS_MAX: u32 = 500;

/// Set once the kernel has the INIT answer (queues may register then);
/// wakes the reactors of the queues waiting for it.
#[derive(Default)]
pub struct InitDone {
    done: AtomicBool,
    waiting: Mutex<Vec<ReactorWaker>>,
}

impl InitDone {
    pub fn set(&self) {
        self.done.store(true, Ordering::Release);
        for waker in self.waiting.lock().drain(..) {
            waker.wake();
        }
    }

    fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn wake_on_set(&self, waker: ReactorWaker) {
        self.waiting.lock().push(waker);
    }
}

/// The entries whose request was woken, and the reactor that serves them.
struct Ready {
    entries: Mutex<Vec<u16>>,
    reactor: ReactorWaker,
}

impl Ready {
    fn push(&self, entry: u16) {
        let mut entries = self.entries.lock();
        let was_empty = entries.is_empty();
        entries.push(entry);
        drop(entries);
        if was_empty {
            self.reactor.wake();
        }
    }
}

/// The waker of one entry's request.
struct EntryWaker {
    entry: u16,
    ready: Arc<Ready>,
}

impl Wake for EntryWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.entry);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.entry);
    }
}

/// The queues of a session, hosted by the engine's reactors.
pub struct Queues {
    shared: Arc<Shared>,
    reactors: Vec<ReactorWaker>,
}

/// What every queue of a session uses.
struct Shared {
    filesystem: Arc<AttachFs>,
    runtime: tokio::runtime::Handle,
    init: Arc<super::Init>,
    mountpoint: PathBuf,
    stop: AtomicBool,
    /// Queues made and not dropped yet.
    live: AtomicUsize,
}

impl Queues {
    /// Starts a queue per possible CPU on `channel`'s session, each on a
    /// reactor of `engine`; they register once `init` is set. Fails when
    /// the kernel has no FUSE over io_uring or no reactor runs io_uring.
    pub fn start(
        channel: &FuseChannel,
        mountpoint: &std::path::Path,
        filesystem: &Arc<AttachFs>,
        runtime: &tokio::runtime::Handle,
        init: &Arc<super::Init>,
        engine: &Engine,
    ) -> Result<Self, String> {
        let hosts = engine.hosts();
        if hosts.is_empty() {
            return Err("no reactor runs io_uring to serve the queues (the node has no disk, or its I/O engine is the thread pool)".into());
        }
        let cpus =
            kernel_iface::fuse_uring::possible_cpus().map_err(|error| format!("cannot count the CPUs: {error}"))?;
        let mut queues = Self {
            shared: Arc::new(Shared {
                filesystem: Arc::clone(filesystem),
                runtime: runtime.clone(),
                init: Arc::clone(init),
                mountpoint: mountpoint.to_owned(),
                stop: AtomicBool::new(false),
                live: AtomicUsize::new(0),
            }),
            reactors: Vec::new(),
        };
        for qid in 0..cpus {
            let host = hosts
                .iter()
                .find(|host| host.core == Some(qid))
                .unwrap_or(&hosts[qid % hosts.len()]);
            let started = QueueGuest::new(channel, qid, host.waker.clone(), &queues.shared).and_then(|guest| {
                guest
                    .queue
                    .notify(host.notify_fd)
                    .map_err(|error| format!("cannot have FUSE queue {qid} wake its reactor: {error}"))?;
                engine
                    .host_guest(host.reactor, Box::new(guest))
                    .map_err(|error| format!("cannot hand FUSE queue {qid} to a reactor: {error}"))
            });
            if let Err(error) = started {
                queues.signal_stop();
                return Err(error);
            }
            init.done.wake_on_set(host.waker.clone());
            queues.reactors.push(host.waker.clone());
        }
        tracing::info!(
            queues = cpus,
            reactors = hosts.len(),
            "FUSE io_uring queues handed to the reactors"
        );
        Ok(queues)
    }

    fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        for reactor in &self.reactors {
            reactor.wake();
        }
    }

    /// Waits (bounded) for the queues, which end when the connection is aborted.
    pub fn join(&mut self, timeout: Duration) {
        self.signal_stop();
        let deadline = Instant::now() + timeout;
        while self.shared.live.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = self.shared.live.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(
                queues = left,
                "FUSE io_uring queues did not stop in time; their reactors drop them when the engine stops"
            );
        }
    }
}

/// A request waiting for the volume, by entry.
struct Task {
    unique: u64,
    pending: Pending,
}

/// One queue, served on a reactor's thread.
struct QueueGuest {
    queue: FuseUringQueue,
    qid: usize,
    shared: Arc<Shared>,
    ready: Arc<Ready>,
    wakers: Vec<Waker>,
    tasks: Vec<Option<Task>>,
    created: Instant,
    registered: bool,
    /// Entries whose registration the kernel refused for now, and when to retry.
    retry: Vec<u16>,
    retry_at: Option<Instant>,
    register_attempts: u32,
    completions: Vec<(u64, i32)>,
    logged_serving: bool,
    /// Answers held back while their entry's write data is still lent.
    deferred: Vec<(u16, u64, Reply)>,
}

impl QueueGuest {
    /// A queue of the session; counted live until dropped.
    fn new(channel: &FuseChannel, qid: usize, reactor: ReactorWaker, shared: &Arc<Shared>) -> Result<Self, String> {
        let qid_u16 = u16::try_from(qid).map_err(|_| format!("CPU {qid}: too many FUSE queues"))?;
        let queue = FuseUringQueue::new(channel, qid_u16, QUEUE_ENTRIES, MAX_WRITE_BYTES as usize)
            .map_err(|error| format!("cannot make FUSE queue {qid}: {error}"))?;
        let ready = Arc::new(Ready {
            entries: Mutex::new(Vec::new()),
            reactor,
        });
        let entries = queue.entries();
        let wakers = (0..entries)
            .map(|entry| {
                Waker::from(Arc::new(EntryWaker {
                    entry,
                    ready: Arc::clone(&ready),
                }))
            })
            .collect();
        shared.live.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            queue,
            qid,
            shared: Arc::clone(shared),
            ready,
            wakers,
            tasks: (0..entries).map(|_| None).collect(),
            created: Instant::now(),
            registered: false,
            retry: Vec::new(),
            retry_at: None,
            register_attempts: 0,
            completions: Vec::new(),
            logged_serving: false,
            deferred: Vec::new(),
        })
    }

    /// One turn: register once INIT is done, take requests, answer those done.
    fn turn(&mut self) -> Result<GuestState, String> {
        if !self.registered {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(GuestState::Finished);
            }
            if !self.shared.init.done.is_set() {
                if self.created.elapsed() > INIT_TIMEOUT {
                    return Err("the session's INIT never came".into());
                }
                return Ok(GuestState::Serving);
            }
            for entry in 0..self.queue.entries() {
                self.queue.register(entry).map_err(|error| error.to_string())?;
            }
            self.registered = true;
        }
        if self.retry_at.is_some_and(|at| Instant::now() >= at) {
            self.retry_at = None;
            for entry in std::mem::take(&mut self.retry) {
                self.queue.register(entry).map_err(|error| error.to_string())?;
            }
        }
        self.completions.clear();
        self.queue.completions(&mut self.completions);
        for index in 0..self.completions.len() {
            let (token, result) = self.completions[index];
            let entry = u16::try_from(token).map_err(|_| format!("unknown completion {token}"))?;
            match result {
                0.. => {
                    if !self.logged_serving {
                        self.logged_serving = true;
                        tracing::debug!(qid = self.qid, "FUSE io_uring queue serving");
                    }
                    self.deferred.extend(receive(
                        &mut self.queue,
                        entry,
                        &self.shared.filesystem,
                        &self.wakers,
                        &mut self.tasks,
                    ));
                }
                error if -error == libc::EAGAIN && self.register_attempts < REGISTER_ATTEMPTS_MAX => {
                    // The kernel is still taking the INIT answer: register again shortly.
                    self.register_attempts += 1;
                    self.retry.push(entry);
                    self.retry_at = Some(Instant::now() + REGISTER_RETRY);
                }
                error if [libc::ENOTCONN, libc::ECANCELED, libc::ECONNABORTED, libc::ENODEV].contains(&-error) => {
                    return Ok(GuestState::Finished); // the connection ended
                }
                error => {
                    return Err(format!(
                        "the kernel refused the queue: {}",
                        std::io::Error::from_raw_os_error(-error)
                    ))
                }
            }
        }
        let woken: Vec<u16> = std::mem::take(&mut *self.ready.entries.lock());
        for entry in woken {
            self.deferred
                .extend(poll_task(&mut self.queue, entry, &self.wakers, &mut self.tasks));
        }
        for (entry, unique, reply) in std::mem::take(&mut self.deferred) {
            if self.queue.is_leased(entry) {
                self.deferred.push((entry, unique, reply));
            } else {
                answer(&mut self.queue, entry, unique, &reply);
            }
        }
        self.queue
            .submit_queued()
            .map_err(|error| format!("io_uring: {error}"))?;
        if self.shared.stop.load(Ordering::Acquire)
            && self.tasks.iter().all(Option::is_none)
            && self.deferred.is_empty()
        {
            return Ok(GuestState::Finished);
        }
        if self.retry_at.is_some() || !self.deferred.is_empty() {
            // Not woken by anything else before the retry is due.
            self.ready.reactor.wake();
        }
        Ok(GuestState::Serving)
    }
}

impl Guest for QueueGuest {
    fn serve(&mut self) -> GuestState {
        let _context = self.shared.runtime.enter();
        match self.turn() {
            Ok(state) => state,
            Err(error) => {
                // Once INIT agreed on io_uring, the kernel holds every request until
                // each CPU's queue is registered: a queue that failed would hang every
                // caller. Aborting the connection makes their I/O fail instead.
                tracing::error!(qid = self.qid, %error, "FUSE io_uring queue failed; aborting the attach filesystem so its devices fail instead of hanging");
                let _ = kernel_iface::fuse::abort(&self.shared.mountpoint);
                GuestState::Finished
            }
        }
    }
}

impl Drop for QueueGuest {
    fn drop(&mut self) {
        // Requests still running (the connection ended under them) are
        // finished by the runtime: a write half done is not abandoned.
        for task in self.tasks.iter_mut().filter_map(Option::take) {
            self.shared.runtime.spawn(async move {
                let _ = task.pending.await;
            });
        }
        self.shared.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes the request in `entry` and answers it, now or once the volume
/// completes it (or hands the answer back, as `poll_task` does).
#[must_use]
fn receive(
    queue: &mut FuseUringQueue,
    entry: u16,
    filesystem: &AttachFs,
    wakers: &[Waker],
    tasks: &mut [Option<Task>],
) -> Option<(u16, u64, Reply)> {
    let lessor = queue.lessor(entry);
    let (header, payload) = queue.buffers(entry);
    let payload_bytes = u32::from_le_bytes(
        header[PAYLOAD_SIZE_AT..PAYLOAD_SIZE_AT + 4]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let commit_id = u64::from_le_bytes(header[COMMIT_ID_AT..COMMIT_ID_AT + 8].try_into().expect("8 bytes"));
    let decoded = proto::decode_header(&header[..IN_HEADER_BYTES]).and_then(|in_header| {
        let payload = payload.get(..payload_bytes).unwrap_or(&[]);
        proto::decode_operation(in_header.opcode, &header[OP_IN_AT..OP_IN_AT + OP_IN_BYTES], payload)
            .map(|operation| (in_header, operation))
    });
    let (in_header, operation) = match decoded {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, "malformed FUSE request on io_uring: EIO");
            answer(queue, entry, commit_id, &Reply::error(libc::EIO));
            return None;
        }
    };
    let unique = in_header.unique;
    debug_assert_eq!(unique, commit_id);
    // A write's data is lent from the entry, not copied: the entry is not
    // answered (nor re-armed) before the lease is dropped.
    let own = |data: &[u8]| match lessor.lease(data) {
        Some(lease) => bytes::Bytes::from_owner(lease),
        None => bytes::Bytes::copy_from_slice(data),
    };
    let answered = filesystem.operate_owning(&in_header, operation, own);
    drop(lessor); // it counts as a lease of the entry too
    match answered {
        Answer::Now(reply) => answer(queue, entry, unique, &reply),
        // Nothing that needs no answer comes through a ring; answer anyway so the entry is armed again.
        Answer::Nothing => answer(queue, entry, unique, &Reply::ok(super::Body::Empty)),
        Answer::Later(pending) => {
            tasks[usize::from(entry)] = Some(Task { unique, pending });
            return poll_task(queue, entry, wakers, tasks);
        }
    }
    None
}

/// Polls `entry`'s request; answers it when done, or hands the answer
/// back when the entry's payload is still lent (see `QueueGuest::deferred`).
#[must_use]
fn poll_task(
    queue: &mut FuseUringQueue,
    entry: u16,
    wakers: &[Waker],
    tasks: &mut [Option<Task>],
) -> Option<(u16, u64, Reply)> {
    let slot = &mut tasks[usize::from(entry)];
    let Some(task) = slot.as_mut() else {
        return None; // a stale wake-up of a request already answered
    };
    let mut context = Context::from_waker(&wakers[usize::from(entry)]);
    if let Poll::Ready(reply) = task.pending.as_mut().poll(&mut context) {
        let unique = task.unique;
        *slot = None;
        if queue.is_leased(entry) {
            // Something kept the write's data past the request: answering
            // would let the kernel write the next request over it.
            tracing::warn!(
                entry,
                "FUSE write data still lent after its request finished; answer deferred"
            );
            return Some((entry, unique, reply));
        }
        answer(queue, entry, unique, &reply);
    }
    None
}

/// Writes `reply` into `entry` and commits it (which fetches the next request into it).
fn answer(queue: &mut FuseUringQueue, entry: u16, unique: u64, reply: &Reply) {
    let (header, payload) = queue.buffers(entry);
    let (pieces, body_bytes) = reply.pieces();
    let (errno, body_bytes) = if body_bytes > payload.len() {
        tracing::error!(body_bytes, "FUSE answer larger than its entry's payload buffer: EIO");
        (libc::EIO, 0)
    } else {
        let mut at = 0;
        for piece in &pieces {
            payload[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        (reply.errno, body_bytes)
    };
    header[..OUT_HEADER_BYTES].copy_from_slice(&proto::encode_out_header(unique, -errno, body_bytes));
    let payload_size = u32::try_from(body_bytes).expect("within the payload buffer");
    header[PAYLOAD_SIZE_AT..PAYLOAD_SIZE_AT + 4].copy_from_slice(&payload_size.to_le_bytes());
    if let Err(error) = queue.commit(entry, unique) {
        tracing::error!(%error, "cannot commit a FUSE answer");
    }
}
