//! Multifd channel work per page, against references measured in the same run:
//! - zero-page detection (`ram::is_zero_page`) versus memcpy of the same bytes;
//! - one channel's packet building (zero detection, hashing, staging copy, compression)
//!   with zstd-1 and zlib-1 versus the zstd and flate2 libraries compressing the same
//!   pages in one call on one thread;
//! - two channels (threads) versus one on the same pages.
//!
//! Data sets of 32 MiB: all-zero, text-like (4 KiB pages of files under /usr/lib:
//! libraries, text, data), random, and a mix (30% zero, 50% /usr/lib, 20% random).
//! Run: `cargo bench -p migration --bench multifd`.

use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use migration::multifd::{Method, PacketBuilder};
use ram::{is_zero_page, PAGE_SIZE};

const SET_BYTES: usize = 32 << 20;
const PAGES: usize = SET_BYTES / PAGE_SIZE;

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Pages of files under /usr/lib (falls back to generated text when there are too few).
fn usr_lib_bytes(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut stack = vec![std::path::PathBuf::from("/usr/lib")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if out.len() >= n {
                break;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() && meta.len() >= PAGE_SIZE as u64 {
                if let Ok(b) = std::fs::read(&p) {
                    let whole = b.len() / PAGE_SIZE * PAGE_SIZE;
                    let take = whole.min(n - out.len()).min(1 << 20);
                    out.extend_from_slice(&b[..take]);
                }
            }
        }
    }
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789\n";
    while out.len() < n {
        out.extend_from_slice(&line[..line.len().min(n - out.len())]);
    }
    out
}

fn data_sets() -> Vec<(&'static str, Vec<u8>)> {
    let lib = usr_lib_bytes(SET_BYTES);
    let random = random_bytes(SET_BYTES, 0x1234_5678);
    let mut mix = Vec::with_capacity(SET_BYTES);
    for i in 0..PAGES {
        let page = &mut [0u8; PAGE_SIZE];
        match i % 10 {
            0..=2 => {}
            3..=7 => page.copy_from_slice(&lib[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]),
            _ => page.copy_from_slice(&random[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]),
        }
        mix.extend_from_slice(page);
    }
    vec![
        ("zero", vec![0u8; SET_BYTES]),
        ("usr-lib", lib),
        ("random", random),
        ("mix", mix),
    ]
}

fn zero_detection(c: &mut Criterion) {
    let zero = vec![0u8; SET_BYTES];
    let mut dst = vec![1u8; SET_BYTES];
    let mut g = c.benchmark_group("zero_detect_vs_memcpy");
    g.throughput(Throughput::Bytes(SET_BYTES as u64));
    g.sample_size(20);
    g.bench_function("is_zero_page", |b| {
        b.iter(|| {
            black_box(&zero)
                .chunks_exact(PAGE_SIZE)
                .filter(|p| is_zero_page(p))
                .count()
        })
    });
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&zero));
            black_box(&dst);
        })
    });
    g.finish();
}

/// One channel's work: build every packet of `data` with a reused builder.
fn channel_pass(builder: &mut PacketBuilder, data: &[u8], first_page: u64) -> usize {
    let mut sent = 0;
    let mut list: Vec<(u64, &[u8])> = Vec::with_capacity(128);
    for (n, chunk) in data.chunks(128 * PAGE_SIZE).enumerate() {
        list.clear();
        for (i, page) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
            list.push(((first_page + (n * 128 + i) as u64) * PAGE_SIZE as u64, page));
        }
        builder.build(&list, n as u64, 1);
        sent += builder.head().len() + builder.data_len();
    }
    sent
}

fn compression(c: &mut Criterion) {
    for (name, data) in data_sets() {
        let mut g = c.benchmark_group(format!("channel_vs_library/{name}"));
        g.throughput(Throughput::Bytes(SET_BYTES as u64));
        g.sample_size(10);
        for (method, label) in [
            (Method::None, "none"),
            (Method::Zstd, "zstd-1"),
            (Method::Zlib, "zlib-1"),
        ] {
            let mut b1 = PacketBuilder::new(method, 1).expect("builder");
            let sent = channel_pass(&mut b1, &data, 0);
            eprintln!(
                "{name} {label}: one channel sends {sent} bytes for {SET_BYTES} ({:.2}x)",
                SET_BYTES as f64 / sent as f64
            );
            g.bench_function(BenchmarkId::new("channel", label), |b| {
                b.iter(|| channel_pass(&mut b1, black_box(&data), 0))
            });
        }
        g.bench_function(BenchmarkId::new("library", "zstd-1"), |b| {
            let mut out = Vec::with_capacity(SET_BYTES + (SET_BYTES >> 7) + 1024);
            let mut cctx = zstd::bulk::Compressor::new(1).expect("zstd");
            b.iter(|| {
                out.clear();
                black_box(
                    cctx.compress_to_buffer(black_box(&data[..]), &mut out)
                        .expect("zstd"),
                )
            })
        });
        g.bench_function(BenchmarkId::new("library", "zlib-1"), |b| {
            b.iter(|| {
                let mut e = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(SET_BYTES),
                    flate2::Compression::new(1),
                );
                e.write_all(black_box(&data)).expect("zlib");
                black_box(e.finish().expect("zlib").len())
            })
        });
        g.finish();
    }
}

/// Channels as threads, each building the packets of its share of the pages.
fn scaling(c: &mut Criterion) {
    let sets = data_sets();
    let Some((_, mix)) = sets.iter().find(|(n, _)| *n == "mix") else {
        return;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("channels_zstd-1/mix");
    g.throughput(Throughput::Bytes(SET_BYTES as u64));
    g.sample_size(10);
    // At least two channels even where the reported parallelism is lower, at most four.
    for channels in 1..=cores.clamp(2, 4) {
        let mut builders: Vec<PacketBuilder> = (0..channels)
            .map(|_| PacketBuilder::new(Method::Zstd, 1).expect("builder"))
            .collect();
        g.bench_function(BenchmarkId::from_parameter(channels), |b| {
            b.iter(|| {
                let share = mix.len() / channels / PAGE_SIZE * PAGE_SIZE;
                std::thread::scope(|s| {
                    for (i, builder) in builders.iter_mut().enumerate() {
                        let part = &mix[i * share..(i + 1) * share];
                        s.spawn(move || {
                            channel_pass(builder, part, (i * share / PAGE_SIZE) as u64)
                        });
                    }
                });
            })
        });
    }
    g.finish();
}

criterion_group!(benches, zero_detection, compression, scaling);
criterion_main!(benches);
