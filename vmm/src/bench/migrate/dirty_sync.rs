//! The cost of one dirty-page sync, per GiB of guest memory: KVM's dirty bitmap (with
//! manual protect: KVM_GET_DIRTY_LOG, merging, and the re-arming KVM_CLEAR_DIRTY_LOG that a
//! migration does chunk by chunk) against KVM's dirty ring (harvesting the rings and
//! KVM_RESET_DIRTY_RINGS).
//!
//! Measured in this process on real VMs ([`crate::machine::Machine`]) of two sizes whose
//! guest dirties the same working set at the same rate, through the very trackers a
//! migration uses ([`crate::dirty::KvmDirtyLog`], [`crate::dirty::KvmDirtyRing`]), timing
//! each call: a bitmap's cost grows with guest memory, a ring's with the pages dirtied.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::SerialOutput;
use ram::{AtomicBitmap, MemoryConfig};
use serde::Serialize;

use super::{BenchEnv, BenchError};
use crate::bench::stats::Summary;
use crate::kvm::vm::{DirtyMode, VmOptions};
use crate::machine::{Machine, MachineConfig, NoEvents, Workload};

/// Sync cost of one tracker on one guest size.
#[derive(Debug, Clone, Serialize)]
pub struct SyncFigure {
    /// "bitmap" or "ring".
    pub tracker: String,
    /// The tracker's own name (says whether manual protect is on).
    pub tracker_name: String,
    /// Guest memory, bytes.
    pub guest_bytes: u64,
    /// Syncs measured.
    pub syncs: usize,
    /// Interval between syncs, ms.
    pub interval_ms: u64,
    /// Mean pages newly dirty per sync.
    pub dirty_pages_per_sync: f64,
    /// Time of one sync call (median, min, max).
    pub sync: Summary,
    /// Time to re-arm all of guest memory after a sync (bitmap with manual protect only).
    pub clear: Option<Summary>,
    /// (sync + clear) median per GiB of guest memory, microseconds.
    pub us_per_gib: f64,
    /// Why it was not measured.
    pub unavailable: Option<String>,
}

fn boot(size: u64, mode: DirtyMode) -> Result<Machine, String> {
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
            dirty: mode,
            ..VmOptions::default()
        },
    };
    Machine::boot(config, Arc::new(NoEvents)).map_err(|e| e.to_string())
}

fn measure(size: u64, mode: DirtyMode, syncs: usize, interval: Duration) -> SyncFigure {
    let tracker = match mode {
        DirtyMode::Bitmap => "bitmap",
        DirtyMode::Ring(_) => "ring",
    };
    let fail = |why: String| SyncFigure {
        tracker: tracker.into(),
        tracker_name: String::new(),
        guest_bytes: size,
        syncs: 0,
        interval_ms: interval.as_millis() as u64,
        dirty_pages_per_sync: 0.0,
        sync: Summary {
            runs: 0,
            median_ms: 0.0,
            min_ms: 0.0,
            max_ms: 0.0,
            samples_ms: Vec::new(),
        },
        clear: None,
        us_per_gib: 0.0,
        unavailable: Some(why),
    };
    let machine = match boot(size, mode) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    // Let the guest fill its working set once.
    std::thread::sleep(Duration::from_millis(300));
    let t = machine.dirty_tracker();
    if let Err(e) = t.start() {
        return fail(e);
    }
    let pages = machine.ram().page_count();
    let bitmap = AtomicBitmap::new(pages);
    let manual = t.clear_chunk_pages().is_some();
    let mut sync_t = Vec::with_capacity(syncs);
    let mut clear_t = Vec::with_capacity(syncs);
    let mut dirty = 0u64;
    // A migration's first pass re-arms everything before it starts sending.
    let _ = t.prepare_send(0, pages);
    for _ in 0..syncs {
        std::thread::sleep(interval);
        let t0 = Instant::now();
        match t.sync(&bitmap) {
            Ok(n) => dirty += n,
            Err(e) => {
                t.stop();
                return fail(e);
            }
        }
        sync_t.push(t0.elapsed());
        if manual {
            let t1 = Instant::now();
            if let Err(e) = t.prepare_send(0, pages) {
                t.stop();
                return fail(e);
            }
            clear_t.push(t1.elapsed());
        }
        bitmap.clear_all();
    }
    t.stop();
    let name = t.name().to_string();
    drop(machine);
    let Some(sync) = Summary::of(&sync_t) else {
        return fail("no syncs".into());
    };
    let clear = Summary::of(&clear_t);
    let gib = size as f64 / (1u64 << 30) as f64;
    let per_call_ms = sync.median_ms + clear.as_ref().map_or(0.0, |c| c.median_ms);
    SyncFigure {
        tracker: tracker.into(),
        tracker_name: name,
        guest_bytes: size,
        syncs,
        interval_ms: interval.as_millis() as u64,
        dirty_pages_per_sync: dirty as f64 / syncs.max(1) as f64,
        us_per_gib: per_call_ms * 1e3 / gib,
        sync,
        clear,
        unavailable: None,
    }
}

/// Runs the section: both trackers on two guest sizes.
pub fn run(env: &BenchEnv) -> Result<Vec<SyncFigure>, BenchError> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(BenchError::Io("/dev/kvm".into(), e));
    }
    let (sizes, syncs): (&[u64], usize) = if env.quick {
        (&[256 << 20, 1 << 30], 5)
    } else {
        (&[1 << 30, 4 << 30], 20)
    };
    let interval = Duration::from_millis(100);
    let mut out = Vec::new();
    for &size in sizes {
        for mode in [DirtyMode::Bitmap, DirtyMode::Ring(4096)] {
            env.say(format!(
                "dirty sync: {:?} on {} MiB (in this process)",
                mode,
                size >> 20
            ));
            out.push(measure(size, mode, syncs, interval));
        }
    }
    Ok(out)
}

/// The section as a table.
pub fn table(rows: &[SyncFigure]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\ndirty sync cost (one vCPU dirtying 32 MiB at 20000 pages/s; a sync every 100 ms):\n\
         \x20 {:<7} {:>7} {:>12} {:>14} {:>14} {:>14}",
        "tracker", "guest", "dirty/sync", "sync ms (med)", "re-arm ms", "us per GiB"
    );
    for r in rows {
        if let Some(why) = &r.unavailable {
            let _ = writeln!(
                t,
                "  {:<7} {:>5}M  unavailable: {why}",
                r.tracker,
                r.guest_bytes >> 20
            );
            continue;
        }
        let _ = writeln!(
            t,
            "  {:<7} {:>5}M {:>12.0} {:>14.3} {:>14} {:>14.1}",
            r.tracker,
            r.guest_bytes >> 20,
            r.dirty_pages_per_sync,
            r.sync.median_ms,
            r.clear
                .as_ref()
                .map_or_else(|| "-".to_string(), |c| format!("{:.3}", c.median_ms)),
            r.us_per_gib
        );
    }
    let _ = writeln!(
        t,
        "  (bitmap = KVM_GET_DIRTY_LOG + merge, re-arm = KVM_CLEAR_DIRTY_LOG of all memory, as a pass does chunk by chunk;\n\
         \x20  ring = harvest every vCPU's ring + KVM_RESET_DIRTY_RINGS + merge; us per GiB = (sync + re-arm) / guest GiB)"
    );
    t
}
