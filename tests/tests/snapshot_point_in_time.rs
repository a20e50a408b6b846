//! Background snapshots of a running, writing guest hold memory exactly as it was when
//! the snapshot started, and `ferry run --restore` resumes the guest from that instant.

mod snapshot_support;

use std::time::Duration;

use serde_json::json;
use snapshot_support::{
    enable_snapshots, generations, snapshot_missing, uffd_wp_pages, wait_generation, wait_snapshot,
};
use tests::{one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions, TempDir};

/// Boots a guest, snapshots it while it rewrites its working set, restores the file in a
/// second process and checks the restored guest against the start instant.
fn snapshot_and_restore(tag: &str, memory: &str, vcpus: usize) {
    let dir = TempDir::new(tag);
    let file = dir.join("snapshot.ferry");
    let mut src = Ferry::start(
        &format!("{tag}-src"),
        &FerryOptions {
            memory: memory.into(),
            vcpus,
            // Flat out: the guest rewrites its 16 MiB many times while the snapshot runs.
            workload: Some("working-set=16M,rate=0".into()),
            ..FerryOptions::default()
        },
    );
    // Generation N: every vCPU has rewritten its whole slice at least twice.
    wait_generation(&mut src, 3, Duration::from_secs(20));
    let at_start = generations(&mut src);
    // 16 MiB/s: the ~17 MiB of data take about a second.
    enable_snapshots(&mut src, 16 << 20);
    // Also hash guest memory during the stall: an independent reference for the file.
    let s = src.cmd("ferry-snapshot-settings", json!({"verify-digest": true}));
    assert_eq!(s["verify-digest"], true);
    src.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let (info, active) = wait_snapshot(&mut src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}\n{}", src.log());
    assert_eq!(
        src.status(),
        "running",
        "the guest runs on after a snapshot"
    );

    // The guest kept running: generation N+1 and later were written during the snapshot.
    let (first, last) = active.expect("query-migrate saw the snapshot active");
    assert!(
        last > first + 10_000,
        "the guest kept writing during the snapshot: {first} -> {last} pages"
    );
    let after = generations(&mut src);
    for (s, a) in at_start.iter().zip(&after) {
        assert!(
            a.0 > s.0 + 1,
            "generations moved on: {at_start:?} -> {after:?}"
        );
    }
    let report = src.cmd("ferry-query-snapshot", json!({}));
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["guest-running"], true, "{report}");
    assert!(report["faults"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(
        report["pages-from-faults"].as_u64().unwrap_or(0) > 0,
        "some pages were saved by the fault handler before the guest rewrote them: {report}"
    );
    assert!(
        report["hole-pages"].as_u64().unwrap_or(0) > 0,
        "never-touched memory goes out as zero runs: {report}"
    );
    assert_eq!(info["ram"]["remaining"], 0, "{info}");
    assert!(
        info["downtime"].as_u64().unwrap_or(u64::MAX) < 1000,
        "the stall is short: {info}"
    );
    assert_eq!(uffd_wp_pages(src.pid()), 0, "no page stays protected");
    // The digest of memory taken while the guest was stopped at the start (not derived
    // from what was written).
    let start_digest = report["stall-digest"].clone();
    assert!(start_digest.is_string(), "{report}");
    assert_eq!(report["start-digest"], start_digest, "{report}");

    // Restore: paused first, to compare memory before the guest moves.
    let mut dst = Ferry::start(
        &format!("{tag}-dst"),
        &FerryOptions {
            memory: memory.into(),
            vcpus,
            workload: None,
            extra: vec!["--restore".into(), file.display().to_string(), "-S".into()],
            ..FerryOptions::default()
        },
    );
    let d = dst.wait_migration_end(Duration::from_secs(60));
    assert_eq!(d["status"], "completed", "{d}\n{}", dst.log());
    assert_eq!(dst.status(), "paused");
    assert_eq!(
        dst.cmd("ferry-memory-page-digest", json!({}))["digest"],
        start_digest,
        "the restored memory is the source's memory at the start instant"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    // The restored guest is at the start instant: at or after what it had written before
    // `migrate`, at or before what it had written when the snapshot was first seen active.
    let restored = generations(&mut dst);
    let total = |g: &[(u64, u64)]| g.iter().map(|x| x.1).sum::<u64>();
    assert!(
        total(&restored) >= total(&at_start) && total(&restored) <= first,
        "restored progress {restored:?} lies between {at_start:?} and {first} pages"
    );
    dst.cmd("cont", json!({}));
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0, "guest verify after restore");
    assert_eq!(checked, 16 << 8);
    let p1 = dst.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(dst.pages_written() > p1, "the restored guest runs");
    // The source is unaffected.
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0, "source guest verify");
}

#[test]
fn snapshot_of_memfd_memory_restores_the_start_instant() {
    let _one = one_guest_test_at_a_time();
    let test = "snapshot_of_memfd_memory_restores_the_start_instant";
    if skip_unless(test, snapshot_missing("memfd")) {
        return;
    }
    snapshot_and_restore("snap-memfd", "256M", 2);
}

#[test]
fn snapshot_of_anonymous_memory_restores_the_start_instant() {
    let _one = one_guest_test_at_a_time();
    let test = "snapshot_of_anonymous_memory_restores_the_start_instant";
    if skip_unless(test, snapshot_missing("anon")) {
        return;
    }
    snapshot_and_restore("snap-anon", "256M,backend=anon", 1);
}

#[test]
fn snapshot_of_a_paused_guest_restores_paused() {
    let _one = one_guest_test_at_a_time();
    let test = "snapshot_of_a_paused_guest_restores_paused";
    if skip_unless(test, snapshot_missing("memfd")) {
        return;
    }
    let dir = TempDir::new("snap-paused");
    let file = dir.join("paused.ferry");
    let mut src = Ferry::start("snap-paused-src", &FerryOptions::default());
    wait_generation(&mut src, 1, Duration::from_secs(20));
    src.cmd("stop", json!({}));
    let digest = src.cmd("ferry-memory-page-digest", json!({}))["digest"].clone();
    enable_snapshots(&mut src, 0);
    src.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let (info, _) = wait_snapshot(&mut src, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(src.status(), "paused", "a paused guest stays paused");
    let report = src.cmd("ferry-query-snapshot", json!({}));
    assert_eq!(report["start-digest"], digest, "{report}");
    assert_eq!(report["guest-running"], false, "{report}");
    assert_eq!(
        report["faults"], 0,
        "nothing is protected for a paused guest: {report}"
    );
    assert!(report["unpopulated"].is_null(), "{report}");
    // Without -S, a guest saved while paused comes back paused (as after a migration).
    let mut dst = Ferry::start(
        "snap-paused-dst",
        &FerryOptions {
            workload: None,
            extra: vec!["--restore".into(), file.display().to_string()],
            ..FerryOptions::default()
        },
    );
    let d = dst.wait_migration_end(Duration::from_secs(60));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(dst.status(), "paused");
    assert_eq!(
        dst.cmd("ferry-memory-page-digest", json!({}))["digest"],
        digest
    );
    dst.cmd("cont", json!({}));
    assert_eq!(dst.guest_verify().1, 0);
}
