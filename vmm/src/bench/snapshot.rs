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
//!    (`stop`, snapshot, `cont`): the stall is the whole save;
//! 4. for both ways, the guest progress lost, in ms of full-speed guest time: a background
//!    snapshot stalls the guest only briefly but slows it while it runs (write faults, and
//!    KVM re-mapping every page whose protection changed), so its loss is the snapshot's
//!    duration times the slowdown; stopping loses the whole stall.
//!
//! Figures are medians over `--runs`; every command is printed.
//!
//! `--dirty-sync` adds the cost of one dirty-page sync per GiB of guest memory for the three
//! trackers a precopy can use, measured in this process on real VMs whose guest dirties
//! the same working set: KVM's dirty bitmap (GET_DIRTY_LOG + the CLEAR_DIRTY_LOG re-arm),
//! KVM's dirty ring, and userfaultfd WP_ASYNC + PAGEMAP_SCAN
//! ([`crate::dirty::UffdAsyncTracker`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use devices::SerialOutput;
use migration::vm::DirtyTracker;
use ram::{AtomicBitmap, MemoryConfig};

use super::migrate::proc::BenchVmm;
use super::migrate::BenchError;
use crate::dirty::UffdAsyncTracker;
use crate::kvm::vm::{DirtyMode, VmOptions};
use crate::machine::{Machine, MachineConfig, NoEvents, Workload};

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
    /// Also compare the dirty-sync cost of KVM's bitmap, KVM's ring and userfaultfd
    /// WP_ASYNC + PAGEMAP_SCAN (in this process, on 1 and 4 GiB guests; 256 MiB and 1 GiB
    /// with --quick).
    #[arg(long)]
    pub dirty_sync: bool,
    /// Only the dirty-sync comparison.
    #[arg(long)]
    pub dirty_sync_only: bool,
}

/// One dirty tracker's sync cost on one guest size.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncRow {
    /// bitmap, ring or uffd-async.
    pub tracker: String,
    /// Guest memory in MiB.
    pub guest_mib: u64,
    /// Mean pages newly dirty per sync.
    pub dirty_per_sync: f64,
    /// Median time of one sync (with the re-arm of all memory for the bitmap), ms.
    pub sync_ms: f64,
    /// That per GiB of guest memory, µs.
    pub us_per_gib: f64,
    /// Why it was not measured.
    pub unavailable: Option<String>,
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
    /// Guest progress lost to the background snapshot, in ms of full-speed guest time:
    /// its duration times (1 - the rate ratio).
    pub guest_lost_ms: f64,
}

/// The report.
#[derive(Debug, Default, Serialize)]
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
    /// The dirty-sync comparison, when asked for.
    pub dirty_sync: Vec<SyncRow>,
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

/// How long the guest needs to write at full speed again after its memory's protection
/// changed: lifting a protection invalidates KVM's mappings of that memory, and on a nested
/// host rebuilding them takes about a second per GiB (measured on this kind of host).
const SETTLE: Duration = Duration::from_secs(3);

fn one_run(vmm: &mut BenchVmm, file: &Path) -> Result<RunFigures, BenchError> {
    std::thread::sleep(SETTLE);
    let idle = guest_rate(vmm, Duration::from_secs(1))?;

    let p0 = pages_written(vmm)?;
    let t0 = Instant::now();
    let (info, report) = snapshot(vmm, file)?;
    let elapsed = t0.elapsed();
    let p1 = pages_written(vmm)?;
    let _ = std::fs::remove_file(file);
    let during = (p1 - p0) as f64 / elapsed.as_secs_f64();
    let ratio = if idle > 0.0 { during / idle } else { 0.0 };
    let total_ms = num(&info["total-time"]);
    let setup_ms = num(&info["setup-time"]);
    let bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let streaming_s = ((total_ms - setup_ms) / 1e3).max(1e-3);
    let lat = &report["fault-latency"];

    // Firecracker's way: the guest is stopped for the whole save.
    std::thread::sleep(SETTLE);
    let s0 = Instant::now();
    vmm.cmd("stop", json!({}))?;
    snapshot(vmm, file)?;
    vmm.cmd("cont", json!({}))?;
    let stw = s0.elapsed();
    let _ = std::fs::remove_file(file);

    Ok(RunFigures {
        guest_rate_idle: idle,
        guest_rate_during: during,
        guest_rate_ratio: ratio,
        snapshot_ms: elapsed.as_secs_f64() * 1e3,
        write_mb_s: bytes as f64 / 1e6 / streaming_s,
        bytes,
        stall_ms: num(&report["stall-ms"]),
        faults: report["faults"].as_u64().unwrap_or(0),
        fault_p50_us: num(&lat["p50-us"]),
        fault_p99_us: num(&lat["p99-us"]),
        fault_max_us: num(&lat["max-us"]),
        stop_the_world_stall_ms: stw.as_secs_f64() * 1e3,
        guest_lost_ms: elapsed.as_secs_f64() * 1e3 * (1.0 - ratio).max(0.0),
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
        guest_lost_ms: m(|r| r.guest_lost_ms),
    })
}

fn boot(size: u64, dirty: DirtyMode) -> Result<Machine, String> {
    let config = MachineConfig {
        memory: MemoryConfig {
            size,
            ..MemoryConfig::default()
        },
        vcpus: 1,
        workload: Workload {
            working_set: 32 << 20,
            rate: 20_000,
            pattern: devices::guest_abi::Pattern::Full,
        },
        serial: SerialOutput::None,
        vm: VmOptions {
            dirty,
            ..VmOptions::default()
        },
    };
    Machine::boot(config, Arc::new(NoEvents)).map_err(|e| e.to_string())
}

/// Times `syncs` syncs of `tracker`, one every 100 ms, while the guest dirties memory.
fn time_syncs(tracker: &dyn DirtyTracker, pages: u64, syncs: usize) -> Result<(f64, f64), String> {
    tracker.start()?;
    let bitmap = AtomicBitmap::new(pages);
    let manual = tracker.clear_chunk_pages().is_some();
    tracker.prepare_send(0, pages)?;
    let mut times = Vec::with_capacity(syncs);
    let mut dirty = 0;
    for _ in 0..syncs {
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let r = tracker.sync(&bitmap).and_then(|n| {
            if manual {
                tracker.prepare_send(0, pages)?;
            }
            Ok(n)
        });
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        match r {
            Ok(n) => dirty += n,
            Err(e) => {
                tracker.stop();
                return Err(e);
            }
        }
        bitmap.clear_all();
    }
    tracker.stop();
    Ok((
        median(times.into_iter()),
        dirty as f64 / syncs.max(1) as f64,
    ))
}

fn sync_row(size: u64, tracker: &str, syncs: usize) -> SyncRow {
    let mode = if tracker == "ring" {
        DirtyMode::Ring(4096)
    } else {
        DirtyMode::Bitmap
    };
    let result = boot(size, mode).and_then(|machine| {
        // Let the guest write its working set once.
        std::thread::sleep(Duration::from_millis(500));
        let pages = machine.ram().page_count();
        if tracker == "uffd-async" {
            let t = UffdAsyncTracker::new(machine.ram().clone());
            time_syncs(&t, pages, syncs)
        } else {
            time_syncs(machine.dirty_tracker().as_ref(), pages, syncs)
        }
    });
    let gib = size as f64 / (1u64 << 30) as f64;
    match result {
        Ok((ms, dirty)) => SyncRow {
            tracker: tracker.into(),
            guest_mib: size >> 20,
            dirty_per_sync: dirty,
            sync_ms: ms,
            us_per_gib: ms * 1e3 / gib,
            unavailable: None,
        },
        Err(e) => SyncRow {
            tracker: tracker.into(),
            guest_mib: size >> 20,
            dirty_per_sync: 0.0,
            sync_ms: 0.0,
            us_per_gib: 0.0,
            unavailable: Some(e),
        },
    }
}

/// The dirty-sync comparison.
pub fn dirty_sync_rows(quick: bool) -> Vec<SyncRow> {
    let (sizes, syncs): (&[u64], usize) = if quick {
        (&[256 << 20, 1 << 30], 5)
    } else {
        (&[1 << 30, 4 << 30], 20)
    };
    let mut rows = Vec::new();
    for &size in sizes {
        for tracker in ["bitmap", "ring", "uffd-async"] {
            rows.push(sync_row(size, tracker, syncs));
        }
    }
    rows
}

/// Runs the benchmark.
pub fn measure(a: &SnapshotArgs) -> Result<SnapshotReport, BenchError> {
    if a.dirty_sync_only {
        return Ok(SnapshotReport {
            dirty_sync: dirty_sync_rows(a.quick),
            ..SnapshotReport::default()
        });
    }
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
        // Let the guest write its whole working set once, then unlimited bandwidth (the
        // capability's probe registers guest RAM with a userfaultfd: the runs settle first).
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
        dirty_sync: if a.dirty_sync {
            dirty_sync_rows(a.quick)
        } else {
            Vec::new()
        },
    })
}

impl SnapshotReport {
    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        if let Some(m) = &self.median {
            let _ = writeln!(o, "guest: {}", self.command);
            self.snapshot_text(m, &mut o);
        }
        if !self.dirty_sync.is_empty() {
            let _ = writeln!(
                o,
                "dirty sync (one vCPU dirtying 32 MiB, a sync every 100 ms; bitmap includes re-arming all memory):"
            );
            let _ = writeln!(
                o,
                "  {:<11} {:>7} {:>11} {:>10} {:>11}",
                "tracker", "guest", "dirty/sync", "sync ms", "µs per GiB"
            );
            for r in &self.dirty_sync {
                match &r.unavailable {
                    Some(why) => {
                        let _ = writeln!(
                            o,
                            "  {:<11} {:>5}M  unavailable: {why}",
                            r.tracker, r.guest_mib
                        );
                    }
                    None => {
                        let _ = writeln!(
                            o,
                            "  {:<11} {:>5}M {:>11.0} {:>10.3} {:>11.1}",
                            r.tracker, r.guest_mib, r.dirty_per_sync, r.sync_ms, r.us_per_gib
                        );
                    }
                }
            }
        }
        o
    }

    fn snapshot_text(&self, m: &RunFigures, o: &mut String) {
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
        let _ = writeln!(
            o,
            "  guest progress lost                {:.0} ms of full-speed guest time (stopped for the whole save: {:.0} ms)",
            m.guest_lost_ms, m.stop_the_world_stall_ms
        );
    }
}

/// `ferry bench snapshot`; returns the exit code.
pub fn main(a: SnapshotArgs) -> i32 {
    super::finish(
        "snapshot",
        measure(&a),
        a.json,
        false,
        |r| r.to_text(),
        |_| true,
    )
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
            guest_lost_ms: x,
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
            dirty_sync: Vec::new(),
        }
        .to_text();
        assert!(text.contains("goal p99 < 1 ms: met"), "{text}");
    }
}
