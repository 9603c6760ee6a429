//! The store under injected faults: device errors, bit rot, full disks,
//! foreign disks. Each test names the behaviour it guards.

// Tests run on 64-bit hosts only; offsets here are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{format_params, test_config, Harness};
use disk_layout::sim_disk::SimDisk;
use disk_layout::{FormatError, Reply, Store, StoreConfig, StoreError};

fn no_periodic_checkpoints(config: &mut StoreConfig) {
    config.checkpoint_interval_blocks = u64::MAX;
}

#[test]
fn segments_are_not_reused_while_either_checkpoint_slot_may_replay_through_them() {
    // Each round overwrites the whole range, killing the previous round's
    // segments. Reusing one that the older checkpoint slot would replay
    // through breaks that slot's chain: with the newest slot corrupt, the
    // crash then loses acknowledged writes.
    let mut h = Harness::with_config(11, 24 << 20, 1 << 20, 256, vec![1], no_periodic_checkpoints);
    for round in 0..40u64 {
        for lba in (0..256).step_by(16) {
            h.write(1, lba, 16);
        }
        h.settle();
        if round % 7 == 6 {
            h.store.request_checkpoint();
        }
    }
    assert!(h.errors.is_empty(), "{:?}", h.errors);
    let geometry = h.store.superblock().geometry;
    let newest = h.store.newest_checkpoint_slot();
    h.disk
        .flip_bit(geometry.checkpoint_slot_offset_bytes(newest) as usize + 4096 + 9, 2);
    h.crash_and_verify();
    h.add_stats();
    assert!(
        h.total.checkpoints >= 2,
        "space pressure must force checkpoints: {:?}",
        h.total
    );
}

#[test]
fn a_failed_batch_write_fails_its_requests_and_loses_nothing_acknowledged() {
    for seed in 0..20 {
        let mut h = Harness::new(seed, 24 << 20, 1 << 20, 128, vec![1, 2]);
        for i in 0..50 {
            h.write(1 + i % 2, (i * 7) % 120, 1 + i % 8);
            h.step();
        }
        h.settle();
        let acked_before = h.acked_writes;
        h.disk.faults.fail_writes_from = Some(0);
        for i in 0..30 {
            h.write(1 + i % 2, (i * 5) % 120, 1 + i % 4);
            h.step();
        }
        h.settle();
        assert!(h.store.is_failed(), "seed={seed}: store kept going after a write error");
        assert!(!h.errors.is_empty(), "seed={seed}: no request saw the error");
        assert_eq!(h.pending_count(), 0, "seed={seed}: requests left without an answer");
        assert_eq!(
            h.acked_writes, acked_before,
            "seed={seed}: a write was acknowledged after the error"
        );
        // New requests are refused with a clear error.
        h.write(1, 0, 1);
        assert!(matches!(h.errors.last(), Some(StoreError::Failed { .. })));
        h.disk.faults.fail_writes_from = None;
        h.crash_and_verify();
    }
}

#[test]
fn a_failed_flush_acknowledges_nothing_and_reopen_recovers() {
    // Odd seed: batches are made durable by flushes.
    let mut h = Harness::new(3, 24 << 20, 1 << 20, 64, vec![1]);
    h.write(1, 0, 4);
    h.settle();
    assert_eq!(h.acked_writes, 1);
    h.disk.faults.fail_flushes = true;
    h.write(1, 4, 4);
    h.settle();
    assert_eq!(h.acked_writes, 1, "write acknowledged although its flush failed");
    assert!(h.store.is_failed());
    h.disk.faults.fail_flushes = false;
    h.crash_and_verify();
}

#[test]
fn a_read_error_fails_that_read_only() {
    let mut h = Harness::new(4, 24 << 20, 1 << 20, 64, vec![1]);
    h.write(1, 0, 8);
    h.settle();
    let geometry = h.store.superblock().geometry;
    let first_data_block = geometry.segments_offset_bytes / 4096 + 1;
    h.disk.faults.eio_read_blocks.insert(first_data_block);
    h.read(1, 0, 8);
    h.settle();
    assert!(matches!(h.errors.last(), Some(StoreError::Io { .. })), "{:?}", h.errors);
    assert!(!h.store.is_failed(), "a read error must not stop the store");
    h.disk.faults.eio_read_blocks.clear();
    h.read(1, 0, 8);
    h.settle();
    assert_eq!(h.errors.len(), 1);
}

#[test]
fn bit_rot_in_data_is_reported_not_returned() {
    let mut h = Harness::new(5, 24 << 20, 1 << 20, 64, vec![1]);
    h.write(1, 0, 4);
    h.settle();
    let geometry = h.store.superblock().geometry;
    // Second data block of the first batch: volume block 1.
    let offset = geometry.segments_offset_bytes as usize + 2 * 4096 + 100;
    h.disk.flip_bit(offset, 3);
    h.read(1, 0, 4);
    h.settle();
    match h.errors.last() {
        Some(StoreError::Checksum { lba, volume_id, .. }) => {
            assert_eq!((*lba, *volume_id), (1, 1));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(h.store.stats().checksum_errors, 1);
    // Other blocks still read fine.
    h.read(1, 2, 2);
    h.settle();
    assert_eq!(h.errors.len(), 1);
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_older_slot() {
    let mut h = Harness::new(6, 24 << 20, 1 << 20, 64, vec![1]);
    for round in 0..3 {
        h.write(1, round * 8, 8);
        h.settle();
        h.store.request_checkpoint();
        h.settle();
    }
    h.write(1, 40, 8);
    h.settle();
    // Corrupt the payload of the newest checkpoint slot.
    let geometry = h.store.superblock().geometry;
    let newest_slot = h.store.newest_checkpoint_slot();
    let payload = geometry.checkpoint_slot_offset_bytes(newest_slot) as usize + 4096 + 3;
    h.disk.flip_bit(payload, 0);
    h.crash_and_verify();
}

#[test]
fn writes_beyond_capacity_get_no_space_and_the_store_keeps_serving() {
    let mut h = Harness::new(7, 24 << 20, 1 << 20, 5000, vec![1, 2]);
    let capacity = h.store.space().capacity_blocks;
    let mut lba = 0;
    while lba + 256 <= 5000 && h.errors.is_empty() {
        h.write(1, lba, 256);
        h.settle();
        lba += 256;
    }
    let mut lba2 = 0;
    while h.errors.is_empty() && lba2 + 256 <= 5000 {
        h.write(2, lba2, 256);
        h.settle();
        lba2 += 256;
    }
    assert!(
        matches!(h.errors.last(), Some(StoreError::NoSpace { .. })),
        "{:?} capacity {capacity}",
        h.errors
    );
    assert!(h.store.space().used_blocks <= capacity);
    // Overwrites of existing data still work, and deleting frees space.
    let before = h.errors.len();
    h.write(1, 0, 16);
    h.settle();
    assert_eq!(h.errors.len(), before, "overwrite refused: {:?}", h.errors);
    h.delete(1);
    h.settle();
    h.write(2, lba2, 64);
    h.settle();
    assert_eq!(h.errors.len(), before, "space was not reclaimed: {:?}", h.errors);
    h.crash_and_verify();
}

#[test]
fn a_disk_of_another_node_is_refused() {
    let mut disk = SimDisk::new(24 << 20, 1);
    Store::format(&mut disk, &format_params(24 << 20, 1 << 20), "sim").unwrap();
    let config = StoreConfig::new("sim", Some([9; 16]), 1);
    assert!(matches!(
        Store::open(&mut disk, config),
        Err(StoreError::WrongNode { .. })
    ));
}

#[test]
fn an_unformatted_disk_is_refused_with_a_format_error() {
    let mut disk = SimDisk::new(24 << 20, 1);
    match Store::open(&mut disk, test_config("sim", 1)) {
        Err(StoreError::Format {
            source: FormatError::BadMagic,
            ..
        }) => {}
        other => panic!("expected BadMagic, got {:?}", other.err()),
    }
}

#[test]
fn a_destroyed_superblock_copy_is_survived() {
    let mut h = Harness::new(8, 24 << 20, 1 << 20, 64, vec![1]);
    h.write(1, 0, 8);
    h.settle();
    h.disk.flip_bit(20, 1); // superblock copy A
    h.crash_and_verify();
}

#[test]
fn reads_of_unwritten_blocks_return_zeroes_and_block_status_reports_holes() {
    let mut h = Harness::new(9, 24 << 20, 1 << 20, 4096, vec![1]);
    h.write(1, 10, 2);
    h.settle();
    let runs = h.store.block_status(1, 0, 100);
    assert_eq!(runs, vec![(0, 10, false), (10, 2, true), (12, 88, false)]);
    let tag = 999_999;
    h.store.read(&mut h.disk, tag, 1, 3000, 16);
    let mut done = Vec::new();
    h.store.drain_done(&mut done);
    match &done[..] {
        [d] if d.tag == tag => match &d.result {
            Ok(Reply::Read(buf)) => assert!(buf.as_slice().iter().all(|&b| b == 0)),
            other => panic!("{other:?}"),
        },
        other => panic!("unwritten read must finish at once: {other:?}"),
    }
}

#[test]
fn a_hole_between_written_blocks_reads_as_zeroes_after_buffers_of_earlier_reads_were_reused() {
    let mut h = Harness::new(19, 24 << 20, 1 << 20, 4096, vec![1]);
    h.write(1, 0, 1);
    h.write(1, 2, 1);
    h.write(1, 4, 3);
    h.write(1, 8, 8);
    h.settle();
    let read = |h: &mut Harness, tag: u64, lba: u64, count: u64| -> Vec<u8> {
        h.store.read(&mut h.disk, tag, 1, lba, count);
        for _ in 0..1_000 {
            let mut done = Vec::new();
            h.store.drain_done(&mut done);
            if let Some(d) = done.pop() {
                match d.result {
                    Ok(Reply::Read(buf)) => return buf.as_slice().to_vec(),
                    other => panic!("{other:?}"),
                }
            }
            // The device completes some requests (not `step`, which would
            // take this untracked read's answer).
            for completion in h.disk.run_some() {
                h.store.on_completion(&mut h.disk, completion);
            }
        }
        panic!("read {tag} never finished");
    };
    // Reads of written data whose buffers go back to this thread's pool,
    // holding data, in the lengths the next reads take.
    for (tag, lba, count) in [(1, 0, 1), (2, 2, 1), (3, 4, 1), (4, 5, 1), (5, 6, 1), (7, 8, 8)] {
        let data = read(&mut h, tag, lba, count);
        assert!(data.chunks(4096).all(|block| block.iter().any(|&b| b != 0)));
    }
    let all = read(&mut h, 6, 0, 8);
    for (block, bytes) in all.chunks(4096).enumerate() {
        let hole = matches!(block, 1 | 3 | 7);
        assert_eq!(bytes.iter().all(|&b| b == 0), hole, "block {block}");
    }
}

#[test]
fn thin_provisioning_counts_only_written_blocks_and_zeroing_frees_them() {
    let mut h = Harness::new(10, 24 << 20, 1 << 20, 4096, vec![1]);
    h.write(1, 100, 8);
    h.write(1, 2000, 8);
    h.settle();
    assert_eq!(h.store.volume_used_blocks(1), 16);
    assert_eq!(h.store.space().used_blocks, 16);
    h.zero(1, 100, 8);
    h.settle();
    assert_eq!(h.store.volume_used_blocks(1), 8);
    assert_eq!(h.store.space().used_blocks, 8);
    h.crash_and_verify();
    assert_eq!(h.store.volume_used_blocks(1), 8, "space accounting survives reopen");
}

#[test]
fn invalid_requests_are_refused_with_a_reason() {
    let mut h = Harness::new(12, 24 << 20, 1 << 20, 64, vec![1]);
    h.store.write(1, 1, 0, &[0u8; 100], 0, 0);
    h.store.write(2, 1, 0, &vec![0u8; 4096 * 257], 0, 0);
    h.store.write(3, 1, u64::MAX - 1, &[0u8; 4096], 0, 0);
    h.store.read(&mut h.disk, 4, 1, 0, 0);
    let mut done = Vec::new();
    h.store.drain_done(&mut done);
    assert_eq!(done.len(), 4);
    for d in done {
        assert!(
            matches!(d.result, Err(StoreError::InvalidRequest { .. })),
            "{:?}",
            d.result
        );
    }
}

#[test]
fn a_cleaned_segment_is_not_reused_before_the_relocation_that_emptied_it_is_durable() {
    // Hold every flush after a relocation: the log runs on for segments
    // while the relocated copies are not durable. Reusing the emptied
    // segment then would overwrite the only durable copy of its data.
    let mut relocations_seen = 0;
    for seed in 0..10u64 {
        let lba_range = 2200;
        let mut h = Harness::new(seed, 24 << 20, 1 << 20, lba_range, vec![1]);
        for lba in (0..lba_range).step_by(16) {
            h.write(1, lba, 16.min(lba_range - lba));
        }
        h.settle();
        let mut rng = disk_layout::sim_disk::SimRng::new(seed);
        // Run until two checkpoints have passed the oldest segments, so the
        // next victim is behind the reuse floor; then until it is emptied.
        for _ in 0..20_000 {
            if h.store.stats().checkpoints >= 3 {
                break;
            }
            h.write(1, rng.below(lba_range - 4), 1 + rng.below(4));
            h.step();
        }
        let before = h.store.stats().relocated_blocks_written;
        for _ in 0..20_000 {
            h.write(1, rng.below(lba_range - 4), 1 + rng.below(4));
            h.step();
            if h.store.stats().relocated_blocks_written > before {
                break;
            }
        }
        if h.store.stats().relocated_blocks_written == before {
            continue;
        }
        relocations_seen += 1;
        h.disk.faults.hold_flushes_after = Some(h.disk.stats.flushes + 1);
        for _ in 0..600 {
            h.write(1, rng.below(lba_range - 4), 2);
            h.step();
        }
        h.crash_and_verify();
    }
    assert!(
        relocations_seen >= 5,
        "the cleaner ran in only {relocations_seen} seeds"
    );
}

#[test]
fn block_states_show_data_crcs_and_count_zeroed_or_zero_filled_blocks_as_holes() {
    use disk_layout::BlockState;
    let mut h = Harness::new(6, 24 << 20, 1 << 20, 64, vec![1]);
    h.write(1, 0, 3);
    h.zero(1, 1, 1);
    h.settle();
    // The index takes a write when it is placed (no need to wait for it).
    h.store.write(9_999, 1, 5, &[0u8; 4096], 1, 9_999);
    let states = h.store.block_states(1, 0, 7);
    assert_eq!(states.len(), 7);
    assert!(matches!(states[0], BlockState::Data { .. }), "{states:?}");
    assert_eq!(states[1], BlockState::Hole, "zeroed");
    assert!(matches!(states[2], BlockState::Data { .. }), "{states:?}");
    assert_ne!(states[0], states[2], "different contents, different crcs");
    assert_eq!(states[5], BlockState::Hole, "written with zeroes");
    assert_eq!(&states[3..5], &[BlockState::Hole, BlockState::Hole], "never written");
    assert_eq!(
        h.store.block_states(2, 0, 3),
        vec![BlockState::Hole; 3],
        "another volume"
    );
}

/// Byte offset of the first data block holding content for (`volume`, `lba`).
fn data_block_of(h: &Harness, volume: u64, lba: u64) -> usize {
    let geometry = h.store.superblock().geometry;
    let start = geometry.segments_offset_bytes as usize;
    let size = h.disk.size_bytes() as usize;
    (start..size)
        .step_by(4096)
        .find(|offset| {
            let block = h.disk.peek(*offset, 16);
            block[..8] == volume.to_le_bytes() && block[8..16] == lba.to_le_bytes()
        })
        .expect("the block is on the disk")
}

#[test]
fn a_rotten_batch_inside_the_log_costs_only_its_own_blocks_at_replay() {
    use disk_layout::BlockState;
    // Rot in the data of the second batch; more durable batches than its
    // durable window (the pipeline depth) follow it.
    let window = common::test_config("sim", 8).pipeline_depth as u64;
    let rounds = window + 4;
    let mut h = Harness::new(8, 24 << 20, 1 << 20, 4 * rounds, vec![1]);
    for round in 0..rounds {
        h.write(1, round * 4, 4);
        h.settle();
    }
    let offset = data_block_of(&h, 1, 5) + 100;
    h.disk.flip_bit(offset, 3);
    let mut disk = h.disk.crash(81);
    let store = Store::open(&mut disk, common::test_config("sim", 8)).unwrap();
    assert_eq!(store.stats().checksum_errors, 4, "the rotten record's blocks");
    assert!(!store.replay_ended_at_damage());
    assert_eq!(store.block_states(1, 4, 4), vec![BlockState::Bad; 4]);
    for lba in (0..4).chain(8..4 * rounds) {
        assert!(
            matches!(store.block_states(1, lba, 1)[0], BlockState::Data { .. }),
            "block {lba} written before or after the rotten batch is kept"
        );
    }
}

#[test]
fn a_damaged_batch_at_the_end_of_the_log_is_torn_and_replay_stops_there() {
    use disk_layout::BlockState;
    let mut h = Harness::new(9, 24 << 20, 1 << 20, 64, vec![1]);
    for round in 0..7 {
        h.write(1, round * 4, 4);
        h.settle();
    }
    // The second-to-last batch: fewer batches follow it than its durable window.
    let offset = data_block_of(&h, 1, 21) + 100;
    h.disk.flip_bit(offset, 3);
    let mut disk = h.disk.crash(91);
    let store = Store::open(&mut disk, common::test_config("sim", 9)).unwrap();
    assert_eq!(store.stats().checksum_errors, 0);
    assert!(store.replay_ended_at_damage(), "this copy may lack acknowledged writes");
    assert!(matches!(store.block_states(1, 19, 1)[0], BlockState::Data { .. }));
    assert_eq!(
        store.block_states(1, 20, 8),
        vec![BlockState::Hole; 8],
        "within its durable window a damaged batch cannot be told from a torn one: replay ends before it"
    );
}

/// Byte offset of the batch header whose records include a `kind` record.
fn batch_header_with(h: &Harness, kind: disk_layout::record::RecordKind) -> usize {
    let geometry = h.store.superblock().geometry;
    let start = geometry.segments_offset_bytes as usize;
    (start..h.disk.size_bytes() as usize)
        .step_by(4096)
        .find(|&offset| {
            disk_layout::record::BatchHeader::decode(h.disk.peek(offset, 4096))
                .is_ok_and(|(header, _)| header.records.iter().any(|r| r.kind == kind))
        })
        .expect("the batch is on the disk")
}

#[test]
fn a_batch_torn_by_a_crash_is_never_completed_by_the_next_lifes_writes() {
    // A crash tore the header of the last batch (a delete): one sector holds
    // older bytes, so replay ends before it and the volume is served as it
    // was. The next life must not write where the torn batch lies: a torn
    // write of its own there could complete the old header (sectors past the
    // records are zero in both) and replay the delete nobody acknowledged,
    // after the volume's data was served.
    use disk_layout::record::RecordKind;
    use disk_layout::BlockState;
    for seed in [3u64, 4] {
        let mut h = Harness::new(seed, 24 << 20, 1 << 20, 8, vec![1, 2]);
        h.write(1, 0, 1);
        h.settle();
        h.delete(1);
        h.settle();
        let header = batch_header_with(&h, RecordKind::DeleteVolume);
        h.disk.flip_bit(header + 3 * 512 + 7, 1);
        let mut disk = h.disk.crash(seed);
        let mut store = Store::open(&mut disk, test_config("sim", seed)).unwrap();
        assert!(
            matches!(store.block_states(1, 0, 1)[0], BlockState::Data { .. }),
            "seed={seed}: the torn delete is not replayed"
        );
        // The next life writes elsewhere; crash with that write in flight.
        store.write(1, 2, 0, &vec![7u8; 4096], 1, 1);
        store.tick(&mut disk);
        for crash_seed in 0..128 {
            let mut crashed = disk.crash(crash_seed);
            let store = Store::open(&mut crashed, test_config("sim", seed)).unwrap();
            assert!(
                matches!(store.block_states(1, 0, 1)[0], BlockState::Data { .. }),
                "seed={seed} crash_seed={crash_seed}: a delete that replay had dropped came back"
            );
        }
    }
}
