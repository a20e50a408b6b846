//! In-process round trips: a multifd sender and receiver over real unix sockets.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ram::{page_hash, AtomicBitmap, GuestRam, PAGE_SIZE};

use super::compress::Compressor;
use super::packet::{Handshake, PacketHeader, PacketPages, FLAG_ZSTD, PAGES_PER_PACKET};
use super::recv::{accept_channels, check_settings, LocalSettings};
use super::*;
use crate::dest::loader::PageBook;
use crate::info::{Channel, MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::stream::header::{Header, FEATURE_MULTIFD, STREAM_VERSION};
use crate::test_pages::{anon_ram, fill_mixed};
use crate::transport::{Listener, MigrationUri};

struct TestEnv {
    counters: MigrationCounters,
    limiter: RateLimiter,
    cancel: AtomicBool,
}

impl SendEnv for TestEnv {
    fn counters(&self) -> &MigrationCounters {
        &self.counters
    }
    fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

const RAM_SIZE: u64 = 8 << 20;
const UUID: [u8; 16] = [9; 16];

fn new_ram() -> Arc<GuestRam> {
    anon_ram(RAM_SIZE)
}

fn header(channels: u8, method: Method) -> Header {
    Header {
        version: STREAM_VERSION,
        features: FEATURE_MULTIFD,
        uuid: UUID,
        ram_size: RAM_SIZE,
        page_size: 4096,
        vcpus: 1,
        multifd_channels: u32::from(channels),
        multifd_compression: u32::from(method.code()),
    }
}

fn socket_uri(tag: &str) -> MigrationUri {
    let p = std::env::temp_dir().join(format!("ferry-mfd-{tag}-{}.sock", std::process::id()));
    MigrationUri::Unix(p)
}

fn env() -> Arc<TestEnv> {
    Arc::new(TestEnv {
        counters: MigrationCounters::new(8),
        limiter: RateLimiter::with_limit(0),
        cancel: AtomicBool::new(false),
    })
}

/// Migrates `src` into a fresh RAM in three passes (all, then two rounds of changed
/// pages); returns the destination RAM and book.
fn migrate(
    channels: u8,
    method: Method,
    tag: &str,
) -> (Arc<GuestRam>, Arc<PageBook>, Arc<TestEnv>) {
    let src = new_ram();
    let pages = RAM_SIZE / PAGE_SIZE as u64;
    fill_mixed(&src, 0, 0..pages);
    let uri = socket_uri(tag);
    let listener = Listener::bind(&uri).unwrap();
    let dst = new_ram();
    let book = Arc::new(PageBook::new(pages, true));
    let (d, b) = (dst.clone(), book.clone());
    let receiver = std::thread::spawn(move || {
        let h = header(channels, method);
        let chans = accept_channels(
            &listener,
            &h,
            Duration::from_secs(10),
            &crate::transport::tls::Security::Plain,
        )
        .unwrap();
        let mut r = MultifdReceiver::start(chans, method, d, b, None).unwrap();
        for pass in 1..=3 {
            r.sync(pass).unwrap();
        }
        r.finish().unwrap();
    });
    let e = env();
    let cfg = SendConfig {
        channels,
        method,
        level: 1,
        zero_copy: false,
        uuid: UUID,
    };
    let mut s = MultifdSender::open(
        &uri,
        &cfg,
        src.clone(),
        e.clone(),
        Duration::from_secs(5),
        &crate::transport::tls::Security::Plain,
    )
    .unwrap();
    let bitmap = AtomicBitmap::new(pages);
    bitmap.set_all();
    let mut calls = 0;
    let sent = s
        .send_bitmap(&bitmap, None, Phase::Precopy, 1, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(sent, pages);
    // Every 1024 pages, and every 100 ms while all channels are busy.
    assert!(calls >= pages / 1024, "{calls}");
    s.sync(1, Phase::Precopy, || Ok(())).unwrap();
    // Pages change between passes; each pass resends them (possibly on other channels).
    for (pass, generation) in [(2u64, 1u64), (3, 2)] {
        let changed: Vec<u64> = (0..pages).filter(|p| p % 7 == generation).collect();
        fill_mixed(&src, generation, changed.iter().copied());
        for &p in &changed {
            bitmap.set(p);
        }
        s.send_bitmap(&bitmap, None, Phase::Precopy, pass, || Ok(()))
            .unwrap();
        s.sync(pass, Phase::Precopy, || Ok(())).unwrap();
    }
    let stats = s.stats();
    // As in a migration: the destination finishes (at END) before the source closes.
    receiver.join().unwrap();
    s.finish().unwrap();
    assert_eq!(
        src.digest(),
        dst.digest(),
        "{channels} channels, {method:?}"
    );
    let report = stats.report();
    assert_eq!(report.channels.len(), usize::from(channels));
    if channels > 1 {
        assert!(
            report.channels.iter().all(|c| c.normal_pages > 0),
            "{report:?}"
        );
    }
    (dst, book, e)
}

#[test]
fn pages_arrive_intact_over_every_channel_count_and_method() {
    for (channels, method) in [
        (1, Method::None),
        (3, Method::None),
        (2, Method::Zlib),
        (4, Method::Zstd),
    ] {
        let tag = format!("rt{channels}{}", method.name());
        let (_, book, e) = migrate(channels, method, &tag);
        book.check_complete().unwrap();
        let c = &e.counters;
        assert!(c.zero_pages() > 0 && c.normal_pages() > 0);
        assert!(c.channel_bytes(Channel::Multifd(0)) > 0);
        assert_eq!(c.main_bytes(), 0, "everything went over the channels");
    }
}

#[test]
fn compression_shrinks_text_and_zero_pages_cost_no_data() {
    let (_, _, e) = migrate(2, Method::Zstd, "ratio");
    // A quarter of the pages are random: the rest compress well or are zero.
    let raw = e.counters.normal_pages() * PAGE_SIZE as u64;
    assert!(
        e.counters.multifd_bytes() < raw * 2 / 3,
        "{} of {raw}",
        e.counters.multifd_bytes()
    );
}

#[test]
fn settings_must_match_the_destinations() {
    let local = LocalSettings {
        enabled: true,
        channels: 4,
        method: Method::Zstd,
    };
    assert!(check_settings(&header(4, Method::Zstd), &local).is_ok());
    let e = check_settings(&header(2, Method::Zstd), &local)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the source uses 2 channels with compression zstd, this destination 4 channels with compression zstd"), "{e}");
    let e = check_settings(&header(4, Method::Zlib), &local)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("compression zlib") && e.contains("compression zstd"),
        "{e}"
    );
    let off = LocalSettings {
        enabled: false,
        ..local
    };
    let e = check_settings(&header(4, Method::Zstd), &off)
        .unwrap_err()
        .to_string();
    assert!(e.contains("capability multifd is off"), "{e}");
    let mut plain = header(0, Method::None);
    plain.features = 0;
    assert!(check_settings(&plain, &off).is_ok());
    let e = check_settings(&plain, &local).unwrap_err().to_string();
    assert!(e.contains("migrates without it"), "{e}");
}

#[test]
fn a_channel_that_never_connects_fails_within_the_timeout() {
    let uri = socket_uri("never");
    let listener = Listener::bind(&uri).unwrap();
    let MigrationUri::Unix(path) = &uri else {
        unreachable!()
    };
    let mut one = std::os::unix::net::UnixStream::connect(path).unwrap();
    one.write_all(
        &Handshake {
            uuid: UUID,
            id: 0,
            channels: 2,
            method: Method::None,
        }
        .encode(),
    )
    .unwrap();
    let t = Instant::now();
    let e = accept_channels(
        &listener,
        &header(2, Method::None),
        Duration::from_millis(300),
        &crate::transport::tls::Security::Plain,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.contains("only 1 of 2 multifd channels connected"), "{e}");
}

#[test]
fn a_wrong_uuid_or_duplicate_id_is_refused() {
    for (uuid, ids, want) in [
        ([1u8; 16], vec![0u8], "received UUID"),
        (UUID, vec![0, 0], "connected twice"),
    ] {
        let uri = socket_uri(&format!("hs{}", ids.len()));
        let listener = Listener::bind(&uri).unwrap();
        let MigrationUri::Unix(path) = &uri else {
            unreachable!()
        };
        let mut keep = Vec::new();
        for id in &ids {
            let mut c = std::os::unix::net::UnixStream::connect(path).unwrap();
            c.write_all(
                &Handshake {
                    uuid,
                    id: *id,
                    channels: 2,
                    method: Method::None,
                }
                .encode(),
            )
            .unwrap();
            keep.push(c);
        }
        let e = accept_channels(
            &listener,
            &header(2, Method::None),
            Duration::from_millis(500),
            &crate::transport::tls::Security::Plain,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// Starts a receiver on one channel fed by a raw socket the test writes to.
fn raw_channel(method: Method, tag: &str) -> (std::os::unix::net::UnixStream, MultifdReceiver) {
    let uri = socket_uri(tag);
    let listener = Listener::bind(&uri).unwrap();
    let MigrationUri::Unix(path) = &uri else {
        unreachable!()
    };
    let mut c = std::os::unix::net::UnixStream::connect(path).unwrap();
    c.write_all(
        &Handshake {
            uuid: UUID,
            id: 0,
            channels: 1,
            method,
        }
        .encode(),
    )
    .unwrap();
    let chans = accept_channels(
        &listener,
        &header(1, method),
        Duration::from_secs(5),
        &crate::transport::tls::Security::Plain,
    )
    .unwrap();
    let book = Arc::new(PageBook::new(RAM_SIZE / 4096, true));
    let r = MultifdReceiver::start(chans, method, new_ram(), book, None).unwrap();
    (c, r)
}

#[test]
fn a_sync_that_never_comes_fails_after_the_silence_limit() {
    let (_c, r) = raw_channel(Method::None, "silent-sync");
    let mut r = r.with_silence_limit(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let e = r.sync(1).expect_err("a silent source").to_string();
    assert!(e.contains("nothing arrived from the source"), "{e}");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn a_corrupt_compressed_packet_fails_the_channel_with_a_clear_error() {
    let (mut c, mut r) = raw_channel(Method::Zstd, "corrupt");
    let h = PacketHeader {
        flags: FLAG_ZSTD,
        pages_alloc: PAGES_PER_PACKET as u32,
        normal_pages: 2,
        next_packet_size: 100,
        packet_num: 5,
        zero_pages: 0,
        pass: 1,
    };
    let mut b = Vec::new();
    PacketPages {
        normal: vec![(0, 1), (4096, 2)],
        zero: vec![],
    }
    .encode(&h, &mut b);
    b.extend_from_slice(&[0xa5; 100]);
    c.write_all(&b).unwrap();
    let e = r.sync(1).unwrap_err().to_string();
    assert!(
        e.contains("multifd channel 0: packet 5: corrupt zstd data"),
        "{e}"
    );
    assert!(r.error().is_some());
}

#[test]
fn a_compressed_page_that_does_not_match_its_hash_fails_the_channel() {
    // zstd data that decodes fine, but to bytes other than the ones the source hashed (zstd
    // frames carry no checksum: the page hashes catch this).
    let (mut c, mut r) = raw_channel(Method::Zstd, "mismatch");
    let pages: Vec<u8> = (0..2 * 4096).map(|i| (i / 7) as u8).collect();
    let mut data = Vec::new();
    let n = Compressor::new(Method::Zstd, 1)
        .unwrap()
        .compress(&pages, &mut data)
        .expect("compressible");
    let h = PacketHeader {
        flags: FLAG_ZSTD,
        pages_alloc: PAGES_PER_PACKET as u32,
        normal_pages: 2,
        next_packet_size: n as u32,
        packet_num: 3,
        zero_pages: 0,
        pass: 1,
    };
    let mut b = Vec::new();
    PacketPages {
        normal: vec![
            (0, page_hash(&pages[..4096])),
            (4096, page_hash(&pages[4096..]) ^ 1),
        ],
        zero: vec![],
    }
    .encode(&h, &mut b);
    b.extend_from_slice(&data[..n]);
    c.write_all(&b).unwrap();
    let e = r.sync(1).unwrap_err().to_string();
    assert!(
        e.contains("multifd channel 0: packet 3: corrupt zstd data: the page at 0x1000 does not match its hash"),
        "{e}"
    );
}

#[test]
fn a_channel_closed_midway_fails_with_a_clear_error() {
    let (mut c, mut r) = raw_channel(Method::None, "closed");
    let h = PacketHeader {
        flags: 0,
        pages_alloc: PAGES_PER_PACKET as u32,
        normal_pages: 2,
        next_packet_size: 8192,
        packet_num: 1,
        zero_pages: 0,
        pass: 1,
    };
    let mut b = Vec::new();
    PacketPages {
        normal: vec![(0, 1), (4096, 2)],
        zero: vec![],
    }
    .encode(&h, &mut b);
    b.extend_from_slice(&[1; 5000]);
    c.write_all(&b).unwrap();
    drop(c);
    let e = r.sync(1).unwrap_err().to_string();
    assert!(e.contains("closed in the middle of a packet"), "{e}");
}

#[test]
fn a_channel_closed_between_packets_fails_at_once() {
    let (c, r) = raw_channel(Method::None, "between");
    drop(c);
    let t = Instant::now();
    while r.error().is_none() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = r.error().unwrap().to_string();
    assert!(
        e.contains("the source closed the channel before the end"),
        "{e}"
    );
}

#[test]
fn pages_after_the_last_sync_are_refused_at_the_end() {
    let (mut c, mut r) = raw_channel(Method::None, "late");
    let mut b = Vec::new();
    let zero = |num, flags, zero_pages| PacketHeader {
        flags,
        pages_alloc: PAGES_PER_PACKET as u32,
        normal_pages: 0,
        next_packet_size: 0,
        packet_num: num,
        zero_pages,
        pass: 1,
    };
    PacketPages::default().encode(&zero(1, super::packet::FLAG_SYNC, 0), &mut b);
    c.write_all(&b).unwrap();
    r.sync(1).unwrap();
    PacketPages {
        normal: vec![],
        zero: vec![8192],
    }
    .encode(&zero(2, 0, 1), &mut b);
    c.write_all(&b).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let e = r.finish().unwrap_err().to_string();
    assert!(e.contains("after the channel's last SYNC"), "{e}");
}

#[test]
fn a_cancelled_sender_stops_promptly() {
    let uri = socket_uri("cancel");
    let listener = Listener::bind(&uri).unwrap();
    // A destination that accepts and reads nothing.
    let hold = std::thread::spawn(move || {
        let chans = accept_channels(
            &listener,
            &header(2, Method::None),
            Duration::from_secs(5),
            &crate::transport::tls::Security::Plain,
        )
        .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        drop(chans);
    });
    let src = new_ram();
    fill_mixed(&src, 0, 0..RAM_SIZE / 4096);
    let e = env();
    let cfg = SendConfig {
        channels: 2,
        method: Method::None,
        level: 0,
        zero_copy: false,
        uuid: UUID,
    };
    let mut s = MultifdSender::open(
        &uri,
        &cfg,
        src,
        e.clone(),
        Duration::from_secs(5),
        &crate::transport::tls::Security::Plain,
    )
    .unwrap();
    let bitmap = AtomicBitmap::new(RAM_SIZE / 4096);
    bitmap.set_all();
    let e2 = e.clone();
    let t = Instant::now();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        e2.cancel.store(true, Ordering::Release);
        e2.limiter.cancel();
    });
    let r = s.send_bitmap(&bitmap, None, Phase::Precopy, 1, || Ok(()));
    drop(s);
    canceller.join().unwrap();
    hold.join().unwrap();
    assert!(matches!(r, Err(crate::error::MigrationError::Cancelled)) || r.is_ok());
    assert!(t.elapsed() < Duration::from_secs(5));
    // Pages not sent are back in the bitmap.
    if r.is_err() {
        assert!(bitmap.count_ones() > 0);
    }
}

#[test]
fn file_uris_and_zero_copy_without_tcp_are_refused() {
    let e = env();
    let cfg = SendConfig {
        channels: 2,
        method: Method::None,
        level: 0,
        zero_copy: false,
        uuid: UUID,
    };
    let file = MigrationUri::File {
        path: std::env::temp_dir().join("ferry-mfd-file"),
        offset: 0,
    };
    let err = MultifdSender::open(
        &file,
        &cfg,
        new_ram(),
        e.clone(),
        Duration::from_secs(1),
        &crate::transport::tls::Security::Plain,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not supported for file:"), "{err}");
    let zc = SendConfig {
        zero_copy: true,
        ..cfg
    };
    let err = MultifdSender::open(
        &socket_uri("zc"),
        &zc,
        new_ram(),
        e,
        Duration::from_secs(1),
        &crate::transport::tls::Security::Plain,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("zero-copy-send needs a tcp:"), "{err}");
}

#[test]
fn zero_copy_over_tcp_delivers_the_same_memory() {
    let src = new_ram();
    let pages = RAM_SIZE / 4096;
    fill_mixed(&src, 0, 0..pages);
    let listener = Listener::bind(&MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .unwrap();
    let uri = MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: listener.local_port().unwrap(),
    };
    let dst = new_ram();
    let book = Arc::new(PageBook::new(pages, true));
    let (d, b) = (dst.clone(), book.clone());
    let receiver = std::thread::spawn(move || {
        let chans = accept_channels(
            &listener,
            &header(2, Method::None),
            Duration::from_secs(10),
            &crate::transport::tls::Security::Plain,
        )
        .unwrap();
        let mut r = MultifdReceiver::start(chans, Method::None, d, b, None).unwrap();
        r.sync(1).unwrap();
        r.finish().unwrap();
    });
    let e = env();
    let cfg = SendConfig {
        channels: 2,
        method: Method::None,
        level: 0,
        zero_copy: true,
        uuid: UUID,
    };
    let Ok(mut s) = MultifdSender::open(
        &uri,
        &cfg,
        src.clone(),
        e.clone(),
        Duration::from_secs(5),
        &crate::transport::tls::Security::Plain,
    ) else {
        eprintln!("SO_ZEROCOPY unavailable: skipped");
        return;
    };
    let bitmap = AtomicBitmap::new(pages);
    bitmap.set_all();
    s.send_bitmap(&bitmap, None, Phase::Precopy, 1, || Ok(()))
        .unwrap();
    s.sync(1, Phase::Precopy, || Ok(())).unwrap();
    receiver.join().unwrap();
    s.finish().unwrap();
    assert_eq!(src.digest(), dst.digest());
    book.check_complete().unwrap();
}

#[test]
fn channels_share_the_rate_limit() {
    let src = new_ram();
    let pages = RAM_SIZE / 4096;
    fill_mixed(&src, 0, 0..pages);
    let uri = socket_uri("rate");
    let listener = Listener::bind(&uri).unwrap();
    let dst = new_ram();
    let book = Arc::new(PageBook::new(pages, true));
    let (d, b) = (dst.clone(), book.clone());
    let receiver = std::thread::spawn(move || {
        let h = header(3, Method::None);
        let chans = accept_channels(
            &listener,
            &h,
            Duration::from_secs(10),
            &crate::transport::tls::Security::Plain,
        )
        .unwrap();
        let mut r = MultifdReceiver::start(chans, Method::None, d, b, None).unwrap();
        r.sync(1).unwrap();
        r.finish().unwrap();
    });
    let limit = 4u64 << 20;
    let e = Arc::new(TestEnv {
        counters: MigrationCounters::new(3),
        limiter: RateLimiter::with_limit(limit),
        cancel: AtomicBool::new(false),
    });
    let cfg = SendConfig {
        channels: 3,
        method: Method::None,
        level: 0,
        zero_copy: false,
        uuid: UUID,
    };
    let t = Instant::now();
    let mut s = MultifdSender::open(
        &uri,
        &cfg,
        src,
        e.clone(),
        Duration::from_secs(5),
        &crate::transport::tls::Security::Plain,
    )
    .unwrap();
    let bitmap = AtomicBitmap::new(pages);
    bitmap.set_all();
    s.send_bitmap(&bitmap, None, Phase::Precopy, 1, || Ok(()))
        .unwrap();
    s.sync(1, Phase::Precopy, || Ok(())).unwrap();
    let took = t.elapsed().as_secs_f64();
    receiver.join().unwrap();
    s.finish().unwrap();
    let sent = e.counters.multifd_bytes();
    // Three-quarters of 8 MiB are non-zero pages: about 6 MiB at 4 MiB/s, all channels
    // together (one window's budget may go at once).
    assert!(sent > 5 << 20, "{sent}");
    let rate = sent as f64 / took;
    assert!(rate < limit as f64 * 1.5, "{rate} B/s over {took} s");
    assert!(took > 1.0, "{took}");
}
