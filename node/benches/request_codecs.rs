//! Micro-benchmarks of the per-request work above the store: parsing an NBD
//! request and encoding its reply, and encrypting / decrypting a block of an
//! encrypted volume (AES-256-XTS). Together with `disk-layout`'s
//! `hot_paths` they bound the CPU a request costs before the kernel's share
//! (TCP, io_uring, thread wake-ups), which `ballast-perf nbd` measures whole.
//!
//! `cargo bench -p node --bench request_codecs` measures; `cargo test
//! --benches` runs each once.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use node::nbd::proto::{self, Request, CMD_WRITE};
use node::volume::crypt::{VolumeCipher, VolumeKey};

fn nbd_codec(c: &mut Criterion) {
    let header = proto::encode_request(&Request {
        flags: 0,
        command: CMD_WRITE,
        cookie: 0x1234,
        offset_bytes: 1 << 30,
        length_bytes: 4096,
    });
    let mut group = c.benchmark_group("nbd");
    group.bench_function("parse a request header", |b| {
        b.iter(|| proto::parse_request(black_box(&header)).expect("valid request"));
    });
    group.bench_function("encode a simple reply", |b| {
        b.iter(|| proto::simple_reply(black_box(0x1234), 0));
    });
    group.bench_function("encode a structured read reply header", |b| {
        b.iter(|| {
            proto::structured_header(
                black_box(0x1234),
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                4104,
            )
        });
    });
    group.finish();
}

fn encryption(c: &mut Criterion) {
    let cipher = VolumeCipher::new(&VolumeKey::generate());
    let mut data: Vec<u8> = std::iter::successors(Some(1u8), |byte| Some(byte.wrapping_add(31)))
        .take(64 * 1024)
        .collect();
    let mut group = c.benchmark_group("encryption (AES-256-XTS)");
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("encrypt one 4 KiB block", |b| {
        b.iter(|| cipher.encrypt_blocks(black_box(7), &mut data[..4096]));
    });
    group.bench_function("decrypt one 4 KiB block", |b| {
        b.iter(|| cipher.decrypt_blocks(black_box(7), &mut data[..4096]));
    });
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("encrypt 64 KiB", |b| {
        b.iter(|| cipher.encrypt_blocks(black_box(7), &mut data));
    });
    group.finish();
}

criterion_group!(benches, nbd_codec, encryption);
criterion_main!(benches);
