//! A coordinator's serving lease on one replicated volume.
//!
//! A replicated volume can move to another node (failover, `volume attach`,
//! a drain). Writes are safe across a move by the epoch fence, but a read
//! answered from the old coordinator's copy after the new one took a write
//! would be stale. So a coordinator answers reads only while it holds a
//! lease: the cluster's Raft leader confirmed, less than `LEASE_DURATION`
//! ago (counted from before the request was sent, on this node's monotonic
//! clock), that this node still coordinates the volume. A new coordinator
//! waits one `LEASE_DURATION` after it learns of the move before it serves,
//! so any lease the old one still holds has run out (`cluster::lease`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a confirmation from the Raft leader lets a coordinator serve reads.
pub const LEASE_DURATION: Duration = Duration::from_millis(1500);

/// Nanoseconds since the process's first lease (monotonic; 0 never means "held").
fn clock_nanos(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(|| Instant::now() - Duration::from_secs(1));
    u64::try_from(at.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// One volume's lease on this node.
#[derive(Debug, Default)]
pub struct ServingLease {
    /// Reads need the lease (the volume has other replicas it could move to).
    required: AtomicBool,
    /// The lease holds before this (`clock_nanos`; 0: never held).
    until_nanos: AtomicU64,
    renewed: tokio::sync::Notify,
}

impl ServingLease {
    /// Whether reads need the lease (set with the volume's replication).
    pub fn set_required(&self, required: bool) {
        self.required.store(required, Ordering::Release);
    }

    #[must_use]
    pub fn is_required(&self) -> bool {
        self.required.load(Ordering::Acquire)
    }

    /// The leader confirmed this node's tenure for a request sent at `asked`.
    pub fn extend_from(&self, asked: Instant) {
        self.until_nanos
            .fetch_max(clock_nanos(asked + LEASE_DURATION), Ordering::AcqRel);
        self.renewed.notify_waiters();
    }

    /// Wakes the reads waiting for a renewal (the volume stopped being served here).
    pub fn wake(&self) {
        self.renewed.notify_waiters();
    }

    /// Whether reads may be answered now (always, when no lease is required).
    #[must_use]
    pub fn holds(&self) -> bool {
        !self.is_required() || clock_nanos(Instant::now()) < self.until_nanos.load(Ordering::Acquire)
    }

    /// Time left on the lease (zero once run out).
    #[must_use]
    pub fn remaining(&self) -> Duration {
        let now = clock_nanos(Instant::now());
        Duration::from_nanos(self.until_nanos.load(Ordering::Acquire).saturating_sub(now))
    }

    /// Waits up to `wait` for the lease to hold, unless `give_up` (checked
    /// at every wake-up) says to stop; whether it holds.
    pub async fn wait(&self, wait: Duration, give_up: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.holds() {
                return true;
            }
            if give_up() {
                return false;
            }
            if tokio::time::timeout_at(deadline, renewed).await.is_err() {
                return self.holds();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_for_its_duration_from_when_it_was_asked_for() {
        let lease = ServingLease::default();
        assert!(lease.holds(), "a volume that needs no lease is always readable");
        lease.set_required(true);
        assert!(!lease.holds(), "never confirmed: no lease");
        lease.extend_from(Instant::now());
        assert!(lease.holds());
        assert!(lease.remaining() <= LEASE_DURATION);
        // A confirmation asked for longer ago than the duration gives nothing.
        let lease = ServingLease::default();
        lease.set_required(true);
        lease.extend_from(Instant::now() - LEASE_DURATION - Duration::from_millis(1));
        assert!(!lease.holds());
        // An older confirmation never shortens a newer one.
        let lease = ServingLease::default();
        lease.set_required(true);
        lease.extend_from(Instant::now());
        lease.extend_from(Instant::now() - LEASE_DURATION);
        assert!(lease.holds());
    }

    #[tokio::test]
    async fn a_read_waiting_for_the_lease_wakes_when_it_is_renewed_and_gives_up_at_its_limit() {
        let lease = std::sync::Arc::new(ServingLease::default());
        lease.set_required(true);
        assert!(
            !lease.wait(Duration::from_millis(20), || false).await,
            "no renewal: gives up"
        );
        let renewer = std::sync::Arc::clone(&lease);
        let renewal = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            renewer.extend_from(Instant::now());
        });
        assert!(lease.wait(Duration::from_secs(30), || false).await);
        renewal.await.unwrap();
        // Woken with a reason to stop waiting: it stops at once.
        let lease = std::sync::Arc::new(ServingLease::default());
        lease.set_required(true);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (waker, stopper) = (std::sync::Arc::clone(&lease), std::sync::Arc::clone(&stop));
        let wake = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stopper.store(true, Ordering::Release);
            waker.wake();
        });
        let started = Instant::now();
        assert!(
            !lease
                .wait(Duration::from_secs(30), || stop.load(Ordering::Acquire))
                .await
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        wake.await.unwrap();
    }
}
