//! The requests one connection is running, as futures polled by the
//! connection's own task: a request costs no task spawn and no thread hop
//! of its own (the NBD server and the peer protocol's server use it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use futures::stream::{FuturesUnordered, StreamExt};

/// A request being run; its output is the answer to send.
pub type Request<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The requests a connection is running. Dropped with some still running
/// (the connection was stopped or broke), they are finished on a task of
/// their own: a write half done must not be abandoned mid-way.
///
/// The set also holds one future that never finishes and is never woken:
/// `FuturesUnordered` wakes its task again whenever one call has polled
/// every future it holds (to let other tasks run), which with few requests
/// in flight was nearly every call, and cost a wake-up of another runtime
/// thread per request (a third more CPU per request at queue depth 1).
pub struct InFlight<T: Send + 'static> {
    futures: FuturesUnordered<Request<T>>,
}

impl<T: Send + 'static> InFlight<T> {
    #[must_use]
    pub fn new() -> Self {
        let futures: FuturesUnordered<Request<T>> = FuturesUnordered::new();
        futures.push(Box::pin(std::future::pending()));
        Self { futures }
    }

    /// Requests running.
    #[must_use]
    pub fn len(&self) -> usize {
        self.futures.len() - 1
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, request: Request<T>) {
        self.futures.push(request);
    }

    /// Runs `request` on a task of its own (its CPU can then use another
    /// core) and keeps its answer with the others; `failed` answers for a
    /// task that did not finish (it panicked or was cancelled).
    pub fn spawn(
        &mut self,
        request: impl Future<Output = T> + Send + 'static,
        failed: impl FnOnce(tokio::task::JoinError) -> T + Send + 'static,
    ) {
        let task = tokio::spawn(request);
        self.futures
            .push(Box::pin(async move { task.await.unwrap_or_else(failed) }));
    }

    /// The next request to finish (pending forever when none runs).
    /// Cancel-safe.
    pub async fn next(&mut self) -> T {
        self.futures.next().await.expect("the set is never empty")
    }
}

impl<T: Send + 'static> Default for InFlight<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send + 'static> Drop for InFlight<T> {
    fn drop(&mut self) {
        let running = self.len();
        if running == 0 {
            return;
        }
        let mut rest = std::mem::take(&mut self.futures);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    for _ in 0..running {
                        rest.next().await;
                    }
                });
            }
            Err(_) => tracing::warn!(requests = running, "requests dropped with their runtime"),
        }
    }
}

/// A future polled first by the thread that made it, then by the runtime.
struct FirstPoll {
    future: parking_lot::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    runtime: tokio::runtime::Handle,
}

impl Wake for FirstPoll {
    fn wake(self: Arc<Self>) {
        // From now on a task of the runtime runs it; a later wake finds it gone.
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let future = self.future.lock().take();
            if let Some(future) = future {
                future.await;
            }
        });
    }
}

/// Runs `future` on `runtime`, polling it once on this thread first: the
/// work up to its first wait (checks, handing I/O to the reactor) costs no
/// wake-up of a runtime thread, only its completion does. For threads
/// that are not the runtime's (FUSE channels, ublk queues); they must be
/// inside its context (`Handle::enter`).
pub fn spawn_polled_here(runtime: &tokio::runtime::Handle, future: impl Future<Output = ()> + Send + 'static) {
    let task = Arc::new(FirstPoll {
        future: parking_lot::Mutex::new(Some(Box::pin(future))),
        runtime: runtime.clone(),
    });
    let waker = Waker::from(Arc::clone(&task));
    let mut context = Context::from_waker(&waker);
    // Held through the poll: a wake meanwhile (from another thread) waits for it.
    let mut slot = task.future.lock();
    if let Some(mut future) = slot.take() {
        if future.as_mut().poll(&mut context).is_pending() {
            *slot = Some(future);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_polled_here_first_is_finished_by_the_runtime_when_it_waits() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let _context = runtime.enter();
        let here = std::thread::current().id();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        spawn_polled_here(runtime.handle(), async move {
            first_tx.send(std::thread::current().id()).unwrap();
            let _ = release_rx.await;
            done_tx.send(std::thread::current().id()).unwrap();
        });
        // The part before the wait ran here, synchronously.
        assert_eq!(first_rx.try_recv().unwrap(), here);
        assert!(done_rx.try_recv().is_err());
        release_tx.send(()).unwrap();
        let finisher = done_rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_ne!(finisher, here, "the rest ran on the runtime");
        // A future that never waits finishes here at once.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        spawn_polled_here(runtime.handle(), async move { ready_tx.send(()).unwrap() });
        assert!(ready_rx.try_recv().is_ok());
    }

    #[tokio::test]
    async fn answers_come_in_completion_order_and_the_set_counts_only_requests() {
        let mut set: InFlight<u32> = InFlight::new();
        assert!(set.is_empty());
        let (slow_tx, slow_rx) = tokio::sync::oneshot::channel::<()>();
        set.push(Box::pin(async move {
            let _ = slow_rx.await;
            1
        }));
        set.push(Box::pin(async { 2 }));
        assert_eq!(set.len(), 2);
        assert_eq!(set.next().await, 2);
        slow_tx.send(()).unwrap();
        assert_eq!(set.next().await, 1);
        assert!(set.is_empty());
        let idle = tokio::time::timeout(std::time::Duration::from_millis(20), set.next()).await;
        assert!(idle.is_err(), "an empty set never answers");
    }

    #[tokio::test]
    async fn a_spawned_request_answers_with_the_others_and_a_failed_one_is_answered_for() {
        let mut set: InFlight<String> = InFlight::new();
        set.spawn(async { "done".to_owned() }, |_| "failed".to_owned());
        assert_eq!(set.next().await, "done");
        set.spawn(async { panic!("boom") }, |error| {
            format!("failed: panic {}", error.is_panic())
        });
        assert_eq!(set.next().await, "failed: panic true");
    }

    #[tokio::test]
    async fn requests_still_running_when_the_set_is_dropped_are_finished() {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u32>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let mut set: InFlight<()> = InFlight::new();
        set.push(Box::pin(async move {
            let _ = go_rx.await;
            let _ = done_tx.send(7);
        }));
        drop(set);
        go_tx.send(()).unwrap();
        let finished = tokio::time::timeout(std::time::Duration::from_secs(5), done_rx).await;
        assert_eq!(finished.unwrap().unwrap(), 7, "the dropped request ran to its end");
    }
}
