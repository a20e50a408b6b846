//! `ferry bench boot|...`: end-to-end figures of real `ferry` processes.
//!
//! Each benchmark is a sub-subcommand with its own arguments; add one by adding a
//! variant to [`BenchCommand`] and a module under `crate::bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::bench::boot::{BootBenchConfig, BootReport};

/// Arguments of `ferry bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time from process start to the guest's first serial byte, and the VMM's memory
    /// overhead (RSS beyond guest RAM) at idle.
    Boot(BootArgs),
    /// Migration figures as ratios to references measured in the same run: first-pass
    /// throughput vs TCP (plain and multifd), downtime, rate-limiter accuracy, dirty-sync cost.
    Migrate(crate::bench::migrate::MigrateArgs),
    /// Background-snapshot figures: the guest's write rate during a snapshot as a ratio to
    /// without, write throughput, fault latency p50/p99, stall vs stopping for the whole save.
    Snapshot(crate::bench::snapshot::SnapshotArgs),
    /// Local migration (x-ignore-shared) downtime and total time for several guest sizes,
    /// against a copying migration of the smallest guest in the same run.
    Local(crate::bench::local::LocalArgs),
    /// Postcopy: migrate-start-postcopy to the guest handed over, page-fault round trip
    /// p50/p99 with and without postcopy-preempt, total time vs precopy + auto-converge.
    Postcopy(crate::bench::postcopy::PostcopyArgs),
}

/// Arguments of `ferry bench boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Untimed warm-up runs before them (fill the page cache with the binary).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Guest memory of each run (memfd-backed: the overhead method needs it).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// vCPUs of each run.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// The guest's workload (default: `ferry run`'s).
    #[arg(long)]
    pub workload: Option<String>,
    /// Milliseconds the last run idles before its memory is read.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// The ferry binary to measure (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when a goal (boot < 20 ms, overhead < 16 MiB) is not met.
    #[arg(long)]
    pub check: bool,
}

/// Runs `ferry bench`; returns the exit code.
pub fn run(a: BenchArgs) -> i32 {
    match a.what {
        BenchCommand::Boot(b) => boot(b),
        BenchCommand::Migrate(m) => crate::bench::migrate::main(m),
        BenchCommand::Snapshot(s) => crate::bench::snapshot::main(s),
        BenchCommand::Local(l) => crate::bench::local::main(l),
        BenchCommand::Postcopy(p) => crate::bench::postcopy::main(p),
    }
}

fn boot(a: BootArgs) -> i32 {
    let ferry = match a
        .ferry
        .clone()
        .map(Ok)
        .unwrap_or_else(std::env::current_exe)
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferry bench boot: cannot find the ferry binary: {e}");
            return 1;
        }
    };
    let config = BootBenchConfig {
        ferry,
        runs: a.runs,
        warmup: a.warmup,
        memory: a.memory,
        vcpus: a.vcpus,
        workload: a.workload,
        settle: Duration::from_millis(a.settle_ms),
        timeout: Duration::from_secs(20),
    };
    let quiet = a.json;
    let result = config.run(|i, t| {
        if !quiet {
            eprintln!("run {:>3}: {:.2} ms", i + 1, t.as_secs_f64() * 1e3);
        }
    });
    let report: BootReport = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry bench boot: {e}");
            return 1;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry bench boot: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    let met = report.goals.boot_met && report.goals.overhead_met;
    if a.check && !met {
        1
    } else {
        0
    }
}
