//! A harness that drives a `Store` over a `SimDisk` and checks it against a
//! model: per block, the history of contents submitted, and how much of it
//! was acknowledged.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use disk_layout::sim_disk::SimDisk;
use disk_layout::{Done, FormatParams, Reply, Store, StoreConfig, StoreError};

pub const BLOCK: usize = 4096;

/// Content 0 means "zeroes".
pub fn block_content(volume: u64, lba: u64, content: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    if content == 0 {
        return block;
    }
    block[0..8].copy_from_slice(&volume.to_le_bytes());
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&content.to_le_bytes());
    let mut x = content.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba;
    for chunk in block[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    block
}

/// Which content a block holds, or panics if it is none we ever wrote.
/// Contents are unique across volumes; a clone's block carries the volume
/// that wrote it.
pub fn decode_content(volume: u64, lba: u64, block: &[u8]) -> u64 {
    if block.iter().all(|&b| b == 0) {
        return 0;
    }
    let writer = u64::from_le_bytes(block[0..8].try_into().unwrap());
    let content = u64::from_le_bytes(block[16..24].try_into().unwrap());
    assert_eq!(
        block,
        &block_content(writer, lba, content)[..],
        "volume {volume} block {lba}: bytes that were never written there"
    );
    content
}

#[derive(Default, Clone)]
struct BlockModel {
    /// Contents in submission order; `history[0]` is the state at (re)open.
    history: Vec<u64>,
    /// Index in `history` of the newest acknowledged content.
    acked: usize,
}

#[derive(Debug)]
enum Pending {
    Write {
        volume: u64,
        lba: u64,
        positions: Vec<usize>,
    },
    Zero {
        volume: u64,
        lba: u64,
        positions: Vec<usize>,
    },
    Delete {
        volume: u64,
        positions: Vec<(u64, usize)>,
    },
    Clone {
        target: u64,
        positions: Vec<(u64, usize)>,
    },
    Read {
        volume: u64,
        lba: u64,
        acked_at_submit: Vec<usize>,
    },
    Flush,
}

pub struct Harness {
    pub disk: SimDisk,
    pub store: Store,
    pub seed: u64,
    blocks: HashMap<(u64, u64), BlockModel>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    next_content: u64,
    pub lba_range: u64,
    pub volumes: Vec<u64>,
    pub acked_writes: u64,
    pub errors: Vec<StoreError>,
    pub crashes: u64,
    reopen: u64,
    tune: fn(&mut StoreConfig),
    /// Store counters summed over every open.
    pub total: disk_layout::StoreStats,
}

/// Test configuration. Even seeds write batches with FUA, odd seeds with
/// write + flush, so both durability paths run under every test.
pub fn test_config(name: &str, seed: u64) -> StoreConfig {
    let mut config = StoreConfig::new(name, Some([2; 16]), seed);
    config.checkpoint_interval_blocks = 2048;
    config.durable_writes = seed.is_multiple_of(2);
    // Small enough that the tests' reads re-sequence scattered data.
    config.resequence_read_blocks_min = 4;
    config
}

pub fn format_params(size_bytes: u64, segment_bytes: u64) -> FormatParams {
    FormatParams {
        disk_size_bytes: size_bytes,
        segment_size_bytes: segment_bytes,
        cluster_uuid: [1; 16],
        node_uuid: [2; 16],
        disk_uuid: [3; 16],
        created_unix_seconds: 1,
    }
}

impl Harness {
    pub fn new(seed: u64, size_bytes: usize, segment_bytes: u64, lba_range: u64, volumes: Vec<u64>) -> Self {
        Self::with_config(seed, size_bytes, segment_bytes, lba_range, volumes, |_| {})
    }

    pub fn with_config(
        seed: u64,
        size_bytes: usize,
        segment_bytes: u64,
        lba_range: u64,
        volumes: Vec<u64>,
        tune: fn(&mut StoreConfig),
    ) -> Self {
        let mut disk = SimDisk::new(size_bytes, seed);
        Store::format(&mut disk, &format_params(size_bytes as u64, segment_bytes), "sim").expect("format");
        let mut config = test_config("sim", seed);
        tune(&mut config);
        let store = Store::open(&mut disk, config).expect("open");
        let mut harness = Self {
            disk,
            store,
            seed,
            blocks: HashMap::new(),
            pending: HashMap::new(),
            next_tag: 1,
            next_content: 1,
            lba_range,
            volumes,
            acked_writes: 0,
            errors: Vec::new(),
            crashes: 0,
            reopen: 0,
            tune,
            total: disk_layout::StoreStats::default(),
        };
        harness.reset_model_to_zero();
        harness
    }

    fn reset_model_to_zero(&mut self) {
        self.blocks.clear();
        for &volume in &self.volumes {
            for lba in 0..self.lba_range {
                self.blocks.insert(
                    (volume, lba),
                    BlockModel {
                        history: vec![0],
                        acked: 0,
                    },
                );
            }
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    pub fn write(&mut self, volume: u64, lba: u64, count: u64) {
        let tag = self.tag();
        let mut data = Vec::with_capacity(count as usize * BLOCK);
        let mut positions = Vec::new();
        for offset in 0..count {
            let content = self.next_content;
            self.next_content += 1;
            data.extend(block_content(volume, lba + offset, content));
            let model = self.blocks.get_mut(&(volume, lba + offset)).unwrap();
            model.history.push(content);
            positions.push(model.history.len() - 1);
        }
        self.pending.insert(tag, Pending::Write { volume, lba, positions });
        self.store.write(tag, volume, lba, &data, 1, tag);
        self.after_request();
    }

    pub fn zero(&mut self, volume: u64, lba: u64, count: u64) {
        let tag = self.tag();
        let mut positions = Vec::new();
        for offset in 0..count {
            let model = self.blocks.get_mut(&(volume, lba + offset)).unwrap();
            model.history.push(0);
            positions.push(model.history.len() - 1);
        }
        self.pending.insert(tag, Pending::Zero { volume, lba, positions });
        self.store.zero(tag, volume, lba, count, 1, tag);
        self.after_request();
    }

    pub fn delete(&mut self, volume: u64) {
        let tag = self.tag();
        let mut positions = Vec::new();
        for lba in 0..self.lba_range {
            let model = self.blocks.get_mut(&(volume, lba)).unwrap();
            model.history.push(0);
            positions.push((lba, model.history.len() - 1));
        }
        self.pending.insert(tag, Pending::Delete { volume, positions });
        self.store.delete_volume(tag, volume);
        self.after_request();
    }

    /// `target` becomes a copy of `source` as submitted so far.
    pub fn clone_volume(&mut self, source: u64, target: u64) {
        let tag = self.tag();
        let mut positions = Vec::new();
        for lba in 0..self.lba_range {
            let content = *self.blocks[&(source, lba)].history.last().unwrap();
            let model = self.blocks.get_mut(&(target, lba)).unwrap();
            model.history.push(content);
            positions.push((lba, model.history.len() - 1));
        }
        self.pending.insert(tag, Pending::Clone { target, positions });
        self.store.clone_volume(tag, source, target, 1, tag);
        self.after_request();
    }

    pub fn read(&mut self, volume: u64, lba: u64, count: u64) {
        self.read_with(volume, lba, count, false);
    }

    /// As `read`, through `Store::scan` (a pass that never re-sequences).
    pub fn scan(&mut self, volume: u64, lba: u64, count: u64) {
        self.read_with(volume, lba, count, true);
    }

    fn read_with(&mut self, volume: u64, lba: u64, count: u64, scan: bool) {
        let tag = self.tag();
        let acked_at_submit = (lba..lba + count).map(|l| self.blocks[&(volume, l)].acked).collect();
        self.pending.insert(
            tag,
            Pending::Read {
                volume,
                lba,
                acked_at_submit,
            },
        );
        let disk = &mut self.disk;
        if scan {
            self.store.scan(disk, tag, volume, lba, count);
        } else {
            self.store.read(disk, tag, volume, lba, count);
        }
        self.after_request();
    }

    pub fn flush(&mut self) {
        let tag = self.tag();
        self.pending.insert(tag, Pending::Flush);
        self.store.flush(tag);
        self.after_request();
    }

    fn after_request(&mut self) {
        self.store.tick(&mut self.disk);
        self.collect();
    }

    /// Lets the device complete some requests.
    pub fn step(&mut self) {
        for completion in self.disk.run_some() {
            self.store.on_completion(&mut self.disk, completion);
        }
        self.store.tick(&mut self.disk);
        // Each step stands for an interval: two in a row without a request between are idle.
        self.store.interval(&mut self.disk);
        self.collect();
    }

    /// Runs until nothing is in flight (bounded); then the live counts
    /// must match the index.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            self.store.tick(&mut self.disk);
            self.store.interval(&mut self.disk);
            if self.disk.in_flight() == 0 {
                self.collect();
                if self.disk.in_flight() == 0 && (self.store.is_quiescent() || self.store.is_failed()) {
                    if let Err(problem) = self.store.verify_live_counts() {
                        panic!("seed={}: after settling: {problem}", self.seed);
                    }
                    return;
                }
            }
            for completion in self.disk.run_all() {
                self.store.on_completion(&mut self.disk, completion);
            }
            self.collect();
            if self.disk.in_flight() == 0 && !self.store.is_quiescent() {
                // A checkpoint encoded on its own thread (`CheckpointEncoding::Background`).
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        panic!("seed={}: store did not settle", self.seed);
    }

    fn collect(&mut self) {
        let mut done: Vec<Done> = Vec::new();
        self.store.drain_done(&mut done);
        for Done { tag, result } in done {
            let pending = self
                .pending
                .remove(&tag)
                .unwrap_or_else(|| panic!("seed={}: unknown tag {tag}", self.seed));
            match (pending, result) {
                (Pending::Write { volume, lba, positions }, Ok(Reply::Written)) => {
                    self.acked_writes += 1;
                    for (offset, position) in positions.into_iter().enumerate() {
                        self.ack(volume, lba + offset as u64, position);
                    }
                }
                (Pending::Zero { volume, lba, positions }, Ok(Reply::Zeroed)) => {
                    for (offset, position) in positions.into_iter().enumerate() {
                        self.ack(volume, lba + offset as u64, position);
                    }
                }
                (Pending::Delete { volume, positions }, Ok(Reply::Deleted)) => {
                    for (lba, position) in positions {
                        self.ack(volume, lba, position);
                    }
                }
                (Pending::Clone { target, positions }, Ok(Reply::Cloned)) => {
                    for (lba, position) in positions {
                        self.ack(target, lba, position);
                    }
                }
                (
                    Pending::Read {
                        volume,
                        lba,
                        acked_at_submit,
                    },
                    Ok(Reply::Read(buf)),
                ) => {
                    for (offset, block) in buf.as_slice().chunks(BLOCK).enumerate() {
                        let got = decode_content(volume, lba + offset as u64, block);
                        let model = &self.blocks[&(volume, lba + offset as u64)];
                        // Acknowledged before the read: must be seen (or something newer).
                        let from = acked_at_submit[offset];
                        assert!(
                            model.history[from..].contains(&got),
                            "seed={}: read of volume {volume} block {} returned content {got}; acknowledged {} (history {:?})",
                            self.seed, lba + offset as u64, model.history[from], model.history
                        );
                    }
                }
                (Pending::Flush, Ok(Reply::Flushed)) => {}
                (_, Err(error)) => self.errors.push(error),
                (pending, Ok(reply)) => {
                    panic!("seed={}: {pending:?} answered with {reply:?}", self.seed)
                }
            }
        }
    }

    /// Completed writes acknowledged so far minus errors: for assertions.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Adds the open store's counters to `total`.
    pub fn add_stats(&mut self) {
        let s = self.store.stats();
        let t = &mut self.total;
        t.user_blocks_written += s.user_blocks_written;
        t.relocated_blocks_written += s.relocated_blocks_written;
        t.resequenced_blocks_written += s.resequenced_blocks_written;
        t.background_resequence_reads += s.background_resequence_reads;
        t.header_blocks_written += s.header_blocks_written;
        t.checkpoints += s.checkpoints;
        t.segments_cleaned += s.segments_cleaned;
        t.checksum_errors += s.checksum_errors;
        t.batches_written += s.batches_written;
        t.discarded_bytes += s.discarded_bytes;
        t.discard_failures += s.discard_failures;
    }

    fn ack(&mut self, volume: u64, lba: u64, position: usize) {
        let model = self.blocks.get_mut(&(volume, lba)).unwrap();
        model.acked = model.acked.max(position);
    }

    /// Crashes the disk at this instant, reopens and checks every block.
    pub fn crash_and_verify(&mut self) {
        self.crashes += 1;
        self.reopen += 1;
        self.add_stats();
        let crash_seed = self.seed.wrapping_mul(31).wrapping_add(self.reopen);
        let mut crashed = self.disk.crash(crash_seed);
        let mut config = test_config("sim", self.seed);
        config.open_nonce = crash_seed;
        (self.tune)(&mut config);
        let store =
            Store::open(&mut crashed, config).unwrap_or_else(|e| panic!("seed={}: reopen failed: {e}", self.seed));
        self.disk = crashed;
        self.store = store;
        self.pending.clear();
        if let Err(problem) = self.store.verify_live_counts() {
            panic!("seed={}: after reopen: {problem}", self.seed);
        }
        self.verify_all_blocks();
    }

    /// Reads every block of every volume and checks it against the model;
    /// then the observed state becomes the new baseline.
    pub fn verify_all_blocks(&mut self) {
        let mut observed: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for volume in self.volumes.clone() {
            let mut lba = 0;
            while lba < self.lba_range {
                let count = (self.lba_range - lba).min(64);
                let tag = self.tag();
                self.store.read(&mut self.disk, tag, volume, lba, count);
                let buf = self.wait_for_read(tag);
                for (offset, block) in buf.chunks(BLOCK).enumerate() {
                    let block_lba = lba + offset as u64;
                    let got = decode_content(volume, block_lba, block);
                    let model = &self.blocks[&(volume, block_lba)];
                    assert!(
                        model.history[model.acked..].contains(&got),
                        "seed={}: after crash volume {volume} block {block_lba} holds content {got}; acknowledged {} (history {:?})",
                        self.seed, model.history[model.acked], model.history
                    );
                    observed.insert((volume, block_lba), got);
                }
                lba += count;
            }
        }
        for ((volume, lba), content) in observed {
            self.blocks.insert(
                (volume, lba),
                BlockModel {
                    history: vec![content],
                    acked: 0,
                },
            );
        }
    }

    fn wait_for_read(&mut self, tag: u64) -> Vec<u8> {
        for _ in 0..10_000 {
            let mut done = Vec::new();
            self.store.drain_done(&mut done);
            if let Some(d) = done.pop() {
                assert!(done.is_empty(), "seed={}: unexpected completions", self.seed);
                assert_eq!(d.tag, tag, "seed={}: unexpected completion", self.seed);
                match d.result {
                    Ok(Reply::Read(buf)) => return buf.as_slice().to_vec(),
                    other => panic!("seed={}: verification read failed: {other:?}", self.seed),
                }
            }
            for completion in self.disk.run_all() {
                self.store.on_completion(&mut self.disk, completion);
            }
            self.store.tick(&mut self.disk);
        }
        panic!("seed={}: verification read never finished", self.seed);
    }
}
