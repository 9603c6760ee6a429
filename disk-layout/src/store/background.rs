//! Re-sequencing in the background: the ranges clients read in large
//! pieces (a table scan, a backup, a database's sequential pages) are
//! remembered, and while the store is idle they are walked and each one that
//! random writes left scattered is read once and written back in logical
//! order (`Store::resequence`, the same moves a client's large read makes).
//! So the next scan after a day of random writes reads at the disk's
//! sequential speed without having paid the scattered reads and the moves
//! itself.
//!
//! Bounded: only ranges a large client read touched, only once a whole
//! interval (`Store::interval`, 100 ms on the node) passed without a request
//! and until one arrives (it pauses the pass at once), under the same space limits as
//! a client read's re-sequencing (at most 70 % full, free segments to spare,
//! no user write waiting), at most `READS_IN_FLIGHT_MAX` reads of one range
//! at a time and none while earlier moves wait for a batch. A walk over the
//! remembered ranges that finds nothing scattered stops until the next
//! write; so does a walk after `WALK_REPEATS_MAX` repeats without a write
//! between. Remembered in memory only: a restart forgets them (a client's
//! large read re-sequences and remembers again).

use std::collections::BTreeMap;

use super::Store;

/// Volume blocks per remembered range (1 MiB, one read).
pub(super) const RANGE_BLOCKS: u64 = 256;
const _: () = assert!(RANGE_BLOCKS <= super::REQUEST_BLOCKS_MAX as u64);
/// Background reads in flight at most.
const READS_IN_FLIGHT_MAX: usize = 2;
/// Ranges looked at per call (their index entries only): bounds the CPU an
/// idle store spends walking many ranges that are in order.
const RANGES_LOOKED_AT_MAX: usize = 1024;
/// Walks repeated without a write between them, at most.
const WALK_REPEATS_MAX: u32 = 3;

/// What the background pass knows.
#[derive(Default)]
pub(super) struct Background {
    /// Ranges a large client read touched: bit `r % 64` of `(volume, r / 64)`
    /// for range `r` (volume blocks `r * RANGE_BLOCKS..`).
    read_in_order: BTreeMap<(u64, u64), u64>,
    /// Requests of any kind accepted (reads, scans, writes, zeroes...).
    requests: u64,
    /// `requests` at the previous interval: idle when unchanged.
    requests_at_interval: u64,
    pub(super) idle: bool,
    /// Writes accepted: ranges in order may be scattered after one.
    writes: u64,
    /// `writes` when the last walk that found the ranges in order began.
    in_order_at_writes: u64,
    /// `writes` when the current walk began (None: no walk under way).
    walk_from_writes: Option<u64>,
    /// Next range the walk looks at: (volume, range).
    cursor: (u64, u64),
    /// A range the walk read could not be moved then (space, a full
    /// backlog): walk again if the walk moved anything at all.
    pub(super) walk_again: bool,
    /// The store's re-sequenced blocks when the walk began.
    walk_moved_from: u64,
    /// Walks repeated since the last write (`walk_again`), at most
    /// `WALK_REPEATS_MAX`: on a nearly full disk the cleaner's moves
    /// scatter what the walk put in order, and each walk leaves some range
    /// for lack of space, so "walk again while it makes progress" alone
    /// could go on for ever on an idle store.
    walk_repeats: u32,
    pub(super) reads_in_flight: usize,
    /// Background reads started (for tests and stats).
    pub(super) reads_started: u64,
}

impl Background {
    /// A request arrived: the background pass stands back until the store
    /// has been idle for a whole interval again.
    pub(super) fn note_request(&mut self) {
        self.requests += 1;
        self.idle = false;
    }

    pub(super) fn note_write(&mut self) {
        self.note_request();
        self.writes += 1;
    }

    /// A client read of `block_count` blocks from `lba` of `volume_id`
    /// (already known to be large enough).
    pub(super) fn note_large_read(&mut self, volume_id: u64, lba: u64, block_count: u64) {
        let first = lba / RANGE_BLOCKS;
        let last = (lba + block_count - 1) / RANGE_BLOCKS;
        let mut added = false;
        for range in first..=last {
            let word = self.read_in_order.entry((volume_id, range / 64)).or_insert(0);
            let bit = 1u64 << (range % 64);
            added |= *word & bit == 0;
            *word |= bit;
        }
        if added {
            // A range remembered while its re-sequencing was skipped (space,
            // a full backlog) is looked at by the next walk.
            self.writes += 1;
        }
    }

    pub(super) fn forget_volume(&mut self, volume_id: u64) {
        let words: Vec<(u64, u64)> = self
            .read_in_order
            .range((volume_id, 0)..=(volume_id, u64::MAX))
            .map(|(key, _)| *key)
            .collect();
        for key in words {
            self.read_in_order.remove(&key);
        }
    }

    /// Called at each interval: idle when no request arrived since the last one.
    pub(super) fn on_interval(&mut self) {
        self.idle = self.requests == self.requests_at_interval;
        self.requests_at_interval = self.requests;
    }

    fn start_walk(&mut self, moved: u64) {
        self.walk_from_writes = Some(self.writes);
        self.walk_moved_from = moved;
        self.walk_again = false;
        self.cursor = (0, 0);
    }

    /// True while the pass has work it has not finished: a walk under
    /// way, writes since the last walk, reads in flight.
    pub(super) fn has_work(&self) -> bool {
        self.walk_from_writes.is_some() || self.writes != self.in_order_at_writes || self.reads_in_flight > 0
    }

    /// The next remembered range at or after the cursor, advancing it.
    fn next_range(&mut self) -> Option<(u64, u64)> {
        let (volume, range) = self.cursor;
        let found = self
            .read_in_order
            .range((volume, range / 64)..)
            .find_map(|(&(v, word), &bits)| {
                let from = if (v, word) == (volume, range / 64) {
                    range % 64
                } else {
                    0
                };
                let bits = bits & (u64::MAX << from);
                (bits != 0).then(|| (v, word * 64 + u64::from(bits.trailing_zeros())))
            })?;
        self.cursor = (found.0, found.1 + 1);
        Some(found)
    }
}

impl Store {
    /// Starts background reads of scattered remembered ranges while the
    /// store is idle (see the module's comment).
    pub(super) fn resequence_in_background(&mut self, io: &mut impl super::BlockIo) {
        if !self.background.idle || !self.resequencing_allowed() || !self.resequence_backlog.is_empty() {
            return;
        }
        let moved = self.stats.resequenced_blocks_written;
        let background = &mut self.background;
        if background.walk_from_writes.is_none() {
            if background.writes == background.in_order_at_writes {
                return;
            }
            background.start_walk(moved);
        }
        let mut looked_at = 0;
        while self.background.reads_in_flight < READS_IN_FLIGHT_MAX && looked_at < RANGES_LOOKED_AT_MAX {
            looked_at += 1;
            let Some((volume_id, range)) = self.background.next_range() else {
                if self.background.reads_in_flight > 0 {
                    // Its last reads may yet find a range they cannot move.
                    return;
                }
                let background = &mut self.background;
                let from = background.walk_from_writes.take().expect("a walk is under way");
                let progress = moved > background.walk_moved_from;
                let repeat = from == background.writes;
                if repeat && !(background.walk_again && progress && background.walk_repeats < WALK_REPEATS_MAX) {
                    background.in_order_at_writes = from;
                    background.walk_again = false;
                    background.walk_repeats = 0;
                    return;
                }
                background.walk_repeats = if repeat { background.walk_repeats + 1 } else { 0 };
                // Written to during the walk, or a range was left scattered
                // while others moved: walk again from the start.
                background.start_walk(moved);
                continue;
            };
            let lba = range * RANGE_BLOCKS;
            if self.is_scattered(volume_id, lba, RANGE_BLOCKS) {
                self.background.reads_in_flight += 1;
                self.background.reads_started += 1;
                self.start_background_read(io, volume_id, lba, RANGE_BLOCKS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_after_a_whole_interval_without_a_request() {
        let mut background = Background::default();
        background.on_interval();
        assert!(background.idle, "nothing ever arrived");
        background.note_request();
        assert!(!background.idle, "a request pauses the pass at once");
        background.on_interval();
        assert!(!background.idle, "the request arrived during this interval");
        background.on_interval();
        assert!(background.idle);
        background.note_write();
        assert!(!background.idle);
    }

    #[test]
    fn the_walk_visits_every_remembered_range_in_order_across_words_and_volumes() {
        let mut background = Background::default();
        background.note_large_read(7, 0, 16);
        background.note_large_read(3, 63 * RANGE_BLOCKS + 10, RANGE_BLOCKS); // ranges 63 and 64
        background.note_large_read(3, 200 * RANGE_BLOCKS, 1);
        let mut seen = Vec::new();
        while let Some(range) = background.next_range() {
            seen.push(range);
        }
        assert_eq!(seen, vec![(3, 63), (3, 64), (3, 200), (7, 0)]);
        background.forget_volume(3);
        background.cursor = (0, 0);
        assert_eq!(background.next_range(), Some((7, 0)));
        assert_eq!(background.next_range(), None);
    }

    #[test]
    fn only_a_newly_remembered_range_asks_for_a_walk() {
        let mut background = Background::default();
        background.note_large_read(1, 0, 512);
        let after_first = background.writes;
        assert!(after_first > 0);
        background.note_large_read(1, 256, 256);
        assert_eq!(background.writes, after_first, "the range was remembered already");
    }
}
