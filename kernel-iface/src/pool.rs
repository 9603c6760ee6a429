//! The fallback engine: a few threads doing pread/pwrite/fdatasync, for
//! hosts where io_uring is missing or blocked (old kernels, seccomp
//! profiles, `kernel.io_uring_disabled`). Entirely safe code: buffers move
//! to the worker and back.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};

use crate::engine::{Completion, IoEngine, IoKind, Submission, Waker, ENGINE_REQUESTS_MAX};

/// Worker threads per engine.
const POOL_THREADS: usize = 4;

enum Event<B> {
    Done(Completion<B>),
    Wake,
}

struct ChannelWaker<B> {
    events: Sender<Event<B>>,
}

impl<B: Send> Waker for ChannelWaker<B> {
    fn wake(&self) {
        let _ = self.events.send(Event::Wake);
    }
}

/// A pread/pwrite thread pool behind the engine interface.
pub struct PoolEngine<B: Send + 'static> {
    work: Option<Sender<Submission<B>>>,
    events: Receiver<Event<B>>,
    events_sender: Sender<Event<B>>,
    ready: Vec<Completion<B>>,
    /// Requests handed to workers and not yet completed.
    in_worker: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<B: AsMut<[u8]> + Send + 'static> PoolEngine<B> {
    /// Starts the worker threads over `files`.
    pub fn new(files: Vec<File>) -> std::io::Result<Self> {
        let files = Arc::new(files);
        let (work, work_receiver) = bounded::<Submission<B>>(ENGINE_REQUESTS_MAX);
        let (events_sender, events) = unbounded();
        let mut threads = Vec::with_capacity(POOL_THREADS);
        for number in 0..POOL_THREADS {
            let files = Arc::clone(&files);
            let work_receiver = work_receiver.clone();
            let events_sender = events_sender.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ballast-io-{number}"))
                .spawn(move || {
                    for submission in work_receiver {
                        let completion = execute(&files, submission);
                        if events_sender.send(Event::Done(completion)).is_err() {
                            return;
                        }
                    }
                })?;
            threads.push(thread);
        }
        Ok(Self {
            work: Some(work),
            events,
            events_sender,
            ready: Vec::new(),
            in_worker: 0,
            threads,
        })
    }

    fn take_event(&mut self, event: Event<B>) {
        if let Event::Done(completion) = event {
            self.in_worker -= 1;
            self.ready.push(completion);
        }
    }
}

fn execute<B: AsMut<[u8]>>(files: &[File], submission: Submission<B>) -> Completion<B> {
    let Submission { file, user_data, kind } = submission;
    let Some(handle) = usize::try_from(file).ok().and_then(|index| files.get(index)) else {
        return Completion {
            user_data,
            result: -libc::EBADF,
            buf: kind.into_buf(),
        };
    };
    let (result, buf) = match kind {
        IoKind::Read { offset_bytes, mut buf } => (
            transfer(buf.as_mut(), offset_bytes, |b, o| handle.read_at(b, o)),
            Some(buf),
        ),
        IoKind::Write { offset_bytes, mut buf } => {
            let result = transfer(buf.as_mut(), offset_bytes, |b, o| handle.write_at(b, o));
            (result, Some(buf))
        }
        // No pwritev2 in std: write, then fdatasync (same guarantee, slower).
        IoKind::WriteDurable { offset_bytes, mut buf } => {
            let result = transfer(buf.as_mut(), offset_bytes, |b, o| handle.write_at(b, o))
                .and_then(|done| handle.sync_data().map(|()| done));
            (result, Some(buf))
        }
        IoKind::Fsync => (handle.sync_data().map(|()| 0), None),
        IoKind::Discard {
            offset_bytes,
            len_bytes,
        } => (discard(handle, offset_bytes, len_bytes).map(|()| 0), None),
    };
    let result = match result {
        Ok(bytes) => i32::try_from(bytes).unwrap_or(i32::MAX),
        Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
    };
    Completion { user_data, result, buf }
}

/// BLKDISCARD is _IO(0x12, 119); its argument is `[start, length]` in bytes.
const BLKDISCARD: libc::c_ulong = 0x1277;

/// Discards a range: BLKDISCARD on a block device, a punched hole in a
/// regular file (blocking; this runs on a worker thread).
pub(crate) fn discard(file: &File, offset_bytes: u64, len_bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let fd = file.as_raw_fd();
    if file.metadata()?.file_type().is_block_device() {
        let range: [u64; 2] = [offset_bytes, len_bytes];
        // SAFETY: BLKDISCARD reads two u64 from the pointer, which is valid
        // for the call.
        let result = unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) };
        return if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(offset_bytes), i64::try_from(len_bytes)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes plain integers.
    let result = unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Repeats a positional transfer until the buffer is done or the file ends.
fn transfer(
    bytes: &mut [u8],
    offset_bytes: u64,
    mut step: impl FnMut(&mut [u8], u64) -> std::io::Result<usize>,
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match step(&mut bytes[done..], offset_bytes + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(done)
}

impl<B: AsMut<[u8]> + Send + 'static> IoEngine<B> for PoolEngine<B> {
    fn push(&mut self, submission: Submission<B>) {
        while self.in_worker >= ENGINE_REQUESTS_MAX {
            match self.events.recv() {
                Ok(event) => self.take_event(event),
                Err(_) => break,
            }
        }
        self.in_worker += 1;
        let work = self.work.as_ref().expect("pool is running");
        if let Err(error) = work.send(submission) {
            // Workers are gone (a panic): report the request as failed.
            self.in_worker -= 1;
            let submission = error.into_inner();
            self.ready.push(Completion {
                user_data: submission.user_data,
                result: -libc::EIO,
                buf: submission.kind.into_buf(),
            });
        }
    }

    fn submit_and_wait(&mut self, min_complete: usize, timeout: Option<Duration>) -> std::io::Result<()> {
        while let Ok(event) = self.events.try_recv() {
            self.take_event(event);
        }
        if self.ready.len() >= min_complete {
            return Ok(());
        }
        let event = match timeout {
            None => self.events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(duration) => self.events.recv_timeout(duration),
        };
        match event {
            Ok(event) => self.take_event(event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err(std::io::Error::other("I/O worker threads are gone")),
        }
        while let Ok(event) = self.events.try_recv() {
            self.take_event(event);
        }
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<Completion<B>>) {
        while let Ok(event) = self.events.try_recv() {
            self.take_event(event);
        }
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.in_worker + self.ready.len()
    }

    fn waker(&self) -> Arc<dyn Waker> {
        Arc::new(ChannelWaker {
            events: self.events_sender.clone(),
        })
    }

    fn kind(&self) -> &'static str {
        "thread-pool"
    }
}

impl<B: Send + 'static> Drop for PoolEngine<B> {
    fn drop(&mut self) {
        self.work.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
