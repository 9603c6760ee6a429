//! Discards: telling the device which segments hold nothing any more.
//!
//! The store writes its disk as a log, so an SSD's flash translation layer
//! only learns that a segment is free if it is told; without that it keeps
//! copying dead data around, and its write speed and endurance fall. A
//! segment is discarded once it is `Free` (dead, behind the reuse floor,
//! its killing batch durable): no replay reads it and no index entry points
//! into it, so whatever it reads as afterwards (zeroes or its old bytes) is
//! never looked at. A discard is unordered against writes, so the run being
//! discarded leaves the free list until the discard completes.
//!
//! Paced: one discard in flight, at most `DISCARD_RUN_SEGMENTS_MAX`
//! consecutive segments in it, at most `StoreConfig::discard_bytes_per_interval`
//! started per `Store::interval` (100 ms on the node), never the free
//! segments that writes may need next: the free list never falls to the
//! cleaner's watermark for a discard (a segment about to be rewritten needs
//! none; the one that stays free is what the device should hear of). A device that
//! refuses discards (EOPNOTSUPP, EINVAL, ENOTTY: no support; a kernel
//! without io_uring's block discard command is the engine's business, which
//! sends them through a helper thread) turns them off for this open, with the
//! reason logged once; another error is counted and logged, and the
//! segments go back to the free list undiscarded. A crash between a
//! segment's freeing and its discard costs nothing: every open queues every
//! free segment that was ever written (`SegmentTable::track_discards`).
//!
//! Dead segments only become free when two checkpoints have passed them, and
//! a checkpoint comes every gigabyte of log: after a volume is deleted on a
//! quiet store that could be never. So while discards are on and the store
//! is idle, a checkpoint is taken when the dead space waiting for one is at
//! least as large as the checkpoint itself (`IDLE_CHECKPOINT_INTERVALS_MIN`
//! apart at least): freed space reaches the device seconds after a delete.
//! Not while the background re-sequencing has work: its moves leave dead
//! segments, and space freed for it would let it go on moving what the
//! cleaner moves in turn; it stops when space runs short, and the idle
//! checkpoint then frees what it left.

use super::{token, Store};
use crate::error::IoFault;
use crate::geometry::Geometry;
use crate::io::{BlockIo, IoOp, IoRequest};

/// Consecutive segments in one discard request, at most.
pub(super) const DISCARD_RUN_SEGMENTS_MAX: u32 = 8;
/// Intervals between checkpoints taken to free dead space on an idle store.
const IDLE_CHECKPOINT_INTERVALS_MIN: u64 = 10;
/// Logged failures: the first, then one in this many.
const FAILURE_LOG_EVERY: u64 = 100;

/// Discard bookkeeping of one store.
#[derive(Debug, Default)]
pub(super) struct Discards {
    /// Discards are being sent (config on, device has not refused).
    pub(super) enabled: bool,
    /// The run in flight: (first segment, count).
    pub(super) in_flight: Option<(u32, u32)>,
    /// Bytes that may still be started in this interval.
    budget_bytes: u64,
    /// Intervals since the store's last completed checkpoint was seen.
    intervals_since_checkpoint: u64,
    checkpoints_seen: u64,
    requests: u64,
}

impl Store {
    /// Starts discards after open when the config asks for them.
    pub(super) fn start_discards(&mut self) {
        if self.config.discard_bytes_per_interval == 0 {
            return;
        }
        self.discards.enabled = true;
        self.discards.budget_bytes = self.config.discard_bytes_per_interval;
        self.segments.track_discards();
    }

    /// True while discards are sent (on in the config, not refused by the device).
    #[must_use]
    pub fn discards_enabled(&self) -> bool {
        self.discards.enabled
    }

    /// True while a discard is on its way to the device.
    #[must_use]
    pub fn discard_in_flight(&self) -> bool {
        self.discards.in_flight.is_some()
    }

    /// Free segments that wait for their discard (for tests and status).
    #[must_use]
    pub fn discards_waiting(&self) -> usize {
        self.segments.undiscarded_count() + self.discards.in_flight.map_or(0, |(_, count)| count as usize)
    }

    /// Per interval: refills the budget, asks for a checkpoint that would
    /// free dead space when the store is idle, sends a discard.
    pub(super) fn discard_on_interval(&mut self, io: &mut impl BlockIo) {
        if !self.discards.enabled || self.failed.is_some() {
            return;
        }
        self.discards.budget_bytes = self.config.discard_bytes_per_interval;
        if self.stats.checkpoints == self.discards.checkpoints_seen {
            self.discards.intervals_since_checkpoint += 1;
        } else {
            self.discards.checkpoints_seen = self.stats.checkpoints;
            self.discards.intervals_since_checkpoint = 0;
        }
        if self.background.idle
            && !self.background_work_pending()
            && self.checkpoint.is_idle()
            && self.discards.intervals_since_checkpoint >= IDLE_CHECKPOINT_INTERVALS_MIN
        {
            let waiting_bytes = self.segments.dead_behind_checkpoint_count() as u64 * self.geometry.segment_size_bytes;
            // Sizing a checkpoint walks the index: only when something waits.
            let worth = waiting_bytes > 0
                && waiting_bytes
                    >= crate::checkpoint::PayloadPlan::new(&self.index, self.geometry.segment_count).bytes() as u64;
            if worth {
                self.checkpoint.requested = true;
                self.discards.intervals_since_checkpoint = 0;
                self.maybe_checkpoint(io);
            }
        }
        self.send_discard(io);
    }

    /// Sends the next run of freed segments when nothing is in flight and
    /// the interval's budget allows.
    fn send_discard(&mut self, io: &mut impl BlockIo) {
        if !self.discards.enabled || self.discards.in_flight.is_some() || self.failed.is_some() {
            return;
        }
        let segment_bytes = self.geometry.segment_size_bytes;
        let by_budget = u32::try_from(self.discards.budget_bytes / segment_bytes).unwrap_or(u32::MAX);
        let max_segments = DISCARD_RUN_SEGMENTS_MAX.min(by_budget);
        if max_segments == 0 {
            return;
        }
        let keep_free = self.clean_watermark() + 1;
        let Some((first, count)) = self.segments.take_discard_run(max_segments, keep_free) else {
            return;
        };
        let len_bytes = u64::from(count) * segment_bytes;
        self.discards.budget_bytes -= len_bytes;
        self.discards.in_flight = Some((first, count));
        self.discards.requests += 1;
        io.submit(IoRequest {
            token: token(super::KIND_DISCARD, self.discards.requests),
            op: IoOp::Discard {
                offset_bytes: Geometry::address_bytes(self.geometry.block_address(first, 0)),
                len_bytes,
            },
        });
    }

    pub(super) fn on_discard_done(&mut self, io: &mut impl BlockIo, result: Result<(), IoFault>) {
        let (first, count) = self
            .discards
            .in_flight
            .take()
            .expect("discard completion without a discard");
        let len_bytes = u64::from(count) * self.geometry.segment_size_bytes;
        self.segments.finish_discard(first, count);
        match result {
            Ok(()) => self.stats.discarded_bytes += len_bytes,
            Err(IoFault::Errno { errno }) if matches!(errno, 95 | 22 | 25) => {
                // EOPNOTSUPP, EINVAL, ENOTTY: the device or kernel has no discard.
                self.stats.discard_failures += 1;
                self.discards.enabled = false;
                self.segments.stop_discards();
                tracing::warn!(
                    disk = %self.config.disk_name,
                    errno,
                    "the device refused a discard (it has no discard support); discards are off for this disk \
                     until it is opened again"
                );
            }
            Err(fault) => {
                self.stats.discard_failures += 1;
                if self.stats.discard_failures % FAILURE_LOG_EVERY == 1 {
                    tracing::warn!(
                        disk = %self.config.disk_name,
                        offset_bytes = Geometry::address_bytes(self.geometry.block_address(first, 0)),
                        len_bytes,
                        %fault,
                        failures = self.stats.discard_failures,
                        "a discard failed; its segments are reused undiscarded"
                    );
                }
            }
        }
        self.send_discard(io);
    }
}
