//! The timeline of real migrations (`ferry-query-migrate-timeline`) and the reports
//! `ferry migrate --report` draws from it: monotonic in time, sampled at every dirty sync
//! and at least every 100 ms, its last sample equal to the final query-migrate, its pass
//! count equal to dirty-sync-count; the chart well-formed and not blank when a real
//! renderer (resvg) draws it.
//!
//! Set FERRY_REPORT_KEEP=DIR to keep the charts of these migrations for a look.

mod migration_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use migration::info::MigrationStatus;
use migration::timeline::{EventKind, SampleKind, Timeline};
use migration_support::{start_dest, start_source, Guest, SMALL};
use serde_json::{json, Value};
use tests::{ferry_bin, kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, TempDir};

const MIB: u64 = 1 << 20;

/// 9 MiB rewritten at 12000 pages/s: more than 8 MiB/s carries, so auto-converge must
/// throttle before the migration converges (as in migration_convergence.rs).
const FAST_DIRTIER: Guest = Guest {
    working_set: "9M",
    rate: 12_000,
    ..SMALL
};

fn timeline(src: &mut Ferry) -> Timeline {
    let v = src.cmd("ferry-query-migrate-timeline", json!({}));
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("the timeline does not parse ({e}): {v}"))
}

fn ferry_migrate(src: &Ferry, uri: &str, args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .arg("migrate")
        .arg("--qmp")
        .arg(&src.qmp_path)
        .arg(uri)
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run ferry migrate")
}

fn keep(path: &Path) {
    if let (Some(dir), Some(name)) = (std::env::var_os("FERRY_REPORT_KEEP"), path.file_name()) {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(path, Path::new(&dir).join(name));
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Checks what every finished timeline must satisfy against the final query-migrate.
fn assert_consistent(tl: &Timeline, info: &Value) {
    assert!(!tl.samples.is_empty());
    for w in tl.samples.windows(2) {
        assert!(
            w[0].t_ms <= w[1].t_ms,
            "samples go back in time: {:?} then {:?}",
            w[0],
            w[1]
        );
        assert!(
            w[0].transferred <= w[1].transferred,
            "transferred shrinks: {} then {}",
            w[0].transferred,
            w[1].transferred
        );
    }
    for w in tl.events.windows(2) {
        assert!(
            w[0].t_ms <= w[1].t_ms,
            "events out of order: {:?}",
            tl.events
        );
    }
    let last = tl.last().expect("a last sample");
    assert_eq!(info["status"], last.status.as_str(), "{info}");
    assert_eq!(tl.status, last.status);
    let ram = |k: &str| info.pointer(&format!("/ram/{k}")).and_then(Value::as_u64);
    if let Some(transferred) = ram("transferred") {
        assert_eq!(last.transferred, transferred, "last sample vs {info}");
        assert_eq!(Some(last.remaining), ram("remaining"));
        assert_eq!(Some(last.dirty_sync_count), ram("dirty-sync-count"));
        assert_eq!(Some(last.dirty_pages_rate), ram("dirty-pages-rate"));
        let mbps = info.pointer("/ram/mbps").and_then(Value::as_f64);
        assert!(
            mbps.is_some_and(|m| close(m, last.mbps)),
            "mbps {mbps:?} vs {}",
            last.mbps
        );
        let syncs = ram("dirty-sync-count").unwrap_or(0);
        assert_eq!(tl.passes, syncs, "one pass recorded per dirty sync");
        let sync_samples = tl
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Sync)
            .count() as u64;
        assert_eq!(sync_samples, syncs, "a sample at every dirty sync");
        let passes: Vec<u64> = tl.pass_times().iter().map(|p| p.0).collect();
        assert_eq!(passes, (1..=syncs).collect::<Vec<_>>(), "pass events");
    }
    assert_eq!(
        tl.total_time,
        info["total-time"].as_u64().or(tl.total_time),
        "{info}"
    );
    assert_eq!(tl.downtime, info["downtime"].as_u64(), "{info}");
    assert_eq!(tl.error_desc.as_deref(), info["error-desc"].as_str());
    // Every state change is an event, from setup to the final state.
    let states: Vec<MigrationStatus> = tl
        .events
        .iter()
        .filter_map(|e| match e.what {
            EventKind::Status { status } => Some(status),
            _ => None,
        })
        .collect();
    assert_eq!(states.first(), Some(&MigrationStatus::Setup), "{states:?}");
    assert_eq!(states.last(), Some(&last.status), "{states:?}");
}

/// Gaps between samples while the migration was active: the sampler's promise is one at
/// least every 100 ms (allow the odd late wake-up on a busy machine).
fn assert_sampled_often(tl: &Timeline) {
    let active: Vec<f64> = tl
        .samples
        .iter()
        .filter(|s| s.status == MigrationStatus::Active)
        .map(|s| s.t_ms)
        .collect();
    let gaps: Vec<f64> = active.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 5, "too few samples: {active:?}");
    let late = gaps.iter().filter(|&&g| g > 100.0).count();
    let worst = gaps.iter().cloned().fold(0.0, f64::max);
    assert!(
        late * 10 <= gaps.len() && worst < 500.0,
        "{late} of {} gaps over 100 ms, worst {worst:.1} ms",
        gaps.len()
    );
}

/// Parses a chart, checks the texts it must hold and that at least `min_lines` series
/// are drawn, renders it with resvg and returns the share of pixels that are not
/// background.
fn check_chart(path: &Path, must_hold: &[&str], min_lines: usize) -> f64 {
    let svg = std::fs::read_to_string(path).expect("the chart was written");
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    let text: String = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n");
    for t in must_hold {
        assert!(text.contains(t), "'{t}' is not in the chart:\n{text}");
    }
    let polylines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .count()
                > 2
        })
        .count();
    assert!(polylines >= min_lines, "series drawn as lines: {polylines}");
    let opt = resvg::usvg::Options::default();
    let tree = resvg::usvg::Tree::from_str(&svg, &opt).expect("resvg parses the chart");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("pixmap");
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    let inked = pixmap
        .pixels()
        .iter()
        .filter(|p| p.alpha() > 0 && (p.red() < 245 || p.green() < 245 || p.blue() < 245))
        .count();
    inked as f64 / pixmap.pixels().len() as f64
}

#[test]
fn an_auto_converging_migration_has_a_consistent_timeline_and_chart() {
    let _one = one_guest_test_at_a_time();
    let test = "an_auto_converging_migration_has_a_consistent_timeline_and_chart";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = FAST_DIRTIER;
    let mut src = start_source("tl-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("tl-dst", guest.dest("tcp:127.0.0.1:0", None));
    let before = timeline(&mut src);
    assert_eq!(before.status, MigrationStatus::None);
    assert!(before.samples.is_empty() && before.events.is_empty());

    let dir = TempDir::new("timeline-chart");
    let chart = dir.path().join("migration.svg");
    let out = ferry_migrate(
        &src,
        &uri,
        &[
            "--caps",
            "auto-converge",
            "--set",
            "max-bandwidth=8M",
            "--set",
            "cpu-throttle-initial=50",
            "--set",
            "cpu-throttle-increment=20",
            "--set",
            "max-cpu-throttle=90",
            "--report",
            chart.to_str().expect("a UTF-8 path"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("report"), "{stdout}");
    keep(&chart);
    let info = src.cmd("query-migrate", json!({}));
    assert_eq!(info["status"], "completed", "{info}");
    let tl = timeline(&mut src);
    assert_consistent(&tl, &info);
    assert_sampled_often(&tl);
    assert_eq!(tl.last().map(|s| s.remaining), Some(0));
    assert!(tl.settings.auto_converge);
    assert_eq!(tl.settings.max_bandwidth, 8 * MIB);
    // Auto-converge's steps, each an event, and back to 0 when the migration ends.
    let steps: Vec<u8> = tl
        .events
        .iter()
        .filter_map(|e| match e.what {
            EventKind::Throttle { percentage } => Some(percentage),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![50, 70, 90, 0], "{:?}", tl.events);
    // The guest stopped for `downtime` ms before the end.
    let d = tl.downtime_interval.expect("a downtime interval");
    let downtime = info["downtime"].as_u64().unwrap_or(0) as f64;
    assert!(
        close(d.end_ms - d.start_ms, downtime) || d.start_ms == 0.0,
        "{d:?} vs {downtime}"
    );
    assert_eq!(tl.switchover_ms, Some(d.start_ms));
    let last_t = tl.last().map_or(0.0, |s| s.t_ms);
    assert!(d.end_ms <= last_t + 1e-9);
    // The chart of this migration.
    let inked = check_chart(
        &chart,
        &[
            "Migration completed",
            "remaining memory (MiB)",
            "dirty rate (MiB/s)",
            "sending rate (MiB/s)",
            " p1",
            "switchover (guest stopped)",
            " 50%",
            " 70%",
            " 90%",
            "auto-converge on",
        ],
        5,
    );
    assert!(inked > 0.02, "the chart is blank: {inked}");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
}

#[test]
fn a_multifd_timeline_counts_bytes_per_channel() {
    let _one = one_guest_test_at_a_time();
    let test = "a_multifd_timeline_counts_bytes_per_channel";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = Guest {
        working_set: "64M",
        rate: 2_000,
        ..SMALL
    };
    let mut src = start_source("tlmfd-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("tlmfd-dst", guest.dest("tcp:127.0.0.1:0", None));
    for f in [&mut src, &mut dst] {
        f.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        f.cmd("migrate-set-parameters", json!({"multifd-channels": 2}));
    }
    let dir = TempDir::new("timeline-json");
    let raw = dir.path().join("timeline.json");
    let out = ferry_migrate(
        &src,
        &uri,
        &[
            "--set",
            "max-bandwidth=64M",
            "--report",
            raw.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info = src.cmd("query-migrate", json!({}));
    // The .json report is the raw timeline, the same as the QMP command's.
    let text = std::fs::read_to_string(&raw).expect("the JSON report");
    let tl: Timeline = serde_json::from_str(&text).expect("the report is a timeline");
    let queried = timeline(&mut src);
    assert_eq!(tl.samples.len(), queried.samples.len());
    assert_eq!(tl.events.len(), queried.events.len());
    assert_eq!(
        tl.last().map(|s| s.transferred),
        queried.last().map(|s| s.transferred)
    );
    assert_consistent(&tl, &info);
    assert_sampled_often(&tl);
    assert_eq!(tl.settings.multifd_channels, 2);
    let last = tl.last().expect("a last sample");
    let channels = last.channel_bytes.clone().expect("per-channel bytes");
    assert_eq!(channels.len(), 2);
    assert!(channels.iter().all(|&b| b > 0), "{channels:?}");
    assert_eq!(
        Some(channels.iter().sum::<u64>()),
        info.pointer("/ram/multifd-bytes").and_then(Value::as_u64),
        "{info}"
    );
    // Per-channel counts only grow.
    let series: Vec<&Vec<u64>> = tl
        .samples
        .iter()
        .filter_map(|s| s.channel_bytes.as_ref())
        .collect();
    assert!(series
        .windows(2)
        .all(|w| w[0].iter().zip(w[1].iter()).all(|(a, b)| a <= b)));
    // Its chart has the per-channel panel.
    let chart = dir.path().join("multifd.svg");
    vmm::report::write_timeline(&chart, &tl).expect("chart");
    keep(&chart);
    let inked = check_chart(
        &chart,
        &[
            "Throughput per multifd channel (2 channels)",
            "channel 0 (MiB/s)",
            "channel 1 (MiB/s)",
            "multifd 2 channels, none",
        ],
        5,
    );
    assert!(inked > 0.02, "{inked}");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
}

#[test]
fn a_failed_migration_keeps_its_timeline_until_the_next_one() {
    let _one = one_guest_test_at_a_time();
    let test = "a_failed_migration_keeps_its_timeline_until_the_next_one";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("tlfail-src", &guest, guest.source(None));
    let dir = TempDir::new("timeline-fail");
    // A report name Ferry cannot write is a usage error, before anything migrates.
    let out = ferry_migrate(&src, "tcp:127.0.0.1:1", &["--report", "chart.png"]);
    assert_eq!(out.status.code(), Some(2));
    let info = src.cmd("query-migrate", json!({}));
    assert!(info.get("status").is_none(), "nothing migrated: {info}");
    // Nobody listens on port 1: the migration fails; the report is written all the same.
    let chart = dir.path().join("failed.svg");
    let out = ferry_migrate(
        &src,
        "tcp:127.0.0.1:1",
        &["--report", chart.to_str().expect("a UTF-8 path")],
    );
    assert_eq!(out.status.code(), Some(1));
    let info = src.cmd("query-migrate", json!({}));
    assert_eq!(info["status"], "failed", "{info}");
    let tl = timeline(&mut src);
    assert_consistent(&tl, &info);
    assert_eq!(tl.passes, 0);
    assert!(tl.error_desc.is_some());
    keep(&chart);
    // Failed while connecting: a sample or two, but the axes, state and error are there.
    let inked = check_chart(&chart, &["Migration failed", "error: "], 0);
    assert!(inked > 0.01, "{inked}");
    // It stays until the next migration, which starts a new timeline.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        timeline(&mut src),
        tl,
        "a finished timeline does not change"
    );
    let (mut dst, uri) = start_dest("tlfail-dst", guest.dest("tcp:127.0.0.1:0", None));
    src.cmd("migrate", json!({ "uri": uri }));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    let next = timeline(&mut src);
    assert_consistent(&next, &info);
    assert!(next.error_desc.is_none());
    assert!(next.samples[0].t_ms < 50.0, "a new timeline starts at 0");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
}

#[test]
fn ferry_demo_writes_the_chart_of_its_migration() {
    let _one = one_guest_test_at_a_time();
    let test = "ferry_demo_writes_the_chart_of_its_migration";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let dir = TempDir::new("demo-report");
    // A name it cannot write: usage error, nothing started.
    let out = Command::new(ferry_bin())
        .args(["demo", "--loopback", "--quiet", "--report"])
        .arg(dir.path().join("demo.pdf"))
        .output()
        .expect("run ferry demo");
    assert_eq!(out.status.code(), Some(2));
    let chart = dir.path().join("demo.svg");
    let out = Command::new(ferry_bin())
        .args([
            "demo",
            "--loopback",
            "--quiet",
            "--memory",
            "256M",
            "--vcpus",
            "1",
            "--working-set",
            "64M",
            "--report",
        ])
        .arg(&chart)
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with("PASS"), "{stdout}");
    assert!(
        stdout.contains(&format!("report            {}", chart.display())),
        "{stdout}"
    );
    keep(&chart);
    let inked = check_chart(
        &chart,
        &["Migration completed", "remaining memory (MiB)", " p1"],
        4,
    );
    assert!(inked > 0.02, "{inked}");
}
