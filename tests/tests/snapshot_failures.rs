//! A background snapshot that is cancelled or fails (disk full, file removed) leaves the
//! guest running with no page write-protected, and removes its partial file.

mod snapshot_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use snapshot_support::{enable_snapshots, snapshot_missing, uffd_wp_pages, wait_snapshot};
use tests::{one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions, TempDir};

/// A guest whose 64 MiB working set makes a snapshot long enough to interrupt.
fn start_guest(tag: &str) -> Ferry {
    let mut f = Ferry::start(
        tag,
        &FerryOptions {
            memory: "256M".into(),
            vcpus: 1,
            workload: Some("working-set=64M,rate=0".into()),
            ..FerryOptions::default()
        },
    );
    // Let it write its whole working set once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while f.pages_written() < 16384 {
        assert!(std::time::Instant::now() < deadline, "guest too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    f
}

/// Waits until the snapshot is active; returns query-migrate.
fn wait_active(f: &mut Ferry) -> Value {
    f.wait_migration(Duration::from_secs(20), |i| {
        matches!(
            i["status"].as_str(),
            Some("active" | "failed" | "completed")
        )
    })
}

/// The guest runs, verifies clean, and nothing of it is write-protected.
fn assert_guest_intact(f: &mut Ferry) {
    assert_eq!(f.status(), "running");
    assert_eq!(uffd_wp_pages(f.pid()), 0, "no page left write-protected");
    let p = f.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(f.pages_written() > p, "the guest keeps running");
    let (_, bad) = f.guest_verify();
    assert_eq!(bad, 0, "guest verify");
}

#[test]
fn cancelled_snapshot_leaves_the_guest_running_unprotected() {
    let _one = one_guest_test_at_a_time();
    let test = "cancelled_snapshot_leaves_the_guest_running_unprotected";
    if skip_unless(test, snapshot_missing("memfd")) {
        return;
    }
    let dir = TempDir::new("snap-cancel");
    let file = dir.join("cancelled.ferry");
    let mut f = start_guest("snap-cancel");
    // 4 MiB/s: 64 MiB would take 16 s.
    enable_snapshots(&mut f, 4 << 20);
    f.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let info = wait_active(&mut f);
    assert_eq!(info["status"], "active", "{info}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        uffd_wp_pages(f.pid()) > 0,
        "mid-snapshot, unsaved pages are write-protected (the check sees them)"
    );
    // A second migrate and capability changes are refused while it runs.
    let e = f.cmd_err(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert_eq!(e, "There's a migration process in progress");
    f.cmd("migrate_cancel", json!({}));
    let (info, _) = wait_snapshot(&mut f, Duration::from_secs(20));
    assert_eq!(info["status"], "cancelled", "{info}");
    assert!(!file.exists(), "the partial file is removed");
    assert_guest_intact(&mut f);
    // The next snapshot works.
    f.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    f.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let (info, _) = wait_snapshot(&mut f, Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(file.exists());
    assert_guest_intact(&mut f);
}

/// A small tmpfs mounted for the test (unmounted on drop), or None when mounting fails.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_fails_the_snapshot_and_leaves_the_guest_running() {
    let _one = one_guest_test_at_a_time();
    let test = "disk_full_fails_the_snapshot_and_leaves_the_guest_running";
    if skip_unless(test, snapshot_missing("memfd")) {
        return;
    }
    let dir = TempDir::new("snap-full");
    // 8 MiB of room for a 64 MiB working set: the disk fills up mid-snapshot, with most
    // pages still protected. Without the right to mount, /dev/full fails the first write.
    let fs = SmallFs::mount(&dir.join("small"), "8M");
    let file = match &fs {
        Some(fs) => fs.0.join("snapshot.ferry"),
        None => {
            eprintln!("{test}: cannot mount a tmpfs, using /dev/full");
            PathBuf::from("/dev/full")
        }
    };
    let mut f = start_guest("snap-full");
    enable_snapshots(&mut f, 0);
    f.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let (info, _) = wait_snapshot(&mut f, Duration::from_secs(60));
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("No space left on device"), "{info}");
    if fs.is_some() {
        let report = f.cmd("ferry-query-snapshot", json!({}));
        assert!(
            report["pages-done"].as_u64().unwrap_or(0) > 0
                && report["pages-done"] != report["pages-total"],
            "it failed in the middle: {report}"
        );
        assert!(!file.exists(), "the partial file is removed");
    }
    assert_guest_intact(&mut f);
}

#[test]
fn removed_file_fails_the_snapshot_and_leaves_the_guest_running() {
    let _one = one_guest_test_at_a_time();
    let test = "removed_file_fails_the_snapshot_and_leaves_the_guest_running";
    if skip_unless(test, snapshot_missing("memfd")) {
        return;
    }
    let dir = TempDir::new("snap-removed");
    let file = dir.join("removed.ferry");
    let mut f = start_guest("snap-removed");
    enable_snapshots(&mut f, 8 << 20);
    f.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let info = wait_active(&mut f);
    assert_eq!(info["status"], "active", "{info}");
    std::fs::remove_file(&file).expect("the snapshot file exists while it is written");
    let (info, _) = wait_snapshot(&mut f, Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap_or("")
            .contains("was removed or replaced"),
        "{info}"
    );
    assert_guest_intact(&mut f);
}
