//! The I/O engine interface shared by the io_uring ring and the pread/pwrite
//! thread pool, and the choice between them.
//!
//! An engine owns each request's buffer from `push` until the request's
//! completion is drained, so callers never hand the kernel memory they can
//! still touch, and need no `unsafe`. Buffers must be aligned for O_DIRECT
//! by the caller (ballast's `IoBuf` is).

use std::fs::File;
use std::time::Duration;

use thiserror::Error;

/// What one request does. Offsets are bytes.
#[derive(Debug)]
pub enum IoKind<B> {
    Read {
        offset_bytes: u64,
        buf: B,
    },
    Write {
        offset_bytes: u64,
        buf: B,
    },
    /// A write that is durable when it completes (RWF_DSYNC: FUA on devices
    /// with a volatile cache, write + flush where FUA is missing).
    WriteDurable {
        offset_bytes: u64,
        buf: B,
    },
    /// fdatasync: makes completed writes durable (also flushes the device cache).
    Fsync,
    /// Tells the device that a range holds nothing worth keeping, so an
    /// SSD's flash translation layer stops copying it: a discard on a block
    /// device (io_uring's block discard command on Linux 6.12+, BLKDISCARD on
    /// a helper thread before; BLKDISCARD in
    /// the thread pool), a punched hole in a regular file. Afterwards the
    /// range reads as zeroes or as its old bytes, never as anything else.
    /// Unordered against writes in flight to the same range: the caller
    /// never discards what it may still write or read.
    Discard {
        offset_bytes: u64,
        len_bytes: u64,
    },
}

impl<B> IoKind<B> {
    /// The request's buffer (none for a flush or a discard).
    pub fn into_buf(self) -> Option<B> {
        match self {
            Self::Read { buf, .. } | Self::Write { buf, .. } | Self::WriteDurable { buf, .. } => Some(buf),
            Self::Fsync | Self::Discard { .. } => None,
        }
    }
}

/// One request for file number `file` (index into the engine's files).
#[derive(Debug)]
pub struct Submission<B> {
    pub file: u32,
    pub user_data: u64,
    pub kind: IoKind<B>,
}

/// The outcome: bytes transferred (>= 0) or `-errno`; the request's buffer.
#[derive(Debug)]
pub struct Completion<B> {
    pub user_data: u64,
    pub result: i32,
    pub buf: Option<B>,
}

impl<B> Completion<B> {
    /// `Ok(())` when the whole buffer (or the fsync) was done, else the
    /// errno (EIO for a short transfer, which O_DIRECT only gives at the end
    /// of a device).
    pub fn status(&self, wanted_bytes: usize) -> Result<(), i32> {
        match usize::try_from(self.result) {
            Ok(done) if done == wanted_bytes => Ok(()),
            Ok(_) => Err(libc::EIO),
            Err(_) => Err(-self.result),
        }
    }
}

/// Wakes an engine blocked in `submit_and_wait` from another thread.
pub trait Waker: Send + Sync {
    fn wake(&self);
}

/// An asynchronous block I/O engine.
pub trait IoEngine<B>: Send {
    /// Queues a request. Blocks only when the engine already holds its
    /// maximum number of requests (then it waits for completions first).
    fn push(&mut self, submission: Submission<B>);

    /// Submits queued requests and waits until at least `min_complete`
    /// completions are ready, a waker fires, or `timeout` passes.
    fn submit_and_wait(&mut self, min_complete: usize, timeout: Option<Duration>) -> std::io::Result<()>;

    /// Hands queued requests to the kernel without waiting or reaping
    /// (a pending wake-up stays pending). Engines that start every request
    /// at `push` do nothing.
    fn submit(&mut self) {}

    /// Moves ready completions into `out`.
    fn drain(&mut self, out: &mut Vec<Completion<B>>);

    /// Requests pushed and not yet drained.
    fn in_flight(&self) -> usize;

    /// A handle other threads use to interrupt `submit_and_wait`.
    fn waker(&self) -> std::sync::Arc<dyn Waker>;

    /// An eventfd whose every write (by a thread or by the kernel, e.g. an
    /// io_uring with it registered) interrupts `submit_and_wait`; None when
    /// the engine waits otherwise (the thread pool). Valid while the engine lives.
    fn notify_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Asks for a completion once `fd` is ready for `events` (`POLLIN`,
    /// `POLLOUT`: a one-shot poll), reported by `drain_polls` with `token`.
    /// False when the engine cannot poll (the thread pool): the caller waits
    /// for readiness some other way. The caller keeps `fd` open until the
    /// poll completes; shutting the socket down completes it.
    fn poll_fd(&mut self, _fd: std::os::fd::RawFd, _events: u32, _token: u64) -> bool {
        false
    }

    /// Moves the tokens of polls that completed into `out`, with their
    /// result (the ready events, or `-errno`).
    fn drain_polls(&mut self, _out: &mut Vec<(u64, i32)>) {}

    /// "io_uring" or "thread-pool", for logs and status.
    fn kind(&self) -> &'static str;
}

/// Errors setting up an engine.
#[derive(Debug, Error)]
pub enum EngineError {
    /// creating the io_uring instance or the pool failed
    #[error("cannot create I/O engine: {0}")]
    Setup(#[from] std::io::Error),
}

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring, falling back to the thread pool when it is unavailable.
    Auto,
    /// The pread/pwrite thread pool only.
    ThreadPool,
}

/// Most requests an engine holds at once.
pub const ENGINE_REQUESTS_MAX: usize = 1024;

/// Opens an engine over `files` (io_uring when possible, else the pool; the
/// fallback is logged once per process).
pub fn open_engine<B: AsMut<[u8]> + Send + 'static>(
    files: Vec<File>,
    choice: EngineChoice,
) -> Result<Box<dyn IoEngine<B>>, EngineError> {
    if choice == EngineChoice::Auto {
        match crate::uring::UringEngine::new(files.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(), files) {
            Ok(engine) => return Ok(Box::new(engine)),
            Err((error, returned)) => {
                warn_once(&error);
                return Ok(Box::new(crate::pool::PoolEngine::new(returned)?));
            }
        }
    }
    Ok(Box::new(crate::pool::PoolEngine::new(files)?))
}

fn warn_once(error: &std::io::Error) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(%error, "io_uring is unavailable (old kernel, seccomp or io_uring_disabled); using the pread/pwrite thread pool");
    });
}
