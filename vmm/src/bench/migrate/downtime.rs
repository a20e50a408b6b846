//! Downtime of a dirtying guest with the default downtime-limit, over several migrations.
//!
//! Each run: a source `ferry run --memory 512M --vcpus 2 --workload
//! working-set=128M,rate=20000` (256M and 64M with `--quick`), a destination `--incoming
//! defer`, max-bandwidth unlimited and every other setting at its default (downtime-limit
//! 300 ms); half a second of dirtying, then `migrate`. The downtime is query-migrate's
//! (from stopping the vCPUs to the destination's confirmation); the guest then verifies
//! its memory on the destination.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{BenchEnv, BenchError};
use crate::bench::stats::Summary;

/// One migration of the dirtying guest.
#[derive(Debug, Clone, Serialize)]
pub struct DowntimeRun {
    /// query-migrate's downtime, ms.
    pub downtime_ms: u64,
    /// query-migrate's total-time, ms.
    pub total_time_ms: u64,
    /// Dirty syncs (passes).
    pub passes: u64,
    /// Bad pages the guest found on the destination.
    pub bad_pages: u64,
    /// Pages the guest checked on the destination.
    pub pages_checked: u64,
}

/// The section's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DowntimeReport {
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The workload.
    pub workload: String,
    /// Every run.
    pub runs: Vec<DowntimeRun>,
    /// Median, min, max of the downtimes.
    pub summary: Option<Summary>,
}

fn one(env: &BenchEnv, memory: &str, workload: &str) -> Result<DowntimeRun, BenchError> {
    let src_args: Vec<String> = vec![
        "--memory".into(),
        memory.into(),
        "--vcpus".into(),
        "2".into(),
        "--workload".into(),
        workload.into(),
    ];
    let dst_args: Vec<String> = vec![
        "--memory".into(),
        memory.into(),
        "--vcpus".into(),
        "2".into(),
        "--incoming".into(),
        "defer".into(),
    ];
    let mut src = env.spawn(env.source_host(), "source", &src_args, &[])?;
    let mut dst = env.spawn(env.dest_host(), "destination", &dst_args, &[])?;
    let addr = env.dest_addr();
    dst.cmd("migrate-incoming", json!({"uri": format!("tcp:{addr}:0")}))?;
    let port = dst.query_migrate()?["socket-address"][0]["port"]
        .as_str()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| BenchError::Failed("the destination names no port".into()))?;
    src.set_params(json!({"max-bandwidth": 0}))?;
    env.note_command(format!(
        "QMP source: migrate-set-parameters {{\"max-bandwidth\": 0}}; migrate {{\"uri\": \"tcp:{addr}:PORT\"}} (after 0.5 s of dirtying)"
    ));
    std::thread::sleep(Duration::from_millis(500));
    src.cmd("migrate", json!({"uri": format!("tcp:{addr}:{port}")}))?;
    let info = src.wait_migration_end(Duration::from_secs(120), Duration::from_millis(50))?;
    if info["status"] != "completed" {
        return Err(BenchError::Failed(format!(
            "the migration ended {}: {}",
            info["status"],
            info["error-desc"].as_str().unwrap_or("")
        )));
    }
    let d = dst.wait_migration_end(Duration::from_secs(30), Duration::from_millis(20))?;
    if d["status"] != "completed" {
        return Err(BenchError::Failed(format!("the destination says {d}")));
    }
    let v = dst.cmd("ferry-guest-verify", json!({}))?;
    Ok(DowntimeRun {
        downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        total_time_ms: info["total-time"].as_u64().unwrap_or(0),
        passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        bad_pages: v["bad-pages"].as_u64().unwrap_or(u64::MAX),
        pages_checked: v["pages-checked"].as_u64().unwrap_or(0),
    })
}

/// Runs `runs` migrations.
pub fn run(env: &BenchEnv, runs: usize) -> Result<DowntimeReport, BenchError> {
    let (memory, workload) = if env.quick {
        ("256M", "working-set=64M,rate=20000")
    } else {
        ("512M", "working-set=128M,rate=20000")
    };
    let mut out = Vec::new();
    for i in 0..runs {
        env.say(format!("downtime: run {} of {runs}", i + 1));
        let r = one(env, memory, workload)?;
        env.say(format!(
            "  downtime {} ms, {} passes, {} bad pages",
            r.downtime_ms, r.passes, r.bad_pages
        ));
        if r.bad_pages != 0 {
            return Err(BenchError::Failed(format!(
                "run {}: the guest found {} bad pages after the migration",
                i + 1,
                r.bad_pages
            )));
        }
        out.push(r);
    }
    let samples: Vec<Duration> = out
        .iter()
        .map(|r| Duration::from_millis(r.downtime_ms))
        .collect();
    Ok(DowntimeReport {
        memory_mib: ram::parse_size_default_unit(memory, 1 << 20).unwrap_or(0) >> 20,
        workload: workload.to_string(),
        summary: Summary::of(&samples),
        runs: out,
    })
}

impl DowntimeReport {
    /// The section as text.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\ndowntime, default downtime-limit (300 ms), {} MiB guest, 2 vCPUs, {}:",
            self.memory_mib, self.workload
        );
        let all: Vec<String> = self
            .runs
            .iter()
            .map(|r| format!("{} ms ({} passes)", r.downtime_ms, r.passes))
            .collect();
        let _ = writeln!(t, "  runs: {}", all.join(", "));
        if let Some(s) = &self.summary {
            let _ = writeln!(
                t,
                "  median {:.0} ms, max {:.0} ms (goals: every run <= 300 ms, median <= 50 ms); guest verify: 0 bad pages in every run",
                s.median_ms, s.max_ms
            );
        }
        t
    }
}
