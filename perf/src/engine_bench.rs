//! Engine-direct load: a closed loop of requests at a fixed queue depth
//! straight into the node's storage engine (no network), timed with an
//! HDR histogram.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use crossbeam_channel::unbounded;
use disk_layout::{Reply, StoreStats};
use hdrhistogram::Histogram;
use node::engine::{Command, Engine};
use serde::Serialize;

/// What one engine run measured.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EngineResult {
    pub iops: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
}

/// The kind of request a run issues.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    RandomWrite,
    /// 4 KiB writes to every block once, in a random order (as fio's
    /// `randwrite` covers a file); after `blocks` requests it starts over.
    ShuffledWrite,
    RandomRead,
    /// 1 MiB reads in order through the blocks, wrapping around.
    SequentialRead,
}

/// Blocks of one `SequentialRead` request (1 MiB).
const SEQUENTIAL_READ_BLOCKS: u64 = 256;

/// When a run ends.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Seconds(f64),
    Requests(u64),
}

#[allow(clippy::too_many_arguments)]
/// Runs `pattern` over blocks `0..blocks` of `volume` for `seconds` with
/// `queue_depth` requests in flight.
pub fn run(
    engine: &Engine,
    disk: usize,
    volume: u64,
    blocks: u64,
    queue_depth: usize,
    seconds: f64,
    pattern: Pattern,
    seed: u64,
) -> Result<EngineResult> {
    run_with(
        engine,
        disk,
        volume,
        blocks,
        queue_depth,
        Limit::Seconds(seconds),
        pattern,
        seed,
    )
}

#[allow(clippy::too_many_arguments)]
/// Runs `pattern` like `run`, for `requests` requests instead of a time.
pub fn run_requests(
    engine: &Engine,
    disk: usize,
    volume: u64,
    blocks: u64,
    queue_depth: usize,
    requests: u64,
    pattern: Pattern,
    seed: u64,
) -> Result<EngineResult> {
    run_with(
        engine,
        disk,
        volume,
        blocks,
        queue_depth,
        Limit::Requests(requests),
        pattern,
        seed,
    )
}

#[allow(clippy::too_many_arguments)]
fn run_with(
    engine: &Engine,
    disk: usize,
    volume: u64,
    blocks: u64,
    queue_depth: usize,
    limit: Limit,
    pattern: Pattern,
    seed: u64,
) -> Result<EngineResult> {
    let queue_depth = match limit {
        Limit::Requests(requests) => queue_depth.min(usize::try_from(requests.max(1)).unwrap_or(usize::MAX)),
        Limit::Seconds(_) => queue_depth,
    };
    let (sender, receiver) = unbounded::<(usize, Result<Reply, disk_layout::StoreError>)>();
    let mut started_at = vec![Instant::now(); queue_depth];
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    // A new seed per call: repeated calls with one seed rewrite the same blocks.
    let mut rng = disk_layout::sim_disk::SimRng::new(seed);
    let template = vec![0xA5u8; 4096];
    let cursor = std::cell::Cell::new(0u64);
    let order: Vec<u64> = if matches!(pattern, Pattern::ShuffledWrite) {
        let mut order: Vec<u64> = (0..blocks).collect();
        for at in (1..order.len()).rev() {
            order.swap(at, rng.index(at + 1));
        }
        order
    } else {
        Vec::new()
    };
    let issue = |slot: usize, rng: &mut disk_layout::sim_disk::SimRng, started_at: &mut [Instant]| {
        let lba = rng.below(blocks);
        let command = match pattern {
            Pattern::ShuffledWrite => {
                let at = cursor.get();
                cursor.set((at + 1) % blocks);
                Command::Write {
                    volume_id: volume,
                    lba: order[usize::try_from(at).expect("a block count")],
                    data: template.clone().into(),
                    epoch: 1,
                    volume_sequence: 0,
                }
            }
            Pattern::SequentialRead => {
                let lba = cursor.get();
                let next = lba + SEQUENTIAL_READ_BLOCKS;
                cursor.set(if next + SEQUENTIAL_READ_BLOCKS > blocks {
                    0
                } else {
                    next
                });
                Command::Read {
                    volume_id: volume,
                    lba,
                    block_count: SEQUENTIAL_READ_BLOCKS,
                }
            }
            Pattern::RandomWrite => Command::Write {
                volume_id: volume,
                lba,
                data: template.clone().into(),
                epoch: 1,
                volume_sequence: 0,
            },
            Pattern::RandomRead => Command::Read {
                volume_id: volume,
                lba,
                block_count: 1,
            },
        };
        started_at[slot] = Instant::now();
        let sender = sender.clone();
        engine.submit(
            disk,
            command,
            Box::new(move |result| {
                let _ = sender.send((slot, result));
            }),
        );
    };
    for slot in 0..queue_depth {
        issue(slot, &mut rng, &mut started_at);
    }
    let start = Instant::now();
    let deadline = match limit {
        Limit::Seconds(seconds) => Some(start + Duration::from_secs_f64(seconds)),
        Limit::Requests(_) => None,
    };
    let mut issued = queue_depth as u64;
    let mut done = 0u64;
    let mut outstanding = queue_depth;
    while outstanding > 0 {
        let (slot, result) = receiver.recv_timeout(Duration::from_secs(30))?;
        outstanding -= 1;
        match result {
            Ok(Reply::Written | Reply::Read(_)) => {}
            other => bail!("engine request failed: {other:?}"),
        }
        let micros = u64::try_from(started_at[slot].elapsed().as_micros()).unwrap_or(u64::MAX);
        histogram.record(micros.max(1))?;
        done += 1;
        let more = match (deadline, limit) {
            (Some(deadline), _) => Instant::now() < deadline,
            (None, Limit::Requests(requests)) => issued < requests,
            (None, Limit::Seconds(_)) => unreachable!("a time limit has a deadline"),
        };
        if more {
            issue(slot, &mut rng, &mut started_at);
            issued += 1;
            outstanding += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(EngineResult {
        iops: done as f64 / elapsed,
        latency_p50_us: histogram.value_at_quantile(0.5) as f64,
        latency_p99_us: histogram.value_at_quantile(0.99) as f64,
    })
}

/// Writes blocks `0..blocks` once, sequentially in 1 MiB requests, 8 in flight.
pub fn fill(engine: &Engine, disk: usize, volume: u64, blocks: u64) -> Result<()> {
    let (sender, receiver) = unbounded();
    let chunk = 256u64;
    let mut next = 0u64;
    let mut outstanding = 0;
    let data = vec![0x5Au8; 4096 * 256];
    while next < blocks || outstanding > 0 {
        while next < blocks && outstanding < 8 {
            let count = chunk.min(blocks - next);
            let sender = sender.clone();
            let bytes = usize::try_from(count * 4096).expect("1 MiB");
            engine.submit(
                disk,
                Command::Write {
                    volume_id: volume,
                    lba: next,
                    data: data[..bytes].to_vec().into(),
                    epoch: 1,
                    volume_sequence: 0,
                },
                Box::new(move |result| {
                    let _ = sender.send(result);
                }),
            );
            next += count;
            outstanding += 1;
        }
        match receiver.recv_timeout(Duration::from_secs(60))? {
            Ok(Reply::Written) => outstanding -= 1,
            other => bail!("fill write failed: {other:?}"),
        }
    }
    Ok(())
}

/// The store's counters.
pub fn stats(engine: &Engine, disk: usize) -> Result<StoreStats> {
    Ok(engine.query(disk, |store| store.stats())?)
}

/// User capacity of the disk in blocks.
pub fn capacity_blocks(engine: &Engine, disk: usize) -> Result<u64> {
    Ok(engine.query(disk, |store| store.space().capacity_blocks)?)
}

/// Write amplification between two snapshots of the counters.
#[must_use]
pub fn write_amplification(before: &StoreStats, after: &StoreStats) -> f64 {
    let user = after.user_blocks_written - before.user_blocks_written;
    let total = user
        + (after.relocated_blocks_written - before.relocated_blocks_written)
        + (after.resequenced_blocks_written - before.resequenced_blocks_written)
        + (after.header_blocks_written - before.header_blocks_written);
    if user == 0 {
        return 1.0;
    }
    total as f64 / user as f64
}
