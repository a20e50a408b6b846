//! The `ferry` command line: one subcommand per file.

pub mod bench;
pub mod demo;
pub mod migrate;
pub mod objects;
pub mod probe;
pub mod qmp_cmd;
pub mod run;
pub mod upgrade;

use clap::{Parser, Subcommand};

/// Ferry: a KVM micro-VMM built to move running guests.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the self-verifying test guest (or wait for an incoming migration) and serve QMP.
    Run(run::RunArgs),
    /// Send one QMP command to a running Ferry and print the reply.
    Qmp(qmp_cmd::QmpArgs),
    /// Show what this host's kernel offers Ferry (KVM, userfaultfd, huge pages).
    Probe(probe::ProbeArgs),
    /// Live-migrate a running Ferry (over QMP) with a progress bar.
    Migrate(migrate::MigrateArgs),
    /// Boot a dirtying guest, live-migrate it between two hosts, verify it, summarize.
    Demo(demo::DemoArgs),
    /// End-to-end figures of real ferry processes (`ferry bench boot`).
    Bench(bench::BenchArgs),
    /// Replace a running Ferry by a new process (a newer binary) with a local migration:
    /// the guest keeps running and no memory is copied.
    Upgrade(upgrade::UpgradeArgs),
}

/// Runs the parsed command line; returns the process exit code.
pub fn main_with(cli: Cli) -> i32 {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Qmp(a) => qmp_cmd::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Upgrade(a) => upgrade::run(a),
    }
}
