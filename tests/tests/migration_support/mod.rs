//! Shared steps of the live-migration end-to-end tests (`tests/migration_*.rs`).
//!
//! Every test boots real `ferry run` processes with real KVM guests; they are
//! small (256 MiB, 1-2 vCPUs) and run one at a time
//! ([`tests::one_guest_test_at_a_time`]). The three outcomes QEMU's suite
//! distinguishes are checked by [`assert_failed_with`],
//! [`assert_source_intact`] and [`assert_destination_refused`].

#![allow(dead_code)] // each test binary uses a different subset

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{Ferry, FerryOptions};

/// A guest for a test: memory, vCPUs, working set and dirty rate (pages/s, 0 = flat out).
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    /// `--memory`.
    pub memory: &'static str,
    /// `--vcpus`.
    pub vcpus: usize,
    /// Working set.
    pub working_set: &'static str,
    /// Dirty rate, pages per second.
    pub rate: u64,
}

/// The default small guest: 256 MiB, 1 vCPU, 32 MiB rewritten at 20000 pages/s.
pub const SMALL: Guest = Guest {
    memory: "256M",
    vcpus: 1,
    working_set: "32M",
    rate: 20_000,
};

impl Guest {
    /// Pages of the working set (what the guest verifies).
    pub fn ws_pages(&self) -> u64 {
        let t = self.working_set;
        let (num, unit) = match t.as_bytes().last() {
            Some(b'K') => (&t[..t.len() - 1], 1u64 << 10),
            Some(b'M') => (&t[..t.len() - 1], 1 << 20),
            Some(b'G') => (&t[..t.len() - 1], 1 << 30),
            _ => (t, 1),
        };
        num.parse::<u64>().unwrap_or(0) * unit / 4096
    }

    /// Options for a source running this guest (in `netns` when given).
    pub fn source(&self, netns: Option<&str>) -> FerryOptions {
        FerryOptions {
            memory: self.memory.into(),
            vcpus: self.vcpus,
            workload: Some(format!(
                "working-set={},rate={}",
                self.working_set, self.rate
            )),
            incoming: None,
            extra: Vec::new(),
            netns: netns.map(str::to_string),
        }
    }

    /// Options for a destination of this guest listening on `incoming`.
    pub fn dest(&self, incoming: &str, netns: Option<&str>) -> FerryOptions {
        FerryOptions {
            memory: self.memory.into(),
            vcpus: self.vcpus,
            workload: None,
            incoming: Some(incoming.into()),
            extra: Vec::new(),
            netns: netns.map(str::to_string),
        }
    }
}

/// Starts a source and waits until its guest has written its whole working set once
/// (at full speed), then sets the guest's rate back to `guest.rate`.
pub fn start_source(tag: &str, guest: &Guest, opts: FerryOptions) -> Ferry {
    let mut src = Ferry::start(tag, &opts);
    fill_working_set(&mut src, guest.rate);
    src
}

/// Makes the guest write its whole working set (rate 0 until every vCPU finished a
/// pass), then sets `rate`.
pub fn fill_working_set(f: &mut Ferry, rate: u64) {
    f.cmd("ferry-guest-set-rate", json!({"rate": 0}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = f.cmd("ferry-guest-progress", json!({}));
        let done = p["vcpus"].as_array().is_some_and(|v| {
            !v.is_empty() && v.iter().all(|c| c["passes"].as_u64().unwrap_or(0) >= 1)
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not fill its working set in 30 s: {p}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    f.cmd("ferry-guest-set-rate", json!({"rate": rate}));
}

/// Starts a destination and waits until it listens; returns it and its URI (the real
/// port when `incoming` asked for port 0).
pub fn start_dest(tag: &str, opts: FerryOptions) -> (Ferry, String) {
    let mut dst = Ferry::start(tag, &opts);
    let info = wait_listening(&mut dst);
    let incoming = opts.incoming.clone().unwrap_or_default();
    let uri = match info.pointer("/socket-address/0") {
        Some(a) if a["type"] == "inet" => format!(
            "tcp:{}:{}",
            a["host"].as_str().unwrap_or(""),
            a["port"].as_str().unwrap_or("")
        ),
        _ => incoming,
    };
    (dst, uri)
}

/// Waits until an incoming VMM listens (its query-migrate says `setup`).
pub fn wait_listening(dst: &mut Ferry) -> Value {
    dst.wait_migration(Duration::from_secs(10), |i| i["status"] == "setup")
}

/// Sets capabilities `on` (all true).
pub fn set_caps(f: &mut Ferry, on: &[&str]) {
    let caps: Vec<Value> = on
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    f.cmd("migrate-set-capabilities", json!({ "capabilities": caps }));
}

/// Sets parameters (a JSON object) and checks they read back.
pub fn set_params(f: &mut Ferry, params: Value) {
    f.cmd("migrate-set-parameters", params.clone());
    let got = f.cmd("query-migrate-parameters", json!({}));
    if let Value::Object(m) = &params {
        for (k, v) in m {
            assert_eq!(&got[k], v, "parameter {k} must read back as set: {got}");
        }
    }
}

/// Issues `migrate` to `uri`.
pub fn migrate(src: &mut Ferry, uri: &str) {
    src.cmd("migrate", json!({ "uri": uri }));
}

/// Waits for one of `statuses` on the source.
pub fn wait_status(f: &mut Ferry, statuses: &[&str], timeout: Duration) -> Value {
    f.wait_migration(timeout, |i| {
        statuses.iter().any(|s| i["status"].as_str() == Some(s))
    })
}

/// `ram.transferred` of a query-migrate reply.
pub fn transferred(info: &Value) -> u64 {
    info.pointer("/ram/transferred")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// `ram.dirty-sync-count` of a query-migrate reply.
pub fn sync_count(info: &Value) -> u64 {
    info.pointer("/ram/dirty-sync-count")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Waits until the source has sent at least `bytes` (the migration is "mid-way").
pub fn wait_transferred(src: &mut Ferry, bytes: u64, timeout: Duration) -> Value {
    src.wait_migration(timeout, |i| {
        transferred(i) >= bytes || i["status"] != "active" && i["status"] != "setup"
    })
}

/// The source's migration ended `failed` with an error that contains one of `words`
/// (case-insensitive); returns the error text.
pub fn assert_failed_with(src: &mut Ferry, timeout: Duration, words: &[&str]) -> String {
    let info = src.wait_migration_end(timeout);
    assert_eq!(info["status"], "failed", "the migration must fail: {info}");
    let desc = info["error-desc"].as_str().unwrap_or("").to_string();
    assert!(
        !desc.is_empty(),
        "a failed migration must say why in error-desc: {info}"
    );
    let lower = desc.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "error-desc should mention one of {words:?}: {desc}"
    );
    desc
}

/// The source guest runs, keeps writing, and verifies all its pages.
pub fn assert_source_intact(src: &mut Ferry, guest: &Guest) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while src.status() != "running" {
        assert!(
            Instant::now() < deadline,
            "the source guest must run again after the migration ended: {}\n{}",
            src.status(),
            src.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = src.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    let after = src.pages_written();
    assert!(
        after > before,
        "the source guest must keep running: {before} -> {after}"
    );
    let (checked, bad) = src.guest_verify();
    assert_eq!(bad, 0, "the source guest must verify all its pages");
    assert_eq!(
        checked,
        guest.ws_pages(),
        "pages checked by the source guest"
    );
}

/// The destination gives up: it exits non-zero, no guest having run there (QEMU's
/// behaviour for a failed incoming migration).
pub fn assert_destination_refused(dst: &mut Ferry, timeout: Duration) {
    let code = dst.wait_exit(timeout);
    assert!(
        code.is_some_and(|c| c != 0),
        "the destination must exit non-zero after a failed incoming migration, got {code:?} \
         (None: still running or killed by a signal)\nlog:\n{}",
        dst.log()
    );
    let log = dst.log();
    assert!(
        log.contains("load of migration failed"),
        "the destination must say why it refused:\n{log}"
    );
}

/// A completed migration to a destination started with `-S`: memory digests of the
/// source (postmigrate) and destination match, the host-side check finds no bad page,
/// the guest's progress counters are exactly the source's, then after `cont` they grow
/// and the guest verifies every page. Returns the source's final query-migrate.
pub fn assert_completed_and_identical(src: &mut Ferry, dst: &mut Ferry, guest: &Guest) -> Value {
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}\n{}", src.log());
    assert_eq!(src.status(), "postmigrate");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(dst.status(), "paused", "-S keeps the destination paused");
    let sd = src.cmd("ferry-memory-digest", json!({}));
    let dd = dst.cmd("ferry-memory-digest", json!({}));
    assert_eq!(
        sd["digest"], dd["digest"],
        "destination memory must equal the source's at switchover"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    let sp = src.cmd("ferry-guest-progress", json!({}));
    let dp = dst.cmd("ferry-guest-progress", json!({}));
    assert_eq!(
        sp["vcpus"], dp["vcpus"],
        "every vCPU's progress counters arrive exactly as the source left them"
    );
    dst.cmd("cont", json!({}));
    let start = dp["pages-written"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = start;
    while now <= start && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = dst.pages_written();
    }
    assert!(
        now > start,
        "the guest continues on the destination from the source's counters: {start} -> {now}"
    );
    let (checked, bad) = dst.guest_verify();
    assert_eq!(
        bad, 0,
        "the guest must verify all its pages on the destination"
    );
    assert_eq!(checked, guest.ws_pages());
    info
}
