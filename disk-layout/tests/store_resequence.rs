//! A range written block by block in random order lies scattered over the
//! log; the first large read of it writes it back in order (`resequence`),
//! so later reads take one I/O where they took one per block.

// Tests run on 64-bit hosts only; offsets here are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::Harness;
use disk_layout::sim_disk::SimRng;
use disk_layout::StoreConfig;

const VOLUME: u64 = 1;
const BLOCKS: u64 = 64;

fn as_the_node_runs_it(config: &mut StoreConfig) {
    config.resequence_read_blocks_min = StoreConfig::new("x", None, 0).resequence_read_blocks_min;
}

/// Writes blocks `0..blocks` one at a time in a random order, each durable
/// before the next, so no two neighbours are adjacent on the disk.
fn scattered(seed: u64) -> Harness {
    let mut h = Harness::with_config(seed, 64 << 20, 1 << 20, BLOCKS, vec![VOLUME], as_the_node_runs_it);
    write_in_random_order(&mut h, BLOCKS);
    h
}

fn write_in_random_order(h: &mut Harness, blocks: u64) {
    let seed = h.seed;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut rng = SimRng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.index(i + 1));
    }
    for lba in order {
        h.write(VOLUME, lba, 1);
        h.settle();
    }
}

/// Disk reads one read of the whole range takes (its data is checked by the harness).
fn reads_of_range(h: &mut Harness, blocks: u64) -> u64 {
    let before = h.disk.stats.reads;
    h.read(VOLUME, 0, blocks);
    h.settle();
    h.disk.stats.reads - before
}

#[test]
fn a_range_written_in_random_order_reads_in_one_io_once_it_was_read_in_order() {
    for seed in 0..4 {
        let mut h = scattered(seed);
        let first = reads_of_range(&mut h, BLOCKS);
        assert!(
            first >= BLOCKS / 2,
            "seed={seed}: the range was not scattered ({first} reads)"
        );
        assert_eq!(h.store.stats().resequenced_blocks_written, BLOCKS, "seed={seed}");
        let second = reads_of_range(&mut h, BLOCKS);
        assert_eq!(
            second, 1,
            "seed={seed}: the range is still scattered after one read in order"
        );
        // The moves are records of the log: replay puts the range where they did.
        h.crash_and_verify();
        let after_crash = reads_of_range(&mut h, BLOCKS);
        assert_eq!(after_crash, 1, "seed={seed}: replay lost the order");
        assert_eq!(
            h.store.stats().resequenced_blocks_written,
            0,
            "seed={seed}: an ordered range was moved again"
        );
        assert!(h.errors.is_empty(), "seed={seed}: {:?}", h.errors);
    }
}

#[test]
fn a_write_that_races_a_resequencing_read_keeps_its_data() {
    for seed in 0..8 {
        let mut h = scattered(seed);
        // The read is on the device when the writes land in the index: its
        // data of those blocks is stale by the time it completes.
        h.read(VOLUME, 0, BLOCKS);
        h.write(VOLUME, 7, 1);
        h.write(VOLUME, 30, 4);
        h.settle();
        assert!(
            h.store.stats().resequenced_blocks_written >= BLOCKS - 5,
            "seed={seed}: the read did not re-sequence: {:?}",
            h.store.stats()
        );
        // Each read's data is checked against the newest acknowledged write.
        h.read(VOLUME, 0, BLOCKS);
        h.settle();
        h.crash_and_verify();
        h.verify_all_blocks();
        assert!(h.errors.is_empty(), "seed={seed}: {:?}", h.errors);
    }
}

#[test]
fn a_disk_more_than_70_percent_full_is_not_given_resequencing_work() {
    // Free segments to spare, but moving blocks on a full disk makes the
    // cleaner's work (write amplification) grow fastest.
    const FILLER: u64 = 2;
    let mut h = Harness::with_config(1, 64 << 20, 1 << 20, 16384, vec![VOLUME, FILLER], as_the_node_runs_it);
    let space = h.store.space();
    let fill = space.capacity_blocks * 3 / 4;
    let mut lba = 0;
    while lba < fill {
        let count = (fill - lba).min(256);
        h.write(FILLER, lba, count);
        h.settle();
        lba += count;
    }
    assert!(h.store.space().free_segments > 8, "{:?}", h.store.space());
    write_in_random_order(&mut h, BLOCKS);
    let first = reads_of_range(&mut h, BLOCKS);
    assert!(first >= BLOCKS / 2, "the range was not scattered ({first} reads)");
    assert_eq!(h.store.stats().resequenced_blocks_written, 0);
    assert!(h.errors.is_empty(), "{:?}", h.errors);
}

#[test]
fn a_scattered_read_that_needs_more_batches_than_there_are_buffers_is_resequenced_whole() {
    // 1 MiB scattered over 256 places takes four batches (84 records
    // each); a pipeline of one leaves three batch buffers.
    fn one_batch_in_flight(config: &mut StoreConfig) {
        as_the_node_runs_it(config);
        config.pipeline_depth = 1;
    }
    const MIB: u64 = 256;
    let mut h = Harness::with_config(3, 64 << 20, 1 << 20, MIB, vec![VOLUME], one_batch_in_flight);
    write_in_random_order(&mut h, MIB);
    let first = reads_of_range(&mut h, MIB);
    assert!(first >= MIB / 2, "the range was not scattered ({first} reads)");
    assert_eq!(h.store.stats().resequenced_blocks_written, MIB, "{:?}", h.store.stats());
    let second = reads_of_range(&mut h, MIB);
    assert!(second <= 4, "{second} reads: the range is still scattered");
    h.crash_and_verify();
    assert!(h.errors.is_empty(), "{:?}", h.errors);
}

#[test]
fn a_scan_of_scattered_data_leaves_it_where_it_is() {
    // Scrub and disk drains read everything once, in order: that says
    // nothing of how clients read, and must not rewrite the volume.
    let mut h = scattered(5);
    let before = h.disk.stats.reads;
    h.scan(VOLUME, 0, BLOCKS);
    h.settle();
    assert!(h.disk.stats.reads - before >= BLOCKS / 2, "the range was not scattered");
    assert_eq!(h.store.stats().resequenced_blocks_written, 0);
    assert!(reads_of_range(&mut h, BLOCKS) >= BLOCKS / 2, "the scan moved the range");
    assert!(h.errors.is_empty(), "{:?}", h.errors);
}

/// Disk reads a settle of the idle store makes.
fn background_reads_while_idle(h: &mut Harness) -> u64 {
    let before = h.disk.stats.reads;
    h.settle();
    h.disk.stats.reads - before
}

#[test]
fn a_range_read_in_order_and_then_scattered_by_random_writes_is_put_back_in_order_while_the_store_is_idle() {
    const MIB: u64 = 256;
    for seed in 0..3 {
        let mut h = Harness::with_config(seed, 64 << 20, 1 << 20, 2 * MIB, vec![VOLUME], as_the_node_runs_it);
        // Written in order and read in large pieces: remembered as read in order.
        for lba in (0..2 * MIB).step_by(64) {
            h.write(VOLUME, lba, 64);
        }
        h.settle();
        for lba in (0..2 * MIB).step_by(MIB as usize) {
            h.read(VOLUME, lba, MIB);
        }
        h.settle();
        // A day of random 4 KiB writes over the first MiB only, never read
        // in between, and no idle moment (in the harness every tick without
        // a request between it and the previous one is one).
        let mut rng = SimRng::new(seed);
        for _ in 0..MIB {
            h.write(VOLUME, rng.below(MIB), 1);
        }
        let before = h.store.stats();
        let moved_reads = background_reads_while_idle(&mut h);
        let after = h.store.stats();
        assert!(
            after.background_resequence_reads > before.background_resequence_reads,
            "seed={seed}: the idle store never looked at the scattered range: {after:?}"
        );
        assert!(moved_reads >= 1, "seed={seed}");
        assert!(
            after.resequenced_blocks_written > before.resequenced_blocks_written,
            "seed={seed}: nothing was moved: {after:?}"
        );
        // The scan after it: a few batches' worth of I/Os, not one per block.
        let scan = reads_of_range(&mut h, MIB);
        assert!(scan <= 4, "seed={seed}: {scan} reads: the range is still scattered");
        // The second MiB was never scattered: nothing of it was read again.
        assert_eq!(
            h.store.stats().background_resequence_reads,
            after.background_resequence_reads,
            "seed={seed}: a range in order was read by the background pass"
        );
        h.crash_and_verify();
        h.verify_all_blocks();
        assert!(h.errors.is_empty(), "seed={seed}: {:?}", h.errors);
    }
}

#[test]
fn a_range_never_read_in_large_pieces_is_left_where_random_writes_put_it() {
    let mut h = scattered(9);
    h.settle();
    h.settle();
    assert_eq!(h.store.stats().background_resequence_reads, 0);
    assert_eq!(h.store.stats().resequenced_blocks_written, 0);
    // Its first large read still pays one I/O per block (and moves it).
    assert!(reads_of_range(&mut h, BLOCKS) >= BLOCKS / 2);
}
