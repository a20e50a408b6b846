//! Postcopy failure and recovery (issue 9) and release-ram (issue 13): a link cut in
//! postcopy pauses both sides while the guest keeps its place on the destination;
//! `migrate-recover` there and `migrate {"resume": true}` on the source finish the
//! migration over a new connection without losing a page. With release-ram the source
//! frees each page once the destination has it.

mod migration_support;

use std::time::{Duration, Instant};

use migration_support::{
    migrate, set_caps, set_params, start_dest, start_source, wait_status, wait_transferred, Guest,
};
use serde_json::{json, Value};
use tests::{free_port, kvm_missing, one_guest_test_at_a_time, skip_unless, Faults, Ferry, Proxy};

const MIB: u64 = 1 << 20;

/// A guest rewriting 32 MiB flat out.
const FAST: Guest = Guest {
    memory: "128M",
    vcpus: 1,
    working_set: "32M",
    rate: 0,
};

/// The same guest at 2000 pages/s (8 MiB/s): on the destination it faults on missing pages
/// for seconds, long enough to break the link twice.
const STEADY: Guest = Guest { rate: 2000, ..FAST };

fn start_pair(tag: &str, guest: &Guest, caps: &[&str]) -> (Ferry, Ferry, String) {
    let mut src = start_source(&format!("{tag}-src"), guest, guest.source(None));
    let (mut dst, uri) = start_dest(&format!("{tag}-dst"), guest.dest("tcp:127.0.0.1:0", None));
    set_caps(&mut src, caps);
    set_caps(&mut dst, caps);
    set_params(&mut src, json!({"max-bandwidth": 4 * MIB}));
    (src, dst, uri)
}

/// Precopy for a few MiB, then the switch; waits until postcopy is active on the source.
fn switch_to_postcopy(src: &mut Ferry, uri: &str) {
    migrate(src, uri);
    let mid = wait_transferred(src, 2 * MIB, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    src.cmd("migrate-start-postcopy", json!({}));
    let info = wait_status(
        src,
        &["postcopy-active", "completed", "failed"],
        Duration::from_secs(10),
    );
    // A small guest may finish its postcopy phase before the first poll sees it.
    let done_in_postcopy = info["status"] == "completed"
        && info
            .pointer("/ram/postcopy-bytes")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
            > 0;
    assert!(
        info["status"] == "postcopy-active" || done_in_postcopy,
        "{info}\n{}",
        src.log()
    );
}

fn wait_both_paused(src: &mut Ferry, dst: &mut Ferry) {
    let s = wait_status(
        src,
        &["postcopy-paused", "completed", "failed"],
        Duration::from_secs(10),
    );
    assert_eq!(s["status"], "postcopy-paused", "{s}\n{}", src.log());
    let d = wait_status(
        dst,
        &["postcopy-paused", "completed", "failed"],
        Duration::from_secs(10),
    );
    assert_eq!(d["status"], "postcopy-paused", "{d}\n{}", dst.log());
}

/// `migrate-recover` on the destination, `migrate` with resume on the source.
fn recover(src: &mut Ferry, dst: &mut Ferry) {
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    dst.cmd("migrate-recover", json!({"uri": uri}));
    src.cmd("migrate", json!({"uri": uri, "resume": true}));
    let s = wait_status(
        src,
        &["postcopy-active", "completed", "failed"],
        Duration::from_secs(10),
    );
    assert!(
        s["status"] == "postcopy-active" || s["status"] == "completed",
        "{s}\n{}",
        src.log()
    );
}

fn wait_completed(src: &mut Ferry, dst: &mut Ferry) -> (Value, Value) {
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}\n{}", dst.log());
    (info, d)
}

fn assert_guest_intact(dst: &mut Ferry, guest: &Guest) {
    assert_eq!(dst.status(), "running");
    let before = dst.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        dst.pages_written() > before,
        "the guest runs on the destination"
    );
    let (checked, bad) = dst.guest_verify();
    assert_eq!(
        bad, 0,
        "the guest must verify every page on the destination"
    );
    assert_eq!(checked, guest.ws_pages());
}

#[test]
fn a_link_cut_in_postcopy_pauses_both_sides_and_recovery_loses_no_page() {
    let _one = one_guest_test_at_a_time();
    let test = "a_link_cut_in_postcopy_pauses_both_sides_and_recovery_loses_no_page";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (mut src, mut dst, uri) =
        start_pair("pcrec", &STEADY, &["postcopy-ram", "postcopy-preempt"]);
    let target = uri
        .strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .expect("tcp uri");
    let proxy = Proxy::start(target, Faults::default()).expect("start the proxy");
    // Background pages at 1 MiB/s: postcopy lasts seconds, long enough to cut it.
    set_params(&mut src, json!({"max-postcopy-bandwidth": MIB}));
    switch_to_postcopy(&mut src, &proxy.uri());
    std::thread::sleep(Duration::from_millis(300));
    proxy.cut();
    wait_both_paused(&mut src, &mut dst);
    // The guest keeps its place on the destination (vCPUs wait for missing pages).
    let err = src.cmd_err("migrate_cancel", json!({}));
    assert!(
        err.contains("Postcopy"),
        "postcopy cannot be cancelled: {err}"
    );
    recover(&mut src, &mut dst);

    // A second break, this time by command on the destination, and a second recovery.
    std::thread::sleep(Duration::from_millis(200));
    dst.cmd("migrate-pause", json!({}));
    wait_both_paused(&mut src, &mut dst);
    recover(&mut src, &mut dst);
    // Now let the background stream run at full speed (the hook reaches postcopy).
    src.cmd(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    );
    let (info, d) = wait_completed(&mut src, &mut dst);
    eprintln!(
        "{test}: source {}; destination {}",
        info["x-ferry-postcopy"], d["x-ferry-postcopy"]
    );
    assert_eq!(d["x-ferry-postcopy"]["pages-missing"], 0, "{d}");
    assert!(
        proxy.connections() >= 2,
        "main stream and preempt channel went through the proxy"
    );
    assert_eq!(
        dst.log().matches("postcopy paused").count(),
        2,
        "two breaks, two pauses:\n{}",
        dst.log()
    );
    assert_guest_intact(&mut dst, &STEADY);
}

#[test]
fn release_ram_frees_the_source_memory_the_destination_has() {
    let _one = one_guest_test_at_a_time();
    let test = "release_ram_frees_the_source_memory_the_destination_has";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (mut src, mut dst, uri) = start_pair("pcrel", &FAST, &["postcopy-ram", "release-ram"]);
    let before = src.status_kib("RssShmem");
    assert!(
        before >= 32 << 10,
        "the source guest's working set is resident: {before} KiB"
    );
    switch_to_postcopy(&mut src, &uri);
    let (info, _) = wait_completed(&mut src, &mut dst);
    let released = info["x-ferry-postcopy"]["released-pages"]
        .as_u64()
        .unwrap_or(0);
    // The source process lets go of its memory once the destination has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = src.status_kib("RssShmem");
    while after > before / 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = src.status_kib("RssShmem");
    }
    eprintln!("{test}: RssShmem {before} KiB -> {after} KiB, {released} pages released");
    assert!(
        after <= before / 4,
        "release-ram: RssShmem must drop: {before} KiB -> {after} KiB"
    );
    assert!(released >= FAST.ws_pages(), "{info}");
    assert_guest_intact(&mut dst, &FAST);
}
