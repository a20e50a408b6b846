//! The shortest path through live migration: loopback TCP, a dirtying guest, verify on the destination.

use std::time::Duration;

use serde_json::json;
use tests::{free_port, kvm_missing, skip_unless, Ferry, FerryOptions};

#[test]
fn precopy_over_loopback_tcp_keeps_every_page() {
    if skip_unless("precopy_over_loopback_tcp_keeps_every_page", kvm_missing()) {
        return;
    }
    let port = free_port();
    let mut src = Ferry::start(
        "smoke-src",
        &FerryOptions {
            vcpus: 2,
            ..FerryOptions::default()
        },
    );
    let mut dst = Ferry::start(
        "smoke-dst",
        &FerryOptions {
            vcpus: 2,
            workload: None,
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    assert_eq!(dst.status(), "inmigrate");
    std::thread::sleep(Duration::from_millis(300));
    let before = src.pages_written();
    assert!(before > 0, "the guest must be dirtying memory");
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(src.status(), "postmigrate");
    // The destination was started with -S: memory can be compared before the guest moves.
    let d = dst.wait_migration_end(Duration::from_secs(10));
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
    let after = dst.pages_written();
    assert!(
        after >= before,
        "progress continues from the source's: {before} -> {after}"
    );
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
    assert_eq!(checked, 64 << 8);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dst.pages_written() > after,
        "the guest keeps running on the destination"
    );
}
