//! The io_uring engine: one ring per reactor thread, files registered once,
//! buffers held in a fixed-capacity slab while the kernel owns them, an
//! eventfd read kept armed so other threads can wake a waiting reactor.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use crate::engine::{Completion, IoEngine, IoKind, Submission, Waker, ENGINE_REQUESTS_MAX};

/// Submission queue entries; the completion queue is twice this, and the
/// slab never holds more requests than half the completion queue can
/// report (the other half is room for socket polls; beyond it the kernel
/// keeps completions on its overflow list, nothing is lost).
const RING_ENTRIES: u32 = 512;
const WAKE_USER_DATA: u64 = u64::MAX;
/// Polls (`poll_fd`) carry this bit in their user data, their token in the rest.
const POLL_TAG: u64 = 1 << 62;
const _: () = assert!(ENGINE_REQUESTS_MAX <= 2 * RING_ENTRIES as usize);

struct Slot<B> {
    user_data: u64,
    buf: Option<B>,
    /// A block-device discard sent as io_uring's command: (file, offset,
    /// length), to hand to the helper if the kernel lacks the command.
    block_discard: Option<(u32, u64, u64)>,
}

/// Block-device discards for kernels whose io_uring has no block discard
/// command (before 6.12: EOPNOTSUPP, or EINVAL before 5.19): one thread
/// doing BLKDISCARD, so the reactor never blocks on a slow TRIM. It sends
/// each result back on a channel and wakes the ring through its eventfd.
struct DiscardHelper {
    requests: Option<crossbeam_channel::Sender<(u32, u64, u64, u64)>>,
    done: crossbeam_channel::Receiver<(u64, i32)>,
    pending: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiscardHelper {
    fn start(files: Vec<Option<File>>, waker: Arc<EventFdWaker>) -> std::io::Result<Self> {
        let (requests, work) = crossbeam_channel::unbounded::<(u32, u64, u64, u64)>();
        let (results, done) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("ballast-discard".into())
            .spawn(move || {
                for (file, offset, len, user_data) in work {
                    let result = match files.get(file as usize).and_then(Option::as_ref) {
                        Some(handle) => match crate::pool::discard(handle, offset, len) {
                            Ok(()) => 0,
                            Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
                        },
                        None => -libc::EBADF,
                    };
                    if results.send((user_data, result)).is_err() {
                        return;
                    }
                    waker.wake();
                }
            })?;
        Ok(Self {
            requests: Some(requests),
            done,
            pending: 0,
            thread: Some(thread),
        })
    }

    fn send(&mut self, file: u32, offset: u64, len: u64, user_data: u64) {
        self.pending += 1;
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|requests| requests.send((file, offset, len, user_data)).is_ok());
        debug_assert!(sent, "the discard helper outlives the engine's requests");
    }
}

impl Drop for DiscardHelper {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Wakes the ring by writing its eventfd.
struct EventFdWaker {
    fd: OwnedFd,
}

impl Waker for EventFdWaker {
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // A failed wake (EAGAIN: counter saturated) still leaves it readable.
        let _ = nix::unistd::write(&self.fd, &one);
    }
}

/// An io_uring instance with registered files.
pub struct UringEngine<B> {
    ring: IoUring,
    /// Fixed capacity, never reallocated: a buffer's address is stable while
    /// the kernel holds it.
    slab: Vec<Option<Slot<B>>>,
    free_slots: Vec<usize>,
    ready: Vec<Completion<B>>,
    /// Polls that completed: (token, result).
    polls_ready: Vec<(u64, i32)>,
    waker: Arc<EventFdWaker>,
    /// The eventfd read's target; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// A wake-up completed and no wait or drain has returned since.
    woken: bool,
    /// Per file: a block device (discards go as the block discard command)
    /// rather than a regular file (discards punch holes).
    block_device: Vec<bool>,
    /// Started once the kernel refused the block discard command (or a
    /// test asked for it): block-device discards go to its thread.
    discard_helper: Option<DiscardHelper>,
    _files: Vec<File>,
}

/// io_uring's block-device discard command (`BLOCK_URING_CMD_DISCARD`,
/// `_IO(0x12, 0)`, Linux 6.12+): start in `addr`, length in `addr3`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;

impl<B: AsMut<[u8]> + Send + 'static> UringEngine<B> {
    /// Creates a ring over `files`. On failure the files are handed back so
    /// the caller can fall back to another engine.
    pub fn new(fds: Vec<RawFd>, files: Vec<File>) -> Result<Self, (std::io::Error, Vec<File>)> {
        let ring = match IoUring::builder().setup_cqsize(4 * RING_ENTRIES).build(RING_ENTRIES) {
            Ok(ring) => ring,
            Err(error) => return Err((error, files)),
        };
        if !fds.is_empty() {
            if let Err(error) = ring.submitter().register_files(&fds) {
                return Err((error, files));
            }
        }
        let event = match nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        ) {
            Ok(event) => event,
            Err(errno) => return Err((errno.into(), files)),
        };
        let block_device = files
            .iter()
            .map(|file| {
                use std::os::unix::fs::FileTypeExt;
                file.metadata().is_ok_and(|meta| meta.file_type().is_block_device())
            })
            .collect();
        let fd = OwnedFd::from(event);
        let mut slab = Vec::with_capacity(ENGINE_REQUESTS_MAX);
        slab.resize_with(ENGINE_REQUESTS_MAX, || None);
        Ok(Self {
            ring,
            slab,
            free_slots: (0..ENGINE_REQUESTS_MAX).rev().collect(),
            ready: Vec::new(),
            polls_ready: Vec::new(),
            waker: Arc::new(EventFdWaker { fd }),
            wake_buf: Box::new([0u8; 8]),
            wake_armed: false,
            woken: false,
            block_device,
            discard_helper: None,
            _files: files,
        })
    }

    fn push_entry(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: every entry pushed points either at a slab buffer (kept
            // alive and unmoved until its completion is reaped) or at
            // `wake_buf` (boxed, alive as long as the ring, which waits for
            // all in-flight requests on drop).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // Submission queue full: hand what is queued to the kernel.
            if let Err(error) = self.ring.submit() {
                tracing::error!(%error, "io_uring submit failed while the queue was full");
            }
        }
    }

    /// Sends block-device discards to a helper thread from now on (what a
    /// kernel without io_uring's block discard command gets). For tests of
    /// that path on kernels that have the command.
    pub fn use_discard_helper(&mut self) -> std::io::Result<()> {
        if self.discard_helper.is_some() {
            return Ok(());
        }
        let files = self
            ._files
            .iter()
            .zip(&self.block_device)
            .map(|(file, &block)| if block { file.try_clone().ok() } else { None })
            .collect();
        self.discard_helper = Some(DiscardHelper::start(files, Arc::clone(&self.waker))?);
        Ok(())
    }

    fn is_block_device(&self, file: u32) -> bool {
        self.block_device.get(file as usize).copied().unwrap_or(false)
    }

    /// A discard of `len` bytes at `offset` of file `file`: the block
    /// discard command on a block device, a punched hole in a regular file.
    fn discard_entry(&self, file: u32, offset: u64, len: u64) -> io_uring::squeue::Entry {
        let fixed = types::Fixed(file);
        if self.is_block_device(file) {
            let mut cmd = [0u8; 16];
            cmd[..8].copy_from_slice(&len.to_ne_bytes());
            opcode::UringCmd16::new(fixed, BLOCK_URING_CMD_DISCARD)
                .addr(Some(offset))
                .cmd(cmd)
                .build()
        } else {
            opcode::Fallocate::new(fixed, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build()
        }
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::Read::new(types::Fd(self.waker.fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_USER_DATA);
        self.push_entry(entry);
        self.wake_armed = true;
    }

    /// Moves kernel completions into `ready`, returning slab slots; notes
    /// a wake-up among them in `woken`.
    fn reap(&mut self) {
        let mut reaped = Vec::new();
        for cqe in self.ring.completion() {
            reaped.push((cqe.user_data(), cqe.result()));
        }
        for (slot_index, result) in reaped {
            if slot_index == WAKE_USER_DATA {
                self.wake_armed = false;
                self.woken = true;
                continue;
            }
            if slot_index & POLL_TAG != 0 {
                self.polls_ready.push((slot_index & !POLL_TAG, result));
                continue;
            }
            let index = usize::try_from(slot_index).expect("slot index fits usize");
            let slot = self.slab[index].take().expect("completion for an empty slot");
            self.free_slots.push(index);
            let no_command = result == -libc::EOPNOTSUPP || result == -libc::EINVAL;
            if let (Some((file, offset, len)), true) = (slot.block_discard, no_command) {
                // This kernel's io_uring has no block discard command.
                if self.discard_helper.is_none() {
                    tracing::info!("io_uring has no block discard command here (Linux before 6.12): discards go through a helper thread");
                }
                match self.use_discard_helper() {
                    Ok(()) => {
                        let helper = self.discard_helper.as_mut().expect("just started");
                        helper.send(file, offset, len, slot.user_data);
                        continue;
                    }
                    Err(error) => tracing::warn!(%error, "cannot start the discard helper thread"),
                }
            }
            self.ready.push(Completion {
                user_data: slot.user_data,
                result,
                buf: slot.buf,
            });
        }
        if let Some(helper) = self.discard_helper.as_mut() {
            while let Ok((user_data, result)) = helper.done.try_recv() {
                helper.pending -= 1;
                self.ready.push(Completion {
                    user_data,
                    result,
                    buf: None,
                });
            }
        }
    }

    fn wait_for_free_slot(&mut self) {
        while self.free_slots.is_empty() {
            if let Err(error) = self.ring.submit_and_wait(1) {
                if error.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(%error, "io_uring wait failed");
                }
            }
            self.reap();
        }
    }
}

impl<B: AsMut<[u8]> + Send + 'static> IoEngine<B> for UringEngine<B> {
    fn push(&mut self, submission: Submission<B>) {
        if let IoKind::Discard {
            offset_bytes,
            len_bytes,
        } = submission.kind
        {
            if self.is_block_device(submission.file) {
                if let Some(helper) = self.discard_helper.as_mut() {
                    helper.send(submission.file, offset_bytes, len_bytes, submission.user_data);
                    return;
                }
            }
        }
        self.wait_for_free_slot();
        let index = self.free_slots.pop().expect("waited for a free slot");
        let Submission { file, user_data, kind } = submission;
        let mut discard = None;
        let (buf, op) = match kind {
            IoKind::Read { offset_bytes, buf } => (Some(buf), Some((offset_bytes, false, false))),
            IoKind::Write { offset_bytes, buf } => (Some(buf), Some((offset_bytes, true, false))),
            IoKind::WriteDurable { offset_bytes, buf } => (Some(buf), Some((offset_bytes, true, true))),
            IoKind::Fsync => (None, None),
            IoKind::Discard {
                offset_bytes,
                len_bytes,
            } => {
                discard = Some((offset_bytes, len_bytes));
                (None, None)
            }
        };
        let block_discard = discard
            .filter(|_| self.is_block_device(file))
            .map(|(offset, len)| (file, offset, len));
        self.slab[index] = Some(Slot {
            user_data,
            buf,
            block_discard,
        });
        let slot = self.slab[index].as_mut().expect("just filled");
        let fixed = types::Fixed(file);
        let entry = match (op, slot.buf.as_mut()) {
            (Some((offset, is_write, durable)), Some(buf)) => {
                let bytes = buf.as_mut();
                let len = u32::try_from(bytes.len()).expect("I/O requests are far below 4 GiB");
                if is_write {
                    let flags = if durable { libc::RWF_DSYNC } else { 0 };
                    opcode::Write::new(fixed, bytes.as_ptr(), len)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                } else {
                    opcode::Read::new(fixed, bytes.as_mut_ptr(), len).offset(offset).build()
                }
            }
            _ => match discard {
                Some((offset, len)) => self.discard_entry(file, offset, len),
                None => opcode::Fsync::new(fixed).flags(types::FsyncFlags::DATASYNC).build(),
            },
        };
        self.push_entry(entry.flags(io_uring::squeue::Flags::empty()).user_data(index as u64));
    }

    fn submit_and_wait(&mut self, min_complete: usize, timeout: Option<Duration>) -> std::io::Result<()> {
        // A wake-up that completed since the last reap is for this wait: it
        // must not sleep (its waker, a thread or a kernel eventfd signal,
        // may have nothing else that would end the wait). Re-armed after
        // the reap, so the next wake-up is caught too.
        self.reap();
        let woken = std::mem::take(&mut self.woken);
        self.arm_wake();
        let want = if woken || !self.polls_ready.is_empty() || self.ready.len() >= min_complete {
            0
        } else {
            1
        };
        let result = match timeout {
            None => self.ring.submit_and_wait(want),
            Some(duration) => {
                let timespec = types::Timespec::from(duration);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => {}
            Err(error) if matches!(error.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(error) => return Err(error),
        }
        self.reap();
        Ok(())
    }

    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(error) = self.ring.submit() {
            if error.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!(%error, "io_uring submit failed");
            }
        }
    }

    fn drain(&mut self, out: &mut Vec<Completion<B>>) {
        self.reap();
        // The caller is awake and looks at everything after draining.
        self.woken = false;
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        let helper = self.discard_helper.as_ref().map_or(0, |helper| helper.pending);
        ENGINE_REQUESTS_MAX - self.free_slots.len() + self.ready.len() + helper
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.waker.clone()
    }

    fn notify_fd(&self) -> Option<RawFd> {
        Some(self.waker.fd.as_raw_fd())
    }

    fn poll_fd(&mut self, fd: RawFd, events: u32, token: u64) -> bool {
        debug_assert!(token < POLL_TAG, "poll tokens are below 2^62");
        // No buffer: nothing of ours for the kernel to hold.
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(token | POLL_TAG);
        self.push_entry(entry);
        true
    }

    fn drain_polls(&mut self, out: &mut Vec<(u64, i32)>) {
        self.reap();
        out.append(&mut self.polls_ready);
    }

    fn kind(&self) -> &'static str {
        "io_uring"
    }
}

impl<B> Drop for UringEngine<B> {
    fn drop(&mut self) {
        // The kernel may still write into slab buffers or `wake_buf`: wait
        // for every request before they are freed. The armed eventfd read is
        // completed by waking it.
        let _ = nix::unistd::write(&self.waker.fd, &1u64.to_ne_bytes());
        for _ in 0..10_000 {
            let busy = self.slab.iter().any(Option::is_some) || self.wake_armed;
            if !busy {
                // Release the files now: ring teardown after close is
                // asynchronous and would keep an O_EXCL device busy briefly.
                let _ = self.ring.submitter().unregister_files();
                return;
            }
            let _ = self.ring.submit_and_wait(1);
            let mut reaped = Vec::new();
            for cqe in self.ring.completion() {
                reaped.push(cqe.user_data());
            }
            for user_data in reaped {
                if user_data == WAKE_USER_DATA {
                    self.wake_armed = false;
                } else if user_data & POLL_TAG != 0 {
                    // A poll: no buffer of ours.
                } else if let Ok(index) = usize::try_from(user_data) {
                    self.slab[index] = None;
                }
            }
        }
        // Still busy after 10 000 waits: leaking beats a use-after-free.
        std::mem::forget(std::mem::take(&mut self.slab));
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0u8; 8])));
        tracing::error!("io_uring dropped with requests in flight; leaking their buffers");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a wait may last in these tests: far beyond what a wake-up takes.
    const WAIT: Duration = Duration::from_secs(30);

    #[test]
    fn a_poll_completes_when_its_socket_becomes_readable_with_its_token() {
        use std::io::Write;
        let mut engine = UringEngine::<Vec<u8>>::new(Vec::new(), Vec::new())
            .map_err(|(error, _)| error)
            .unwrap();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(engine.poll_fd(theirs.as_raw_fd(), libc::POLLIN as u32, 7));
        let mut ready = Vec::new();
        engine.submit_and_wait(0, Some(Duration::ZERO)).unwrap();
        engine.drain_polls(&mut ready);
        assert!(ready.is_empty(), "nothing was written yet: {ready:?}");
        assert_eq!(engine.in_flight(), 0, "a poll is not a disk request");
        ours.write_all(b"x").unwrap();
        for _ in 0..100 {
            engine.submit_and_wait(1, Some(WAIT)).unwrap();
            engine.drain_polls(&mut ready);
            if !ready.is_empty() {
                break;
            }
        }
        assert_eq!(ready.len(), 1, "{ready:?}");
        assert_eq!(ready[0].0, 7);
        assert!(ready[0].1 & i32::from(libc::POLLIN) != 0, "{ready:?}");
    }

    #[test]
    fn a_wake_up_that_completed_before_the_wait_ends_the_wait_at_once() {
        let mut engine = UringEngine::<Vec<u8>>::new(Vec::new(), Vec::new())
            .map_err(|(error, _)| error)
            .unwrap();
        // Arms the eventfd read.
        engine.submit_and_wait(1, Some(Duration::ZERO)).unwrap();
        // Its completion is posted when this thread next leaves the kernel,
        // before the wait below starts.
        engine.waker().wake();
        let started = std::time::Instant::now();
        engine.submit_and_wait(1, Some(WAIT)).unwrap();
        assert!(
            started.elapsed() < WAIT,
            "the wait slept through a wake-up that came before it"
        );
        // And the read is armed again: a later wake-up ends a later wait.
        engine.waker().wake();
        let started = std::time::Instant::now();
        engine.submit_and_wait(1, Some(WAIT)).unwrap();
        assert!(started.elapsed() < WAIT, "the wait slept through a wake-up");
    }
}
