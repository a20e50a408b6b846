//! The command-line faces of live migration: `ferry migrate` and `ferry demo`.

mod migration_support;

use std::process::Command;
use std::time::Duration;

use migration_support::{start_dest, start_source, SMALL};
use serde_json::json;
use tests::{ferry_bin, kvm_missing, netns_missing, one_guest_test_at_a_time, skip_unless};

#[test]
fn ferry_migrate_sets_options_migrates_and_exits_0_only_when_completed() {
    let _one = one_guest_test_at_a_time();
    let test = "ferry_migrate_sets_options_migrates_and_exits_0_only_when_completed";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("cli-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("cli-dst", guest.dest("tcp:127.0.0.1:0", None));
    let out = Command::new(ferry_bin())
        .arg("migrate")
        .arg("--qmp")
        .arg(&src.qmp_path)
        .arg(&uri)
        .args(["--caps", "events,pause-before-switchover=off"])
        .args(["--set", "max-bandwidth=512M", "--set", "downtime-limit=250"])
        .output()
        .expect("run ferry migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("migration completed"),
        "summary:\n{stdout}"
    );
    for figure in [
        "total time",
        "downtime",
        "transferred",
        "throughput",
        "iterations",
    ] {
        assert!(stdout.contains(figure), "{figure} missing from:\n{stdout}");
    }
    // The progress display (a line a second when stderr is not a terminal) names its figures.
    assert!(
        stderr.contains("sent") && stderr.contains("left"),
        "{stderr}"
    );
    let params = src.cmd("query-migrate-parameters", json!({}));
    assert_eq!(params["max-bandwidth"], 512 << 20);
    assert_eq!(params["downtime-limit"], 250);
    let caps = src.cmd("query-migrate-capabilities", json!({}));
    let events = caps
        .as_array()
        .and_then(|c| c.iter().find(|c| c["capability"] == "events"))
        .map(|c| c["state"].clone());
    assert_eq!(events, Some(json!(true)), "{caps}");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed");

    // A migration that fails: exit 1, and the summary carries error-desc.
    let (mut dst2, _) = start_dest("cli-dst2", guest.dest("tcp:127.0.0.1:0", None));
    let out = Command::new(ferry_bin())
        .arg("migrate")
        .arg("--qmp")
        .arg(&dst2.qmp_path)
        .arg("tcp:127.0.0.1:1")
        .output()
        .expect("run ferry migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an incoming VM cannot migrate out: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("Guest is waiting for an incoming migration"),
        "{stderr}"
    );
    // A bad --set is a usage error.
    let out = Command::new(ferry_bin())
        .arg("migrate")
        .arg("--qmp")
        .arg(&dst2.qmp_path)
        .arg("tcp:127.0.0.1:1")
        .args(["--set", "max-bandwidth"])
        .output()
        .expect("run ferry migrate");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(dst2.status(), "inmigrate");
}

#[test]
fn ferry_migrate_reports_a_failed_migration_and_exits_1() {
    let _one = one_guest_test_at_a_time();
    let test = "ferry_migrate_reports_a_failed_migration_and_exits_1";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let src = start_source("cli-fail-src", &guest, guest.source(None));
    let out = Command::new(ferry_bin())
        .arg("migrate")
        .arg("--qmp")
        .arg(&src.qmp_path)
        .arg("tcp:127.0.0.1:0")
        .arg("--quiet")
        .output()
        .expect("run ferry migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("migration failed"), "{stdout}");
    assert!(
        stdout.contains("error "),
        "error-desc in the summary:\n{stdout}"
    );
}

#[test]
fn ferry_demo_migrates_between_two_hosts_and_passes() {
    let _one = one_guest_test_at_a_time();
    let test = "ferry_demo_migrates_between_two_hosts_and_passes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let with_netns = netns_missing().is_none();
    let out = Command::new(ferry_bin())
        .args([
            "demo",
            "--memory",
            "256M",
            "--vcpus",
            "1",
            "--working-set",
            "64M",
        ])
        .arg("--quiet")
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.trim_end().ends_with("PASS"), "{stdout}");
    assert!(
        stdout.contains("bad pages         0 of 16384"),
        "the guest checked its whole working set:\n{stdout}"
    );
    if with_netns {
        assert!(
            stdout.contains("network namespaces") && stdout.contains("198.18.0.2"),
            "{stdout}"
        );
    }
    // Nothing is left behind.
    let leftovers: Vec<String> = std::fs::read_dir("/tmp")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ferry-demo-"))
                .collect()
        })
        .unwrap_or_default();
    let mine: Vec<&String> = leftovers
        .iter()
        .filter(|n| {
            n.strip_prefix("ferry-demo-")
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .collect();
    assert!(mine.is_empty(), "scratch directories left behind: {mine:?}");
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in ns.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let pid = name
            .strip_prefix("ferry-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            assert!(
                std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "namespace {name} outlived its demo"
            );
        }
    }
}
