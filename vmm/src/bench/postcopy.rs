//! `ferry bench postcopy`: postcopy figures against precopy with auto-converge on a guest
//! that dirties memory faster than the link carries it, measured in the same run.
//!
//! Each run: a source `ferry run --memory M --vcpus 2 --workload W` and a destination
//! `--incoming tcp:127.0.0.1:0`, loopback TCP with the "link" limited to `--bandwidth`
//! (`max-bandwidth` in precopy, `max-postcopy-bandwidth` for postcopy's background pages;
//! requested pages are not limited, as in QEMU's preempt channel). Postcopy rows migrate in
//! precopy for `--precopy-ms`, then `migrate-start-postcopy`; the reference row runs precopy
//! with auto-converge until it completes. Figures: the time from `migrate-start-postcopy`
//! to the commit (the destination runs the guest as soon as it reads it), the guest's
//! downtime, the destination's page-fault round trip p50/p99 (request to page in place),
//! blocktime, and total time. Every run ends with the guest verifying its memory on the
//! destination (0 bad pages or the run fails).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use super::migrate::proc::BenchVmm;
use super::migrate::BenchError;
use super::stats::Summary;

/// Arguments of `ferry bench postcopy`.
#[derive(Debug, Args, Clone)]
pub struct PostcopyArgs {
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// The guest's workload (default: 64 MiB rewritten flat out).
    #[arg(long, default_value = "working-set=64M,rate=0")]
    pub workload: String,
    /// The link's bandwidth, bytes per second (QEMU size suffixes accepted).
    #[arg(long, default_value = "32M")]
    pub bandwidth: String,
    /// Milliseconds of precopy before `migrate-start-postcopy`.
    #[arg(long, default_value_t = 1000)]
    pub precopy_ms: u64,
    /// Migrations per configuration.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The ferry binary to measure (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when a goal is not met (median switch to the destination < 20 ms).
    #[arg(long)]
    pub check: bool,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyRun {
    /// `migrate-start-postcopy` to the commit, microseconds (postcopy rows).
    pub switch_us: Option<u64>,
    /// Downtime, ms.
    pub downtime_ms: u64,
    /// Total time, ms.
    pub total_ms: u64,
    /// Fault round trip p50, microseconds (postcopy rows).
    pub fault_p50_us: Option<f64>,
    /// Fault round trip p99, microseconds.
    pub fault_p99_us: Option<f64>,
    /// Pages requested by the destination.
    pub requests: u64,
    /// Blocktime total, ms (every vCPU blocked at once).
    pub blocktime_ms: Option<u64>,
    /// Final throttle of the reference row, percent.
    pub throttle: u64,
}

/// One configuration's runs.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyRow {
    /// "postcopy", "postcopy + preempt" or "precopy + auto-converge".
    pub kind: String,
    /// Every run.
    pub runs: Vec<PostcopyRun>,
}

/// The benchmark's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PostcopyReport {
    /// Guest memory.
    pub memory: String,
    /// The workload.
    pub workload: String,
    /// Link bandwidth, bytes per second.
    pub bandwidth: u64,
    /// The rows.
    pub rows: Vec<PostcopyRow>,
    /// Whether the goal holds.
    pub goals_met: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Postcopy,
    Preempt,
    AutoConverge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Postcopy => "postcopy",
            Kind::Preempt => "postcopy + preempt",
            Kind::AutoConverge => "precopy + auto-converge",
        }
    }
}

/// Runs `ferry bench postcopy`; returns the exit code.
pub fn main(a: PostcopyArgs) -> i32 {
    super::finish(
        "postcopy",
        run(&a),
        a.json,
        a.check,
        |r| r.to_text(),
        |r| r.goals_met,
    )
}

fn run(a: &PostcopyArgs) -> Result<PostcopyReport, BenchError> {
    let ferry = super::ferry_binary(&a.ferry)?;
    let bandwidth = ram::parse_size_default_unit(&a.bandwidth, 1)
        .map_err(|e| BenchError::Usage(format!("--bandwidth: '{}': {e}", a.bandwidth)))?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-postcopy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io(dir.clone(), e))?;
    let mut rows = Vec::new();
    let mut result = Ok(());
    for kind in [Kind::Postcopy, Kind::Preempt, Kind::AutoConverge] {
        let mut runs = Vec::new();
        for i in 0..a.runs.max(1) {
            eprintln!(
                "bench postcopy: {}, run {} of {}",
                kind.name(),
                i + 1,
                a.runs
            );
            match one(a, &ferry, &dir, bandwidth, kind) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        rows.push(PostcopyRow {
            kind: kind.name().into(),
            runs,
        });
        if result.is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let goals_met = rows
        .iter()
        .filter(|r| r.kind != Kind::AutoConverge.name())
        .all(|r| {
            summary(r, |x| x.switch_us.map(|u| u as f64 / 1e3)).is_some_and(|s| s.median_ms < 20.0)
        });
    Ok(PostcopyReport {
        memory: a.memory.clone(),
        workload: a.workload.clone(),
        bandwidth,
        rows,
        goals_met,
    })
}

fn one(
    a: &PostcopyArgs,
    ferry: &Path,
    dir: &Path,
    bandwidth: u64,
    kind: Kind,
) -> Result<PostcopyRun, BenchError> {
    let (mut src, mut dst) =
        BenchVmm::spawn_pair(ferry, dir, &a.memory, &a.workload, "tcp:127.0.0.1:0")?;
    // The destination listens once its query-migrate shows the address.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let port = loop {
        let info = dst.query_migrate()?;
        if let Some(p) = info["socket-address"][0]["port"].as_str() {
            break p.to_string();
        }
        if std::time::Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the destination does not listen: {info}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let uri = format!("tcp:127.0.0.1:{port}");
    let caps: &[(&str, bool)] = match kind {
        Kind::Postcopy => &[("postcopy-ram", true), ("postcopy-blocktime", true)],
        Kind::Preempt => &[
            ("postcopy-ram", true),
            ("postcopy-blocktime", true),
            ("postcopy-preempt", true),
        ],
        Kind::AutoConverge => &[("auto-converge", true)],
    };
    src.set_caps(caps)?;
    dst.set_caps(caps)?;
    src.set_params(json!({"max-bandwidth": bandwidth, "max-postcopy-bandwidth": bandwidth}))?;
    // Let the guest fill its working set.
    std::thread::sleep(Duration::from_millis(500));
    src.cmd("migrate", json!({ "uri": uri }))?;
    if kind != Kind::AutoConverge {
        std::thread::sleep(Duration::from_millis(a.precopy_ms));
        src.cmd("migrate-start-postcopy", json!({}))?;
    }
    let info = wait_end(&mut src, &dst, Duration::from_secs(180))?;
    if info["status"] != "completed" {
        return Err(BenchError::Failed(format!(
            "{}: the migration ended {}: {}\n{}",
            kind.name(),
            info["status"],
            info["error-desc"].as_str().unwrap_or(""),
            src.log()
        )));
    }
    let d = dst.wait_migration_end(Duration::from_secs(30), Duration::from_millis(5))?;
    if d["status"] != "completed" {
        return Err(BenchError::Failed(format!("the destination says {d}")));
    }
    let v = dst.cmd("ferry-guest-verify", json!({}))?;
    if v["bad-pages"].as_u64() != Some(0) {
        return Err(BenchError::Failed(format!(
            "the guest found bad pages after the migration: {v}"
        )));
    }
    let pc: &Value = &d["x-ferry-postcopy"];
    let postcopy = kind != Kind::AutoConverge;
    Ok(PostcopyRun {
        switch_us: info["x-ferry-postcopy"]["switch-us"]
            .as_u64()
            .filter(|_| postcopy),
        downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        total_ms: info["total-time"].as_u64().unwrap_or(0),
        fault_p50_us: pc["fault-latency"]["p50-us"].as_f64(),
        fault_p99_us: pc["fault-latency"]["p99-us"].as_f64(),
        requests: info["ram"]["postcopy-requests"].as_u64().unwrap_or(0),
        blocktime_ms: d["postcopy-blocktime"].as_u64(),
        throttle: info["cpu-throttle-percentage"].as_u64().unwrap_or(0),
    })
}

/// Polls the source until its migration ends; a postcopy that pauses (the link broke) is
/// a failed run, reported with both logs.
fn wait_end(src: &mut BenchVmm, dst: &BenchVmm, timeout: Duration) -> Result<Value, BenchError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let info = src.query_migrate()?;
        match info["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => return Ok(info),
            Some("postcopy-paused") => {
                return Err(BenchError::Failed(format!(
                    "postcopy paused: {info}\nsource log:\n{}\ndestination log:\n{}",
                    src.log(),
                    dst.log()
                )))
            }
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "the migration did not end within {timeout:?} (last: {info})"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Median/min/max of `f` (a value in ms) over the row's runs.
fn summary(r: &PostcopyRow, f: impl Fn(&PostcopyRun) -> Option<f64>) -> Option<Summary> {
    let samples: Vec<Duration> = r
        .runs
        .iter()
        .filter_map(&f)
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3))
        .collect();
    Summary::of(&samples)
}

impl PostcopyReport {
    /// The figures as text.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "postcopy vs precopy + auto-converge: {} guest, 2 vCPUs, workload {}, link {} MiB/s (loopback TCP)",
            self.memory,
            self.workload,
            self.bandwidth >> 20
        );
        let _ = writeln!(
            t,
            "{:<24} {:>20} {:>20} {:>22} {:>22} {:>22}",
            "kind",
            "switch ms med (min-max)",
            "downtime ms med",
            "fault p50 us med",
            "fault p99 us med",
            "total ms med (min-max)"
        );
        let fmt = |s: Option<Summary>, scale: f64| {
            s.map_or("-".to_string(), |s| {
                format!(
                    "{:.1} ({:.1}-{:.1})",
                    s.median_ms * scale,
                    s.min_ms * scale,
                    s.max_ms * scale
                )
            })
        };
        for r in &self.rows {
            let _ = writeln!(
                t,
                "{:<24} {:>20} {:>20} {:>22} {:>22} {:>22}",
                r.kind,
                fmt(summary(r, |x| x.switch_us.map(|u| u as f64 / 1e3)), 1.0),
                fmt(summary(r, |x| Some(x.downtime_ms as f64)), 1.0),
                fmt(summary(r, |x| x.fault_p50_us.map(|u| u / 1e3)), 1e3),
                fmt(summary(r, |x| x.fault_p99_us.map(|u| u / 1e3)), 1e3),
                fmt(summary(r, |x| Some(x.total_ms as f64)), 1.0),
            );
        }
        let _ = writeln!(
            t,
            "goal (median migrate-start-postcopy to the guest handed over < 20 ms): {}",
            if self.goals_met { "met" } else { "NOT met" }
        );
        t
    }
}
