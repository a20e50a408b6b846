//! Helpers shared by the multifd end-to-end tests: starting a source/destination pair with
//! multifd settings, checking a completed migration, and a multifd-aware TCP proxy that
//! injects faults into one channel.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tests::{free_port, Ferry, FerryOptions};

/// Turns multifd on with `channels` channels and `compression` on a Ferry.
pub fn enable_multifd(f: &mut Ferry, channels: u8, compression: &str) {
    f.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    f.cmd(
        "migrate-set-parameters",
        json!({"multifd-channels": channels, "multifd-compression": compression}),
    );
}

/// A dirtying source and a destination (-S) listening on a free loopback port.
pub fn start_pair(tag: &str) -> (Ferry, Ferry, u16) {
    let port = free_port();
    let src = Ferry::start(
        &format!("{tag}-src"),
        &FerryOptions {
            workload: Some("working-set=64M,rate=20000".into()),
            ..FerryOptions::default()
        },
    );
    let dst = Ferry::start(
        &format!("{tag}-dst"),
        &FerryOptions {
            workload: None,
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    (src, dst, port)
}

/// Waits for completion on both sides, compares memory, then lets the destination guest
/// run and verify itself. Returns the source's final query-migrate.
pub fn assert_completed_and_identical(src: &mut Ferry, dst: &mut Ferry) -> Value {
    let info = src.wait_migration_end(Duration::from_secs(120));
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    let d = dst.wait_migration_end(Duration::from_secs(20));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(dst.status(), "paused");
    assert_eq!(
        src.cmd("ferry-memory-digest", json!({}))["digest"],
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        "destination memory must equal the source's at switchover"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    dst.cmd("cont", json!({}));
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0, "bad pages on the destination");
    assert!(checked > 0);
    info
}

/// The source guest still runs and its memory is intact; the migration failed with an
/// error mentioning `want` (any of them).
pub fn assert_failed_and_source_intact(src: &mut Ferry, want: &[&str]) -> String {
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or("").to_string();
    assert!(
        want.iter().any(|w| desc.contains(w)),
        "error-desc {desc:?} mentions none of {want:?}\nsource log:\n{}",
        src.log()
    );
    assert_eq!(src.status(), "running", "the source guest keeps running");
    let before = src.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        src.pages_written() > before,
        "the source guest makes progress"
    );
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0);
    desc
}

/// Waits for the destination process to exit; asserts status 1.
pub fn assert_destination_exits_1(dst: &mut Ferry, within: Duration) {
    let code = dst.wait_exit(within);
    assert_eq!(code, Some(1), "destination log:\n{}", dst.log());
}

/// What the proxy does to one multifd channel (by id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelFault {
    /// Flip a byte in the middle of the compressed data of the `nth` compressed packet
    /// (not raw) crossing any channel.
    CorruptCompressed {
        /// Which compressed packet (0-based, counted over all channels).
        nth: u64,
    },
    /// Close the channel (both ways) after forwarding `packets` packets.
    CloseAfter {
        /// Channel id.
        channel: u8,
        /// Packets forwarded first.
        packets: u64,
    },
    /// Accept the channel from the source but never connect it to the destination.
    NeverConnect {
        /// Channel id.
        channel: u8,
    },
}

/// A TCP proxy in front of a destination that understands the multifd framing.
pub struct MultifdProxy {
    /// Where the source connects.
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Faults actually injected.
    pub injected: Arc<AtomicU64>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl MultifdProxy {
    /// Starts a proxy forwarding to 127.0.0.1:`target`.
    pub fn start(target: u16, fault: ChannelFault) -> MultifdProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let injected = Arc::new(AtomicU64::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (s, inj, h) = (stop.clone(), injected.clone(), held.clone());
        let seen = Arc::new(AtomicU64::new(0));
        std::thread::spawn(move || {
            let to: SocketAddr = ([127, 0, 0, 1], target).into();
            let mut first = true;
            for c in l.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(c) = c else { continue };
                if first {
                    first = false;
                    let Ok(up) = TcpStream::connect(to) else {
                        continue;
                    };
                    pipe_both(c, up);
                } else {
                    let (inj, h, seen) = (inj.clone(), h.clone(), seen.clone());
                    std::thread::spawn(move || channel(c, to, fault, &inj, &seen, &h));
                }
            }
        });
        MultifdProxy {
            port,
            stop,
            injected,
            held,
        }
    }

    /// The migration URI of the proxy.
    pub fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }
}

impl Drop for MultifdProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Ok(h) = self.held.lock() {
            for s in h.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn pipe_both(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    std::thread::spawn(move || pipe(a, b));
    std::thread::spawn(move || pipe(b2, a2));
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Forwards one multifd channel packet by packet (layout: multifd/packet.rs), applying
/// `fault` when it targets this channel.
fn channel(
    mut src: TcpStream,
    to: SocketAddr,
    fault: ChannelFault,
    injected: &AtomicU64,
    compressed_seen: &AtomicU64,
    held: &Mutex<Vec<TcpStream>>,
) {
    let mut hs = [0u8; 64];
    if src.read_exact(&mut hs).is_err() {
        return;
    }
    let id = hs[24];
    if fault == (ChannelFault::NeverConnect { channel: id }) {
        injected.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut h) = held.lock() {
            h.push(src);
        }
        return;
    }
    let Ok(mut dst) = TcpStream::connect(to) else {
        return;
    };
    if dst.write_all(&hs).is_err() {
        return;
    }
    let mut packets = 0u64;
    let mut head = [0u8; 48];
    loop {
        if let ChannelFault::CloseAfter {
            channel,
            packets: n,
        } = fault
        {
            if channel == id && packets == n {
                injected.fetch_add(1, Ordering::AcqRel);
                let _ = src.shutdown(Shutdown::Both);
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
        }
        if src.read_exact(&mut head).is_err() {
            let _ = dst.shutdown(Shutdown::Write);
            return;
        }
        let normal = u32_at(&head, 16) as usize;
        let size = u32_at(&head, 20) as usize;
        let zero = u32_at(&head, 32) as usize;
        let mut rest = vec![0u8; (normal * 2 + zero + 1) * 8 + size];
        if src.read_exact(&mut rest).is_err() {
            return;
        }
        let flags = u32_at(&head, 8);
        let compressed = flags & 0xe != 0 && flags & 0x10 == 0;
        if size > 0 && compressed {
            if let ChannelFault::CorruptCompressed { nth } = fault {
                if compressed_seen.fetch_add(1, Ordering::AcqRel) == nth {
                    let at = rest.len() - size / 2;
                    rest[at] ^= 0x5a;
                    injected.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        if dst
            .write_all(&head)
            .and_then(|_| dst.write_all(&rest))
            .is_err()
        {
            return;
        }
        packets += 1;
    }
}
