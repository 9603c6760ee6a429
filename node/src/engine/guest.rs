//! Work a reactor runs on its own thread besides its stores: a guest (a
//! FUSE-over-io_uring queue, say) is served between the reactor's turns,
//! so its requests reach the stores, and their answers come back, without
//! leaving the core. A request a guest's code sends to this same reactor
//! skips the channel and the wake-up (a thread-local queue); one for
//! another reactor's disk is a hand-off, counted.
//!
//! What a guest polls is woken through a `ReactorWaker`: from the reactor's
//! own thread (an answer callback) it only marks work to do before the
//! reactor sleeps; from another thread it wakes the reactor.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kernel_iface::Waker;

use super::Control;

/// What a guest says after a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    /// Keep serving it.
    Serving,
    /// It is done: the reactor drops it.
    Finished,
}

/// Work hosted by a reactor. `serve` runs on the reactor thread after each
/// of its turns, and must never block: it does what is ready and returns.
pub trait Guest: Send {
    fn serve(&mut self) -> GuestState;
}

/// A reactor that can host guests.
#[derive(Clone)]
pub struct Host {
    /// The reactor's number (`Engine::host_guest`).
    pub reactor: usize,
    /// The core it is pinned to, if it is.
    pub core: Option<usize>,
    /// An eventfd whose writes wake the reactor (`IoEngine::notify_fd`).
    pub notify_fd: std::os::fd::RawFd,
    pub waker: ReactorWaker,
}

/// Wakes a reactor to serve its guests: cheap from the reactor's own
/// thread (a flag), a write of its eventfd from any other.
#[derive(Clone)]
pub struct ReactorWaker {
    id: u64,
    waker: Arc<dyn Waker>,
}

impl ReactorWaker {
    pub(super) fn new(id: u64, waker: Arc<dyn Waker>) -> Self {
        Self { id, waker }
    }

    /// Whether this thread is the reactor it wakes.
    #[must_use]
    pub fn is_current(&self) -> bool {
        CURRENT_REACTOR.with(Cell::get) == self.id
    }

    pub fn wake(&self) {
        if self.is_current() {
            GUEST_WORK.with(|work| work.set(true));
        } else {
            self.waker.wake();
        }
    }
}

/// A process-wide unique id per reactor (0: none).
pub(super) fn next_reactor_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

thread_local! {
    /// The id of the reactor this thread runs (0 on other threads).
    static CURRENT_REACTOR: Cell<u64> = const { Cell::new(0) };
    /// Requests this reactor sent itself, taken on its next turn.
    static LOCAL_REQUESTS: RefCell<Vec<Control>> = const { RefCell::new(Vec::new()) };
    /// A guest's task was woken on this thread since the guests were last served.
    static GUEST_WORK: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as reactor `id`'s.
pub(super) fn enter_reactor(id: u64) {
    CURRENT_REACTOR.with(|current| current.set(id));
}

/// Keeps `control` for this thread's reactor if it is reactor `id`; gives
/// it back otherwise.
pub(super) fn send_local(id: u64, control: Control) -> Result<(), Control> {
    if CURRENT_REACTOR.with(Cell::get) != id {
        return Err(control);
    }
    LOCAL_REQUESTS.with(|local| local.borrow_mut().push(control));
    Ok(())
}

/// Whether this thread runs a reactor (a request sent from here to another
/// reactor is a hand-off).
pub(super) fn on_a_reactor() -> bool {
    CURRENT_REACTOR.with(Cell::get) != 0
}

/// The requests this reactor sent itself, in order.
pub(super) fn take_local() -> Vec<Control> {
    LOCAL_REQUESTS.with(|local| std::mem::take(&mut *local.borrow_mut()))
}

/// Whether work is waiting on this reactor's thread (requests it sent
/// itself, or woken guest tasks): then it must not sleep.
pub(super) fn local_work() -> bool {
    GUEST_WORK.with(Cell::get) || LOCAL_REQUESTS.with(|local| !local.borrow().is_empty())
}

/// Marks guest work on this thread (a guest was just added).
pub(super) fn wake_here() {
    GUEST_WORK.with(|work| work.set(true));
}

/// Clears the guest-work mark (the guests are about to be served).
pub(super) fn take_guest_work() -> bool {
    GUEST_WORK.with(|work| work.replace(false))
}

/// A future run to completion on a reactor's thread (an NBD connection):
/// polled when woken, with the runtime's context entered (its I/O and
/// timers wake it from their own threads). A panic ends it, not the reactor.
pub struct FutureGuest {
    future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    woken: Arc<FutureWake>,
    runtime: tokio::runtime::Handle,
}

struct FutureWake {
    flag: std::sync::atomic::AtomicBool,
    reactor: ReactorWaker,
}

impl std::task::Wake for FutureWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.reactor.wake();
        }
    }
}

impl FutureGuest {
    #[must_use]
    pub fn new(
        future: impl std::future::Future<Output = ()> + Send + 'static,
        reactor: ReactorWaker,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            future: Box::pin(future),
            woken: Arc::new(FutureWake {
                flag: std::sync::atomic::AtomicBool::new(true),
                reactor,
            }),
            runtime,
        }
    }
}

impl Guest for FutureGuest {
    fn serve(&mut self) -> GuestState {
        if !self.woken.flag.swap(false, Ordering::AcqRel) {
            return GuestState::Serving;
        }
        let _context = self.runtime.enter();
        let waker = std::task::Waker::from(Arc::clone(&self.woken));
        let mut context = std::task::Context::from_waker(&waker);
        let future = self.future.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.poll(&mut context))) {
            Ok(std::task::Poll::Ready(())) => GuestState::Finished,
            Ok(std::task::Poll::Pending) => GuestState::Serving,
            Err(_) => {
                tracing::error!("work hosted on a reactor panicked; it is dropped, the reactor goes on");
                GuestState::Finished
            }
        }
    }
}
