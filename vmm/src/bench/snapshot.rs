//! `ferry bench snapshot`: background-snapshot figures of a real `ferry run` whose guest
//! rewrites its working set flat out, each stated against a reference from the same run.
//!
//! Per run:
//! 1. the guest's write rate over a window without a snapshot (the reference);
//! 2. a background snapshot (max-bandwidth unlimited): the guest's write rate while it
//!    runs (as a ratio to 1.), the snapshot's write throughput, the stall (guest stopped
//!    to save state and protect RAM), and the write-fault service latency p50/p99
//!    (goal: p99 under 1 ms), as the snapshot measured them;
//! 3. the same save with the guest stopped for all of it, as Firecracker takes snapshots
//!    (`stop`, snapshot, `cont`): the stall is the whole save.
//!
//! Figures are medians over `--runs`; every command is printed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use super::migrate::proc::BenchVmm;
use super::migrate::BenchError;

/// Arguments of `ferry bench snapshot`.
#[derive(Debug, Args, Clone)]
pub struct SnapshotArgs {
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// The guest's working set (rewritten flat out).
    #[arg(long, default_value = "256M")]
    pub working_set: String,
    /// The guest's write rate in pages/s (0 = as fast as it can).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Directory for the snapshot files (default /var/tmp: a disk, like real snapshots).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A smoke run: 256 MiB guest, 64 MiB working set, one run.
    #[arg(long)]
    pub quick: bool,
    /// The ferry binary to measure (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunFigures {
    /// Guest pages written per second without a snapshot.
    pub guest_rate_idle: f64,
    /// Guest pages written per second while the snapshot ran.
    pub guest_rate_during: f64,
    /// The ratio of the two.
    pub guest_rate_ratio: f64,
    /// Snapshot duration (migrate to completed), ms.
    pub snapshot_ms: f64,
    /// Bytes written to the file per second of streaming, MB/s.
    pub write_mb_s: f64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Guest stopped at the start, ms.
    pub stall_ms: f64,
    /// Write faults served.
    pub faults: u64,
    /// Fault service latency, µs.
    pub fault_p50_us: f64,
    /// Fault service latency, µs.
    pub fault_p99_us: f64,
    /// Fault service latency, µs.
    pub fault_max_us: f64,
    /// Stop, save everything, cont: the guest's stall, ms.
    pub stop_the_world_stall_ms: f64,
}

/// The report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotReport {
    /// The `ferry run` command.
    pub command: String,
    /// Every run.
    pub runs: Vec<RunFigures>,
    /// Medians over the runs.
    pub median: Option<RunFigures>,
    /// p99 fault latency under 1 ms (median run).
    pub p99_goal_met: bool,
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn pages_written(vmm: &mut BenchVmm) -> Result<u64, BenchError> {
    Ok(vmm.cmd("ferry-guest-progress", json!({}))?["pages-written"]
        .as_u64()
        .unwrap_or(0))
}

/// The guest's write rate over `window`.
fn guest_rate(vmm: &mut BenchVmm, window: Duration) -> Result<f64, BenchError> {
    let (p0, t0) = (pages_written(vmm)?, Instant::now());
    std::thread::sleep(window);
    let (p1, t1) = (pages_written(vmm)?, Instant::now());
    Ok((p1 - p0) as f64 / (t1 - t0).as_secs_f64())
}

/// Runs a snapshot to `file` and waits for it; returns (query-migrate, ferry-query-snapshot).
fn snapshot(vmm: &mut BenchVmm, file: &Path) -> Result<(Value, Value), BenchError> {
    vmm.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    )?;
    let info = vmm.wait_migration_end(Duration::from_secs(600), Duration::from_millis(5))?;
    let report = vmm.cmd("ferry-query-snapshot", json!({}))?;
    if info["status"] != "completed" {
        return Err(BenchError::Failed(format!(
            "the snapshot did not complete: {info}"
        )));
    }
    Ok((info, report))
}

fn one_run(vmm: &mut BenchVmm, file: &Path) -> Result<RunFigures, BenchError> {
    let idle = guest_rate(vmm, Duration::from_secs(1))?;

    let p0 = pages_written(vmm)?;
    let t0 = Instant::now();
    let (info, report) = snapshot(vmm, file)?;
    let elapsed = t0.elapsed();
    let p1 = pages_written(vmm)?;
    let _ = std::fs::remove_file(file);
    let during = (p1 - p0) as f64 / elapsed.as_secs_f64();
    let total_ms = num(&info["total-time"]);
    let setup_ms = num(&info["setup-time"]);
    let bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let streaming_s = ((total_ms - setup_ms) / 1e3).max(1e-3);
    let lat = &report["fault-latency"];

    // Firecracker's way: the guest is stopped for the whole save.
    let s0 = Instant::now();
    vmm.cmd("stop", json!({}))?;
    snapshot(vmm, file)?;
    vmm.cmd("cont", json!({}))?;
    let stw = s0.elapsed();
    let _ = std::fs::remove_file(file);

    Ok(RunFigures {
        guest_rate_idle: idle,
        guest_rate_during: during,
        guest_rate_ratio: if idle > 0.0 { during / idle } else { 0.0 },
        snapshot_ms: elapsed.as_secs_f64() * 1e3,
        write_mb_s: bytes as f64 / 1e6 / streaming_s,
        bytes,
        stall_ms: num(&report["stall-ms"]),
        faults: report["faults"].as_u64().unwrap_or(0),
        fault_p50_us: num(&lat["p50-us"]),
        fault_p99_us: num(&lat["p99-us"]),
        fault_max_us: num(&lat["max-us"]),
        stop_the_world_stall_ms: stw.as_secs_f64() * 1e3,
    })
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn medians(runs: &[RunFigures]) -> Option<RunFigures> {
    let first = runs.first()?;
    let m = |f: fn(&RunFigures) -> f64| median(runs.iter().map(f));
    Some(RunFigures {
        guest_rate_idle: m(|r| r.guest_rate_idle),
        guest_rate_during: m(|r| r.guest_rate_during),
        guest_rate_ratio: m(|r| r.guest_rate_ratio),
        snapshot_ms: m(|r| r.snapshot_ms),
        write_mb_s: m(|r| r.write_mb_s),
        bytes: first.bytes,
        stall_ms: m(|r| r.stall_ms),
        faults: m(|r| r.faults as f64) as u64,
        fault_p50_us: m(|r| r.fault_p50_us),
        fault_p99_us: m(|r| r.fault_p99_us),
        fault_max_us: m(|r| r.fault_max_us),
        stop_the_world_stall_ms: m(|r| r.stop_the_world_stall_ms),
    })
}

/// Runs the benchmark.
pub fn measure(a: &SnapshotArgs) -> Result<SnapshotReport, BenchError> {
    let ferry = match &a.ferry {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| BenchError::Io("ferry".into(), e))?,
    };
    let (memory, ws, runs) = if a.quick {
        ("256M".to_string(), "64M".to_string(), 1)
    } else {
        (a.memory.clone(), a.working_set.clone(), a.runs.max(1))
    };
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join(format!("ferry-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io(dir.clone(), e))?;
    let args: Vec<String> = vec![
        "--memory".into(),
        memory,
        "--vcpus".into(),
        a.vcpus.to_string(),
        "--workload".into(),
        format!("working-set={ws},rate={}", a.rate),
    ];
    let result = (|| {
        let mut vmm = BenchVmm::spawn(&ferry, None, &dir, "guest", &args, &[])?;
        // Let the guest write its whole working set once, then unlimited bandwidth.
        std::thread::sleep(Duration::from_secs(2));
        vmm.set_caps(&[("background-snapshot", true)])?;
        vmm.set_params(json!({"max-bandwidth": 0}))?;
        let file = dir.join("snapshot.ferry");
        let mut all = Vec::new();
        for i in 0..runs {
            let r = one_run(&mut vmm, &file)?;
            if !a.json {
                eprintln!(
                    "run {}: guest {:.0}% of its rate, stall {:.1} ms vs {:.0} ms stopped, p99 {:.0} µs",
                    i + 1,
                    r.guest_rate_ratio * 100.0,
                    r.stall_ms,
                    r.stop_the_world_stall_ms,
                    r.fault_p99_us
                );
            }
            all.push(r);
        }
        Ok((vmm.command.join(" "), all))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (command, runs) = result?;
    let median = medians(&runs);
    Ok(SnapshotReport {
        command,
        p99_goal_met: median.as_ref().is_some_and(|m| m.fault_p99_us < 1000.0),
        runs,
        median,
    })
}

impl SnapshotReport {
    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "guest: {}", self.command);
        let Some(m) = &self.median else {
            return o;
        };
        let _ = writeln!(
            o,
            "background snapshot (median of {} runs):",
            self.runs.len()
        );
        let _ = writeln!(
            o,
            "  guest write rate during / without  {:.0} / {:.0} pages/s = {:.2}",
            m.guest_rate_during, m.guest_rate_idle, m.guest_rate_ratio
        );
        let _ = writeln!(
            o,
            "  snapshot                           {:.0} ms, {:.1} MiB written at {:.0} MB/s",
            m.snapshot_ms,
            m.bytes as f64 / (1 << 20) as f64,
            m.write_mb_s
        );
        let _ = writeln!(
            o,
            "  write faults                       {} served, p50 {:.1} µs, p99 {:.1} µs, max {:.0} µs (goal p99 < 1 ms: {})",
            m.faults,
            m.fault_p50_us,
            m.fault_p99_us,
            m.fault_max_us,
            if self.p99_goal_met { "met" } else { "NOT met" }
        );
        let _ = writeln!(
            o,
            "  guest stall                        {:.2} ms (stopped for the whole save: {:.0} ms, {:.0}x longer)",
            m.stall_ms,
            m.stop_the_world_stall_ms,
            m.stop_the_world_stall_ms / m.stall_ms.max(1e-3)
        );
        o
    }
}

/// `ferry bench snapshot`; returns the exit code.
pub fn main(a: SnapshotArgs) -> i32 {
    match measure(&a) {
        Ok(r) => {
            if a.json {
                match serde_json::to_string_pretty(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("ferry bench snapshot: {e}");
                        return 1;
                    }
                }
            } else {
                print!("{}", r.to_text());
            }
            0
        }
        Err(e) => {
            eprintln!("ferry bench snapshot: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_are_per_figure() {
        let r = |x: f64| RunFigures {
            guest_rate_idle: x,
            guest_rate_during: x / 2.0,
            guest_rate_ratio: 0.5,
            snapshot_ms: x,
            write_mb_s: x,
            bytes: 7,
            stall_ms: x,
            faults: x as u64,
            fault_p50_us: x,
            fault_p99_us: x,
            fault_max_us: x,
            stop_the_world_stall_ms: 10.0 * x,
        };
        let m = medians(&[r(3.0), r(1.0), r(2.0)]).unwrap();
        assert_eq!(m.guest_rate_idle, 2.0);
        assert_eq!(m.stop_the_world_stall_ms, 20.0);
        assert_eq!(m.faults, 2);
        assert!(medians(&[]).is_none());
        let text = SnapshotReport {
            command: "ferry run".into(),
            runs: vec![r(1.0)],
            median: Some(m),
            p99_goal_met: true,
        }
        .to_text();
        assert!(text.contains("goal p99 < 1 ms: met"), "{text}");
    }
}
