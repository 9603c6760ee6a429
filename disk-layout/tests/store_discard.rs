//! Discards of freed segments (`store::discard`) on the simulated disk:
//! segments freed by deletes and cleaning reach the device as discards
//! within a bounded number of intervals, a crash before or during a discard
//! loses nothing and the discard is sent after reopening, and a device that
//! refuses or fails discards costs nothing but the discards. Loops are
//! bounded by counts.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{test_config, Harness};
use disk_layout::geometry::Geometry;
use disk_layout::{Store, StoreConfig};

const DISK_BYTES: usize = 64 << 20;
const SEGMENT_BYTES: u64 = 1 << 20;
/// 24 MiB per volume: volume 1 fills 24 segments.
const LBA_RANGE: u64 = 6144;
/// Intervals (100 ms each on the node) a freed segment may wait for its discard.
const INTERVALS_MAX: u32 = 400;

fn discards_off(config: &mut StoreConfig) {
    config.discard_bytes_per_interval = 0;
}

/// Writes all of volume 1 and a quarter of volume 2, then deletes volume 1
/// and waits for the delete's acknowledgement (not for the discards: an
/// idle store starts them within a few intervals). Returns the segments
/// that read as zeroes before the delete.
fn fill_then_delete(h: &mut Harness) -> usize {
    for lba in (0..LBA_RANGE).step_by(256) {
        h.write(1, lba, 256);
        h.step();
    }
    for lba in (0..LBA_RANGE / 4).step_by(64) {
        h.write(2, lba, 64);
        h.step();
    }
    h.settle();
    let zeroed = zeroed_segments(h);
    h.delete(1);
    for _ in 0..INTERVALS_MAX {
        if h.pending_count() == 0 {
            return zeroed;
        }
        h.step();
    }
    panic!("seed={}: the delete was not acknowledged", h.seed);
}

/// Writes all of volume 1 (again), then checks every block of every volume.
fn rewrite_and_verify(h: &mut Harness) {
    for lba in (0..LBA_RANGE).step_by(256) {
        h.write(1, lba, 256);
        h.step();
    }
    h.settle();
    h.verify_all_blocks();
    assert!(h.errors.is_empty(), "{:?}", h.errors);
}

/// Segments of the disk whose every byte reads as zero.
fn zeroed_segments(h: &Harness) -> usize {
    let geometry = h.store.superblock().geometry;
    (0..geometry.segment_count)
        .filter(|&segment| {
            let offset = Geometry::address_bytes(geometry.block_address(segment, 0));
            h.disk.is_zero(offset as usize, geometry.segment_size_bytes as usize)
        })
        .count()
}

/// Steps intervals until this open of the store discarded `bytes` and no
/// freed segment waits for a discard.
fn run_until_discarded(h: &mut Harness, bytes: u64) {
    for _ in 0..INTERVALS_MAX {
        h.step();
        if h.store.discards_waiting() == 0 && h.store.stats().discarded_bytes >= bytes {
            h.settle();
            return;
        }
    }
    panic!(
        "seed={}: {} freed segments still wait for a discard after {INTERVALS_MAX} intervals ({:?})",
        h.seed,
        h.store.discards_waiting(),
        h.store.stats()
    );
}

#[test]
fn segments_freed_by_a_delete_are_discarded_on_an_idle_store() {
    let mut h = Harness::new(11, DISK_BYTES, SEGMENT_BYTES, LBA_RANGE, vec![1, 2]);
    let zeroed_before = fill_then_delete(&mut h);
    run_until_discarded(&mut h, 20 * SEGMENT_BYTES);
    assert_eq!(h.disk.stats.discard_bytes, h.store.stats().discarded_bytes);
    assert_eq!(h.store.stats().discard_failures, 0);
    assert!(
        zeroed_segments(&h) >= zeroed_before + 20,
        "the deleted data's segments must read as zeroes on this disk ({zeroed_before} before)"
    );
    // What was not deleted is intact.
    h.verify_all_blocks();
    // And the discarded segments take new data.
    rewrite_and_verify(&mut h);
}

#[test]
fn segments_freed_before_a_crash_are_discarded_after_reopening() {
    let mut h = Harness::with_config(12, DISK_BYTES, SEGMENT_BYTES, LBA_RANGE, vec![1, 2], discards_off);
    let _ = fill_then_delete(&mut h);
    // Two checkpoints pass the deleted data: its segments are free, never discarded.
    for _ in 0..2 {
        h.store.request_checkpoint();
        h.settle();
    }
    assert!(h.store.space().free_segments >= 20);
    assert_eq!(h.disk.stats.discards, 0, "discards are off");
    let zeroed_before = zeroed_segments(&h);
    // Power cut, then an open with discards on.
    let mut disk = h.disk.crash(99);
    let store = Store::open(&mut disk, test_config("sim", 12)).expect("reopen");
    assert!(
        store.discards_waiting() >= 20,
        "every free segment ever written is queued"
    );
    h.disk = disk;
    h.store = store;
    h.verify_all_blocks();
    run_until_discarded(&mut h, 20 * SEGMENT_BYTES);
    assert!(zeroed_segments(&h) >= zeroed_before + 20);
    h.verify_all_blocks();
}

#[test]
fn a_crash_with_a_discard_in_flight_loses_nothing_and_the_discard_is_sent_again() {
    for seed in 20..26 {
        let mut h = Harness::new(seed, DISK_BYTES, SEGMENT_BYTES, LBA_RANGE, vec![1, 2]);
        let _ = fill_then_delete(&mut h);
        // Step until a discard is in flight, then cut the power.
        let mut in_flight = false;
        for _ in 0..INTERVALS_MAX {
            h.step();
            if h.store.discard_in_flight() {
                in_flight = true;
                break;
            }
        }
        assert!(in_flight, "seed={seed}: no discard was sent");
        h.crash_and_verify();
        // The segments are discarded again in this open (whether the cut
        // kept the discard or not); if the cut tore a checkpoint slot, after
        // the two checkpoints that free them again.
        run_until_discarded(&mut h, 20 * SEGMENT_BYTES);
        h.verify_all_blocks();
    }
}

#[test]
fn a_device_without_discard_turns_discards_off_and_keeps_serving() {
    let mut h = Harness::new(13, DISK_BYTES, SEGMENT_BYTES, LBA_RANGE, vec![1, 2]);
    h.disk.faults.discard_unsupported = true;
    let _ = fill_then_delete(&mut h);
    for _ in 0..INTERVALS_MAX {
        h.step();
        if !h.store.discards_enabled() {
            break;
        }
    }
    assert!(!h.store.discards_enabled(), "a refused discard turns discards off");
    assert_eq!(
        h.store.stats().discard_failures,
        1,
        "refused once, then never sent again"
    );
    assert_eq!(h.store.discards_waiting(), 0);
    h.settle();
    rewrite_and_verify(&mut h);
}

#[test]
fn failed_discards_are_counted_and_their_segments_are_reused() {
    let mut h = Harness::new(14, DISK_BYTES, SEGMENT_BYTES, LBA_RANGE, vec![1, 2]);
    h.disk.faults.fail_discards = true;
    let _ = fill_then_delete(&mut h);
    for _ in 0..INTERVALS_MAX {
        h.step();
        if h.store.discards_waiting() == 0 && h.store.stats().discard_failures > 0 {
            break;
        }
    }
    let stats = h.store.stats();
    assert!(stats.discard_failures > 0);
    assert_eq!(stats.discarded_bytes, 0);
    assert!(h.store.discards_enabled(), "an I/O error is not a refusal");
    assert_eq!(h.store.discards_waiting(), 0, "failed runs are not retried");
    h.disk.faults.fail_discards = false;
    rewrite_and_verify(&mut h);
}
