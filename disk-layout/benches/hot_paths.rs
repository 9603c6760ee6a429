//! Micro-benchmarks of the store's hot paths, without a device: the checksum
//! of every block, the batch header codec, the index, and the whole store
//! (engine-direct) writing and reading over an in-memory disk. What fio sees
//! through NBD is in `ballast-perf`; these say which part of a request's CPU
//! cost is the store's own.
//!
//! `cargo bench -p disk-layout` measures; `cargo test --benches` (part of
//! `scripts/test.sh`) runs each once, so they keep building and working.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use disk_layout::index::{Entry, Index};
use disk_layout::record::{block_crc, BatchHeader, Record, RecordKind, BATCH_HEADER_BYTES, RECORDS_PER_BATCH_MAX};
use disk_layout::sim_disk::{SimDisk, SimRng};
use disk_layout::{Done, FormatParams, Store, StoreConfig};

const BLOCK: usize = 4096;

/// `len` bytes counting up by `step` (not compressible into a run, not zero).
fn pattern(len: usize, step: u8) -> Vec<u8> {
    std::iter::successors(Some(1u8), |byte| Some(byte.wrapping_add(step)))
        .take(len)
        .collect()
}

fn checksum(c: &mut Criterion) {
    let block = pattern(BLOCK, 7);
    let mut group = c.benchmark_group("checksum");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    group.bench_function("crc32c of one 4 KiB block", |b| b.iter(|| block_crc(black_box(&block))));
    group.finish();
}

fn full_header() -> BatchHeader {
    let records = (0..RECORDS_PER_BATCH_MAX as u64)
        .map(|i| Record {
            volume_id: 7,
            lba: i * 97,
            block_count: 1,
            kind: RecordKind::Write,
            epoch: 3,
            volume_sequence: 1000 + i,
            data_crc: 0xdead_beef ^ u32::try_from(i).expect("few records"),
            relocated_from: 0,
        })
        .collect();
    BatchHeader {
        durable_window: 4,
        sequence: 123_456,
        previous_header_crc: 42,
        segment_index: 9,
        next_segment_index: 10,
        open_nonce: 77,
        records,
    }
}

fn batch_header_codec(c: &mut Criterion) {
    let header = full_header();
    let mut block = vec![0u8; BATCH_HEADER_BYTES];
    header.encode_into(&mut block);
    let mut group = c.benchmark_group("batch header");
    group.throughput(Throughput::Elements(header.records.len() as u64));
    group.bench_function("encode (full header)", |b| {
        let mut out = vec![0u8; BATCH_HEADER_BYTES];
        b.iter(|| black_box(&header).encode_into(&mut out));
    });
    group.bench_function("decode and verify (full header)", |b| {
        b.iter(|| BatchHeader::decode(black_box(&block)).expect("valid header"));
    });
    group.finish();
}

/// Blocks of the index benchmarks' volume: 2 GiB.
const VOLUME_BLOCKS: u64 = (2 << 30) / BLOCK as u64;

fn index(c: &mut Criterion) {
    let mut rng = SimRng::new(1);
    let mut index = Index::default();
    for lba in 0..VOLUME_BLOCKS {
        index.volume_mut(1).set(
            lba,
            Entry {
                address: lba + 1,
                crc: 1,
            },
        );
    }
    let mut group = c.benchmark_group("index (2 GiB volume, fully mapped)");
    group.bench_function("get, random block", |b| {
        b.iter(|| index.get(1, rng.below(VOLUME_BLOCKS)));
    });
    group.bench_function("set, random block", |b| {
        b.iter(|| {
            let lba = rng.below(VOLUME_BLOCKS);
            index.volume_mut(1).set(lba, Entry { address: 5, crc: 2 })
        });
    });
    // A 1 MiB write over mapped data, as the log places it: 256 blocks at
    // consecutive new addresses.
    let mut next_address = VOLUME_BLOCKS + 1;
    group.bench_function("set, 256 blocks of a sequential overwrite", |b| {
        b.iter(|| {
            let first = rng.below(VOLUME_BLOCKS - 256);
            for offset in 0..256 {
                index.volume_mut(1).set(
                    first + offset,
                    Entry {
                        address: next_address + offset,
                        crc: 3,
                    },
                );
            }
            next_address = (next_address + 256) % (1 << 39) + 1;
        });
    });
    group.finish();
}

/// A formatted, opened store over an in-memory disk.
fn store_on_sim_disk() -> (Store, SimDisk) {
    const DISK_BYTES: usize = 512 << 20;
    let mut disk = SimDisk::new(DISK_BYTES, 1);
    let params = FormatParams {
        disk_size_bytes: DISK_BYTES as u64,
        segment_size_bytes: 8 << 20,
        cluster_uuid: [1; 16],
        node_uuid: [2; 16],
        disk_uuid: [3; 16],
        created_unix_seconds: 1,
    };
    Store::format(&mut disk, &params, "bench").expect("format");
    let mut config = StoreConfig::new("bench", Some([2; 16]), 1);
    config.durable_writes = true;
    let store = Store::open(&mut disk, config).expect("open");
    (store, disk)
}

/// Runs the store and its disk until `expected` requests are answered.
fn complete(store: &mut Store, disk: &mut SimDisk, expected: usize, done: &mut Vec<Done>) {
    done.clear();
    for _ in 0..10_000 {
        store.tick(disk);
        store.drain_done(done);
        if done.len() >= expected {
            assert!(done.iter().all(|d| d.result.is_ok()), "a benchmark request failed");
            return;
        }
        for completion in disk.run_all() {
            store.on_completion(disk, completion);
        }
        store.drain_done(done);
    }
    panic!("the store answered {} of {expected} requests", done.len());
}

/// Requests in flight per round, as fio's QD32 keeps them.
const QUEUE_DEPTH: usize = 32;
/// The part of the volume the store benchmarks write (the store keeps room to clean).
const SPAN_BLOCKS: u64 = 32 * 1024;

fn store_engine(c: &mut Criterion) {
    let (mut store, mut disk) = store_on_sim_disk();
    let data = pattern(BLOCK, 13);
    let mut done = Vec::new();
    let mut rng = SimRng::new(2);
    let mut tag = 0;
    // Map every block first, so reads read and the cleaner has work like a used disk's.
    for chunk in 0..SPAN_BLOCKS / 256 {
        let big = data.repeat(256);
        store.write(tag, 1, chunk * 256, &big, 1, tag);
        tag += 1;
        complete(&mut store, &mut disk, 1, &mut done);
    }
    let mut group = c.benchmark_group("store engine-direct (in-memory disk)");
    group.throughput(Throughput::Elements(QUEUE_DEPTH as u64));
    group.bench_function("32 random 4 KiB writes, durable", |b| {
        b.iter(|| {
            for _ in 0..QUEUE_DEPTH {
                store.write(tag, 1, rng.below(SPAN_BLOCKS), &data, 1, tag);
                tag += 1;
            }
            complete(&mut store, &mut disk, QUEUE_DEPTH, &mut done);
        });
    });
    group.bench_function("32 random 4 KiB reads", |b| {
        b.iter(|| {
            for _ in 0..QUEUE_DEPTH {
                store.read(&mut disk, tag, 1, rng.below(SPAN_BLOCKS), 1);
                tag += 1;
            }
            complete(&mut store, &mut disk, QUEUE_DEPTH, &mut done);
        });
    });
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("one 1 MiB sequential write, durable", |b| {
        let big = data.repeat(256);
        let mut lba = 0;
        b.iter_batched(
            || {
                lba = (lba + 256) % SPAN_BLOCKS;
                lba
            },
            |lba| {
                store.write(tag, 1, lba, &big, 1, tag);
                tag += 1;
                complete(&mut store, &mut disk, 1, &mut done);
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// A checkpoint's payload of a 2 GiB volume, measured as the store writes
/// one (its size, then the bytes): how long a checkpoint holds the thread
/// that encodes it per GiB of data mapped (the reactor's, with
/// `CheckpointEncoding::Inline`); and the copy of the index a checkpoint
/// encoded in the background takes on the reactor instead.
fn checkpoint_payload(c: &mut Criterion) {
    use disk_layout::checkpoint::{encode_payload, PayloadPlan};
    let mut sequential = Index::default();
    let mut random = Index::default();
    for lba in 0..VOLUME_BLOCKS {
        sequential.volume_mut(1).set(
            lba,
            Entry {
                address: lba + 1,
                crc: 1,
            },
        );
        let scrambled = (lba * 389) % VOLUME_BLOCKS;
        random.volume_mut(1).set(
            scrambled,
            Entry {
                address: lba + 1,
                crc: 1,
            },
        );
    }
    let mut group = c.benchmark_group("checkpoint payload (2 GiB volume)");
    group.sample_size(10);
    for (name, index) in [("sequential", &sequential), ("random", &random)] {
        let mut out = vec![0u8; PayloadPlan::new(index, 0).bytes()];
        group.throughput(Throughput::Bytes(out.len() as u64));
        group.bench_function(format!("size and encode, {name} data"), |b| {
            b.iter(|| {
                let plan = PayloadPlan::new(black_box(index), 0);
                encode_payload(index, &plan, &[], &mut out[..plan.bytes()])
            });
        });
        group.bench_function(format!("freeze the index for the background, {name} data"), |b| {
            b.iter(|| black_box(index).clone());
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    checksum,
    batch_header_codec,
    index,
    store_engine,
    checkpoint_payload
);
criterion_main!(benches);
