//! The fuzz targets' seed corpora (fuzz/corpus/) are real, complete inputs: every seed of
//! the stream readers loads to the end without a suspect page, and every multifd seed is a
//! valid channel whose packets decode and decompress to pages matching their hashes.
//!
//! The multifd seeds are written by this test's builder: run it with
//! `FERRY_WRITE_FUZZ_SEEDS=1` to write them again after a format change. The stream and
//! snapshot seeds come from real guests (see fuzz/README.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use migration::dest::loader::{load_stream, LoadProgress, RamLoader};
use migration::multifd::compress::Decompressor;
use migration::multifd::packet::{
    Handshake, Method, PacketHeader, PacketPages, HANDSHAKE_LEN, PACKET_HEADER_LEN,
};
use migration::multifd::PacketBuilder;
use migration::stream::frame::FrameReader;
use migration::stream::header::{Header, FEATURE_SNAPSHOT};
use ram::{page_hash, Backend, GuestRam, MemoryConfig, PAGE_SIZE};

const RAM_SIZE: u64 = 4 << 20;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus(target))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("seed-"))
                })
                .filter_map(|p| {
                    let name = p.file_name()?.to_str()?.to_string();
                    Some((name, std::fs::read(&p).ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn ram() -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(&MemoryConfig {
            size: RAM_SIZE,
            backend: Backend::AnonymousPrivate,
            ..MemoryConfig::default()
        })
        .expect("guest RAM"),
    )
}

struct NoProgress;

impl LoadProgress for NoProgress {
    fn pass_end(&mut self, _pass: u64) -> migration::error::Result<()> {
        Ok(())
    }
}

/// Loads a stream seed (control byte 0, then the stream) and returns its header.
fn load_seed(name: &str, seed: &[u8]) -> Header {
    assert_eq!(
        seed.first(),
        Some(&0),
        "{name}: control byte 0 (reseal) first"
    );
    let mut input = &seed[1..];
    let header = Header::read_from(&mut input).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(header.ram_size, RAM_SIZE, "{name}: a 4 MiB guest");
    let ram = ram();
    let mut reader = FrameReader::new(input);
    let mut loader = RamLoader::new(&ram, true);
    let state = load_stream(&mut reader, &mut loader, &mut NoProgress)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    loader
        .check_complete()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(!state.is_empty(), "{name}: carries the VM state");
    header
}

#[test]
fn stream_load_seeds_load_completely() {
    let all = seeds("stream_load");
    assert!(all.len() >= 2, "stream_load seeds: {}", all.len());
    for (name, seed) in &all {
        load_seed(name, seed);
    }
}

#[test]
fn snapshot_restore_seeds_are_complete_snapshots() {
    let all = seeds("snapshot_restore");
    assert!(all.len() >= 2, "snapshot_restore seeds: {}", all.len());
    for (name, seed) in &all {
        let header = load_seed(name, seed);
        assert!(header.has(FEATURE_SNAPSHOT), "{name}: a snapshot");
        let state = &seed[seed.len().saturating_sub(4096)..];
        assert!(
            state.windows(9).any(|w| w == b"\"devices\""),
            "{name}: a VM state document"
        );
    }
}

/// Page `i` of a seed: text, a counter pattern or zeros, as a guest's memory holds them.
fn page(i: u64) -> Vec<u8> {
    match i % 4 {
        0 => b"ferry multifd seed: the quick brown fox jumps over the lazy dog\n"
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect(),
        1 => (0..PAGE_SIZE as u64)
            .map(|b| (b.wrapping_mul(i + 7) >> 3) as u8)
            .collect(),
        2 => vec![0; PAGE_SIZE],
        _ => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i;
            (0..PAGE_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        }
    }
}

/// A channel as the source writes it: control byte 0, handshake, two packets of pass 1,
/// the pass's SYNC packet.
fn build_channel(method: Method) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(
        &Handshake {
            uuid: *b"ferry-fuzz-seed!",
            id: 0,
            channels: 2,
            method,
        }
        .encode(),
    );
    let mut b = PacketBuilder::new(method, 1).expect("compressor");
    let batches: [&[u64]; 3] = [&[0, 1, 2, 3, 9], &[20, 21, 22, 40], &[]];
    for (num, pages) in batches.iter().enumerate() {
        let data: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|&p| (p * PAGE_SIZE as u64, page(p)))
            .collect();
        let refs: Vec<(u64, &[u8])> = data.iter().map(|(o, d)| (*o, &d[..])).collect();
        b.build(&refs, num as u64 + 1, 1);
        let mut head = b.head().to_vec();
        if pages.is_empty() {
            // The SYNC packet ending the pass.
            head[8] |= 1;
            let body = head.len() - 8;
            let sum = xxhash_rust::xxh3::xxh3_64(&head[..body]);
            head[body..].copy_from_slice(&sum.to_le_bytes());
        }
        out.extend_from_slice(&head);
        match b.data() {
            Some(d) => out.extend_from_slice(d),
            None => {
                for (i, (_, d)) in data.iter().enumerate() {
                    if b.is_normal(i) {
                        out.extend_from_slice(d);
                    }
                }
            }
        }
    }
    out
}

/// Decodes a channel seed; returns (packets, normal pages, zero pages).
fn decode_channel(name: &str, seed: &[u8]) -> (usize, usize, usize) {
    assert_eq!(seed.first(), Some(&0), "{name}: control byte 0 first");
    let mut input = &seed[1..];
    let hs: &[u8; HANDSHAKE_LEN] = input[..HANDSHAKE_LEN].try_into().expect("handshake");
    let hs = Handshake::decode(hs).unwrap_or_else(|e| panic!("{name}: {e}"));
    input = &input[HANDSHAKE_LEN..];
    let mut dec = Decompressor::new(hs.method).expect("decompressor");
    let (mut packets, mut normal, mut zero) = (0, 0, 0);
    let mut pages = PacketPages::default();
    while !input.is_empty() {
        let head: &[u8; PACKET_HEADER_LEN] = input[..PACKET_HEADER_LEN].try_into().expect("header");
        let h = PacketHeader::decode(head, hs.method).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tail = &input[PACKET_HEADER_LEN..PACKET_HEADER_LEN + h.tail_len()];
        pages
            .decode_tail(head, &h, tail, RAM_SIZE)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        input = &input[PACKET_HEADER_LEN + h.tail_len()..];
        let area = &input[..h.next_packet_size as usize];
        input = &input[h.next_packet_size as usize..];
        let mut bytes = vec![0u8; pages.normal.len() * PAGE_SIZE];
        if h.is_compressed() && !pages.normal.is_empty() {
            dec.decompress(area, &mut bytes)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            bytes.copy_from_slice(area);
        }
        for (i, &(offset, hash)) in pages.normal.iter().enumerate() {
            let b = &bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            assert_eq!(page_hash(b), hash, "{name}: page {offset:#x}");
            assert_eq!(b, &page(offset / PAGE_SIZE as u64)[..], "{name}: page data");
        }
        packets += 1;
        normal += pages.normal.len();
        zero += pages.zero.len();
    }
    (packets, normal, zero)
}

#[test]
fn multifd_seeds_are_valid_channels() {
    let write = std::env::var_os("FERRY_WRITE_FUZZ_SEEDS").is_some();
    for method in [Method::None, Method::Zlib, Method::Zstd] {
        let name = format!("seed-{}", method.name());
        let path = corpus("multifd_packet").join(&name);
        if write {
            std::fs::create_dir_all(corpus("multifd_packet")).expect("corpus dir");
            std::fs::write(&path, build_channel(method)).expect("write seed");
        }
        let seed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            decode_channel(&name, &seed),
            (3, 7, 2),
            "{name}: 3 packets, 7 normal and 2 zero pages"
        );
    }
}
