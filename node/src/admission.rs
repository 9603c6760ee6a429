//! Connection slots for a public port that a flood cannot use up: at most
//! `max` connections; when all are taken, a new one evicts the oldest
//! connection still in its handshake (connected, but no request or
//! session yet: a slowloris or flood socket; a real client gets past that
//! in milliseconds), and with every slot in use by real work a new
//! connection is refused at once. Used by the NBD and API listeners.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

/// How long a new connection waits for an evicted one's slot.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Handshaking {
    next_id: AtomicU64,
    /// By age: ids only grow.
    tasks: Mutex<BTreeMap<u64, AbortHandle>>,
    evicted: AtomicU64,
}

/// The slots of one listener.
pub struct Admission {
    port: &'static str,
    slots: Arc<Semaphore>,
    handshaking: Arc<Handshaking>,
}

/// A connection's place among the handshaking: it leaves when its
/// handshake ends (`handshake_done`) or the connection does.
pub struct Ticket {
    id: u64,
    registry: Arc<Handshaking>,
}

impl Ticket {
    /// The connection is in real use now: it is no longer evicted.
    pub fn handshake_done(&self) {
        self.registry.tasks.lock().remove(&self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_done();
    }
}

impl Admission {
    #[must_use]
    pub fn new(port: &'static str, max: usize) -> Self {
        Self {
            port,
            slots: Arc::new(Semaphore::new(max)),
            handshaking: Arc::new(Handshaking::default()),
        }
    }

    /// Aborts the oldest connection still in its handshake; false if none is.
    fn evict_oldest(&self) -> bool {
        let Some((_, task)) = self.handshaking.tasks.lock().pop_first() else {
            return false;
        };
        task.abort();
        let evicted = self.handshaking.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        if evicted.is_power_of_two() || evicted.is_multiple_of(1000) {
            tracing::warn!(
                port = self.port,
                evicted,
                "connections full: closed the oldest one still in its handshake to make room"
            );
        }
        true
    }

    /// A slot for a connection just accepted from `peer`, evicting the
    /// oldest handshaking one if need be; None: refuse it (close it now).
    pub async fn admit(&self, peer: &std::net::SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(permit);
        }
        if !self.evict_oldest() {
            tracing::warn!(port = self.port, %peer, "connection refused: every slot is in use");
            return None;
        }
        // The evicted task gives its slot back as it is dropped.
        match tokio::time::timeout(EVICTION_WAIT, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => None,
        }
    }

    /// Spawns a connection's task on `set`, registered as handshaking
    /// until it calls `Ticket::handshake_done`.
    pub fn spawn<F>(&self, set: &mut JoinSet<()>, task: impl FnOnce(Ticket) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let id = self.handshaking.next_id.fetch_add(1, Ordering::Relaxed);
        let ticket = Ticket {
            id,
            registry: Arc::clone(&self.handshaking),
        };
        // Registered under the lock the ticket takes to leave, so the task
        // cannot leave before it is in.
        let mut tasks = self.handshaking.tasks.lock();
        let handle = set.spawn(task(ticket));
        tasks.insert(id, handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_listener_evicts_the_oldest_handshaking_connection_and_spares_active_ones() {
        let admission = Admission::new("test", 2);
        let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut set = JoinSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        let open = |name: &'static str,
                    active: bool,
                    permit: OwnedSemaphorePermit,
                    tx: tokio::sync::mpsc::UnboundedSender<&'static str>| {
            move |ticket: Ticket| async move {
                let _permit = permit;
                if active {
                    ticket.handshake_done();
                }
                // Reports only if it was not aborted first.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = tx.send(name);
            }
        };
        let first = admission.admit(&peer).await.unwrap();
        admission.spawn(&mut set, open("active", true, first, done_tx.clone()));
        tokio::task::yield_now().await;
        let second = admission.admit(&peer).await.unwrap();
        admission.spawn(&mut set, open("silent", false, second, done_tx.clone()));
        // Full: the silent one is evicted for the third, the active one stays.
        let third = admission.admit(&peer).await.expect("room made by eviction");
        admission.spawn(&mut set, open("third", true, third, done_tx.clone()));
        tokio::task::yield_now().await;
        // Full of active connections: a fourth is refused.
        assert!(admission.admit(&peer).await.is_none());
        drop(done_tx);
        let mut finished = Vec::new();
        while let Some(name) = done_rx.recv().await {
            finished.push(name);
        }
        finished.sort_unstable();
        assert_eq!(finished, ["active", "third"]);
    }
}
