//! Sockets whose readiness the reactor's own io_uring reports.
//!
//! A connection hosted by a reactor (NBD, a peer's replica traffic) would
//! otherwise learn that its socket is readable from the runtime's I/O
//! thread (epoll), which then wakes the reactor through its eventfd: two
//! threads and a wake-up per event. A `HostableSocket` starts on the
//! runtime (accept, handshake, TLS) and, the first time it is polled on a
//! reactor's thread, leaves the runtime's epoll: from then on it reads and
//! writes with plain non-blocking calls, and when the socket is not ready
//! it arms a one-shot poll on that reactor's ring, whose completion wakes
//! the connection on the same thread (no system call, no other thread).
//!
//! `BALLAST_SOCKETS_ON_RING=0` keeps hosted sockets on the runtime's epoll
//! (for A/B runs).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use disk_layout::IoBuf;
use kernel_iface::IoEngine;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The socket polls of one reactor: asked for by connections on any
/// thread, armed and completed by the reactor.
pub(super) struct SocketPolls {
    /// Wakes the reactor when a poll is asked for from another thread.
    waker: super::ReactorWaker,
    /// Set (under the lock, after the push) when `Polls::to_arm` gained a
    /// poll: the reactor's turn skips the lock while it is clear.
    asked: std::sync::atomic::AtomicBool,
    inner: parking_lot::Mutex<Polls>,
}

#[derive(Default)]
struct Polls {
    next_token: u64,
    /// Wakers of the armed polls, by token.
    waiting: HashMap<u64, std::task::Waker>,
    /// Polls asked for since the reactor last armed them: (fd, events, token).
    to_arm: Vec<(RawFd, u32, u64)>,
}

thread_local! {
    /// The polls of the reactor this thread runs, when its engine polls sockets.
    static CURRENT: RefCell<Option<Arc<SocketPolls>>> = const { RefCell::new(None) };
}

/// Polls armed on reactors' rings since the process started.
static POLLS_ARMED: AtomicU64 = AtomicU64::new(0);
/// Sockets moved from the runtime's epoll to a reactor's ring.
static SOCKETS_MOVED: AtomicU64 = AtomicU64::new(0);

/// Polls armed on the reactors' rings since the process started (each one
/// a wait for a socket that did not go through the runtime's I/O thread).
#[must_use]
pub fn polls_armed() -> u64 {
    POLLS_ARMED.load(Ordering::Relaxed)
}

/// Sockets that moved from the runtime to a reactor since the process started.
#[must_use]
pub fn sockets_moved() -> u64 {
    SOCKETS_MOVED.load(Ordering::Relaxed)
}

/// Marks this thread as the reactor woken by `waker`, able to poll sockets
/// when its engine can (`IoEngine::poll_fd`; the thread pool cannot).
pub(super) fn enter(waker: super::ReactorWaker, engine_polls: bool) {
    let enabled = engine_polls && std::env::var("BALLAST_SOCKETS_ON_RING").map_or(true, |value| value != "0");
    let polls = enabled.then(|| {
        Arc::new(SocketPolls {
            waker,
            asked: std::sync::atomic::AtomicBool::new(false),
            inner: parking_lot::Mutex::new(Polls::default()),
        })
    });
    CURRENT.with(|current| *current.borrow_mut() = polls);
}

fn current() -> Option<Arc<SocketPolls>> {
    CURRENT.with(|current| current.borrow().clone())
}

/// Runs `work` with this thread's polls, without touching their count of
/// owners (called every reactor turn).
fn with_current(work: impl FnOnce(&SocketPolls)) {
    CURRENT.with(|current| {
        if let Some(polls) = current.borrow().as_deref() {
            work(polls);
        }
    });
}

/// Hands the polls asked for (on any thread) to this reactor's engine.
pub(super) fn arm_asked(engine: &mut dyn IoEngine<IoBuf>) {
    with_current(|polls| {
        // Cleared before the list is taken: a poll pushed after this sets it
        // again (and wakes the reactor when asked from another thread).
        if !polls.asked.swap(false, Ordering::Acquire) {
            return;
        }
        let asked = std::mem::take(&mut polls.inner.lock().to_arm);
        for (fd, events, token) in asked {
            if engine.poll_fd(fd, events, token) {
                POLLS_ARMED.fetch_add(1, Ordering::Relaxed);
            } else {
                // Cannot happen on a thread marked by `enter`; never leave a waiter asleep.
                polls.wake([token]);
            }
        }
    });
}

/// Wakes the connections whose polls on this reactor completed.
pub(super) fn wake_ready(engine: &mut dyn IoEngine<IoBuf>, scratch: &mut Vec<(u64, i32)>) {
    engine.drain_polls(scratch);
    if scratch.is_empty() {
        return;
    }
    with_current(|polls| polls.wake(scratch.drain(..).map(|(token, _)| token)));
    scratch.clear();
}

impl SocketPolls {
    fn wake(&self, tokens: impl IntoIterator<Item = u64>) {
        let wakers: Vec<std::task::Waker> = {
            let mut polls = self.inner.lock();
            // A token nobody waits for is a socket already dropped.
            tokens
                .into_iter()
                .filter_map(|token| polls.waiting.remove(&token))
                .collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Asks the reactor to wake `waker` once `fd` is ready for `events`,
    /// unless a poll for it is still armed (then only the waker is kept).
    fn arm(&self, fd: RawFd, events: u32, slot: &mut Option<u64>, waker: &std::task::Waker) {
        {
            let mut polls = self.inner.lock();
            if let Some(token) = *slot {
                if let Some(armed) = polls.waiting.get_mut(&token) {
                    if !armed.will_wake(waker) {
                        armed.clone_from(waker);
                    }
                    return;
                }
            }
            polls.next_token += 1;
            let token = polls.next_token;
            polls.waiting.insert(token, waker.clone());
            polls.to_arm.push((fd, events, token));
            self.asked.store(true, Ordering::Release);
            *slot = Some(token);
        }
        // On its own thread the reactor arms it before it next sleeps.
        if !self.waker.is_current() {
            self.waker.wake();
        }
    }

    /// Forgets a dropped socket's polls (asked for or armed).
    fn forget(&self, tokens: [Option<u64>; 2]) {
        let mut polls = self.inner.lock();
        for token in tokens.into_iter().flatten() {
            polls.waiting.remove(&token);
            polls.to_arm.retain(|(_, _, asked)| *asked != token);
        }
    }
}

/// A TCP connection that moves onto the reactor that first polls it; after
/// that any thread may use it, and that reactor's ring says when it is ready.
pub struct HostableSocket {
    mode: Mode,
    /// Tasks that found it not ready while on the runtime: woken when it
    /// moves (the runtime's epoll no longer wakes them then).
    runtime_waiters: [Option<std::task::Waker>; 2],
}

enum Mode {
    Runtime(tokio::net::TcpStream),
    Reactor(RingSocket),
    /// Moving failed: every call fails.
    Broken,
}

/// A socket served by a reactor's ring.
struct RingSocket {
    stream: std::net::TcpStream,
    polls: Arc<SocketPolls>,
    /// The armed poll for readability, if any.
    readable: Option<u64>,
    writable: Option<u64>,
}

impl HostableSocket {
    #[must_use]
    pub fn new(stream: tokio::net::TcpStream) -> Self {
        Self {
            mode: Mode::Runtime(stream),
            runtime_waiters: [None, None],
        }
    }

    /// Whether a reactor serves it now.
    #[must_use]
    pub fn on_reactor(&self) -> bool {
        matches!(self.mode, Mode::Reactor(_))
    }

    /// Moves it to this thread's reactor if it runs one that polls sockets
    /// (the first poll of a hosted connection).
    fn settle(&mut self) -> std::io::Result<()> {
        match &self.mode {
            Mode::Runtime(_) => {
                let Some(polls) = current() else {
                    return Ok(());
                };
                let Mode::Runtime(stream) = std::mem::replace(&mut self.mode, Mode::Broken) else {
                    unreachable!("matched above");
                };
                let stream = stream.into_std()?;
                SOCKETS_MOVED.fetch_add(1, Ordering::Relaxed);
                self.mode = Mode::Reactor(RingSocket {
                    stream,
                    polls,
                    readable: None,
                    writable: None,
                });
                for waiter in self.runtime_waiters.iter_mut().filter_map(Option::take) {
                    waiter.wake();
                }
                Ok(())
            }
            Mode::Broken => Err(std::io::Error::other("the socket could not move to its reactor")),
            Mode::Reactor(_) => Ok(()),
        }
    }

    /// Remembers the task a runtime-side call left pending (`which`: 0 read, 1 write).
    fn note_runtime_wait<T>(&mut self, which: usize, cx: &Context<'_>, outcome: Poll<T>) -> Poll<T> {
        if outcome.is_pending() {
            self.runtime_waiters[which] = Some(cx.waker().clone());
        }
        outcome
    }
}

/// Runs `attempt` until it is not interrupted; a would-block arms a poll
/// for `events` and returns pending.
fn ready_or_arm<T>(
    polls: &SocketPolls,
    fd: RawFd,
    events: i16,
    slot: &mut Option<u64>,
    cx: &Context<'_>,
    mut attempt: impl FnMut() -> std::io::Result<T>,
) -> Poll<std::io::Result<T>> {
    loop {
        match attempt() {
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                polls.arm(fd, u32::from(events.cast_unsigned()), slot, cx.waker());
                return Poll::Pending;
            }
            done => return Poll::Ready(done),
        }
    }
}

impl Drop for RingSocket {
    fn drop(&mut self) {
        // An armed poll holds the socket open in the kernel until it
        // completes: a shutdown completes it (and closes the connection,
        // as the close after it would).
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.polls.forget([self.readable, self.writable]);
    }
}

impl HostableSocket {
    /// One read or write (`events`: `POLLIN` or `POLLOUT`) with `arg`: on the
    /// runtime through `runtime`, on a reactor through `ring` (armed for
    /// `events` when not ready).
    fn poll_io<A: ?Sized, T>(
        &mut self,
        cx: &mut Context<'_>,
        events: i16,
        arg: &mut A,
        runtime: impl FnOnce(Pin<&mut tokio::net::TcpStream>, &mut Context<'_>, &mut A) -> Poll<std::io::Result<T>>,
        ring: impl FnMut(&std::net::TcpStream, &mut A) -> std::io::Result<T>,
    ) -> Poll<std::io::Result<T>> {
        if let Err(error) = self.settle() {
            return Poll::Ready(Err(error));
        }
        match &mut self.mode {
            Mode::Runtime(stream) => {
                let outcome = runtime(Pin::new(stream), cx, arg);
                self.note_runtime_wait(usize::from(events != libc::POLLIN), cx, outcome)
            }
            Mode::Reactor(socket) => {
                let slot = if events == libc::POLLIN {
                    &mut socket.readable
                } else {
                    &mut socket.writable
                };
                let mut ring = ring;
                ready_or_arm(&socket.polls, socket.stream.as_raw_fd(), events, slot, cx, || {
                    ring(&socket.stream, arg)
                })
            }
            Mode::Broken => Poll::Ready(Err(std::io::Error::other("the socket could not move to its reactor"))),
        }
    }
}

impl AsyncRead for HostableSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_io(
            cx,
            libc::POLLIN,
            buf,
            |stream, cx, buf| stream.poll_read(cx, buf),
            |mut stream, buf| {
                let bytes = stream.read(buf.initialize_unfilled())?;
                buf.advance(bytes);
                Ok(())
            },
        )
    }
}

impl AsyncWrite for HostableSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_io(
            cx,
            libc::POLLOUT,
            &mut (),
            |stream, cx, ()| stream.poll_write(cx, buf),
            |mut stream, ()| stream.write(buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_io(
            cx,
            libc::POLLOUT,
            &mut (),
            |stream, cx, ()| stream.poll_write_vectored(cx, bufs),
            |mut stream, ()| stream.write_vectored(bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().mode {
            Mode::Runtime(stream) => Pin::new(stream).poll_flush(cx),
            // Nothing is buffered here.
            Mode::Reactor(_) | Mode::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().mode {
            Mode::Runtime(stream) => Pin::new(stream).poll_shutdown(cx),
            Mode::Reactor(ring) => Poll::Ready(ring.stream.shutdown(std::net::Shutdown::Write)),
            Mode::Broken => Poll::Ready(Ok(())),
        }
    }
}
