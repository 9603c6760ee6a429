//! How often the store checkpoints. A checkpoint rewrites the whole index,
//! so its cost grows with the data held: on a large, full disk it would
//! write more than the clients do if checkpoints came every fixed amount
//! of log.

// Tests run on 64-bit hosts only; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::Harness;
use disk_layout::sim_disk::SimRng;
use disk_layout::store::{CheckpointEncoding, CHECKPOINT_LOG_RATIO};

/// Writes `count` random single blocks over `range`, 32 in flight, then
/// lets the store settle. Bounded by the count and the harness's settle.
fn random_writes(h: &mut Harness, rng: &mut SimRng, range: u64, count: u64) {
    let mut issued = 0;
    for _ in 0..count * 1000 {
        if issued == count && h.pending_count() == 0 {
            break;
        }
        if issued < count && h.pending_count() < 32 {
            h.write(1, rng.below(range), 1);
            issued += 1;
        } else {
            h.step();
        }
    }
    assert_eq!(issued, count, "seed={}: writes left unissued", h.seed);
    h.settle();
}

#[test]
fn checkpoints_of_a_large_index_write_at_most_a_quarter_of_what_the_log_does() {
    for seed in 0..2u64 {
        // A checkpoint asked for every 64 log blocks (256 KiB), while the
        // index of 40,000 randomly written blocks takes about 100 blocks
        // (16 bytes each in a checkpoint): at the asked-for pace the
        // checkpoints would write 1.5 times the log.
        let mut h = Harness::with_config(seed, 256 << 20, 1 << 20, 40_000, vec![1], |config| {
            config.checkpoint_interval_blocks = 64;
        });
        let mut rng = SimRng::new(seed);
        random_writes(&mut h, &mut rng, 40_000, 20_000);
        let before = h.store.stats();
        random_writes(&mut h, &mut rng, 40_000, 20_000);
        let after = h.store.stats();
        let log = (after.user_blocks_written + after.header_blocks_written + after.relocated_blocks_written)
            - (before.user_blocks_written + before.header_blocks_written + before.relocated_blocks_written);
        let checkpoints = after.checkpoints - before.checkpoints;
        let checkpoint_blocks = after.checkpoint_blocks_written - before.checkpoint_blocks_written;
        assert!(
            checkpoints >= 3,
            "seed={seed}: {checkpoints} checkpoints in {log} log blocks: still taken"
        );
        assert!(
            checkpoint_blocks * CHECKPOINT_LOG_RATIO <= log + log / 10,
            "seed={seed}: checkpoints wrote {checkpoint_blocks} blocks for {log} blocks of log"
        );
        h.crash_and_verify();
    }
}

/// Forty snapshots of a volume of random data: each costs the checkpoint
/// (and memory) only where it differs from the volume, also after the
/// cleaner moved the blocks they share; one of them trimmed at random
/// costs its holes. Written alone, each snapshot would need as much room
/// as the volume: the slot would overflow (the store panicked here once).
#[test]
fn forty_snapshots_of_random_data_cost_what_differs_and_still_checkpoint() {
    let seed = 3;
    let volumes: Vec<u64> = (1..=40).collect();
    let mut h = Harness::with_config(seed, 64 << 20, 1 << 20, 8000, volumes, |config| {
        config.checkpoint_interval_blocks = 256;
    });
    let mut rng = SimRng::new(seed);
    random_writes(&mut h, &mut rng, 8000, 10_000);
    let one_volume = h.store.index_memory_bytes();
    for target in 2..=40 {
        h.clone_volume(1, target);
        h.settle();
    }
    for _ in 0..2000 {
        let lba = rng.below(8000);
        h.zero(40, lba, 1);
        for _ in 0..100_000 {
            if h.pending_count() < 32 {
                break;
            }
            h.step();
        }
        assert!(h.pending_count() < 32, "seed={seed}: zeroes not answered");
    }
    h.settle();
    random_writes(&mut h, &mut rng, 8000, 2000);
    assert!(h.errors.is_empty(), "{:?}", h.errors.first());
    let stats = h.store.stats();
    assert!(stats.segments_cleaned > 0 && stats.checkpoints > 10, "{stats:?}");
    assert_eq!(stats.checkpoints_refused, 0);
    let all = h.store.index_memory_bytes();
    assert!(
        all < 4 * one_volume,
        "40 volumes take {all} bytes of index, one took {one_volume}: the snapshots share its chunks"
    );
    h.crash_and_verify();
}

/// When the maps outgrow the room a checkpoint has (a test's small room
/// here; a slot on a real disk), the store does not stop: it keeps serving
/// from the older checkpoint and the log, refuses new clones with a clear
/// error, and checkpoints again once a delete made the maps fit.
#[test]
fn maps_outgrowing_the_checkpoint_room_refuse_clones_and_keep_serving() {
    let seed = 5;
    let mut h = Harness::with_config(seed, 64 << 20, 1 << 20, 8000, vec![1, 2, 3], |config| {
        config.checkpoint_interval_blocks = 256;
        config.checkpoint_room_bytes = Some(64 << 10);
    });
    let mut rng = SimRng::new(seed);
    random_writes(&mut h, &mut rng, 2000, 1000);
    h.clone_volume(1, 2);
    h.settle();
    assert!(h.errors.is_empty(), "a small map fits: {:?}", h.errors);
    // Random blocks cost 16 bytes each: the 4,500 or so of 6,000 writes
    // over 8,000 blocks outgrow 64 KiB (the log still fits the disk).
    random_writes(&mut h, &mut rng, 8000, 6000);
    assert!(h.store.stats().checkpoints_refused > 0);
    assert!(h.errors.is_empty(), "writes go on: {:?}", h.errors.first());
    h.clone_volume(1, 3);
    h.settle();
    let message = h.errors.pop().expect("the clone is refused").to_string();
    assert!(
        message.contains("checkpoint area") && message.contains("deleted"),
        "{message}"
    );
    h.crash_and_verify();
    h.delete(1);
    h.delete(2);
    h.settle();
    random_writes(&mut h, &mut rng, 1000, 500);
    let checkpoints = h.store.stats().checkpoints;
    random_writes(&mut h, &mut rng, 1000, 2000);
    assert!(
        h.store.stats().checkpoints > checkpoints,
        "checkpoints again once the maps fit"
    );
    h.clone_volume(1, 3);
    h.settle();
    assert!(h.errors.is_empty(), "the clone is taken again: {:?}", h.errors);
    h.crash_and_verify();
}

/// With checkpoints refused nothing is ever freed: once the log has used
/// the disk, writes fail with NoSpace instead of waiting for space forever,
/// and what was acknowledged survives a crash.
#[test]
fn with_checkpoints_refused_a_full_log_fails_writes_instead_of_hanging() {
    let seed = 7;
    let mut h = Harness::with_config(seed, 32 << 20, 1 << 20, 4000, vec![1], |config| {
        config.checkpoint_interval_blocks = 256;
        config.checkpoint_room_bytes = Some(16 << 10);
    });
    let mut rng = SimRng::new(seed);
    random_writes(&mut h, &mut rng, 4000, 12_000);
    assert!(h.store.stats().checkpoints_refused > 0);
    assert!(
        !h.errors.is_empty() && h.errors.iter().all(disk_layout::StoreError::is_retryable),
        "{:?}",
        h.errors.first()
    );
    h.crash_and_verify();
}

/// With `CheckpointEncoding::Background` (the node's), the payload is
/// encoded on a thread of its own while writes go on: each checkpoint holds
/// the index as of its start and replay the log after it, so a crash at
/// any moment (while a payload is encoded, written, or its header is)
/// loses nothing acknowledged, and checkpoints keep completing.
#[test]
fn checkpoints_encoded_in_the_background_lose_nothing_acknowledged_across_crashes() {
    for seed in 0..4u64 {
        let mut h = Harness::with_config(seed, 64 << 20, 1 << 20, 4_000, vec![1, 2], |config| {
            config.checkpoint_interval_blocks = 64;
            config.checkpoint_encoding = CheckpointEncoding::Background;
        });
        let mut rng = SimRng::new(seed);
        for _ in 0..6 {
            let steps = 300 + rng.below(900);
            for _ in 0..steps {
                if h.pending_count() < 32 {
                    let count = 1 + rng.below(8);
                    h.write(1 + rng.below(2), rng.below(4_000 - count), count);
                } else {
                    h.step();
                }
            }
            // Also lets encodings end: the checkpoints of the round complete.
            h.settle();
            for _ in 0..steps / 4 {
                if h.pending_count() < 32 {
                    h.write(1 + rng.below(2), rng.below(4_000), 1);
                } else {
                    h.step();
                }
            }
            h.crash_and_verify();
        }
        h.add_stats();
        assert!(
            h.total.checkpoints >= 6,
            "seed={seed}: {} checkpoints completed",
            h.total.checkpoints
        );
        assert!(h.errors.is_empty(), "seed={seed}: {:?}", h.errors);
    }
}
