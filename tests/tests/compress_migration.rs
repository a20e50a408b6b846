//! Legacy compression (capability `compress`): migrations with 1, 2 and 8 threads at
//! levels 0, 1 and 9 keep every page; `compress-wait-thread=false` sends pages raw when
//! the threads are busy; a corrupt compressed page fails the migration clearly and the
//! source runs on; QEMU's incompatibilities are refused with its messages.

mod migration_support;
mod multifd_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use multifd_support::{
    assert_completed_and_identical, assert_destination_exits_1, assert_failed_and_source_intact,
};
use serde_json::{json, Value};
use tests::{
    free_port, kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions, TempDir,
};

fn set_compress(f: &mut Ferry, threads: u8, level: u8, wait: bool) {
    f.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "compress", "state": true}]}),
    );
    f.cmd(
        "migrate-set-parameters",
        json!({"compress-threads": threads, "compress-level": level,
               "compress-wait-thread": wait, "decompress-threads": 2}),
    );
}

/// A 128 MiB memory image: a quarter zero pages, a quarter text, a quarter repeated
/// bytes, a quarter pseudo-random (the test guest's own pages do not compress).
fn memory_image(dir: &TempDir) -> String {
    let path = dir.join("memory.img");
    let mut img = Vec::with_capacity(128 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..(128u64 << 20) / 4096 {
        match p % 4 {
            0 => img.resize(img.len() + 4096, 0),
            1 => {
                let line = format!("page {p}: the quick brown fox jumps over the lazy dog\n");
                img.extend(line.bytes().cycle().take(4096));
            }
            2 => img.resize(img.len() + 4096, (p % 251) as u8 | 1),
            _ => img.extend((0..4096).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })),
        }
    }
    std::fs::write(&path, &img).expect("write the memory image");
    path.display().to_string()
}

/// A source whose memory starts as [`memory_image`] with a dirtying 16 MiB working set, and
/// a destination (-S) listening on a free loopback port.
fn start_image_pair(tag: &str, dir: &TempDir) -> (Ferry, Ferry, u16) {
    let port = free_port();
    let src = Ferry::start(
        &format!("{tag}-src"),
        &FerryOptions {
            memory: format!("128M,mem-path={},share=off", memory_image(dir)),
            workload: Some("working-set=16M,rate=20000".into()),
            ..FerryOptions::default()
        },
    );
    let dst = Ferry::start(
        &format!("{tag}-dst"),
        &FerryOptions {
            memory: "128M".into(),
            workload: None,
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    (src, dst, port)
}

/// Migrates a dirtying guest with compression; returns the source's final query-migrate.
fn migrate_compressed(tag: &str, threads: u8, level: u8, wait: bool) -> Option<Value> {
    if skip_unless(tag, kvm_missing()) {
        return None;
    }
    let dir = TempDir::new(tag);
    let (mut src, mut dst, port) = start_image_pair(tag, &dir);
    set_compress(&mut src, threads, level, wait);
    set_compress(&mut dst, threads, level, wait);
    std::thread::sleep(Duration::from_millis(300));
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = assert_completed_and_identical(&mut src, &mut dst);
    eprintln!(
        "{tag}: {} normal pages {}",
        info["compression"], info["ram"]["normal"]
    );
    Some(info)
}

#[test]
fn compressed_migrations_keep_every_page_for_each_thread_count_and_level() {
    let _one = one_guest_test_at_a_time();
    for (threads, level) in [(1, 0), (2, 1), (8, 9)] {
        let tag = format!("compress-{threads}t-l{level}");
        let Some(info) = migrate_compressed(&tag, threads, level, true) else {
            return;
        };
        let c = &info["compression"];
        let pages = c["pages"].as_u64().unwrap_or(0);
        let size = c["compressed-size"].as_u64().unwrap_or(0);
        // The image's text and repeated pages (16384, less those the guest's boot area and
        // working set overwrote).
        assert!(pages > 12000, "{tag}: pages were compressed: {info}");
        assert_eq!(c["busy"], 0, "{tag}: the sender waits for a thread");
        if level == 0 {
            // Level 0 stores: a little larger than the pages.
            assert!(size > pages * 4096, "{tag}: {c}");
        } else {
            assert!(size < pages * 4096, "{tag}: {c}");
            assert!(c["compression-rate"].as_f64().unwrap_or(0.0) > 1.0, "{c}");
        }
    }
}

#[test]
fn without_wait_thread_busy_threads_send_pages_raw() {
    let _one = one_guest_test_at_a_time();
    let Some(info) = migrate_compressed("compress-nowait", 1, 9, false) else {
        return;
    };
    let c = &info["compression"];
    assert!(c["busy"].as_u64().unwrap_or(0) > 0, "{info}");
    assert!(c["pages"].as_u64().unwrap_or(0) > 0, "{info}");
    // Raw pages are counted as normal pages.
    assert!(info["ram"]["normal"].as_u64().unwrap_or(0) > 0, "{info}");
}

/// Forwards a migration stream, XOR-ing the data of the first COMPRESSED record.
struct CorruptingProxy {
    port: u16,
    injected: Arc<AtomicU64>,
}

impl CorruptingProxy {
    fn start(target: u16) -> CorruptingProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let injected = Arc::new(AtomicU64::new(0));
        let inj = injected.clone();
        std::thread::spawn(move || {
            let Ok((up, _)) = l.accept() else { return };
            let Ok(down) = TcpStream::connect(("127.0.0.1", target)) else {
                return;
            };
            let (up2, down2) = (
                up.try_clone().expect("clone"),
                down.try_clone().expect("clone"),
            );
            let back = std::thread::spawn(move || copy_back(down2, up2));
            let _ = forward(&up, &down, &inj);
            // Pass the end on to the destination, but leave the source's side open until
            // what the destination says (its FAILED reply) has reached the source: closing
            // it here raced that reply.
            let _ = down.shutdown(Shutdown::Write);
            let _ = back.join();
            let _ = up.shutdown(Shutdown::Both);
        });
        CorruptingProxy { port, injected }
    }
}

fn copy_back(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

fn forward(mut up: &TcpStream, mut down: &TcpStream, injected: &AtomicU64) -> std::io::Result<()> {
    let mut header = [0u8; 64];
    up.read_exact(&mut header)?;
    down.write_all(&header)?;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    loop {
        let mut head = [0u8; 8];
        up.read_exact(&mut head)?;
        let len = u32_at(&head, 4) as usize;
        // RAM frames count their trailer in `len`; other frames do not.
        let mut body = vec![0u8; if head[0] == 1 { len } else { len + 8 }];
        up.read_exact(&mut body)?;
        if head[0] == 1 && injected.load(Ordering::Acquire) == 0 {
            let entries = u32_at(&body, 0) as usize;
            let mut data = 8 + entries * 24 + 8;
            for e in 0..entries {
                let at = 8 + e * 24;
                let word = u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or([0; 8]));
                let arg = u64::from_le_bytes(body[at + 8..at + 16].try_into().unwrap_or([0; 8]));
                let n = match word & 0xfff {
                    0x002 => 0,
                    0x008 => 4096,
                    _ => arg as usize,
                };
                if word & 0xfff == 0x100 && injected.load(Ordering::Acquire) == 0 {
                    for b in &mut body[data..data + n] {
                        *b ^= 0x5a;
                    }
                    injected.store(1, Ordering::Release);
                }
                data += n;
            }
        }
        down.write_all(&head)?;
        down.write_all(&body)?;
    }
}

#[test]
fn a_corrupt_compressed_page_fails_the_migration_and_the_source_runs_on() {
    let _one = one_guest_test_at_a_time();
    let tag = "compress-corrupt";
    if skip_unless(tag, kvm_missing()) {
        return;
    }
    let dir = TempDir::new(tag);
    let (mut src, mut dst, port) = start_image_pair(tag, &dir);
    set_compress(&mut src, 2, 1, true);
    set_compress(&mut dst, 2, 1, true);
    let proxy = CorruptingProxy::start(port);
    std::thread::sleep(Duration::from_millis(500));
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", proxy.port)}),
    );
    let desc = assert_failed_and_source_intact(&mut src, &["corrupt zlib data"]);
    assert!(desc.contains("compressed page at RAM offset 0x"), "{desc}");
    assert_eq!(proxy.injected.load(Ordering::Acquire), 1);
    assert_destination_exits_1(&mut dst, Duration::from_secs(20));
}

#[test]
fn qemus_incompatibilities_with_compress_are_refused_with_its_messages() {
    let _one = one_guest_test_at_a_time();
    let tag = "compress-incompatible";
    if skip_unless(tag, kvm_missing()) {
        return;
    }
    let mut f = Ferry::start(
        tag,
        &FerryOptions {
            memory: "64M".into(),
            workload: None,
            ..FerryOptions::default()
        },
    );
    let caps = |names: &[&str]| {
        json!({"capabilities": names.iter()
            .map(|n| json!({"capability": n, "state": true})).collect::<Vec<_>>()})
    };
    let e = f.cmd_err("migrate-set-capabilities", caps(&["compress", "multifd"]));
    assert!(e.contains("Multifd is not compatible with compress"), "{e}");
    let e = f.cmd_err(
        "migrate-set-capabilities",
        caps(&["postcopy-ram", "postcopy-preempt", "compress"]),
    );
    assert!(
        e.contains("Postcopy preempt not compatible with compress"),
        "{e}"
    );
    let e = f.cmd_err(
        "migrate-set-capabilities",
        caps(&["background-snapshot", "compress"]),
    );
    assert!(
        e.contains("Background-snapshot is not compatible with compress")
            || e.contains("not supported by host kernel"),
        "{e}"
    );
    // Nothing was turned on by the refused requests; compress alone is fine.
    f.cmd("migrate-set-capabilities", caps(&["compress"]));
    let on: Vec<String> = f
        .cmd("query-migrate-capabilities", json!({}))
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str().map(String::from))
        .collect();
    assert!(on.contains(&"compress".to_string()), "{on:?}");
    for off in [
        "multifd",
        "postcopy-ram",
        "postcopy-preempt",
        "background-snapshot",
    ] {
        assert!(!on.contains(&off.to_string()), "{off} stayed off: {on:?}");
    }
}

/// QEMU allows `compress` with `postcopy-ram` (not with `postcopy-preempt`): pages compressed
/// in precopy, the rest pulled in postcopy; the guest verifies every page.
#[test]
fn compressed_precopy_then_postcopy_keeps_every_page() {
    use migration_support::{
        migrate, set_caps, set_params, start_dest, start_source, wait_transferred, Guest,
    };
    let _one = one_guest_test_at_a_time();
    let tag = "compress-postcopy";
    if skip_unless(tag, kvm_missing()) {
        return;
    }
    // Rewrites 32 MiB flat out: at 8 MiB/s only postcopy can finish.
    const FAST: Guest = Guest {
        memory: "128M",
        vcpus: 2,
        working_set: "32M",
        rate: 0,
    };
    let mut src = start_source(&format!("{tag}-src"), &FAST, FAST.source(None));
    let (mut dst, uri) = start_dest(&format!("{tag}-dst"), FAST.dest("tcp:127.0.0.1:0", None));
    for f in [&mut src, &mut dst] {
        set_caps(f, &["postcopy-ram"]);
        // Level 0 stores: the guest's own pages do not shrink, stored they still go compressed.
        set_compress(f, 2, 0, true);
    }
    set_params(&mut src, json!({"max-bandwidth": 8u64 << 20}));
    migrate(&mut src, &uri);
    let mid = wait_transferred(&mut src, 2 << 20, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    src.cmd("migrate-start-postcopy", json!({}));
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    assert!(
        info["compression"]["pages"].as_u64().unwrap_or(0) > 0,
        "{info}"
    );
    assert!(
        info["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0,
        "{info}"
    );
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}\n{}", dst.log());
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0, "the guest verifies every page on the destination");
    assert_eq!(checked, FAST.ws_pages());
}
