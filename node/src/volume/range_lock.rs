//! Orders overlapping mutations of a replicated volume: a write waits
//! until no in-flight write overlaps its blocks, so the coordinator and
//! every replica apply overlapping writes in the same order (the store
//! keeps the last record applied). Writes that do not overlap run
//! concurrently.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// In-flight block ranges of one volume.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, Arc<Notify>)>>,
}

/// Releases its range when dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    notify: Arc<Notify>,
}

impl RangeLock {
    /// Waits until `[start, start + count)` overlaps no held range, then holds it.
    pub async fn lock(&self, start: u64, count: u64) -> RangeGuard<'_> {
        let end = start.saturating_add(count);
        loop {
            let wait = {
                let mut held = self.held.lock();
                match held.iter().find(|(s, e, _)| *s < end && start < *e) {
                    Some((_, _, notify)) => {
                        let notify = Arc::clone(notify);
                        // Registered under the lock, so a release between here and the await is not missed.
                        let notified = notify.notified_owned();
                        Some(notified)
                    }
                    None => {
                        let notify = Arc::new(Notify::new());
                        held.push((start, end, Arc::clone(&notify)));
                        return RangeGuard { lock: self, notify };
                    }
                }
            };
            if let Some(notified) = wait {
                notified.await;
            }
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        held.retain(|(_, _, notify)| !Arc::ptr_eq(notify, &self.notify));
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
}
