//! Shared steps of the background-snapshot end-to-end tests (`tests/snapshot_*.rs`).
//!
//! Whether a test can run is decided by the same probe users see: `ferry probe --json`
//! (its `background-snapshot-ready` and per-backend `write-tracking` answers).

#![allow(dead_code)] // each test binary uses a different subset

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{ferry_bin, kvm_missing, Ferry};

/// `ferry probe --json`.
pub fn probe() -> Value {
    let out = Command::new(ferry_bin())
        .args(["probe", "--json"])
        .output()
        .expect("run ferry probe");
    serde_json::from_slice(&out.stdout).expect("ferry probe --json prints JSON")
}

/// The probe's write-tracking entry for `backend` ("memfd", "anon", ...).
pub fn write_tracking(probe: &Value, backend: &str) -> Value {
    probe["write-tracking"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["backend"] == backend).cloned())
        .unwrap_or(Value::Null)
}

/// Why background snapshots of `backend` memory cannot be tested here, if they cannot.
pub fn snapshot_missing(backend: &str) -> Option<String> {
    if let Some(why) = kvm_missing() {
        return Some(why);
    }
    let p = probe();
    let wt = write_tracking(&p, backend);
    if wt["support"] != "compatible" {
        return Some(format!(
            "ferry probe: write tracking of {backend} memory is {} ({})",
            wt["support"], wt["reason"]
        ));
    }
    if wt["unpopulated-wp"]["works"] != true {
        return Some(format!(
            "ferry probe: unpopulated {backend} pages cannot be write-protected: {}",
            wt["unpopulated-wp"]
        ));
    }
    None
}

/// Turns background-snapshot on and sets max-bandwidth (bytes/s).
pub fn enable_snapshots(f: &mut Ferry, bandwidth: u64) {
    f.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    f.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": bandwidth}),
    );
}

/// Each vCPU's (generation, pages written).
pub fn generations(f: &mut Ferry) -> Vec<(u64, u64)> {
    let p = f.cmd("ferry-guest-progress", json!({}));
    p["vcpus"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    (
                        v["generation"].as_u64().unwrap_or(0),
                        v["pages-written"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every vCPU of the guest has finished `passes` passes over its slice.
pub fn wait_generation(f: &mut Ferry, generation: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let g = generations(f);
        if !g.is_empty() && g.iter().all(|(gen, _)| *gen >= generation) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not reach generation {generation}: {g:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pages of process `pid` whose pagemap entry has the uffd-wp bit (57): pages still
/// write-protected by a userfaultfd, anywhere in the process.
pub fn uffd_wp_pages(pid: u32) -> u64 {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).expect("open pagemap");
    let mut count = 0;
    let mut buf = vec![0u8; 8 * 65536];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if line.ends_with("[vsyscall]") || !perms.starts_with("rw") {
            continue;
        }
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        let mut page = s / 4096;
        while page < e / 4096 {
            let n = (e / 4096 - page).min(65536) as usize;
            let bytes = &mut buf[..n * 8];
            if pagemap.read_exact_at(bytes, page * 8).is_err() {
                break;
            }
            count += bytes
                .chunks_exact(8)
                .filter(|c| c[7] & (1 << (57 - 56)) != 0)
                .count() as u64;
            page += n as u64;
        }
    }
    count
}

/// Polls query-migrate until the snapshot ends; returns the last reply and the guest's
/// pages-written figures seen while it was active (first, last).
pub fn wait_snapshot(f: &mut Ferry, timeout: Duration) -> (Value, Option<(u64, u64)>) {
    let deadline = Instant::now() + timeout;
    let mut seen: Option<(u64, u64)> = None;
    loop {
        let info = f.cmd("query-migrate", json!({}));
        match info["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => return (info, seen),
            Some("active") => {
                let w = f.pages_written();
                seen = Some(seen.map_or((w, w), |(a, _)| (a, w)));
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "snapshot did not end within {timeout:?}: {info}\n{}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
