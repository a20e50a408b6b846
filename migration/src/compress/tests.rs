//! Legacy compression through the real sender and loader: pages sent by RamSender with a
//! compression pool are loaded by RamLoader with a decompression pool.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ram::{AtomicBitmap, GuestRam, PAGE_SIZE};

use super::*;
use crate::dest::loader::{load_stream, LoadProgress, RamLoader};
use crate::error::MigrationError;
use crate::info::{MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::source::ram_sender::RamSender;
use crate::stream::frame::{FrameKind, FrameReader, FrameWriter};
use crate::stream::ram::FLAG_COMPRESS;
use crate::test_pages::{anon_ram, fill_mixed};

const RAM_SIZE: u64 = 4 << 20;

fn new_ram() -> Arc<GuestRam> {
    anon_ram(RAM_SIZE)
}

/// Zero, text-like, random and repeated-byte pages.
fn fill(ram: &GuestRam, seed: u64) {
    fill_mixed(ram, seed, 0..ram.page_count());
}

struct NoProgress;

impl LoadProgress for NoProgress {
    fn pass_end(&mut self, _pass: u64) -> crate::error::Result<()> {
        Ok(())
    }
}

/// Sends all of `src` (two passes, the second over the odd pages after a change) with
/// a compression pool and returns the stream and the counters.
fn send(
    src: &Arc<GuestRam>,
    threads: u8,
    level: u8,
    wait: bool,
) -> (Vec<u8>, Arc<CompressCounters>) {
    let counters = MigrationCounters::new(0);
    let limiter = RateLimiter::with_limit(0);
    let cancel = AtomicBool::new(false);
    let cc = Arc::new(CompressCounters::default());
    let mut pool = CompressPool::start(src.clone(), threads, level, wait, cc.clone()).unwrap();
    let mut out = FrameWriter::new(Vec::new());
    for pass in 1..=2u64 {
        let bitmap = AtomicBitmap::new(src.page_count());
        if pass == 1 {
            bitmap.set_all();
        } else {
            // Change the odd pages (text, so it compresses) and send those again.
            for p in (1..src.page_count()).step_by(2) {
                let line = format!("pass 2, page {p}\n");
                let page: Vec<u8> = line.bytes().cycle().take(PAGE_SIZE).collect();
                src.write_page(p, &page).unwrap();
                bitmap.set(p);
            }
        }
        let mut sender =
            RamSender::new(src, &mut out, &counters, &limiter, &cancel, Phase::Precopy)
                .with_compress(Some(&mut pool));
        sender.send_bitmap(&bitmap, |_| Ok(())).unwrap();
        drop(sender);
        out.frame(FrameKind::PassEnd, &pass.to_le_bytes()).unwrap();
    }
    out.frame(FrameKind::State, b"state").unwrap();
    out.frame(FrameKind::End, &[0u8; 16]).unwrap();
    (out.into_inner(), cc)
}

fn load(stream: &[u8], dst: &Arc<GuestRam>, threads: u8) -> crate::error::Result<Vec<u8>> {
    load_checking(stream, dst, threads, true)
}

fn load_checking(
    stream: &[u8],
    dst: &Arc<GuestRam>,
    threads: u8,
    error_check: bool,
) -> crate::error::Result<Vec<u8>> {
    let mut reader = FrameReader::new(stream);
    let mut loader = RamLoader::new(dst, true);
    let pool = DecompressPool::start(dst.clone(), loader.book(), threads, error_check).unwrap();
    loader = loader.with_decompress(pool);
    load_stream(&mut reader, &mut loader, &mut NoProgress)
}

fn same_memory(a: &GuestRam, b: &GuestRam) -> bool {
    (0..a.page_count()).all(|p| a.page(p) == b.page(p))
}

/// Where the data of every COMPRESSED record is in a stream written by [`send`], its
/// length, and the page's RAM offset.
fn compressed_records(stream: &[u8]) -> Vec<(usize, usize, u64)> {
    let mut found = Vec::new();
    let mut at = 0usize;
    let u32_at = |o: usize| u32::from_le_bytes(stream[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(stream[o..o + 8].try_into().unwrap());
    while at < stream.len() {
        let (kind, len) = (stream[at], u32_at(at + 4));
        if kind == FrameKind::Ram as u8 {
            let entries = u32_at(at + 8);
            let mut data = at + 16 + entries * 24 + 8;
            for e in 0..entries {
                let entry = at + 16 + e * 24;
                let (word, arg) = (u64_at(entry), u64_at(entry + 8));
                let dlen = match word & 0xfff {
                    0x008 => PAGE_SIZE,
                    0x002 => 0,
                    _ => arg as usize,
                };
                if word & 0xfff == FLAG_COMPRESS {
                    found.push((data, dlen, word & !0xfff));
                }
                data += dlen;
            }
            at += 8 + len;
        } else {
            at += 8 + len + 8;
        }
    }
    found
}

#[test]
fn pages_round_trip_for_every_thread_count_and_level() {
    for (threads, level) in [(1, 0), (2, 1), (8, 9), (2, 9), (8, 0)] {
        let src = new_ram();
        fill(&src, 0);
        let (stream, cc) = send(&src, threads, level, true);
        let dst = new_ram();
        assert_eq!(load(&stream, &dst, 2).unwrap(), b"state");
        assert!(same_memory(&src, &dst), "threads {threads} level {level}");
        let s = cc.stats();
        // Text and repeated pages compress (and at level 0 are stored); random pages at
        // levels 1-9 do not shrink and go whole.
        assert!(s.pages > 0, "{s:?}");
        let records = compressed_records(&stream);
        assert_eq!(records.len() as u64, s.pages);
        if level == 0 {
            assert!(records.iter().all(|&(_, n, _)| n > PAGE_SIZE), "stored");
        } else {
            assert!(records.iter().all(|&(_, n, _)| n < PAGE_SIZE));
            assert!(s.compressed_size * 4 < s.pages * PAGE_SIZE as u64, "{s:?}");
        }
        assert_eq!(s.busy, 0, "the sender waits for a thread");
    }
}

#[test]
fn without_waiting_busy_threads_send_pages_raw() {
    let src = new_ram();
    fill(&src, 0);
    let (stream, cc) = send(&src, 1, 9, false);
    let s = cc.stats();
    assert!(s.busy > 0, "{s:?}");
    assert!(s.pages > 0, "{s:?}");
    let dst = new_ram();
    load(&stream, &dst, 1).unwrap();
    assert!(same_memory(&src, &dst));
}

#[test]
fn a_corrupt_compressed_page_fails_the_load_naming_the_page() {
    let src = new_ram();
    fill(&src, 0);
    let (mut stream, _) = send(&src, 2, 1, true);
    let records = compressed_records(&stream);
    // The last compressed record: no later copy of its page follows.
    let (at, len, _) = records[records.len() - 1];
    stream[at + len / 2] ^= 0x5a;
    let dst = new_ram();
    let e = load(&stream, &dst, 2).unwrap_err();
    assert!(matches!(e, MigrationError::Stream(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("compressed page at RAM offset 0x") && text.contains("corrupt zlib data"),
        "{text}"
    );
}

#[test]
fn a_compressed_page_is_refused_when_the_stream_did_not_announce_compression() {
    let src = new_ram();
    fill(&src, 0);
    let (stream, _) = send(&src, 1, 1, true);
    let dst = new_ram();
    let mut loader = RamLoader::new(&dst, true);
    let e = load_stream(
        &mut FrameReader::new(&stream[..]),
        &mut loader,
        &mut NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("did not announce compression"), "{e}");
}

#[test]
fn pool_reports_busy_only_without_wait() {
    let ram = new_ram();
    fill(&ram, 0);
    let cc = Arc::new(CompressCounters::default());
    let mut pool = CompressPool::start(ram.clone(), 2, 1, false, cc.clone()).unwrap();
    assert_eq!(pool.submit(1).unwrap(), Submitted::Queued);
    assert_eq!(pool.submit(2).unwrap(), Submitted::Queued);
    assert!(pool.all_busy());
    assert_eq!(pool.submit(3).unwrap(), Submitted::Busy);
    assert_eq!(cc.stats().busy, 1);
    let cancel = AtomicBool::new(false);
    let mut got = Vec::new();
    while let Some(d) = pool.next_pending(&cancel).unwrap() {
        got.push(match d {
            Done::Compressed { offset, .. } | Done::Raw { offset, .. } => offset,
        });
    }
    got.sort_unstable();
    assert_eq!(got, vec![0x1000, 0x2000]);
    assert!(!pool.all_busy());
}

#[test]
fn query_migrate_shows_compression_beside_ram_only() {
    use crate::info::{MigrationInfo, MigrationStatus, SourceState};
    let stats = CompressionStats {
        pages: 5,
        busy: 1,
        busy_rate: 0.25,
        compressed_size: 100,
        compression_rate: 3.5,
    };
    let state = |status| SourceState {
        status,
        compression: Some(stats),
        ..SourceState::default()
    };
    let v = serde_json::to_value(MigrationInfo::source(&state(MigrationStatus::Active))).unwrap();
    assert_eq!(v["compression"]["busy-rate"], 0.25, "{v}");
    assert_eq!(v["compression"]["compressed-size"], 100);
    let v =
        serde_json::to_value(MigrationInfo::source(&state(MigrationStatus::Completed))).unwrap();
    assert_eq!(v["compression"]["pages"], 5, "{v}");
    let v = serde_json::to_value(MigrationInfo::source(&state(MigrationStatus::Failed))).unwrap();
    assert!(v.get("compression").is_none(), "{v}");
}

#[test]
fn without_decompress_error_check_a_corrupt_page_waits_for_a_later_copy() {
    let src = new_ram();
    fill(&src, 0);
    let (stream, _) = send(&src, 2, 1, true);
    let records = compressed_records(&stream);
    // A page of the first pass that the second pass sends again (odd pages).
    let &(at, len, _) = records
        .iter()
        .find(|r| r.2 % (2 * PAGE_SIZE as u64) == PAGE_SIZE as u64)
        .unwrap();
    let mut repaired = stream.clone();
    repaired[at..at + len].iter_mut().for_each(|b| *b ^= 0x5a);
    let dst = new_ram();
    assert_eq!(load_checking(&repaired, &dst, 2, false).unwrap(), b"state");
    assert!(same_memory(&src, &dst));
    // With the check on, the same stream fails.
    let e = load_checking(&repaired, &new_ram(), 2, true).unwrap_err();
    assert!(e.to_string().contains("corrupt zlib data"), "{e}");
    // The last page is never sent again: it is reported at the end of the stream.
    let (at, len, offset) = records[records.len() - 1];
    let mut lost = stream.clone();
    lost[at..at + len].iter_mut().for_each(|b| *b ^= 0x5a);
    let e = load_checking(&lost, &new_ram(), 2, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("never sent again") && e.contains(&format!("{offset:#x}")),
        "{e}"
    );
}
