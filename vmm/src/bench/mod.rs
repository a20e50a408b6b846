//! End-to-end figures of a real Ferry, behind `ferry bench`: one module per benchmark
//! (`boot`, `migrate`, `snapshot`), plus what they share (summary statistics, a process's memory from
//! /proc).

pub mod boot;
pub mod local;
pub mod migrate;
pub mod postcopy;
pub mod proc_status;
pub mod snapshot;
pub mod stats;

pub use proc_status::ProcMemory;
pub use stats::Summary;

use std::path::PathBuf;

use migrate::BenchError;

/// The ferry binary a bench runs: `--ferry PATH` when given, else this executable.
pub fn ferry_binary(given: &Option<PathBuf>) -> Result<PathBuf, BenchError> {
    match given {
        Some(f) => Ok(f.clone()),
        None => {
            std::env::current_exe().map_err(|e| BenchError::Io(PathBuf::from("current_exe"), e))
        }
    }
}

/// Prints a bench's report (JSON or text) and returns the exit code: 1 when the run
/// failed, or with `check` when a goal is not met.
pub fn finish<R: serde::Serialize>(
    name: &str,
    result: Result<R, BenchError>,
    json: bool,
    check: bool,
    text: impl Fn(&R) -> String,
    goals_met: impl Fn(&R) -> bool,
) -> i32 {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry bench {name}: {e}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry bench {name}: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", text(&report));
    }
    if check && !goals_met(&report) {
        eprintln!("ferry bench {name}: a goal is not met");
        return 1;
    }
    0
}
