//! `ferry bench migrate`: end-to-end migration figures of real `ferry run` processes, each
//! stated as a ratio to a reference measured in the same run.
//!
//! Sections (each can be chosen with `--only`):
//! - **populate** ([`populate`]): faulting in fresh guest memory, first touch on one thread
//!   against MADV_POPULATE_WRITE on all CPUs (`prealloc=on`), per backend;
//! - **throughput** ([`throughput`]): the first pass of a migration of guest memory loaded
//!   from the data-set images (`--memory SIZE,mem-path=IMAGE,share=off` on the source,
//!   an idle guest), max-bandwidth unlimited, into a fresh and into a preallocated
//!   destination, plain and with multifd (2 and 4 channels, zstd-1, zlib-1: tried, and
//!   reported unavailable when this build cannot do them) and legacy `compress` (1 and 2
//!   threads at zlib level 1); versus TCP over the same link
//!   measured by this process ([`tcp`]) with the same number of streams, and versus the
//!   QEMU 7.2 figures of issue 12;
//! - **downtime** ([`downtime`]): a dirtying guest migrated with the default downtime-limit
//!   several times: every value, the median and the maximum;
//! - **rate** ([`rate`]): the measured rate of a migration against max-bandwidth;
//! - **dirty-sync** ([`dirty_sync`]): the cost of one dirty-page sync per GiB of guest memory,
//!   KVM's dirty bitmap versus its dirty ring, measured in this process on a real VM.
//!
//! The source and destination are two `ferry run` processes on loopback TCP, or on the two
//! network-namespace hosts of [`crate::hostpair`] with `--netns`. Every command is printed.
//! `--report DIR` adds charts: every throughput row's migration timeline and a summary
//! ([`crate::report::bench_migrate`]).

pub mod data;
pub mod dirty_sync;
pub mod downtime;
pub mod populate;
pub mod proc;
pub mod rate;
pub mod tcp;
pub mod throughput;
pub mod tls;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use thiserror::Error;

use crate::hostpair::{Host, HostPair};

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A file or process could not be used.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A `ferry run` exited early.
    #[error("the {name} VMM exited with {code:?}; its log:\n{log}")]
    Exited {
        /// Which one.
        name: String,
        /// Exit code.
        code: Option<i32>,
        /// Its stderr.
        log: String,
    },
    /// A QMP command failed.
    #[error("{name}: {command}: {error}")]
    Qmp {
        /// Which VMM.
        name: String,
        /// The command.
        command: String,
        /// What went wrong.
        error: String,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The data sets are missing.
    #[error("{0}")]
    Data(String),
    /// A measurement that makes no sense (a migration that failed, a mismatch).
    #[error("{0}")]
    Failed(String),
    /// The options.
    #[error("{0}")]
    Usage(String),
}

/// Arguments of `ferry bench migrate`.
#[derive(Debug, Args, Clone)]
pub struct MigrateArgs {
    /// A smoke run for CI: 256 MiB guests, small stand-in data sets when the real ones are
    /// missing, fewer runs.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Directory of the data-set images mixed.img and random.img (scripts/bench-data.sh
    /// makes them; default $FERRY_BENCH_DATA or ~/.cache/ferry/bench-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Guest memory of the throughput and rate rows (default 2G; 256M with --quick).
    #[arg(long)]
    pub memory: Option<String>,
    /// Run source and destination on two network-namespace hosts joined by a veth pair
    /// (198.18.0.1 -> 198.18.0.2) instead of loopback.
    #[arg(long)]
    pub netns: bool,
    /// Sections to run: populate,throughput,downtime,rate,dirty-sync (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Throughput configurations: plain,multifd-2,multifd-4,zstd-1,zlib-1,compress-1,
    /// compress-2 (legacy `compress` with 1 or 2 threads, zlib level 1) (default: these
    /// seven), tls,multifd-2-tls (plain and multifd-2 over TLS; each brings its
    /// configuration without TLS along, and the table gives the ratio of the two), and
    /// multifd-2-zc (multifd-2 with zero-copy-send; brings multifd-2 along, and the table
    /// compares the source's CPU per GiB).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Destinations of the plain rows: fresh,prealloc,thp,fresh-1t,fresh-2t,fresh-nopop
    /// (default fresh,prealloc; multifd rows go into a fresh destination). `thp` is fresh
    /// anonymous memory with huge pages; `fresh-1t` / `fresh-2t` / `fresh-nopop` populate
    /// ahead of the receiver with one thread / two / not at all (`fresh`: one per CPU but
    /// the receiver's).
    #[arg(long, value_delimiter = ',')]
    pub dest: Vec<String>,
    /// Migrations of the dirtying guest for the downtime figures (default 5; 2 with --quick).
    #[arg(long)]
    pub downtime_runs: Option<usize>,
    /// Runs of each throughput row; the best is reported (default 1).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// The ferry binary to measure (default: this one).
    #[arg(long)]
    pub ferry: Option<PathBuf>,
    /// Keep the scratch directory (logs of every ferry run).
    #[arg(long)]
    pub keep: bool,
    /// Exit with status 1 when a goal is not met.
    #[arg(long)]
    pub check: bool,
    /// Write charts into DIR: the timeline of every throughput row's migration and a
    /// summary of GiB/s per configuration and data set beside the same-run TCP figures.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// Where and how the processes run; shared by the sections.
pub struct BenchEnv {
    /// The ferry binary.
    pub ferry: PathBuf,
    /// Scratch directory (sockets, logs, stand-in images).
    pub dir: PathBuf,
    /// The host pair, when `--netns`.
    pub pair: Option<HostPair>,
    /// Whether this is a `--quick` run.
    pub quick: bool,
    /// Progress messages on stderr.
    pub verbose: bool,
    commands: std::sync::Mutex<Vec<String>>,
}

impl BenchEnv {
    /// The source's host (None: this one).
    pub fn source_host(&self) -> Option<&Host> {
        self.pair.as_ref().map(HostPair::a)
    }

    /// The destination's host (None: this one).
    pub fn dest_host(&self) -> Option<&Host> {
        self.pair.as_ref().map(HostPair::b)
    }

    /// The address the destination listens on.
    pub fn dest_addr(&self) -> String {
        self.dest_host()
            .map_or_else(|| "127.0.0.1".to_string(), |h| h.addr.to_string())
    }

    /// Ends of the TCP reference, on the same hosts as the migrations.
    pub fn tcp_ends(&self) -> tcp::TcpEnds {
        tcp::TcpEnds {
            sender_netns: self.source_host().and_then(|h| h.netns.clone()),
            receiver_netns: self.dest_host().and_then(|h| h.netns.clone()),
            addr: self.dest_host().map(|h| h.addr),
        }
    }

    /// Records a command line for the report (each once).
    pub fn note_command(&self, line: String) {
        if let Ok(mut c) = self.commands.lock() {
            if !c.contains(&line) {
                c.push(line);
            }
        }
    }

    /// A progress line on stderr.
    pub fn say(&self, what: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("ferry bench migrate: {what}");
        }
    }

    /// Starts a `ferry run` on `host` and records its command line.
    pub fn spawn(
        &self,
        host: Option<&Host>,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<proc::BenchVmm, BenchError> {
        let v = proc::BenchVmm::spawn(&self.ferry, host, &self.dir, name, args, env)?;
        self.note_command(v.command.join(" "));
        Ok(v)
    }
}

/// QEMU 7.2's receive figures on this machine, quoted by issue 12 (GiB/s).
#[derive(Debug, Clone, Serialize)]
pub struct QemuReference {
    /// Into fresh memory: low and high.
    pub fresh_gib_per_s: (f64, f64),
    /// Into preallocated memory: low and high.
    pub prealloc_gib_per_s: (f64, f64),
    /// Where the figures come from.
    pub source: &'static str,
}

/// The goals and whether they were met.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Goals {
    /// Plain first pass / loopback TCP >= 0.8 (random data, fresh destination).
    pub plain_vs_tcp: Option<bool>,
    /// Plain into a fresh destination >= 2x QEMU 7.2's best fresh figure (1.4 GiB/s), per data set.
    pub fresh_vs_qemu: Option<bool>,
    /// multifd none 2 channels / 2-stream TCP >= 0.9.
    pub multifd2_vs_tcp: Option<bool>,
    /// Every downtime <= 300 ms.
    pub downtime_max: Option<bool>,
    /// Median downtime <= 50 ms.
    pub downtime_median: Option<bool>,
    /// Every measured rate within +-3% of max-bandwidth.
    pub rate_within_3pct: Option<bool>,
}

/// Everything `ferry bench migrate` measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// Always "migrate".
    pub bench: &'static str,
    /// Loopback, or the netns host pair.
    pub hosts: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// CPUs of this machine.
    pub cpus: usize,
    /// Guest memory of the throughput and rate rows, bytes.
    pub memory_bytes: u64,
    /// The images used.
    pub data_sets: Vec<data::DataSet>,
    /// TCP references (1 stream, and N streams for multifd rows).
    pub tcp: Vec<tcp::TcpFigure>,
    /// TCP from the random image, mapped as the source guest maps it, into fresh memory (one
    /// figure per stream count of the uncompressed rows).
    pub tcp_memory: Vec<tcp::TcpFigure>,
    /// The same on one stream into preallocated memory (when a plain row goes there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_memory_prealloc: Option<tcp::TcpFigure>,
    /// Throughput rows.
    pub throughput: Vec<throughput::ThroughputRow>,
    /// QEMU's figures from issue 12.
    pub qemu: QemuReference,
    /// Downtime figures.
    pub downtime: Option<downtime::DowntimeReport>,
    /// Rate-limiter rows.
    pub rate_limit: Vec<rate::RateRow>,
    /// Dirty-sync cost rows.
    pub dirty_sync: Vec<dirty_sync::SyncFigure>,
    /// First touch versus MADV_POPULATE_WRITE.
    pub populate: Vec<populate::PopulateRow>,
    /// Goals.
    pub goals: Goals,
    /// Every command line run, in order.
    pub commands: Vec<String>,
    /// Sections that could not run, and why.
    pub errors: Vec<String>,
}

const SECTIONS: [&str; 5] = ["populate", "throughput", "downtime", "rate", "dirty-sync"];

fn parse_size(text: &str) -> Result<u64, BenchError> {
    ram::parse_size_default_unit(text, 1 << 20)
        .map_err(|e| BenchError::Usage(format!("--memory {text}: {e}")))
        .and_then(|s| {
            if s == 0 || s % (2 << 20) != 0 {
                Err(BenchError::Usage(format!(
                    "--memory {text}: must be a non-zero multiple of 2 MiB"
                )))
            } else {
                Ok(s)
            }
        })
}

/// Finds (or, with `--quick`, makes) the two images of at least `size` bytes.
fn data_sets(a: &MigrateArgs, env: &BenchEnv, size: u64) -> Result<Vec<data::DataSet>, BenchError> {
    let dir = a.data_dir.clone().unwrap_or_else(data::default_dir);
    let mut out = Vec::new();
    for kind in data::KINDS {
        match data::find(&dir, kind, size) {
            Some(d) => out.push(d),
            None if a.quick => {
                env.say(format!(
                    "no {kind}.img of {} MiB in {}: making a small stand-in",
                    size >> 20,
                    dir.display()
                ));
                out.push(
                    data::synthesize(&env.dir, kind, size)
                        .map_err(|e| BenchError::Io(env.dir.clone(), e))?,
                );
            }
            None => {
                return Err(BenchError::Data(format!(
                    "{}/{kind}.img (at least {} MiB) is missing: run scripts/bench-data.sh \
                     (or pass --data-dir, or --quick for small stand-ins)",
                    dir.display(),
                    size >> 20
                )))
            }
        }
    }
    // Read them once so that the first row does not measure the disk.
    for d in &out {
        if let Ok(mut f) = std::fs::File::open(&d.path) {
            let _ = std::io::copy(&mut std::io::Read::take(&mut f, size), &mut std::io::sink());
        }
    }
    Ok(out)
}

/// Runs the benchmark.
pub fn run(a: &MigrateArgs) -> Result<MigrateReport, BenchError> {
    let ferry = match a.ferry.clone() {
        Some(p) => p,
        None => std::env::current_exe().map_err(|e| BenchError::Io("ferry".into(), e))?,
    };
    let sections: Vec<String> = if a.only.is_empty() {
        SECTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        a.only.clone()
    };
    if let Some(bad) = sections.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        return Err(BenchError::Usage(format!(
            "--only: unknown section '{bad}' (known: {})",
            SECTIONS.join(",")
        )));
    }
    let memory = parse_size(
        a.memory
            .as_deref()
            .unwrap_or(if a.quick { "256M" } else { "2G" }),
    )?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io(dir.clone(), e))?;
    let _scratch = Scratch {
        path: dir.clone(),
        keep: a.keep,
    };
    let pair = if a.netns {
        Some(HostPair::create().map_err(|e| BenchError::Usage(format!("--netns: {e}")))?)
    } else {
        None
    };
    let env = BenchEnv {
        ferry,
        dir,
        pair,
        quick: a.quick,
        verbose: true,
        commands: std::sync::Mutex::new(Vec::new()),
    };
    let hosts = match env.pair.as_ref() {
        Some(p) => format!(
            "two network-namespace hosts joined by a veth pair ({} -> {})",
            p.a().addr,
            p.b().addr
        ),
        None => "loopback TCP (127.0.0.1)".to_string(),
    };
    let mut report = MigrateReport {
        bench: "migrate",
        hosts,
        quick: a.quick,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: memory,
        data_sets: Vec::new(),
        tcp: Vec::new(),
        tcp_memory: Vec::new(),
        tcp_memory_prealloc: None,
        throughput: Vec::new(),
        qemu: QemuReference {
            fresh_gib_per_s: (1.0, 1.4),
            prealloc_gib_per_s: (2.2, 4.0),
            source: "issue 12: QEMU 7.2 on this machine, same data sets",
        },
        downtime: None,
        rate_limit: Vec::new(),
        dirty_sync: Vec::new(),
        populate: Vec::new(),
        goals: Goals::default(),
        commands: Vec::new(),
        errors: Vec::new(),
    };
    let wants = |s: &str| sections.iter().any(|x| x == s);
    if wants("populate") {
        match populate::run(&env) {
            Ok(rows) => report.populate = rows,
            Err(e) => report.errors.push(format!("populate: {e}")),
        }
    }
    if wants("throughput") || wants("rate") {
        report.data_sets = data_sets(a, &env, memory)?;
    }
    if wants("throughput") {
        let configs = throughput::configs(&a.configs).map_err(BenchError::Usage)?;
        let dests = throughput::dests(&a.dest).map_err(BenchError::Usage)?;
        let section = throughput::run(
            &env,
            &report.data_sets,
            memory,
            &configs,
            &dests,
            a.runs.max(1),
        );
        report.tcp = section.tcp;
        report.tcp_memory = section.tcp_memory;
        report.tcp_memory_prealloc = section.tcp_memory_prealloc;
        report.throughput = section.rows;
        report.errors.extend(section.errors);
    }
    if wants("downtime") {
        let runs = a.downtime_runs.unwrap_or(if a.quick { 2 } else { 5 });
        match downtime::run(&env, runs) {
            Ok(d) => report.downtime = Some(d),
            Err(e) => report.errors.push(format!("downtime: {e}")),
        }
    }
    if wants("rate") {
        let link = throughput::link_rate(&report.throughput, &report.tcp);
        match report.data_sets.iter().find(|d| d.kind == "random") {
            Some(random) => match rate::run(&env, random, memory, link) {
                Ok(rows) => report.rate_limit = rows,
                Err(e) => report.errors.push(format!("rate: {e}")),
            },
            None => report.errors.push("rate: no random data set".into()),
        }
    }
    if wants("dirty-sync") {
        match dirty_sync::run(&env) {
            Ok(rows) => report.dirty_sync = rows,
            Err(e) => report.errors.push(format!("dirty-sync: {e}")),
        }
    }
    report.goals = goals(&report);
    report.commands = env.commands.lock().map(|c| c.clone()).unwrap_or_default();
    Ok(report)
}

fn goals(r: &MigrateReport) -> Goals {
    let plain_fresh = |kind: &str| {
        r.throughput
            .iter()
            .filter(|t| t.data_set == kind && t.config == "plain" && t.dest == "fresh")
            .find_map(throughput::ThroughputRow::ok)
    };
    let plain_vs_tcp = plain_fresh("random")
        .and_then(|m| m.wire_vs_tcp)
        .map(|x| x >= 0.8);
    let fresh: Vec<bool> = ["mixed", "random"]
        .iter()
        .filter_map(|k| plain_fresh(k))
        .map(|m| m.guest_gib_per_s >= 2.0 * r.qemu.fresh_gib_per_s.1)
        .collect();
    let multifd2 = r
        .throughput
        .iter()
        .filter(|t| t.config == "multifd-2" && t.data_set == "random")
        .filter_map(throughput::ThroughputRow::ok)
        .find_map(|m| m.wire_vs_tcp)
        .map(|x| x >= 0.9);
    let d = r.downtime.as_ref().and_then(|d| d.summary.as_ref());
    let rates: Vec<bool> = r
        .rate_limit
        .iter()
        .filter_map(|x| x.error_pct)
        .map(|e| e.abs() <= 3.0)
        .collect();
    Goals {
        plain_vs_tcp,
        fresh_vs_qemu: (!fresh.is_empty()).then(|| fresh.iter().all(|&b| b)),
        multifd2_vs_tcp: multifd2,
        downtime_max: d.map(|s| s.max_ms <= 300.0),
        downtime_median: d.map(|s| s.median_ms <= 50.0),
        rate_within_3pct: (!rates.is_empty()).then(|| rates.iter().all(|&b| b)),
    }
}

/// A scratch directory removed on drop (unless kept).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("ferry bench migrate: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn verdict(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

impl MigrateReport {
    /// Whether every goal that was measured is met.
    pub fn goals_met(&self) -> bool {
        let g = &self.goals;
        [
            g.plain_vs_tcp,
            g.fresh_vs_qemu,
            g.multifd2_vs_tcp,
            g.downtime_max,
            g.downtime_median,
            g.rate_within_3pct,
        ]
        .iter()
        .all(|v| v.unwrap_or(true))
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "ferry bench migrate{}: {} ({} CPUs), guest memory {} MiB",
            if self.quick { " --quick" } else { "" },
            self.hosts,
            self.cpus,
            self.memory_bytes >> 20
        );
        if !self.data_sets.is_empty() {
            let _ = writeln!(t, "\ndata sets:");
            for d in &self.data_sets {
                let _ = writeln!(
                    t,
                    "  {:<7} {} ({} MiB{})",
                    d.kind,
                    d.path.display(),
                    d.size >> 20,
                    if d.synthesized {
                        ", a small stand-in"
                    } else {
                        ""
                    }
                );
            }
        }
        if !self.tcp.is_empty() {
            let _ = writeln!(
                t,
                "\nreference: TCP measured by this process over the same link:"
            );
            for f in &self.tcp {
                let _ = writeln!(
                    t,
                    "  {} stream(s): {:.2} GiB/s (best of {:?})",
                    f.streams,
                    f.gib_per_s,
                    f.runs_rounded()
                );
            }
            let memory_refs = self
                .tcp_memory
                .iter()
                .map(|f| (f, "fresh"))
                .chain(self.tcp_memory_prealloc.iter().map(|f| (f, "prealloc")));
            for (f, dest) in memory_refs {
                let into = if dest == "fresh" {
                    "fresh"
                } else {
                    "preallocated"
                };
                let _ = writeln!(
                    t,
                    "  {} stream(s) from the random image (mapped as the source guest maps it) into {into} memfd memory,\n\
                     \x20 128 pages per writev/readv, no headers or checks: {:.2} GiB/s (best of {:?})",
                    f.streams,
                    f.gib_per_s,
                    f.runs_rounded()
                );
                for r in self.throughput.iter().filter(|r| {
                    r.data_set == "random"
                        && r.dest == dest
                        && throughput::memory_reference_streams(&r.config) == Some(f.streams)
                }) {
                    if let Some(m) = r.ok() {
                        let _ = writeln!(
                            t,
                            "  {} first pass, random -> {dest}: {:.2} x that memory-bound reference",
                            r.config,
                            m.wire_gib_per_s / f.gib_per_s.max(1e-9)
                        );
                    }
                }
            }
            let _ = writeln!(
                t,
                "reference: {} — into fresh memory {:.1}-{:.1} GiB/s, preallocated {:.1}-{:.1} GiB/s",
                self.qemu.source,
                self.qemu.fresh_gib_per_s.0,
                self.qemu.fresh_gib_per_s.1,
                self.qemu.prealloc_gib_per_s.0,
                self.qemu.prealloc_gib_per_s.1
            );
        }
        if !self.populate.is_empty() {
            t.push_str(&populate::table(&self.populate));
        }
        if !self.throughput.is_empty() {
            t.push_str(&throughput::table(&self.throughput, &self.qemu));
        }
        if let Some(d) = &self.downtime {
            t.push_str(&d.to_text());
        }
        if !self.rate_limit.is_empty() {
            t.push_str(&rate::table(&self.rate_limit));
        }
        if !self.dirty_sync.is_empty() {
            t.push_str(&dirty_sync::table(&self.dirty_sync));
        }
        let g = &self.goals;
        let _ = writeln!(t, "\ngoals:");
        for (name, v) in [
            (
                "plain first pass >= 0.8 x TCP (random, fresh)",
                g.plain_vs_tcp,
            ),
            (
                "plain into fresh memory >= 2 x QEMU 7.2 (2.8 GiB/s)",
                g.fresh_vs_qemu,
            ),
            (
                "multifd none 2 channels >= 0.9 x 2-stream TCP",
                g.multifd2_vs_tcp,
            ),
            ("every downtime <= 300 ms", g.downtime_max),
            ("median downtime <= 50 ms", g.downtime_median),
            ("rate within +-3% of max-bandwidth", g.rate_within_3pct),
        ] {
            let _ = writeln!(t, "  {name:<55} {}", verdict(v));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(t, "\nnot measured:");
            for e in &self.errors {
                let _ = writeln!(t, "  {e}");
            }
        }
        let _ = writeln!(
            t,
            "\ncommands (QMP sequences are in --json and in each section's notes):"
        );
        for c in &self.commands {
            let _ = writeln!(t, "  {c}");
        }
        t
    }
}

/// `ferry bench migrate`: runs, prints, returns the exit code.
pub fn main(a: MigrateArgs) -> i32 {
    let report = match run(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry bench migrate: {e}");
            return 1;
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry bench migrate: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if let Some(dir) = &a.report {
        match crate::report::bench_migrate::write(dir, &report) {
            Ok(files) => eprintln!(
                "ferry bench migrate: {} chart(s) in {}",
                files.len(),
                dir.display()
            ),
            Err(e) => {
                eprintln!("ferry bench migrate: --report: {e}");
                return 1;
            }
        }
    }
    if a.check && !report.goals_met() {
        1
    } else {
        0
    }
}

/// GiB/s of `bytes` over `d`.
pub fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / (1u64 << 30) as f64
}

/// Seconds between two QMP event timestamps.
pub fn event_seconds(from: &crate::qmp::Timestamp, to: &crate::qmp::Timestamp) -> f64 {
    (to.seconds - from.seconds) as f64 + (to.microseconds - from.microseconds) as f64 / 1e6
}

/// A path as the report prints it.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}
