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
