//! Convergence: a guest that dirties memory faster than max-bandwidth never converges
//! without auto-converge, converges with it (throttled by QEMU's rule), and a live change
//! of max-bandwidth changes the rate the migration runs at.

mod migration_support;

use std::time::{Duration, Instant};

use migration_support::{
    assert_source_intact, migrate, set_caps, set_params, start_dest, start_source, sync_count,
    transferred, wait_status, Guest, SMALL,
};
use serde_json::{json, Value};
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry};

const MIB: u64 = 1 << 20;

/// 9 MiB rewritten at 12000 pages/s (about 48 MB/s): six times what 8 MiB/s carries. A
/// pass over the working set takes just over a second at 8 MiB/s, so each pass closes one
/// of QEMU's dirty-rate periods (a sync at least 1 s after the last).
const FAST_DIRTIER: Guest = Guest {
    working_set: "9M",
    rate: 12_000,
    ..SMALL
};

fn pair(tag: &str, guest: &Guest) -> (Ferry, Ferry, String) {
    let src = start_source(&format!("{tag}-src"), guest, guest.source(None));
    let (dst, uri) = start_dest(&format!("{tag}-dst"), guest.dest("tcp:127.0.0.1:0", None));
    (src, dst, uri)
}

fn throttle(info: &Value) -> u64 {
    info["cpu-throttle-percentage"].as_u64().unwrap_or(0)
}

#[test]
fn dirtying_faster_than_max_bandwidth_never_converges_without_auto_converge() {
    let _one = one_guest_test_at_a_time();
    let test = "dirtying_faster_than_max_bandwidth_never_converges_without_auto_converge";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = FAST_DIRTIER;
    let (mut src, _dst, uri) = pair("noconv", &guest);
    set_params(&mut src, json!({"max-bandwidth": 8 * MIB}));
    migrate(&mut src, &uri);
    wait_status(&mut src, &["active"], Duration::from_secs(10));
    // Keep iterating: passes go by, the status stays active, nothing throttles.
    let t0 = Instant::now();
    let mut last = Value::Null;
    while sync_count(&last) < 4 {
        last = src.cmd("query-migrate", json!({}));
        assert_eq!(
            last["status"], "active",
            "the migration must keep iterating: {last}"
        );
        assert_eq!(throttle(&last), 0, "no auto-converge, no throttle: {last}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "passes must go by: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let expected = last["expected-downtime"].as_u64().unwrap_or(0);
    assert!(
        expected > 300,
        "the expected downtime stays above downtime-limit (300 ms): {last}"
    );
    src.cmd("migrate_cancel", json!({}));
    let info = wait_status(&mut src, &["cancelled"], Duration::from_secs(10));
    assert_eq!(info["status"], "cancelled");
    assert_source_intact(&mut src, &guest);
}

#[test]
fn auto_converge_throttles_by_qemus_rule_until_the_migration_converges() {
    let _one = one_guest_test_at_a_time();
    let test = "auto_converge_throttles_by_qemus_rule_until_the_migration_converges";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = FAST_DIRTIER;
    let (mut src, mut dst, uri) = pair("autoconv", &guest);
    set_caps(&mut src, &["auto-converge"]);
    // 50 -> 70 -> 90 (110 capped at max-cpu-throttle): only at 90 % does the guest dirty
    // clearly less than 8 MiB/s carries (at 70 % it still rewrites its whole working set
    // during a pass).
    set_params(
        &mut src,
        json!({
            "max-bandwidth": 8 * MIB,
            "cpu-throttle-initial": 50,
            "cpu-throttle-increment": 20,
            "max-cpu-throttle": 90,
        }),
    );
    migrate(&mut src, &uri);
    let mut seen: Vec<u64> = vec![0];
    let mut syncs_at_first_throttle = None;
    let info = loop {
        let info = src.cmd("query-migrate", json!({}));
        let pct = throttle(&info);
        if pct != *seen.last().unwrap_or(&0) {
            eprintln!(
                "{test}: throttle {pct}% at {} ms, pass {}",
                info["total-time"],
                sync_count(&info)
            );
            if syncs_at_first_throttle.is_none() {
                syncs_at_first_throttle = Some(sync_count(&info));
            }
            seen.push(pct);
        }
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => panic!("{info}"),
            _ => {}
        }
        assert!(
            seen.len() < 10,
            "the throttle keeps changing: {seen:?} {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Values after completion read 0 again: drop a trailing 0.
    if seen.len() > 1 && seen.last() == Some(&0) {
        seen.pop();
    }
    assert_eq!(
        seen,
        vec![0, 50, 70, 90],
        "throttle must start at cpu-throttle-initial, step by cpu-throttle-increment and \
         stop at max-cpu-throttle; final {info}"
    );
    // Ferry counts no sync at setup (QEMU does), so two closed periods = two syncs.
    assert!(
        syncs_at_first_throttle.unwrap_or(0) >= 2,
        "QEMU throttles only after two high dirty-rate periods, each closed by a sync: \
         first throttle at dirty-sync-count {syncs_at_first_throttle:?}"
    );
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while dst.status() != "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
    assert_eq!(checked, guest.ws_pages());
    // The destination guest is not throttled.
    let a = dst.pages_written();
    std::thread::sleep(Duration::from_millis(300));
    let rate = (dst.pages_written() - a) as f64 / 0.3;
    assert!(
        rate > guest.rate as f64 * 0.5,
        "the destination guest runs at full speed: {rate:.0} pages/s"
    );
}

/// Bytes per second sent over `window`, measured from query-migrate.
fn measured_rate(src: &mut Ferry, window: Duration) -> f64 {
    let a = src.cmd("query-migrate", json!({}));
    let t = Instant::now();
    std::thread::sleep(window);
    let b = src.cmd("query-migrate", json!({}));
    assert_eq!(b["status"], "active", "{b}");
    (transferred(&b) - transferred(&a)) as f64 / t.elapsed().as_secs_f64()
}

#[test]
fn changing_max_bandwidth_during_a_migration_changes_the_measured_rate() {
    let _one = one_guest_test_at_a_time();
    let test = "changing_max_bandwidth_during_a_migration_changes_the_measured_rate";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // 64 MiB of data: the first pass outlasts both measurements.
    let guest = Guest {
        working_set: "64M",
        rate: 1_000,
        ..SMALL
    };
    let (mut src, _dst, uri) = pair("bw", &guest);
    set_params(&mut src, json!({"max-bandwidth": 4 * MIB}));
    migrate(&mut src, &uri);
    wait_status(&mut src, &["active"], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let slow = measured_rate(&mut src, Duration::from_millis(1000));
    set_params(&mut src, json!({"max-bandwidth": 16 * MIB}));
    // The limiter applies a change within one 100 ms window.
    std::thread::sleep(Duration::from_millis(200));
    let fast = measured_rate(&mut src, Duration::from_millis(1000));
    eprintln!(
        "{test}: {:.2} MiB/s at 4 MiB/s, {:.2} MiB/s at 16 MiB/s",
        slow / MIB as f64,
        fast / MIB as f64
    );
    let within = |got: f64, want: u64| (got - want as f64).abs() <= want as f64 * 0.15;
    assert!(
        within(slow, 4 * MIB),
        "rate at max-bandwidth 4 MiB/s: {slow:.0} B/s"
    );
    assert!(
        within(fast, 16 * MIB),
        "rate at max-bandwidth 16 MiB/s: {fast:.0} B/s"
    );
    src.cmd("migrate_cancel", json!({}));
    wait_status(&mut src, &["cancelled"], Duration::from_secs(10));
    assert_source_intact(&mut src, &guest);
}

#[test]
fn remaining_shrinks_while_the_first_pass_sends_pages() {
    let _one = one_guest_test_at_a_time();
    let test = "remaining_shrinks_while_the_first_pass_sends_pages";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // QEMU's ram.remaining is the dirty bitmap's live count: every page sent leaves it.
    let guest = Guest {
        working_set: "64M",
        rate: 1_000,
        ..SMALL
    };
    let (mut src, _dst, uri) = pair("remaining", &guest);
    set_params(&mut src, json!({"max-bandwidth": 16 * MIB}));
    migrate(&mut src, &uri);
    wait_status(&mut src, &["active"], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let a = src.cmd("query-migrate", json!({}));
    std::thread::sleep(Duration::from_millis(1000));
    let b = src.cmd("query-migrate", json!({}));
    src.cmd("migrate_cancel", json!({}));
    wait_status(&mut src, &["cancelled"], Duration::from_secs(10));
    assert_eq!(
        sync_count(&b),
        sync_count(&a),
        "still the first pass: {a} {b}"
    );
    let (ra, rb) = (
        a["ram"]["remaining"].as_u64().unwrap_or(0),
        b["ram"]["remaining"].as_u64().unwrap_or(0),
    );
    let sent = transferred(&b) - transferred(&a);
    assert!(
        rb < ra && ra - rb >= sent / 2,
        "ram.remaining must shrink as pages are sent, as QEMU's does (the dirty pages not yet \
         sent); Ferry reports the count of the last sync for a whole pass ({sent} bytes sent \
         in 1 s): {ra} -> {rb}"
    );
}
