//! XBZRLE encode and decode of 4 KiB pages with 0.1%, 1%, 10% and 50% of
//! bytes changed (spread at random), each group with a 4 KiB memcpy as the
//! yardstick; the encode group also runs a step-for-step model of QEMU's
//! scalar encoder (tests/xbzrle_qemu_model.rs) on the same pages, and a
//! third group compares the encoder's kernels at 1%.
//!
//! `CARGO_TARGET_DIR=/work/target-h2 cargo bench -p migration --bench xbzrle`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use migration::xbzrle::{decode, encode, encode_with, Kernel};

#[path = "../tests/xbzrle_qemu_model.rs"]
#[allow(dead_code, unused_imports)]
mod qemu_model;

const PAGE: usize = 4096;

/// Changed-byte fractions, in tenths of a percent.
const DENSITIES: [(u32, &str); 4] = [(1, "0.1%"), (10, "1%"), (100, "10%"), (500, "50%")];

/// xorshift64: deterministic pages without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A random page and a copy with `per_mille` / 1000 of its bytes changed,
/// at distinct random offsets.
fn page_pair(per_mille: u32, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(seed);
    let old: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
    let mut new = old.clone();
    let changes = (PAGE * per_mille as usize).div_ceil(1000);
    let mut offsets: Vec<usize> = (0..PAGE).collect();
    for i in 0..changes {
        let j = i + (rng.next() as usize) % (PAGE - i);
        offsets.swap(i, j);
        new[offsets[i]] ^= (rng.next() as u8) | 1;
    }
    (old, new)
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("xbzrle_encode_4k");
    group.throughput(Throughput::Bytes(PAGE as u64));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let (old, _) = page_pair(0, 1);
    let mut dst = vec![0u8; PAGE];
    group.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&old)));
    });
    for (per_mille, label) in DENSITIES {
        let (old, new) = page_pair(per_mille, 0x5eed + u64::from(per_mille));
        let mut dst = vec![0u8; PAGE];
        group.bench_with_input(BenchmarkId::new("encode", label), &(), |b, _| {
            b.iter(|| encode(black_box(&old), black_box(&new), &mut dst));
        });
        group.bench_with_input(BenchmarkId::new("qemu-scalar-model", label), &(), |b, _| {
            b.iter(|| qemu_model::qemu_encode(black_box(&old), black_box(&new), &mut dst));
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("xbzrle_decode_4k");
    group.throughput(Throughput::Bytes(PAGE as u64));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let (old, _) = page_pair(0, 1);
    let mut dst = vec![0u8; PAGE];
    group.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&old)));
    });
    for (per_mille, label) in DENSITIES {
        let (old, new) = page_pair(per_mille, 0x5eed + u64::from(per_mille));
        // Room for any delta: at 50% it is larger than the page (the sender
        // would send the page whole), but the decoder's speed is measured.
        let mut delta = vec![0u8; 3 * PAGE];
        let n = encode(&old, &new, &mut delta).unwrap_or(0);
        delta.truncate(n);
        let mut page = old.clone();
        group.bench_with_input(BenchmarkId::new("decode", label), &(), |b, _| {
            b.iter(|| decode(black_box(&delta), &mut page));
        });
    }
    group.finish();
}

fn bench_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("xbzrle_encode_4k_1pct_kernels");
    group.throughput(Throughput::Bytes(PAGE as u64));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    let (old, new) = page_pair(10, 0x5eed + 10);
    let mut dst = vec![0u8; PAGE];
    for kernel in Kernel::ALL.into_iter().filter(|k| k.is_available()) {
        group.bench_function(kernel.name(), |b| {
            b.iter(|| encode_with(kernel, black_box(&old), black_box(&new), &mut dst));
        });
    }
    group.bench_function("qemu-scalar-model", |b| {
        b.iter(|| qemu_model::qemu_encode(black_box(&old), black_box(&new), &mut dst));
    });
    group.finish();
}

criterion_group!(benches, bench_encode, bench_decode, bench_kernels);
criterion_main!(benches);
