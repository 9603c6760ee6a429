//! Orders overlapping mutations of a replicated volume: a write waits
//! until no earlier in-flight write or read overlaps its blocks, so the
//! coordinator and every replica apply overlapping writes in the same order
//! (the store keeps the last record applied). A client read waits for the
//! earlier overlapping writes: it never sees a write that is not yet durable
//! on every in-sync replica (which a crash of this node could still undo).
//! Writes that do not overlap run concurrently, and so do reads.
//!
//! Requests are served in the order they arrive where they overlap: each
//! takes a ticket, and waits only for overlapping holders with an earlier
//! one that conflict (any write; a read conflicts with writes only), so a
//! stream of reads cannot starve a write.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

struct Held {
    ticket: u64,
    start: u64,
    end: u64,
    shared: bool,
    notify: Arc<Notify>,
}

/// In-flight block ranges of one volume.
#[derive(Default)]
pub struct RangeLock {
    /// The next ticket, and the ranges held or waited for.
    held: Mutex<(u64, Vec<Held>)>,
}

/// Releases its range when dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    notify: Arc<Notify>,
}

impl RangeLock {
    /// Waits until `[start, start + count)` overlaps no earlier held range, then holds it alone.
    pub async fn lock(&self, start: u64, count: u64) -> RangeGuard<'_> {
        self.acquire(start, count, false).await
    }

    /// Waits until `[start, start + count)` overlaps no earlier write, then
    /// holds it for reading (beside other reads).
    pub async fn share(&self, start: u64, count: u64) -> RangeGuard<'_> {
        self.acquire(start, count, true).await
    }

    async fn acquire(&self, start: u64, count: u64, shared: bool) -> RangeGuard<'_> {
        let end = start.saturating_add(count);
        let notify = Arc::new(Notify::new());
        let ticket = {
            let mut held = self.held.lock();
            let ticket = held.0;
            held.0 += 1;
            held.1.push(Held {
                ticket,
                start,
                end,
                shared,
                notify: Arc::clone(&notify),
            });
            ticket
        };
        // Dropped while waiting (a cancelled request): the range goes too.
        let guard = RangeGuard { lock: self, notify };
        loop {
            let wait = {
                let held = self.held.lock();
                held.1
                    .iter()
                    .find(|h| h.ticket < ticket && h.start < end && start < h.end && !(shared && h.shared))
                    // Registered under the lock, so a release between here and the await is not missed.
                    .map(|h| Arc::clone(&h.notify).notified_owned())
            };
            match wait {
                Some(notified) => notified.await,
                None => return guard,
            }
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        held.1.retain(|h| !Arc::ptr_eq(&h.notify, &self.notify));
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let first = lock.lock(0, 8).await;
        let _disjoint = tokio::time::timeout(Duration::from_secs(5), lock.lock(8, 8))
            .await
            .expect("disjoint range must not wait");
        let waiter = {
            let lock = Arc::clone(&lock);
            tokio::spawn(async move {
                let _guard = lock.lock(4, 1).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "an overlapping range must wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released range wakes the waiter")
            .unwrap();
    }

    #[tokio::test]
    async fn reads_share_a_range_but_wait_for_an_earlier_write_and_a_write_waits_for_earlier_reads() {
        let lock = Arc::new(RangeLock::default());
        let read = lock.share(0, 8).await;
        let _other_read = tokio::time::timeout(Duration::from_secs(5), lock.share(4, 8))
            .await
            .expect("reads do not wait for reads");
        let write = {
            let lock = Arc::clone(&lock);
            tokio::spawn(async move {
                let _guard = lock.lock(6, 1).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!write.is_finished(), "a write must wait for the reads before it");
        // A read arriving after the waiting write queues behind it (no starvation).
        let late_read = {
            let lock = Arc::clone(&lock);
            tokio::spawn(async move {
                let _guard = lock.share(6, 1).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late_read.is_finished(), "a read must wait for an earlier write");
        drop(read);
        drop(_other_read);
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("the write runs once the reads are done")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), late_read)
            .await
            .expect("then the late read")
            .unwrap();
    }
}
