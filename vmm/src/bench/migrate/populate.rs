//! `prealloc=on` against single-threaded first touch: the time to fault in all of a
//! guest's memory, per backend, measured in this process on fresh mappings.
//!
//! First touch is what a guest (or a receiver writing into fresh memory) pays page by
//! page; MADV_POPULATE_WRITE on all CPUs is what `prealloc=on` and the incoming populate
//! use instead.

use std::fmt::Write as _;

use ram::{Backend, GuestRam, HugePages, MemoryConfig};
use serde::Serialize;

use super::{BenchEnv, BenchError};

/// One backend, both ways.
#[derive(Debug, Clone, Serialize)]
pub struct PopulateRow {
    /// The `--memory` options measured.
    pub memory: String,
    /// Bytes populated.
    pub bytes: u64,
    /// First touch, one thread, GiB/s.
    pub touch_gib_per_s: f64,
    /// MADV_POPULATE_WRITE on `threads` threads, GiB/s.
    pub populate_gib_per_s: f64,
    /// Threads of the populate.
    pub threads: usize,
}

fn fresh(size: u64, backend: Backend, hugepages: HugePages) -> Result<GuestRam, BenchError> {
    GuestRam::new(&MemoryConfig {
        size,
        backend,
        hugepages,
        prealloc: false,
    })
    .map_err(|e| BenchError::Failed(format!("guest memory: {e}")))
}

/// Runs the section.
pub fn run(env: &BenchEnv) -> Result<Vec<PopulateRow>, BenchError> {
    let size: u64 = if env.quick { 256 << 20 } else { 2 << 30 };
    let threads = ram::guest_ram::threads_for_populate();
    let gib = (1u64 << 30) as f64;
    let mut rows = Vec::new();
    for (name, backend, hp) in [
        ("memfd (default)", Backend::SharedMemfd, HugePages::None),
        ("backend=anon", Backend::AnonymousPrivate, HugePages::None),
        (
            "backend=anon,hugepages=thp",
            Backend::AnonymousPrivate,
            HugePages::Thp,
        ),
    ] {
        env.say(format!("populate: {name}, {} MiB", size >> 20));
        let touch = fresh(size, backend.clone(), hp)?.populate_by_touch();
        let r = fresh(size, backend, hp)?;
        let pop = r
            .populate_with_progress(threads, |_, _| {})
            .map_err(|e| BenchError::Failed(format!("populate: {e}")))?;
        drop(r);
        rows.push(PopulateRow {
            memory: format!("{}M,{name}", size >> 20),
            bytes: size,
            touch_gib_per_s: touch.bytes_per_second() / gib,
            populate_gib_per_s: pop.bytes_per_second() / gib,
            threads: pop.threads,
        });
    }
    Ok(rows)
}

/// The section as a table.
pub fn table(rows: &[PopulateRow]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nfaulting in fresh guest memory (in this process): first touch (1 thread) vs MADV_POPULATE_WRITE (prealloc=on):"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "  {:<36} touch {:>5.2} GiB/s   populate {:>5.2} GiB/s on {} threads   ({:.1}x)",
            r.memory,
            r.touch_gib_per_s,
            r.populate_gib_per_s,
            r.threads,
            r.populate_gib_per_s / r.touch_gib_per_s.max(1e-9)
        );
    }
    t
}
