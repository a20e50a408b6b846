//! Live migration over a unix socket, and to a file restored by `ferry run --incoming file:`.

mod migration_support;

use std::time::Duration;

use migration_support::{assert_completed_and_identical, migrate, start_dest, start_source, SMALL};
use serde_json::json;
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, TempDir};

#[test]
fn live_migration_over_a_unix_socket_keeps_every_page() {
    let _one = one_guest_test_at_a_time();
    let test = "live_migration_over_a_unix_socket_keeps_every_page";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let dir = TempDir::new("unix-mig");
    let sock = dir.join("migration.sock");
    let mut src = start_source("unix-src", &guest, guest.source(None));
    let mut dopts = guest.dest(&format!("unix:{}", sock.display()), None);
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("unix-dst", dopts);
    assert!(
        sock.exists(),
        "the destination listens on {}",
        sock.display()
    );
    migrate(&mut src, &uri);
    assert_completed_and_identical(&mut src, &mut dst, &guest);
    let d = dst.cmd("query-migrate", json!({}));
    assert_eq!(d["socket-address"][0]["type"], "unix", "{d}");
}

#[test]
fn migration_to_a_file_is_restored_by_incoming_file() {
    let _one = one_guest_test_at_a_time();
    let test = "migration_to_a_file_is_restored_by_incoming_file";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let dir = TempDir::new("file-mig");
    let file = dir.join("guest.mig");
    let uri = format!("file:{}", file.display());
    let mut src = start_source("file-src", &guest, guest.source(None));
    migrate(&mut src, &uri);
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(
        src.status(),
        "postmigrate",
        "the source stops after a migration to a file"
    );
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 32 << 20,
        "the file must hold the working set ({size} bytes)"
    );
    let src_digest = src.cmd("ferry-memory-digest", json!({}))["digest"].clone();
    let src_progress = src.cmd("ferry-guest-progress", json!({}));
    drop(src);

    let mut dopts = guest.dest(&uri, None);
    dopts.extra.push("-S".into());
    let mut dst = Ferry::start("file-dst", &dopts);
    let d = dst.wait_migration_end(Duration::from_secs(30));
    assert_eq!(d["status"], "completed", "{d}\n{}", dst.log());
    assert_eq!(dst.status(), "paused");
    assert_eq!(
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        src_digest,
        "restored memory equals the source's when it stopped"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    assert_eq!(
        dst.cmd("ferry-guest-progress", json!({}))["vcpus"],
        src_progress["vcpus"],
        "vCPU progress restored exactly"
    );
    dst.cmd("cont", json!({}));
    let start = src_progress["pages-written"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(dst.pages_written() > start, "the restored guest runs on");
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
    assert_eq!(checked, guest.ws_pages());
}
