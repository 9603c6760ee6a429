//! FUSE over io_uring: a queue per possible CPU (the kernel hands a
//! request to the queue of the CPU its caller runs on), each served by a
//! thread pinned to that CPU that is also the executor of its requests. A
//! request arrives as the completion of one of the queue's entries; it is
//! polled at once on this thread (handing its I/O to the reactor), and when
//! the volume completes it, the reactor's wake-up lands here (an eventfd
//! read on the same ring), the answer is written into the entry and sent
//! with COMMIT_AND_FETCH, which arms the entry again. No runtime thread is
//! woken on the way; requests the queue gets while others wait are served
//! in the same turn of the ring.
//!
//! Requests reach the rings only once every queue has an entry
//! registered; before that (and for interrupts and forgets, always) they
//! come through /dev/fuse, which the session's channel threads keep serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use kernel_iface::fuse::FuseChannel;
use kernel_iface::fuse_uring::{FuseUringQueue, COMMIT_ID_AT, OP_IN_AT, OP_IN_BYTES, PAYLOAD_SIZE_AT, WAKE_TOKEN};
use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use super::proto::{self, IN_HEADER_BYTES, OUT_HEADER_BYTES};
use super::{Answer, AttachFs, Pending, Reply, MAX_WRITE_BYTES};

/// Entries (requests in flight) per queue. Their payload buffers are
/// `MAX_WRITE_BYTES` each, touched only as far as requests fill them.
const QUEUE_ENTRIES: u16 = 64;
/// How long a queue waits for the session's INIT before registering.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Registration refused while INIT is being processed (EAGAIN) is retried this often.
const REGISTER_RETRY: Duration = Duration::from_millis(10);
const REGISTER_ATTEMPTS_MAX: u32 = 500;

/// Set once the kernel has the INIT answer (queues may register then).
#[derive(Default)]
pub struct InitDone {
    done: Mutex<bool>,
    changed: parking_lot::Condvar,
}

impl InitDone {
    pub fn set(&self) {
        *self.done.lock() = true;
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let mut done = self.done.lock();
        let deadline = Instant::now() + timeout;
        while !*done {
            if self.changed.wait_until(&mut done, deadline).timed_out() {
                return *done;
            }
        }
        true
    }
}

/// The entries whose request was woken, and the eventfd that wakes the ring.
struct Ready {
    entries: Mutex<Vec<u16>>,
    eventfd: EventFd,
}

impl Ready {
    fn push(&self, entry: u16) {
        let mut entries = self.entries.lock();
        let was_empty = entries.is_empty();
        entries.push(entry);
        drop(entries);
        if was_empty {
            // EAGAIN (counter saturated) still leaves it readable.
            let _ = self.eventfd.write(1);
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

/// The queue threads of a session.
pub struct Queues {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Queues {
    /// Starts a queue per possible CPU on `channel`'s session; they register
    /// once `init` is set. Fails when the kernel has no FUSE over io_uring.
    pub fn start(
        channel: &FuseChannel,
        mountpoint: &std::path::Path,
        filesystem: &Arc<AttachFs>,
        runtime: &tokio::runtime::Handle,
        init: &Arc<super::Init>,
    ) -> Result<Self, String> {
        let cpus =
            kernel_iface::fuse_uring::possible_cpus().map_err(|error| format!("cannot count the CPUs: {error}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for qid in 0..cpus {
            let qid_u16 = u16::try_from(qid).map_err(|_| format!("{cpus} CPUs: too many FUSE queues"))?;
            let queue = FuseUringQueue::new(channel, qid_u16, QUEUE_ENTRIES, MAX_WRITE_BYTES as usize)
                .map_err(|error| format!("cannot make FUSE queue {qid}: {error}"))?;
            let eventfd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|error| format!("eventfd: {error}"))?;
            let ready = Arc::new(Ready {
                entries: Mutex::new(Vec::new()),
                eventfd,
            });
            let (filesystem, runtime, init, stop) = (
                Arc::clone(filesystem),
                runtime.clone(),
                Arc::clone(init),
                Arc::clone(&stop),
            );
            let mountpoint = mountpoint.to_owned();
            let thread = std::thread::Builder::new()
                .name(format!("fuse-q{qid}"))
                .spawn(move || {
                    if let Err(error) = serve_queue(queue, qid, &filesystem, &runtime, &ready, &init, &stop) {
                        // Once INIT agreed on io_uring, the kernel holds every request until
                        // each CPU's queue is registered: a queue that failed would hang every
                        // caller. Aborting the connection makes their I/O fail instead.
                        tracing::error!(qid, %error, "FUSE io_uring queue failed; aborting the attach filesystem so its devices fail instead of hanging");
                        let _ = kernel_iface::fuse::abort(&mountpoint);
                    }
                })
                .map_err(|error| format!("cannot start a FUSE queue thread: {error}"))?;
            threads.push(thread);
        }
        Ok(Self { stop, threads })
    }

    /// Waits (bounded) for the queue threads, which end when the connection is aborted.
    pub fn join(&mut self, timeout: Duration) {
        self.stop.store(true, Ordering::Release);
        super::join_bounded(std::mem::take(&mut self.threads), timeout, "queue");
    }
}

/// A request waiting for the volume, by entry.
struct Task {
    unique: u64,
    pending: Pending,
}

#[allow(clippy::too_many_arguments)]
fn serve_queue(
    mut queue: FuseUringQueue,
    qid: usize,
    filesystem: &AttachFs,
    runtime: &tokio::runtime::Handle,
    ready: &Arc<Ready>,
    init: &super::Init,
    stop: &AtomicBool,
) -> Result<(), String> {
    let _context = runtime.enter();
    if let Err(error) = kernel_iface::affinity::pin_current_thread(qid) {
        tracing::debug!(qid, %error, "FUSE queue thread not pinned");
    }
    if !init.done.wait(INIT_TIMEOUT) {
        return Err("the session's INIT never came".into());
    }
    let entries = queue.entries();
    for entry in 0..entries {
        queue.register(entry).map_err(|error| error.to_string())?;
    }
    queue
        .arm_wake(std::os::fd::AsRawFd::as_raw_fd(&ready.eventfd))
        .map_err(|error| error.to_string())?;
    let wakers: Vec<Waker> = (0..entries)
        .map(|entry| {
            Waker::from(Arc::new(EntryWaker {
                entry,
                ready: Arc::clone(ready),
            }))
        })
        .collect();
    let mut tasks: Vec<Option<Task>> = (0..entries).map(|_| None).collect();
    let mut register_attempts = 0u32;
    let mut completions = Vec::new();
    let mut registered_logged = false;
    loop {
        completions.clear();
        queue
            .submit(1, &mut completions)
            .map_err(|error| format!("io_uring: {error}"))?;
        for &(token, result) in &completions {
            if token == WAKE_TOKEN {
                let _ = ready.eventfd.read();
                queue
                    .arm_wake(std::os::fd::AsRawFd::as_raw_fd(&ready.eventfd))
                    .map_err(|error| error.to_string())?;
                continue;
            }
            let entry = u16::try_from(token).map_err(|_| format!("unknown completion {token}"))?;
            match result {
                0.. => {
                    if !registered_logged {
                        registered_logged = true;
                        tracing::debug!(qid, "FUSE io_uring queue serving");
                    }
                    receive(&mut queue, entry, filesystem, &wakers, &mut tasks);
                }
                error if -error == libc::EAGAIN && register_attempts < REGISTER_ATTEMPTS_MAX => {
                    // The kernel is still taking the INIT answer: register again shortly.
                    register_attempts += 1;
                    std::thread::sleep(REGISTER_RETRY);
                    queue.register(entry).map_err(|error| error.to_string())?;
                }
                error if [libc::ENOTCONN, libc::ECANCELED, libc::ECONNABORTED, libc::ENODEV].contains(&-error) => {
                    return Ok(()); // the connection ended
                }
                error => {
                    return Err(format!(
                        "the kernel refused the queue: {}",
                        std::io::Error::from_raw_os_error(-error)
                    ))
                }
            }
        }
        let woken: Vec<u16> = std::mem::take(&mut *ready.entries.lock());
        for entry in woken {
            poll_task(&mut queue, entry, &wakers, &mut tasks);
        }
        if stop.load(Ordering::Acquire) && tasks.iter().all(Option::is_none) {
            return Ok(());
        }
    }
}

/// Takes the request in `entry` and answers it, now or once the volume completes it.
fn receive(
    queue: &mut FuseUringQueue,
    entry: u16,
    filesystem: &AttachFs,
    wakers: &[Waker],
    tasks: &mut [Option<Task>],
) {
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
            return answer(queue, entry, commit_id, &Reply::error(libc::EIO));
        }
    };
    let unique = in_header.unique;
    debug_assert_eq!(unique, commit_id);
    match filesystem.operate(&in_header, operation) {
        Answer::Now(reply) => answer(queue, entry, unique, &reply),
        // Nothing that needs no answer comes through a ring; answer anyway so the entry is armed again.
        Answer::Nothing => answer(queue, entry, unique, &Reply::ok(super::Body::Empty)),
        Answer::Later(pending) => {
            tasks[usize::from(entry)] = Some(Task { unique, pending });
            poll_task(queue, entry, wakers, tasks);
        }
    }
}

/// Polls `entry`'s request; answers it when done.
fn poll_task(queue: &mut FuseUringQueue, entry: u16, wakers: &[Waker], tasks: &mut [Option<Task>]) {
    let slot = &mut tasks[usize::from(entry)];
    let Some(task) = slot.as_mut() else {
        return; // a stale wake-up of a request already answered
    };
    let mut context = Context::from_waker(&wakers[usize::from(entry)]);
    if let Poll::Ready(reply) = task.pending.as_mut().poll(&mut context) {
        let unique = task.unique;
        *slot = None;
        answer(queue, entry, unique, &reply);
    }
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
