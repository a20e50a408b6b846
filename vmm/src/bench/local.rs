//! `ferry bench local`: downtime and total time of local migrations (x-ignore-shared) for
//! several guest sizes, against a copying migration of the smallest guest over the same
//! kind of unix socket, measured in the same run.
//!
//! Each run: a source `ferry run --memory SIZE --vcpus 2 --workload
//! working-set=256M,rate=20000` (memfd memory, the default), a destination `--memory SIZE
//! --vcpus 2 --incoming defer`, x-ignore-shared on both, half a second of dirtying, then
//! `migrate unix:PATH`, polled every millisecond. The downtime is the source's, to the
//! microsecond (query-migrate's `x-ferry-downtime-us`); total time is query-migrate's; the
//! guest verifies its memory on the destination afterwards (0 bad pages or the run fails).
//! The reference rows migrate the smallest guest the same way but without x-ignore-shared,
//! so every page is copied.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::migrate::proc::BenchVmm;
use super::migrate::BenchError;
use super::stats::Summary;

/// Arguments of `ferry bench local`.
#[derive(Debug, Args, Clone)]
pub struct LocalArgs {
    /// Guest sizes (memfd-backed; only the working set is ever touched).
    #[arg(long, value_delimiter = ',', default_value = "1G,4G,16G")]
    pub sizes: Vec<String>,
    /// Migrations per size.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The guest's workload.
    #[arg(long, default_value = "working-set=256M,rate=20000")]
    pub workload: String,
    /// The ferry binary to measure (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when a goal is not met (median downtime < 5 ms; the largest
    /// guest's median total time within 2x of the smallest's).
    #[arg(long)]
    pub check: bool,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRun {
    /// Downtime, microseconds.
    pub downtime_us: u64,
    /// query-migrate's total-time, ms.
    pub total_time_ms: u64,
    /// From `migrate` to `completed` as this process saw it, ms.
    pub wall_ms: f64,
    /// Bytes the migration sent.
    pub transferred: u64,
}

/// The runs of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct LocalRow {
    /// "local" or "copy (reference)".
    pub kind: String,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Every run.
    pub runs: Vec<LocalRun>,
    /// Downtime summary (ms values).
    pub downtime: Option<Summary>,
    /// Total-time summary (ms values).
    pub total: Option<Summary>,
}

/// The benchmark's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LocalReport {
    /// The workload.
    pub workload: String,
    /// One row per size, then the reference.
    pub rows: Vec<LocalRow>,
    /// Largest guest's median total time / smallest's (goal: about 1).
    pub size_ratio: Option<f64>,
    /// Smallest local guest's median total time / the copying reference's.
    pub copy_ratio: Option<f64>,
    /// Whether the goals hold.
    pub goals_met: bool,
}

/// Runs `ferry bench local`; returns the exit code.
pub fn main(a: LocalArgs) -> i32 {
    super::finish(
        "local",
        run(&a),
        a.json,
        a.check,
        |r| r.to_text(),
        |r| r.goals_met,
    )
}

fn run(a: &LocalArgs) -> Result<LocalReport, BenchError> {
    let ferry = super::ferry_binary(&a.ferry)?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io(dir.clone(), e))?;
    let result = run_in(a, &ferry, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(a: &LocalArgs, ferry: &Path, dir: &Path) -> Result<LocalReport, BenchError> {
    let mut sizes = Vec::new();
    for s in &a.sizes {
        let bytes = ram::parse_size_default_unit(s, 1 << 20)
            .map_err(|e| BenchError::Usage(format!("--sizes: '{s}': {e}")))?;
        sizes.push((s.clone(), bytes));
    }
    sizes.sort_by_key(|s| s.1);
    let smallest = sizes
        .first()
        .cloned()
        .ok_or_else(|| BenchError::Usage("--sizes is empty".into()))?;
    let runs = a.runs.max(1);
    let mut rows = Vec::new();
    for (text, bytes) in &sizes {
        rows.push(row(a, ferry, dir, text, *bytes, true, runs)?);
    }
    rows.push(row(a, ferry, dir, &smallest.0, smallest.1, false, runs)?);
    let median_total = |r: &LocalRow| r.total.as_ref().map(|s| s.median_ms);
    let local_rows = &rows[..sizes.len()];
    let size_ratio = match (local_rows.first(), local_rows.last()) {
        (Some(f), Some(l)) => match (median_total(f), median_total(l)) {
            (Some(f), Some(l)) if f > 0.0 => Some(l / f),
            _ => None,
        },
        _ => None,
    };
    let copy_ratio = match (local_rows.first().and_then(median_total), rows.last()) {
        (Some(l), Some(c)) => median_total(c).filter(|c| *c > 0.0).map(|c| l / c),
        _ => None,
    };
    let downtime_ok = local_rows
        .iter()
        .all(|r| r.downtime.as_ref().is_some_and(|d| d.median_ms < 5.0));
    // Total times of a few ms are noisy: "independent of size" means within 2x or 5 ms.
    let size_ok = match (local_rows.first(), local_rows.last()) {
        (Some(f), Some(l)) => match (median_total(f), median_total(l)) {
            (Some(f), Some(l)) => l <= (2.0 * f).max(f + 5.0),
            _ => false,
        },
        _ => false,
    };
    Ok(LocalReport {
        workload: a.workload.clone(),
        rows,
        size_ratio,
        copy_ratio,
        goals_met: downtime_ok && size_ok,
    })
}

fn row(
    a: &LocalArgs,
    ferry: &Path,
    dir: &Path,
    size: &str,
    bytes: u64,
    local: bool,
    runs: usize,
) -> Result<LocalRow, BenchError> {
    let mut out = Vec::new();
    for i in 0..runs {
        eprintln!(
            "bench local: {} {size}, run {} of {runs}",
            if local { "local" } else { "copy" },
            i + 1
        );
        out.push(one(a, ferry, dir, size, local)?);
    }
    let ms = |f: &dyn Fn(&LocalRun) -> f64| -> Option<Summary> {
        let samples: Vec<Duration> = out
            .iter()
            .map(|r| Duration::from_secs_f64(f(r) / 1e3))
            .collect();
        Summary::of(&samples)
    };
    Ok(LocalRow {
        kind: if local {
            "local".into()
        } else {
            "copy (reference)".into()
        },
        memory: bytes,
        downtime: ms(&|r| r.downtime_us as f64 / 1e3),
        total: ms(&|r| r.total_time_ms as f64),
        runs: out,
    })
}

fn one(
    a: &LocalArgs,
    ferry: &Path,
    dir: &Path,
    size: &str,
    local: bool,
) -> Result<LocalRun, BenchError> {
    let (mut src, mut dst) = BenchVmm::spawn_pair(ferry, dir, size, &a.workload, "defer")?;
    let sock = dir.join("migration.sock");
    let _ = std::fs::remove_file(&sock);
    let uri = format!("unix:{}", sock.display());
    if local {
        dst.set_caps(&[("x-ignore-shared", true)])?;
        src.set_caps(&[("x-ignore-shared", true)])?;
    }
    src.set_params(json!({"max-bandwidth": 0}))?;
    dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    src.cmd("migrate", json!({ "uri": uri }))?;
    let info = src.wait_migration_end(Duration::from_secs(300), Duration::from_millis(1))?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    if info["status"] != "completed" {
        return Err(BenchError::Failed(format!(
            "the migration ended {}: {}",
            info["status"],
            info["error-desc"].as_str().unwrap_or("")
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
    Ok(LocalRun {
        downtime_us: info["x-ferry-downtime-us"]
            .as_u64()
            .unwrap_or_else(|| info["downtime"].as_u64().unwrap_or(0) * 1000),
        total_time_ms: info["total-time"].as_u64().unwrap_or(0),
        wall_ms,
        transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
    })
}

impl LocalReport {
    /// The figures as text.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "local migration (x-ignore-shared), 2 vCPUs, workload {}",
            self.workload
        );
        let _ = writeln!(
            t,
            "{:<18} {:>8} {:>26} {:>26} {:>12}",
            "kind", "memory", "downtime ms med (min-max)", "total ms med (min-max)", "bytes sent"
        );
        for r in &self.rows {
            let fmt = |s: &Option<Summary>| {
                s.as_ref().map_or("-".to_string(), |s| {
                    format!("{:.2} ({:.2}-{:.2})", s.median_ms, s.min_ms, s.max_ms)
                })
            };
            let bytes = r.runs.iter().map(|x| x.transferred).max().unwrap_or(0);
            let _ = writeln!(
                t,
                "{:<18} {:>7}M {:>26} {:>26} {:>12}",
                r.kind,
                r.memory >> 20,
                fmt(&r.downtime),
                fmt(&r.total),
                bytes
            );
        }
        if let Some(x) = self.size_ratio {
            let _ = writeln!(
                t,
                "total time, largest guest / smallest: {x:.2} (goal: independent of size)"
            );
        }
        if let Some(x) = self.copy_ratio {
            let _ = writeln!(
                t,
                "total time, local / copying migration of the smallest guest: {x:.3}"
            );
        }
        let _ = writeln!(
            t,
            "goals (median downtime < 5 ms, total time independent of size): {}",
            if self.goals_met { "met" } else { "NOT met" }
        );
        t
    }
}
