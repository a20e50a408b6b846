//! The fault matrix (issue 10): real `ferry` processes on two "hosts" (network
//! namespaces joined by a veth pair), a fault injected mid-migration, and for each
//! case one of two endings, checked in full:
//! - the migration completes and the destination's guest verifies every page, or
//! - it fails with an error that says what happened, the source guest runs on and
//!   verifies every page, the source holds no more threads or descriptors than before
//!   the migration, and the destination starts no guest: it exits with status 1.
//!
//! | fault                                  | how                                     | ending    |
//! |----------------------------------------|-----------------------------------------|-----------|
//! | destination killed                     | SIGKILL mid-stream                      | fails     |
//! | source killed                          | SIGKILL mid-stream                      | dest exits 1 |
//! | link down 1 s, then up                 | veth down/up (`ip link`)                | completes |
//! | link down for good                     | veth down                               | fails     |
//! | 10% "loss" + 50 ms delay               | proxy on host A (see tests::proxy)      | completes |
//! | peer stops reading                     | SIGSTOP of the destination              | fails     |
//! | destination freezes at switchover      | SIGSTOP during pause-before-switchover  | fails     |
//! | disk full (file: target)               | 8 MiB tmpfs                             | fails     |
//!
//! Both sides run with `--migration-io-timeout 2`, so a stuck socket fails the
//! migration in seconds, not the default 30 s. Then two load tests: 100 back-to-back
//! migrations of a dirtying guest, each to a fresh process, and a QMP flood (20
//! clients, malformed and oversized input, valid commands in a tight loop) during a
//! migration. Every wait is bounded.

mod migration_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_support::{
    assert_completed_and_identical, assert_destination_refused, assert_failed_with,
    assert_source_intact, migrate, set_caps, set_params, start_dest, start_source, wait_listening,
    wait_status, wait_transferred, Guest,
};
use serde_json::{json, Value};
use tests::leaks::{wait_back_to, Resources};
use tests::{
    host_pair_or_skip, kvm_missing, one_guest_test_at_a_time, skip_unless, Faults, Ferry,
    FerryOptions, HostPair, Mount, Proxy, TempDir,
};

const MIB: u64 = 1 << 20;
/// `--migration-io-timeout` of every process here, seconds.
const IO_TIMEOUT: &str = "2";
/// How long a failed migration's threads and sockets may take to go.
const SETTLE: Duration = Duration::from_secs(5);

/// 128 MiB, 1 vCPU, 8 MiB rewritten at 2000 pages/s (8 MB/s): small and quick, yet
/// dirtying during every pass.
const GUEST: Guest = Guest {
    memory: "128M",
    vcpus: 1,
    working_set: "8M",
    rate: 2000,
};

fn with_io_timeout(mut o: FerryOptions) -> FerryOptions {
    o.extra
        .extend(["--migration-io-timeout".into(), IO_TIMEOUT.into()]);
    o
}

/// The start of every fault case: one guest test at a time, and KVM and the two namespace
/// hosts present (None: skipped, the reason printed).
fn fault_case(test: &str) -> Option<(tests::netns::GuestTestGuard, HostPair)> {
    let one = one_guest_test_at_a_time();
    if skip_unless(test, kvm_missing()) {
        return None;
    }
    Some((one, host_pair_or_skip(test)?))
}

/// A source on host A and a destination listening on host B (port 4444).
fn pair_on_hosts(
    tag: &str,
    hosts: &HostPair,
    guest: &Guest,
    dest_paused: bool,
) -> (Ferry, Ferry, String) {
    let src = start_source(
        &format!("{tag}-src"),
        guest,
        with_io_timeout(guest.source(hosts.a().netns.as_deref())),
    );
    let mut dopts = with_io_timeout(guest.dest(
        &format!("tcp:{}:4444", hosts.b().addr),
        hosts.b().netns.as_deref(),
    ));
    if dest_paused {
        dopts.extra.push("-S".into());
    }
    let (dst, uri) = start_dest(&format!("{tag}-dst"), dopts);
    (src, dst, uri)
}

/// Waits up to `timeout` for the destination to exit with 1, refusing the incoming guest and
/// saying why (one of `words` in its log); returns how long that took.
fn assert_destination_gave_up(dst: &mut Ferry, timeout: Duration, words: &[&str]) -> Duration {
    let t0 = Instant::now();
    let code = dst.wait_exit(timeout);
    let waited = t0.elapsed();
    assert_eq!(code, Some(1), "the destination exits with 1\n{}", dst.log());
    assert_destination_refused(dst, Duration::from_secs(1));
    let log = dst.log();
    assert!(
        words.iter().any(|w| log.contains(w)),
        "the destination says why (one of {words:?}):\n{log}"
    );
    waited
}

/// Starts the migration at `bandwidth` bytes/s and waits until `bytes` have gone, the
/// migration still active: the moment each fault strikes. Returns that query-migrate.
fn migrate_until_mid_way(src: &mut Ferry, uri: &str, bandwidth: u64, bytes: u64) -> Value {
    set_params(src, json!({ "max-bandwidth": bandwidth }));
    migrate(src, uri);
    let mid = wait_transferred(src, bytes, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    mid
}

/// What the source holds before `migrate` (its QMP connection is open already).
fn baseline(src: &Ferry) -> Resources {
    Resources::of(src.pid())
}

/// The ending of a failed case on the source: a clear error (one of `words`), the guest
/// running and intact, and every thread and descriptor of the migration gone.
fn assert_failed_cleanly(
    test: &str,
    src: &mut Ferry,
    guest: &Guest,
    before: &Resources,
    timeout: Duration,
    words: &[&str],
) -> String {
    let t0 = Instant::now();
    let err = assert_failed_with(src, timeout, words);
    eprintln!("{test}: failed after {:?}: {err}", t0.elapsed());
    assert_source_intact(src, guest);
    if let Err(leak) = wait_back_to(src.pid(), before, SETTLE) {
        panic!(
            "{test}: the failed migration leaked: {leak}\nsource log:\n{}",
            src.log()
        );
    }
    err
}

#[test]
fn fault_destination_killed_fails_with_a_clear_error_and_leaks_nothing() {
    let test = "fault_destination_killed_fails_with_a_clear_error_and_leaks_nothing";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-killdst", &hosts, &GUEST, false);
    let before = baseline(&src);
    migrate_until_mid_way(&mut src, &uri, 8 * MIB, 2 * MIB);
    dst.kill();
    assert_failed_cleanly(
        test,
        &mut src,
        &GUEST,
        &before,
        Duration::from_secs(10),
        &["connection", "reset", "broken pipe", "destination"],
    );
}

#[test]
fn fault_source_killed_makes_the_destination_exit_1_without_a_guest() {
    let test = "fault_source_killed_makes_the_destination_exit_1_without_a_guest";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-killsrc", &hosts, &GUEST, false);
    migrate_until_mid_way(&mut src, &uri, 8 * MIB, 2 * MIB);
    let d = dst.cmd("query-migrate", json!({}));
    assert_eq!(d["status"], "active", "the destination is loading: {d}");
    assert_eq!(dst.status(), "inmigrate");
    src.kill();
    let waited =
        assert_destination_gave_up(&mut dst, Duration::from_secs(10), &["truncated", "reset"]);
    eprintln!("{test}: destination exited 1 after {waited:?}");
}

#[test]
fn fault_link_down_for_one_second_then_up_completes_with_every_page() {
    let test = "fault_link_down_for_one_second_then_up_completes_with_every_page";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    // An outage shorter than the I/O timeout is only a pause: TCP retransmits once the
    // link is back (within its backoff, about a second here), so give it room.
    // Both sides allow 5 s without progress here (the other cases: 2 s).
    let guest = GUEST;
    let five = |mut o: FerryOptions| {
        o.extra
            .extend(["--migration-io-timeout".into(), "5".into()]);
        o
    };
    let mut src = start_source(
        "f-flap-src",
        &guest,
        five(guest.source(hosts.a().netns.as_deref())),
    );
    let mut dopts = five(guest.dest(
        &format!("tcp:{}:4444", hosts.b().addr),
        hosts.b().netns.as_deref(),
    ));
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("f-flap-dst", dopts);
    let mid = migrate_until_mid_way(&mut src, &uri, 8 * MIB, 2 * MIB);
    let at_cut = mid["ram"]["transferred"].as_u64().unwrap_or(0);
    hosts.link_down().expect("take the link down");
    std::thread::sleep(Duration::from_secs(1));
    let during = src.cmd("query-migrate", json!({}));
    hosts.link_up().expect("bring the link back");
    assert_eq!(during["status"], "active", "{during}");
    // Nothing got through while the link was down (beyond what the socket buffers took).
    eprintln!(
        "{test}: transferred {at_cut} at the cut, {} after 1 s down",
        during["ram"]["transferred"]
    );
    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    eprintln!(
        "{test}: completed in {} ms, downtime {} ms",
        info["total-time"], info["downtime"]
    );
}

#[test]
fn fault_link_down_for_good_fails_within_the_io_timeout() {
    let test = "fault_link_down_for_good_fails_within_the_io_timeout";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-down", &hosts, &GUEST, false);
    let before = baseline(&src);
    migrate_until_mid_way(&mut src, &uri, 8 * MIB, 2 * MIB);
    hosts.link_down().expect("take the link down");
    let t0 = Instant::now();
    let err = assert_failed_cleanly(
        test,
        &mut src,
        &GUEST,
        &before,
        Duration::from_secs(15),
        &[""],
    );
    let lower = err.to_lowercase();
    assert!(
        lower.contains("timed out") || lower.contains("no progress"),
        "after a dead link the error says the destination stopped answering: {err}"
    );
    // The destination's keepalive (bounded by the same timeout) gives up as well.
    assert_destination_refused(&mut dst, Duration::from_secs(15));
    eprintln!("{test}: both sides gave up within {:?}", t0.elapsed());
}

#[test]
fn fault_lossy_slow_link_completes_with_every_page() {
    let test = "fault_lossy_slow_link_completes_with_every_page";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    // 50 ms each way and a 200 ms retransmission stall for 10% of the chunks: about
    // 3 MB/s, so the guest dirties slowly (400 KB/s) and the migration converges.
    let guest = Guest {
        working_set: "8M",
        rate: 100,
        ..GUEST
    };
    let mut src = start_source(
        "f-lossy-src",
        &guest,
        with_io_timeout(guest.source(hosts.a().netns.as_deref())),
    );
    // The guest keeps its rate (rates under 1000 pages/s per vCPU once ran flat out,
    // which no slow link can follow).
    let p0 = src.pages_written();
    std::thread::sleep(Duration::from_millis(500));
    let rate = (src.pages_written() - p0) * 2;
    assert!(
        rate <= 3 * guest.rate,
        "the guest dirties {rate} pages/s, asked for {}",
        guest.rate
    );
    let mut dopts = with_io_timeout(guest.dest(
        &format!("tcp:{}:4444", hosts.b().addr),
        hosts.b().netns.as_deref(),
    ));
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("f-lossy-dst", dopts);
    let target = uri
        .strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a tcp URI: {uri}"));
    let faults = Faults {
        latency: Duration::from_millis(50),
        loss_percent: 10,
        loss_stall: Duration::from_millis(200),
        ..Faults::default()
    };
    let a = hosts.a().netns.clone();
    let proxy = match &a {
        Some(ns) => Proxy::start_in_netns(ns, target, faults),
        None => Proxy::start(target, faults),
    }
    .expect("start the proxy on host A");
    let t0 = Instant::now();
    migrate(&mut src, &proxy.uri());
    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    eprintln!(
        "{test}: completed in {:?} ({} ms total, {} passes, downtime {} ms, {} bytes over the proxy)",
        t0.elapsed(),
        info["total-time"],
        info["ram"]["dirty-sync-count"],
        info["downtime"],
        proxy.forwarded_up()
    );
    assert!(proxy.forwarded_up() > guest.ws_pages() * 4096);
}

/// Continues a stopped process when dropped (the test may panic while it is stopped).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process id this test started; no memory is involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[test]
fn fault_destination_that_stops_reading_fails_within_the_io_timeout() {
    let test = "fault_destination_that_stops_reading_fails_within_the_io_timeout";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    // 32 MiB: more than the socket buffers of both ends take, so writes block while
    // the migration is still sending its first pass.
    let guest = Guest {
        working_set: "32M",
        ..GUEST
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-sigstop", &hosts, &guest, false);
    let before = baseline(&src);
    migrate_until_mid_way(&mut src, &uri, 16 * MIB, 2 * MIB);
    // The destination process freezes: its kernel still acknowledges what fits in the
    // socket buffer, then the window closes and the source's writes stop progressing.
    signal(dst.pid(), libc::SIGSTOP);
    let cont = Continue(dst.pid());
    let err = assert_failed_cleanly(
        test,
        &mut src,
        &guest,
        &before,
        Duration::from_secs(20),
        &[""],
    );
    let lower = err.to_lowercase();
    assert!(
        lower.contains("no progress") || lower.contains("timed out"),
        "a destination that stopped reading is named as such: {err}"
    );
    // Woken up, the destination finds the stream cut short and refuses it.
    drop(cont);
    assert_destination_refused(&mut dst, Duration::from_secs(15));
}

#[test]
fn fault_destination_frozen_at_switchover_fails_within_the_io_timeout() {
    let test = "fault_destination_frozen_at_switchover_fails_within_the_io_timeout";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-frozen-end", &hosts, &GUEST, false);
    set_caps(&mut src, &["pause-before-switchover"]);
    let before = baseline(&src);
    migrate(&mut src, &uri);
    let paused = wait_status(&mut src, &["pre-switchover"], Duration::from_secs(30));
    assert_eq!(paused["status"], "pre-switchover", "{paused}");
    // Everything but the last pages and the device state is at the destination; it
    // freezes before it can confirm loading them.
    signal(dst.pid(), libc::SIGSTOP);
    let cont = Continue(dst.pid());
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    let t0 = Instant::now();
    let err = assert_failed_cleanly(
        test,
        &mut src,
        &GUEST,
        &before,
        Duration::from_secs(20),
        &["did not confirm loading"],
    );
    // --migration-io-timeout 2 after the last progress, not a fixed minute.
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the source waited {:?}: {err}",
        t0.elapsed()
    );
    drop(cont);
    assert_destination_refused(&mut dst, Duration::from_secs(15));
}

/// A source frozen mid-stream (or a link that dies without a reset): the destination's
/// kernel has nothing to report, so only a bound on silence ends its wait.
fn source_frozen_mid_migration(test: &str, tag: &str, caps: &[&str], params: Value) {
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts(tag, &hosts, &GUEST, false);
    if !caps.is_empty() {
        set_caps(&mut src, caps);
        set_caps(&mut dst, caps);
    }
    set_params(&mut src, params.clone());
    set_params(&mut dst, params);
    migrate_until_mid_way(&mut src, &uri, 8 * MIB, 2 * MIB);
    signal(src.pid(), libc::SIGSTOP);
    let cont = Continue(src.pid());
    let waited = assert_destination_gave_up(
        &mut dst,
        Duration::from_secs(20),
        &["nothing arrived from the source for 3s"],
    );
    drop(cont);
    // Silence limit: --migration-io-timeout 2, at least three 1 s keepalive intervals.
    assert!(waited < Duration::from_secs(10), "{test}: took {waited:?}");
    eprintln!("{test}: destination exited 1 after {waited:?}");
    // Continued, the source finds its destination gone; its guest runs on intact.
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert_source_intact(&mut src, &GUEST);
}

#[test]
fn fault_source_frozen_makes_the_destination_exit_1_after_its_io_timeout() {
    source_frozen_mid_migration(
        "fault_source_frozen_makes_the_destination_exit_1_after_its_io_timeout",
        "f-stopsrc",
        &[],
        json!({}),
    );
}

#[test]
fn fault_source_frozen_during_multifd_makes_the_destination_exit_1() {
    source_frozen_mid_migration(
        "fault_source_frozen_during_multifd_makes_the_destination_exit_1",
        "f-stopsrc-mfd",
        &["multifd"],
        json!({"multifd-channels": 2}),
    );
}

#[test]
fn a_pause_before_switchover_longer_than_the_io_timeout_still_completes() {
    let test = "a_pause_before_switchover_longer_than_the_io_timeout_still_completes";
    let Some((_one, hosts)) = fault_case(test) else {
        return;
    };
    let (mut src, mut dst, uri) = pair_on_hosts("f-longpause", &hosts, &GUEST, true);
    set_caps(&mut src, &["pause-before-switchover", "multifd"]);
    set_caps(&mut dst, &["multifd"]);
    migrate(&mut src, &uri);
    let paused = wait_status(&mut src, &["pre-switchover"], Duration::from_secs(30));
    assert_eq!(paused["status"], "pre-switchover", "{paused}");
    // Three times the destination's silence limit (3 s): the source's keepalives carry it.
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(
        dst.try_wait(),
        None,
        "the destination waits for a paused source:\n{}",
        dst.log()
    );
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    assert_completed_and_identical(&mut src, &mut dst, &GUEST);
}

#[test]
fn fault_disk_full_for_a_file_target_fails_with_enospc_and_leaks_nothing() {
    let _one = one_guest_test_at_a_time();
    let test = "fault_disk_full_for_a_file_target_fails_with_enospc_and_leaks_nothing";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let fs = match Mount::new("f-diskfull", "tmpfs", Some("size=8m")) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            return;
        }
    };
    // 16 MiB of guest data cannot fit in 8 MiB.
    let guest = Guest {
        working_set: "16M",
        ..GUEST
    };
    let mut src = start_source(
        "f-diskfull-src",
        &guest,
        with_io_timeout(guest.source(None)),
    );
    let before = baseline(&src);
    let file: PathBuf = fs.path().join("guest.mig");
    migrate(&mut src, &format!("file:{}", file.display()));
    let t0 = Instant::now();
    let err = assert_failed_with(&mut src, Duration::from_secs(20), &["no space left"]);
    eprintln!("{test}: failed after {:?}: {err}", t0.elapsed());
    assert_source_intact(&mut src, &guest);
    if let Err(leak) = wait_back_to(src.pid(), &before, SETTLE) {
        panic!("{test}: the failed migration leaked: {leak}\n{}", src.log());
    }
    let written = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(
        written > 4 * MIB && written <= 8 * MIB,
        "the file filled the tmpfs before the error: {written} bytes"
    );
    drop(fs);
}

/// Polls query-migrate every 5 ms until the migration ended; returns the last reply.
fn wait_end_fast(f: &mut Ferry, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = f.cmd("query-migrate", json!({}));
        if matches!(
            info["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "migration not done within {timeout:?}: {info}\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hundred_back_to_back_migrations_each_to_a_fresh_process_keep_every_page() {
    let _one = one_guest_test_at_a_time();
    let test = "hundred_back_to_back_migrations_each_to_a_fresh_process_keep_every_page";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    const HOPS: usize = 100;
    let guest = Guest {
        memory: "64M",
        vcpus: 1,
        working_set: "2M",
        rate: 2000,
    };
    let socks = TempDir::new("b2b-socks");
    let t0 = Instant::now();
    let mut cur = start_source("b2b-0", &guest, guest.source(None));
    let mut written = cur.pages_written();
    let mut slowest = Duration::ZERO;
    let mut total_downtime = 0u64;
    for hop in 1..=HOPS {
        let path = socks.join(&format!("{hop}.sock"));
        let uri = format!("unix:{}", path.display());
        let mut next = Ferry::start(&format!("b2b-{hop}"), &guest.dest(&uri, None));
        wait_listening(&mut next);
        let h0 = Instant::now();
        migrate(&mut cur, &uri);
        let info = wait_end_fast(&mut cur, Duration::from_secs(20));
        assert_eq!(
            info["status"],
            "completed",
            "hop {hop}: {info}\n{}",
            cur.log()
        );
        slowest = slowest.max(h0.elapsed());
        total_downtime += info["downtime"].as_u64().unwrap_or(0);
        let d = wait_end_fast(&mut next, Duration::from_secs(10));
        assert_eq!(d["status"], "completed", "hop {hop}: {d}\n{}", next.log());
        assert_eq!(next.status(), "running", "hop {hop}: the guest runs on");
        // The guest's progress carried over: it never goes back.
        let now = next.pages_written();
        assert!(
            now >= written,
            "hop {hop}: the guest's progress went back from {written} to {now}"
        );
        written = now;
        // The old source is done: it quits cleanly and promptly.
        let _ = cur.try_cmd("quit", json!({}));
        let code = cur.wait_exit(Duration::from_secs(5));
        assert_eq!(
            code,
            Some(0),
            "hop {hop}: the old source exits 0\n{}",
            cur.log()
        );
        cur = next;
    }
    // Still dirtying, and every page is what the guest wrote.
    std::thread::sleep(Duration::from_millis(100));
    assert!(cur.pages_written() > written, "the guest still runs");
    let (checked, bad) = cur.guest_verify();
    assert_eq!((checked, bad), (guest.ws_pages(), 0), "after {HOPS} hops");
    eprintln!(
        "{test}: {HOPS} hops in {:?} (slowest migration {slowest:?}, total downtime {total_downtime} ms)",
        t0.elapsed()
    );
}

/// One flood client's tally.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    answered: u64,
    errors: u64,
}

/// Reads lines until the response with `id`; counts answers without an id (errors for
/// malformed input). Err when the connection ends or the deadline passes first.
fn read_until_id(
    r: &mut BufReader<UnixStream>,
    id: &str,
    tally: &mut Tally,
) -> Result<Value, String> {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err(format!("connection closed before the answer to {id}")),
            Ok(_) => {}
            Err(e) => return Err(format!("no answer to {id}: {e}")),
        }
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            return Err(format!("not JSON from the server: {line:?}"));
        };
        if v.get("event").is_some() {
            continue;
        }
        match v.get("id").and_then(Value::as_str) {
            Some(got) if got == id => return Ok(v),
            Some(other) => return Err(format!("answer to {other} while waiting for {id}")),
            None => tally.errors += 1,
        }
    }
}

/// One flood client: greeting, negotiation, then `rounds` of (client-specific bad
/// input, then a well-formed query-migrate whose answer it waits for).
fn flood_client(qmp: &Path, n: usize, rounds: u64) -> Result<Tally, String> {
    let s = UnixStream::connect(qmp).map_err(|e| format!("client {n}: connect: {e}"))?;
    // A client waits in the listen backlog until one of the server's slots frees.
    let timeout = Some(Duration::from_secs(30));
    s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    s.set_write_timeout(timeout).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut tally = Tally::default();
    let mut greeting = String::new();
    r.read_line(&mut greeting)
        .map_err(|e| format!("client {n}: no greeting: {e}"))?;
    if !greeting.contains("\"QMP\"") {
        return Err(format!("client {n}: not a greeting: {greeting:?}"));
    }
    let send = |w: &mut UnixStream, bytes: &[u8]| {
        w.write_all(bytes)
            .map_err(|e| format!("client {n}: write: {e}"))
    };
    send(
        &mut w,
        b"{\"execute\":\"qmp_capabilities\",\"id\":\"cap\"}\n",
    )?;
    let cap = read_until_id(&mut r, "cap", &mut tally)?;
    if cap.get("return").is_none() {
        return Err(format!("client {n}: qmp_capabilities: {cap}"));
    }
    for round in 0..rounds {
        match n % 5 {
            // Syntax errors and stray bytes; 0xFF resynchronizes the lexer (QEMU's rule).
            0 => send(&mut w, b"{\"execute\": }\n{\"execute\" \"x\"}\n\x01garbage!!\xff\n")?,
            // Too deep: 2000 open brackets, then a reset.
            1 => {
                let mut deep = vec![b'['; 2000];
                deep.extend_from_slice(b"\xff\n");
                send(&mut w, &deep)?;
            }
            // Wrong shapes: not an object, unknown command, bad arguments.
            2 => send(
                &mut w,
                b"[1,2,3]\n\"text\"\n{\"execute\":\"no-such-command\"}\n{\"execute\":\"query-migrate\",\"arguments\":{\"x\":1}}\n",
            )?,
            // Oversized: a 64 MiB + 1 token, once (client 3 only), else too many tokens.
            3 if n == 3 && round == 0 => {
                let mut big = vec![b'a'; (64 << 20) + 1];
                big.extend_from_slice(b"\xff\n");
                send(&mut w, &big)?;
            }
            3 if n == 8 && round == 0 => {
                let mut many = b"[".to_vec();
                // One token past the limit of 2 Mi (`[`, then 1 Mi times `0` `,`).
                many.extend(std::iter::repeat_n(b"0,".as_slice(), 1 << 20).flatten());
                many.extend_from_slice(b"0]\n");
                send(&mut w, &many)?;
            }
            // Valid only, back to back.
            _ => {}
        }
        let id = format!("c{n}-{round}");
        let req = format!("{{\"execute\":\"query-migrate\",\"id\":\"{id}\"}}\n");
        send(&mut w, req.as_bytes())?;
        tally.sent += 1;
        let v = read_until_id(&mut r, &id, &mut tally).map_err(|e| format!("client {n}: {e}"))?;
        if v.pointer("/return/status").is_none() {
            return Err(format!("client {n}: query-migrate answered {v}"));
        }
        tally.answered += 1;
    }
    Ok(tally)
}

#[test]
fn qmp_flood_during_a_migration_answers_every_command_and_the_migration_completes() {
    let _one = one_guest_test_at_a_time();
    let test = "qmp_flood_during_a_migration_answers_every_command_and_the_migration_completes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    const CLIENTS: usize = 20;
    const ROUNDS: u64 = 40;
    let guest = Guest {
        working_set: "16M",
        ..GUEST
    };
    let mut src = start_source("flood-src", &guest, guest.source(None));
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("flood-dst", dopts);
    // About two seconds of migration at 16 MiB/s.
    let before = baseline(&src);
    migrate_until_mid_way(&mut src, &uri, 16 * MIB, MIB);
    let qmp = src.qmp_path.clone();
    let go = Arc::new(AtomicBool::new(false));
    let answered_while_active = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (qmp, go) = (qmp.clone(), go.clone());
            std::thread::spawn(move || {
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                flood_client(&qmp, n, ROUNDS)
            })
        })
        .collect();
    go.store(true, Ordering::Release);
    // Meanwhile the test's own connection keeps asking, as a management tool would.
    let mut own = 0u64;
    loop {
        let info = src.cmd("query-migrate", json!({}));
        own += 1;
        if info["status"] == "active" {
            answered_while_active.fetch_add(1, Ordering::Relaxed);
        }
        if clients.iter().all(|c| c.is_finished()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the flood clients did not finish within 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let flood_time = t0.elapsed();
    let mut total = Tally::default();
    for c in clients {
        let t = c
            .join()
            .expect("flood client thread")
            .unwrap_or_else(|e| panic!("{e}\nsource log:\n{}", src.log()));
        assert_eq!(t.answered, t.sent, "every well-formed command was answered");
        total.sent += t.sent;
        total.answered += t.answered;
        total.errors += t.errors;
    }
    assert_eq!(total.answered, CLIENTS as u64 * ROUNDS);
    assert!(total.errors > 0, "malformed input was answered with errors");
    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    eprintln!(
        "{test}: {CLIENTS} clients, {} commands answered and {} errors for bad input in \
         {flood_time:?}; own connection {own} queries ({} while active); migration {} ms",
        total.answered,
        total.errors,
        answered_while_active.load(Ordering::Relaxed),
        info["total-time"]
    );
    // Every client's threads and socket are gone again.
    if let Err(leak) = wait_back_to(src.pid(), &before, SETTLE) {
        panic!("{test}: the flood left server resources behind: {leak}");
    }
}
