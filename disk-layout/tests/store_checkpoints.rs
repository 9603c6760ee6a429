//! How often the store checkpoints. A checkpoint rewrites the whole index,
//! so its cost grows with the data held: on a large, full disk it would
//! write more than the clients do if checkpoints came every fixed amount
//! of log.

// Tests run on 64-bit hosts only; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::Harness;
use disk_layout::sim_disk::SimRng;
use disk_layout::store::CHECKPOINT_LOG_RATIO;

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
