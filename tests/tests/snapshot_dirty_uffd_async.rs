//! Precopy with `--dirty-tracking uffd-async` (userfaultfd WP_ASYNC + PAGEMAP_SCAN instead
//! of KVM's dirty log): a dirtying guest migrates with every page intact.

mod snapshot_support;

use std::time::Duration;

use serde_json::json;
use snapshot_support::probe;
use tests::{free_port, kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions};

fn uffd_async_missing() -> Option<String> {
    if let Some(why) = kvm_missing() {
        return Some(why);
    }
    let p = probe();
    let src = p["dirty-tracking"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "uffd-async").cloned())
        .unwrap_or_default();
    if src["available"] == true {
        None
    } else {
        Some(format!(
            "ferry probe: uffd-async dirty tracking: {}",
            src["detail"]
        ))
    }
}

#[test]
fn precopy_with_uffd_async_dirty_tracking_keeps_every_page() {
    let _one = one_guest_test_at_a_time();
    let test = "precopy_with_uffd_async_dirty_tracking_keeps_every_page";
    if skip_unless(test, uffd_async_missing()) {
        return;
    }
    let port = free_port();
    let mut src = Ferry::start(
        "uffd-async-src",
        &FerryOptions {
            vcpus: 2,
            workload: Some("working-set=32M,rate=20000".into()),
            extra: vec!["--dirty-tracking".into(), "uffd-async".into()],
            ..FerryOptions::default()
        },
    );
    let mut dst = Ferry::start(
        "uffd-async-dst",
        &FerryOptions {
            vcpus: 2,
            workload: None,
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    // A slow first pass, so that the guest dirties pages the later passes must find.
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 64 << 20}));
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    // Then a link well above the guest's dirty rate (~80 MiB/s, about the slow link's
    // 64 MiB/s: at that rate the migration would never converge).
    src.wait_migration(Duration::from_secs(60), |i| {
        i["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
            || !matches!(i["status"].as_str(), Some("setup" | "active"))
    });
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30}),
    );
    let info = src.wait_migration_end(Duration::from_secs(120));
    assert_eq!(info["status"], "completed", "{info}\n{}", src.log());
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
        "pages dirtied during the first pass were found and sent again: {info}"
    );
    let d = dst.wait_migration_end(Duration::from_secs(30));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(
        src.cmd("ferry-memory-digest", json!({}))["digest"],
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        "destination memory equals the source's at switchover"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    dst.cmd("cont", json!({}));
    let (_, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
}

#[test]
fn unknown_dirty_tracking_names_the_choices() {
    if skip_unless("unknown_dirty_tracking_names_the_choices", kvm_missing()) {
        return;
    }
    let out = std::process::Command::new(tests::ferry_bin())
        .args(["run", "--dirty-tracking", "magic", "--serial", "none"])
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bitmap, ring[:ENTRIES] or uffd-async"),
        "{err}"
    );
}
