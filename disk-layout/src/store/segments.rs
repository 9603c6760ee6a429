//! Segment states and space accounting.
//!
//! ```text
//! Free -> Reserved -> Open -> Used -> DeadPending -> Free
//!                       \________________^  (nothing live when switched away)
//! Free -> Discarding -> Free  (the device is told the segment is unused)
//! ```
//! A segment is `Reserved` as the successor of the open one before the open
//! one's first batch is written, so every batch header can name where the
//! log continues. A segment whose data is all dead becomes reusable only
//! once both checkpoint slots start replay after its last batch (the reuse
//! floor): until then a crash could need to replay through it.
//!
//! With discards on, a segment that becomes free joins `undiscarded` too;
//! `take_discard_run` takes a run of them out of the free list while their
//! discard is in flight (nothing may write them until it completes: a
//! discard is unordered against writes), `finish_discard` puts them back.
//! A free segment reserved before its discard went out is simply not
//! discarded: it is about to be overwritten anyway.

use std::collections::BTreeSet;

/// Exponent of age in the victim score. 1.0 is LFS cost-benefit (good for
/// hot/cold skew); 0.0 is greedy (best for uniform random overwrites).
pub const AGE_WEIGHT: f64 = 0.0;

/// Lifecycle state of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentState {
    Free,
    Reserved,
    Open,
    Used,
    DeadPending,
    /// The cleaner could not account for all its live blocks (corrupt headers).
    Stuck,
    /// Free, out of the free list while a discard of it is in flight.
    Discarding,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    state: SegmentState,
    live_blocks: u32,
    last_sequence: u64,
    /// Sequence of the batch whose record made the segment dead.
    died_at_sequence: u64,
}

/// Per-segment state, live counts and the free list of one disk.
pub struct SegmentTable {
    segments: Vec<Segment>,
    free: Vec<u32>,
    dead_pending: Vec<u32>,
    live_blocks_total: u64,
    reuse_floor_sequence: u64,
    /// Free segments written since their last discard (discards on only).
    undiscarded: BTreeSet<u32>,
    /// Segments in state `Discarding`.
    discarding: usize,
    track_discards: bool,
}

impl SegmentTable {
    /// Builds the table after replay. `live` holds each segment's live blocks.
    pub fn new(last_sequence: Vec<u64>, live: Vec<u32>, open: u32, reserved: u32, reuse_floor_sequence: u64) -> Self {
        assert_eq!(last_sequence.len(), live.len());
        assert_ne!(open, reserved);
        let mut table = Self {
            segments: Vec::with_capacity(live.len()),
            free: Vec::new(),
            dead_pending: Vec::new(),
            live_blocks_total: live.iter().map(|&l| u64::from(l)).sum(),
            reuse_floor_sequence,
            undiscarded: BTreeSet::new(),
            discarding: 0,
            track_discards: false,
        };
        for (index, (&last_sequence, &live_blocks)) in last_sequence.iter().zip(&live).enumerate() {
            let number = u32::try_from(index).expect("segment count is u32");
            let state = if number == open {
                SegmentState::Open
            } else if number == reserved {
                SegmentState::Reserved
            } else if live_blocks > 0 {
                SegmentState::Used
            } else if last_sequence == 0 || last_sequence < reuse_floor_sequence {
                SegmentState::Free
            } else {
                SegmentState::DeadPending
            };
            match state {
                SegmentState::Free => table.free.push(number),
                SegmentState::DeadPending => table.dead_pending.push(number),
                _ => {}
            }
            table.segments.push(Segment {
                state,
                live_blocks,
                last_sequence,
                died_at_sequence: 0,
            });
        }
        // Hand out low-numbered segments first (pop takes from the end).
        table.free.reverse();
        table
    }

    /// Turns discard tracking on: from now on every segment that becomes
    /// free is to be discarded, and so is every free segment that was ever
    /// written (its discard may have been lost to a crash, or never sent).
    pub fn track_discards(&mut self) {
        self.track_discards = true;
        for &segment in &self.free {
            if self.segments[segment as usize].last_sequence > 0 {
                self.undiscarded.insert(segment);
            }
        }
    }

    /// Turns discards off (the device refused one): nothing is queued any more.
    pub fn stop_discards(&mut self) {
        self.track_discards = false;
        self.undiscarded.clear();
    }

    /// Free segments waiting for a discard.
    #[must_use]
    pub fn undiscarded_count(&self) -> usize {
        self.undiscarded.len()
    }

    /// Takes the lowest run of consecutive segments waiting for a discard,
    /// at most `max_segments` long, leaving at least `keep_free` segments in
    /// the free list: they become `Discarding` until `finish_discard`.
    /// Returns (first segment, count).
    pub fn take_discard_run(&mut self, max_segments: u32, keep_free: usize) -> Option<(u32, u32)> {
        let spare = u32::try_from(self.free.len().saturating_sub(keep_free)).unwrap_or(u32::MAX);
        let limit = max_segments.min(spare);
        let &first = self.undiscarded.first()?;
        if limit == 0 {
            return None;
        }
        let mut count = 1;
        while count < limit && self.undiscarded.contains(&(first + count)) {
            count += 1;
        }
        let run = first..first + count;
        for segment in run.clone() {
            self.undiscarded.remove(&segment);
            let entry = &mut self.segments[segment as usize];
            debug_assert_eq!(entry.state, SegmentState::Free);
            entry.state = SegmentState::Discarding;
        }
        self.free.retain(|segment| !run.contains(segment));
        self.discarding += count as usize;
        Some((first, count))
    }

    /// The discard of a run taken by `take_discard_run` completed (done or
    /// failed): its segments are free again.
    pub fn finish_discard(&mut self, first: u32, count: u32) {
        for segment in first..first + count {
            let entry = &mut self.segments[segment as usize];
            assert_eq!(entry.state, SegmentState::Discarding);
            entry.state = SegmentState::Free;
            self.free.push(segment);
        }
        self.discarding -= count as usize;
    }

    /// Free segments including those whose discard is in flight.
    #[must_use]
    pub fn free_or_discarding_count(&self) -> usize {
        self.free.len() + self.discarding
    }

    #[must_use]
    pub fn state(&self, segment: u32) -> SegmentState {
        self.segments[segment as usize].state
    }

    #[must_use]
    pub fn live_blocks(&self, segment: u32) -> u32 {
        self.segments[segment as usize].live_blocks
    }

    #[must_use]
    pub fn last_sequence(&self, segment: u32) -> u64 {
        self.segments[segment as usize].last_sequence
    }

    /// Every segment's last written batch sequence (for checkpoints).
    #[must_use]
    pub fn last_sequences(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.last_sequence).collect()
    }

    #[must_use]
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    #[must_use]
    pub fn dead_pending_count(&self) -> usize {
        self.dead_pending.len()
    }

    /// Dead segments that only a checkpoint (moving the floor) can free.
    #[must_use]
    pub fn dead_behind_checkpoint_count(&self) -> usize {
        let floor = self.reuse_floor_sequence;
        self.dead_pending
            .iter()
            .filter(|&&segment| self.segments[segment as usize].last_sequence >= floor)
            .count()
    }

    #[must_use]
    pub fn live_blocks_total(&self) -> u64 {
        self.live_blocks_total
    }

    #[must_use]
    pub fn reuse_floor_sequence(&self) -> u64 {
        self.reuse_floor_sequence
    }

    /// Records that a batch with `sequence` was placed in `segment`.
    pub fn note_batch(&mut self, segment: u32, sequence: u64) {
        let entry = &mut self.segments[segment as usize];
        assert_eq!(
            entry.state,
            SegmentState::Open,
            "batch placed in segment {segment} that is not open"
        );
        assert!(sequence > entry.last_sequence);
        entry.last_sequence = sequence;
    }

    /// One more live block in `segment`.
    pub fn add_live(&mut self, segment: u32) {
        let entry = &mut self.segments[segment as usize];
        assert_eq!(
            entry.state,
            SegmentState::Open,
            "new data in segment {segment} that is not open"
        );
        entry.live_blocks += 1;
        self.live_blocks_total += 1;
    }

    /// One live block of `segment` died (overwritten, zeroed, deleted,
    /// moved) by a record of the batch with `sequence`.
    pub fn remove_live(&mut self, segment: u32, sequence: u64) {
        let entry = &mut self.segments[segment as usize];
        assert!(entry.live_blocks > 0, "segment {segment} live count underflow");
        entry.live_blocks -= 1;
        self.live_blocks_total -= 1;
        if entry.live_blocks == 0 && matches!(entry.state, SegmentState::Used | SegmentState::Stuck) {
            entry.state = SegmentState::DeadPending;
            entry.died_at_sequence = sequence;
            self.dead_pending.push(segment);
        }
    }

    /// Takes a free segment and marks it reserved.
    pub fn reserve(&mut self) -> Option<u32> {
        let segment = self.free.pop()?;
        self.undiscarded.remove(&segment);
        let entry = &mut self.segments[segment as usize];
        assert_eq!(entry.state, SegmentState::Free);
        assert_eq!(entry.live_blocks, 0);
        entry.state = SegmentState::Reserved;
        Some(segment)
    }

    /// The open segment is full: `reserved` becomes open, `old` is closed.
    /// `sequence` is the next batch's (if `old` is already dead, what killed
    /// it is in batches before that).
    pub fn switch(&mut self, old: u32, reserved: u32, sequence: u64) {
        assert_eq!(self.segments[reserved as usize].state, SegmentState::Reserved);
        assert_eq!(self.segments[old as usize].state, SegmentState::Open);
        self.segments[reserved as usize].state = SegmentState::Open;
        let old_entry = &mut self.segments[old as usize];
        if old_entry.live_blocks == 0 {
            old_entry.state = SegmentState::DeadPending;
            old_entry.died_at_sequence = sequence;
            self.dead_pending.push(old);
        } else {
            old_entry.state = SegmentState::Used;
        }
    }

    /// A checkpoint moved the reuse floor.
    pub fn advance_floor(&mut self, reuse_floor_sequence: u64, durable_sequence: u64) {
        assert!(reuse_floor_sequence >= self.reuse_floor_sequence);
        self.reuse_floor_sequence = reuse_floor_sequence;
        self.release(durable_sequence);
    }

    /// Frees dead segments behind the floor whose killing batch is durable.
    pub fn release(&mut self, durable_sequence: u64) {
        let floor = self.reuse_floor_sequence;
        let segments = &mut self.segments;
        let free = &mut self.free;
        let mut undiscarded = self.track_discards.then_some(&mut self.undiscarded);
        self.dead_pending.retain(|&segment| {
            let entry = &mut segments[segment as usize];
            debug_assert_eq!(entry.state, SegmentState::DeadPending);
            if entry.last_sequence < floor && entry.died_at_sequence <= durable_sequence {
                entry.state = SegmentState::Free;
                free.push(segment);
                if let Some(undiscarded) = undiscarded.as_mut() {
                    undiscarded.insert(segment);
                }
                false
            } else {
                true
            }
        });
    }

    /// Marks a segment the cleaner could not empty.
    pub fn mark_stuck(&mut self, segment: u32) {
        let entry = &mut self.segments[segment as usize];
        if entry.state == SegmentState::Used {
            entry.state = SegmentState::Stuck;
        }
    }

    /// The best segment to clean by cost-benefit, `(1-u) * age / (1+u)`:
    /// empty-ish and old segments first. Only segments whose batches are all
    /// durable (`last_sequence <= durable_sequence`) qualify.
    #[must_use]
    /// Segments with more than `live_blocks_max` live blocks are not worth it.
    pub fn pick_victim(
        &self,
        segment_blocks: u32,
        live_blocks_max: u32,
        now_sequence: u64,
        durable_sequence: u64,
    ) -> Option<u32> {
        let mut best: Option<(f64, u32)> = None;
        for (index, segment) in self.segments.iter().enumerate() {
            if segment.state != SegmentState::Used
                || segment.live_blocks >= segment_blocks
                || segment.live_blocks > live_blocks_max
                || segment.last_sequence > durable_sequence
            {
                continue;
            }
            let utilization = f64::from(segment.live_blocks) / f64::from(segment_blocks);
            let age = (now_sequence.saturating_sub(segment.last_sequence) + 1) as f64;
            let score = (1.0 - utilization) * age.powf(AGE_WEIGHT) / (1.0 + utilization);
            if best.is_none_or(|(best_score, _)| score > best_score) {
                best = Some((score, u32::try_from(index).expect("u32")));
            }
        }
        best.map(|(_, segment)| segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_derived_from_live_counts_and_the_floor() {
        let table = SegmentTable::new(vec![0, 5, 9, 3, 12], vec![0, 0, 0, 4, 0], 4, 0, 8);
        assert_eq!(table.state(0), SegmentState::Reserved);
        assert_eq!(table.state(1), SegmentState::Free, "dead and behind the floor");
        assert_eq!(table.state(2), SegmentState::DeadPending, "dead but replay may need it");
        assert_eq!(table.state(3), SegmentState::Used);
        assert_eq!(table.state(4), SegmentState::Open);
        assert_eq!(table.live_blocks_total(), 4);
    }

    #[test]
    fn a_dead_segment_is_reused_only_behind_the_floor_and_once_its_killer_is_durable() {
        let mut table = SegmentTable::new(vec![0, 0, 0, 0], vec![0, 0, 0, 0], 0, 1, 1);
        table.note_batch(0, 1);
        table.add_live(0);
        let next = table.reserve().unwrap();
        table.switch(0, 1, 2);
        assert_eq!(table.state(0), SegmentState::Used);
        table.remove_live(0, 5);
        assert_eq!(table.state(0), SegmentState::DeadPending);
        table.advance_floor(1, 10);
        assert_eq!(
            table.state(0),
            SegmentState::DeadPending,
            "floor 1 does not pass sequence 1"
        );
        table.advance_floor(2, 4);
        assert_eq!(
            table.state(0),
            SegmentState::DeadPending,
            "the killing batch 5 is not durable"
        );
        table.release(5);
        assert_eq!(table.state(0), SegmentState::Free);
        assert_ne!(next, 0);
    }

    #[test]
    fn a_discard_takes_runs_of_freed_segments_out_of_the_free_list_until_it_completes() {
        // Segments 0..6 were all written once and are free; 6 is open, 7 reserved.
        let mut table = SegmentTable::new(vec![1, 2, 3, 0, 5, 6, 7, 0], vec![0; 8], 6, 7, 10);
        table.track_discards();
        assert_eq!(table.undiscarded_count(), 5, "never-written segment 3 needs no discard");
        assert_eq!(table.take_discard_run(8, 1), Some((0, 3)), "0, 1, 2 are one run");
        for segment in 0..3 {
            assert_eq!(table.state(segment), SegmentState::Discarding);
        }
        assert_eq!(table.free_count(), 3);
        assert_eq!(table.free_or_discarding_count(), 6);
        // Nothing in flight can be reserved.
        let mut reserved = Vec::new();
        while table.free_count() > 0 {
            reserved.push(table.reserve().unwrap());
        }
        assert!(reserved.iter().all(|&segment| segment >= 3), "{reserved:?}");
        assert_eq!(
            table.undiscarded_count(),
            0,
            "reserved segments are overwritten, not discarded"
        );
        table.finish_discard(0, 3);
        assert_eq!(table.free_count(), 3);
        assert_eq!(table.state(1), SegmentState::Free);
    }

    #[test]
    fn a_discard_run_leaves_the_free_segments_writes_need() {
        let mut table = SegmentTable::new(vec![1, 2, 3, 4, 5, 0], vec![0; 6], 4, 5, 10);
        table.track_discards();
        assert_eq!(table.free_count(), 4);
        assert_eq!(table.take_discard_run(8, 3), Some((0, 1)));
        assert_eq!(table.take_discard_run(8, 3), None, "three must stay free");
        table.stop_discards();
        table.finish_discard(0, 1);
        assert_eq!(table.undiscarded_count(), 0);
    }

    #[test]
    fn a_segment_freed_by_a_checkpoint_waits_for_a_discard() {
        let mut table = SegmentTable::new(vec![0, 0, 0, 0], vec![0, 0, 0, 0], 0, 1, 1);
        table.track_discards();
        table.note_batch(0, 1);
        table.add_live(0);
        let _ = table.reserve().unwrap();
        table.switch(0, 1, 2);
        table.remove_live(0, 2);
        assert_eq!(table.undiscarded_count(), 0, "dead, not free yet");
        table.advance_floor(3, 3);
        assert_eq!(table.state(0), SegmentState::Free);
        assert_eq!(table.undiscarded_count(), 1);
        assert_eq!(table.take_discard_run(8, 0), Some((0, 1)));
    }

    #[test]
    fn the_victim_is_the_emptiest_old_segment() {
        let table = SegmentTable::new(vec![1, 2, 3, 4, 5], vec![100, 10, 200, 0, 0], 4, 3, 0);
        assert_eq!(table.pick_victim(256, 255, 10, 10), Some(1));
        assert_eq!(
            table.pick_victim(256, 255, 10, 1),
            Some(0),
            "segments with undurable batches are skipped"
        );
    }
}
