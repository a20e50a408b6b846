//! `ferry demo`: boot a dirtying guest on one "host", live-migrate it to another,
//! have the guest verify every page there, and print a summary with PASS or FAIL.
//!
//! The two hosts are network namespaces joined by a veth pair (198.18.0.1 and
//! 198.18.0.2, see [`crate::hostpair`]), or plain loopback when namespaces
//! cannot be created. Each host runs its own `ferry run` process (this very
//! binary, found with `std::env::current_exe()`). The migration uses
//! Ferry's defaults and is driven through the same code as `ferry migrate`.
//! Everything the demo creates — processes, namespaces, sockets, logs — is
//! removed when it ends, also on failure and on Ctrl-C; the child processes
//! also get SIGTERM if the demo itself is killed.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use thiserror::Error;

use super::migrate::{self, human_bytes, BarProgress, NoProgress, ProgressView, WatchOptions};
use crate::hostpair::{remove_stale, Host, HostPair};
use crate::qmp::{ClientError, QmpClient};

/// Arguments of `ferry demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Memory the guest keeps rewriting while it migrates.
    #[arg(long, default_value = "256M")]
    pub working_set: String,
    /// Pages per second the guest dirties (all vCPUs together; 0 = as fast as it can).
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// TCP port of the destination (loopback uses a free port instead).
    #[arg(long, default_value_t = 4444)]
    pub port: u16,
    /// Use plain loopback even when network namespaces are available.
    #[arg(long)]
    pub loopback: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Keep the scratch directory (logs, serial consoles) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Write the migration's timeline: a chart (FILE.svg) or the raw samples (FILE.json).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// Why the demo stopped before it could verify the guest.
#[derive(Debug, Error)]
pub enum DemoError {
    /// The scratch directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A `ferry run` could not be started.
    #[error("cannot start the {host} VMM: {source}")]
    Spawn {
        /// Which host.
        host: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A `ferry run` exited early.
    #[error("the {host} VMM exited with {code:?}; its log:\n{log}")]
    Exited {
        /// Which host.
        host: &'static str,
        /// Its exit code.
        code: Option<i32>,
        /// Its stderr.
        log: String,
    },
    /// A QMP command failed.
    #[error("{host}: {command}: {source}")]
    Qmp {
        /// Which host.
        host: &'static str,
        /// The command.
        command: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The user pressed Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// Driving the migration failed.
    #[error(transparent)]
    Migrate(#[from] migrate::MigrateError),
}

/// A scratch directory removed on drop (unless kept).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("ferry demo: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One `ferry run` process and its QMP connection; killed on drop.
struct Vmm {
    host: &'static str,
    child: Child,
    log: PathBuf,
    qmp_path: PathBuf,
    qmp: Option<QmpClient>,
}

impl Vmm {
    fn spawn(
        host: &'static str,
        on: &Host,
        dir: &Path,
        run_args: &[String],
    ) -> Result<Vmm, DemoError> {
        let exe = std::env::current_exe().map_err(|source| DemoError::Spawn { host, source })?;
        let qmp_path = dir.join(format!("{host}.sock"));
        let log = dir.join(format!("{host}.log"));
        let log_file = File::create(&log).map_err(|source| DemoError::Spawn { host, source })?;
        let mut cmd = on.command(exe);
        cmd.arg("run")
            .args(run_args)
            .arg("--qmp")
            .arg(&qmp_path)
            .arg("--serial")
            .arg(format!(
                "file:{}",
                dir.join(format!("{host}-serial.txt")).display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        // SAFETY: prctl is async-signal-safe; it only sets the child's parent-death signal,
        // so the VMM stops if the demo dies without cleaning up (e.g. SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| DemoError::Spawn { host, source })?;
        Ok(Vmm {
            host,
            child,
            log,
            qmp_path,
            qmp: None,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.child.try_wait() {
            Ok(Some(st)) => Err(DemoError::Exited {
                host: self.host,
                code: st.code(),
                log: self.log(),
            }),
            _ => Ok(()),
        }
    }

    /// Connects to QMP, waiting for the process to serve it.
    fn connect(&mut self, interrupt: &AtomicBool) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = QmpClient::connect(&self.qmp_path) {
                self.qmp = Some(c);
                return Ok(());
            }
            if interrupt.load(Ordering::Acquire) {
                return Err(DemoError::Interrupted);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(DemoError::Timeout(format!(
                    "the {} VMM did not serve QMP within 20 s",
                    self.host
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&mut self) -> Result<&mut QmpClient, DemoError> {
        let host = self.host;
        self.qmp.as_mut().ok_or_else(|| DemoError::Qmp {
            host,
            command: "connect".into(),
            source: ClientError::Closed,
        })
    }

    fn cmd(&mut self, command: &str, args: Value) -> Result<Value, DemoError> {
        let host = self.host;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        self.client()?
            .execute(command, args)
            .map_err(|source| DemoError::Qmp {
                host,
                command: command.to_string(),
                source,
            })
    }

    /// Polls `command` until `done` says yes.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        interrupt: &AtomicBool,
        command: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if interrupt.load(Ordering::Acquire) {
                return Err(DemoError::Interrupted);
            }
            let v = self.cmd(command, json!({}))?;
            if done(&v) {
                return Ok(v);
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(DemoError::Timeout(format!("{what} (last: {v})")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pages_written(&mut self) -> Result<u64, DemoError> {
        Ok(
            self.cmd("ferry-guest-progress", json!({}))?["pages-written"]
                .as_u64()
                .unwrap_or(0),
        )
    }

    /// Asks the process to quit, then makes sure it is gone.
    fn stop(&mut self) {
        if let Some(mut c) = self.qmp.take() {
            c.set_timeout(Duration::from_secs(1));
            let _ = c.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the demo measured.
#[derive(Debug, Default)]
struct Report {
    hosts: String,
    outcome: Option<migrate::Outcome>,
    pages_before: u64,
    pages_after: u64,
    pages_checked: u64,
    bad_pages: Option<u64>,
    wall: Duration,
    error: Option<String>,
    /// The `--report` file and whether writing it failed.
    chart: Option<(PathBuf, Option<String>)>,
}

impl Report {
    fn passed(&self) -> bool {
        self.error.is_none()
            && self.chart.as_ref().is_none_or(|(_, e)| e.is_none())
            && self.outcome.as_ref().is_some_and(|o| o.completed())
            && self.bad_pages == Some(0)
            && self.pages_checked > 0
    }

    fn render(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "ferry demo: live migration between {}", self.hosts);
        if let Some(o) = &self.outcome {
            let s = &o.last;
            let ms = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| format!("{v} ms"));
            let _ = writeln!(t, "  status            {}", s.status);
            if o.completed() {
                let _ = writeln!(t, "  total time        {}", ms(s.total_time_ms));
                let _ = writeln!(t, "  downtime          {}", ms(s.downtime_ms));
                let _ = writeln!(t, "  transferred       {}", human_bytes(s.transferred));
                let _ = writeln!(
                    t,
                    "  throughput        {}/s ({:.0} Mbit/s)",
                    human_bytes(s.throughput() as u64),
                    s.mbps
                );
                let _ = writeln!(
                    t,
                    "  iterations        {} (dirty-sync-count)",
                    s.dirty_sync_count
                );
            } else {
                // A migration that did not complete reports only its status: show the
                // last figures seen while it ran.
                let sent = o.samples.iter().map(|x| x.snapshot.transferred).max();
                let _ = writeln!(
                    t,
                    "  transferred       {} before it ended, after {:.1} s",
                    human_bytes(sent.unwrap_or(0)),
                    o.elapsed.as_secs_f64()
                );
            }
            if let Some(e) = &s.error {
                let _ = writeln!(t, "  migration error   {e}");
            }
        }
        if self.pages_after > 0 {
            let _ = writeln!(
                t,
                "  guest progress    {} pages written before, {} after (continues on the destination)",
                self.pages_before, self.pages_after
            );
        }
        match self.bad_pages {
            Some(b) => {
                let _ = writeln!(
                    t,
                    "  bad pages         {b} of {} checked by the guest on the destination",
                    self.pages_checked
                );
            }
            None => {
                let _ = writeln!(t, "  bad pages         not checked");
            }
        }
        match &self.chart {
            Some((path, None)) => {
                let _ = writeln!(t, "  report            {}", path.display());
            }
            Some((path, Some(e))) => {
                let _ = writeln!(t, "  report            {} not written: {e}", path.display());
            }
            None => {}
        }
        let _ = writeln!(t, "  demo wall time    {:.1} s", self.wall.as_secs_f64());
        if let Some(e) = &self.error {
            let _ = writeln!(t, "  error             {e}");
        }
        let _ = writeln!(t, "{}", if self.passed() { "PASS" } else { "FAIL" });
        t
    }
}

/// Removes scratch directories of earlier demos whose process is gone (e.g. killed with
/// SIGKILL); returns their names.
fn remove_stale_scratch() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ferry-demo-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

fn scratch(keep: bool) -> Result<Scratch, DemoError> {
    let path = PathBuf::from(format!("/tmp/ferry-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).map_err(|source| DemoError::Dir {
        path: path.clone(),
        source,
    })?;
    Ok(Scratch { path, keep })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The demo's steps; fills `report` as it goes so a failure still shows what happened.
fn demo(a: &DemoArgs, interrupt: &AtomicBool, report: &mut Report) -> Result<(), DemoError> {
    let t0 = Instant::now();
    let say = |msg: &str| {
        if !a.quiet {
            eprintln!("[{:5.1}s] {msg}", t0.elapsed().as_secs_f64());
        }
    };
    let pair = if a.loopback {
        HostPair::loopback("--loopback was given")
    } else {
        HostPair::create_or_loopback()
    };
    if let Some(why) = pair.fallback() {
        say(&format!("{why}; both hosts use loopback (127.0.0.1)"));
        report.hosts = "two processes on loopback (127.0.0.1)".into();
    } else {
        report.hosts = format!(
            "network namespaces {} ({}) and {} ({})",
            pair.a().netns.as_deref().unwrap_or(""),
            pair.a().addr,
            pair.b().netns.as_deref().unwrap_or(""),
            pair.b().addr
        );
    }
    let dir = scratch(a.keep)?;
    let port = if pair.is_netns() { a.port } else { free_port() };
    let uri = format!("tcp:{}:{port}", pair.b().addr);
    let common = [
        "--memory".to_string(),
        a.memory.clone(),
        "--vcpus".into(),
        a.vcpus.to_string(),
    ];
    let mut src_args = common.to_vec();
    src_args.extend([
        "--workload".into(),
        format!("working-set={},rate={}", a.working_set, a.rate),
    ]);
    let mut dst_args = common.to_vec();
    dst_args.extend(["--incoming".into(), uri.clone()]);

    say(&format!(
        "booting the source ({}) and the destination ({})",
        pair.a().addr,
        pair.b().addr
    ));
    let mut src = Vmm::spawn("source", pair.a(), &dir.path, &src_args)?;
    let mut dst = Vmm::spawn("destination", pair.b(), &dir.path, &dst_args)?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let left = || deadline.saturating_duration_since(Instant::now());
    src.connect(interrupt)?;
    dst.connect(interrupt)?;
    dst.wait_for(
        "the destination to listen",
        left().min(Duration::from_secs(20)),
        interrupt,
        "query-migrate",
        |v| v["status"] == "setup",
    )?;
    say("both VMMs are up; the guest fills its working set");
    // Warm-up: the guest fills its whole working set at full speed (so the migration
    // carries real data, not zero pages), then dirties at the chosen rate.
    src.cmd("ferry-guest-set-rate", json!({"rate": 0}))?;
    src.wait_for(
        "the guest to fill its working set",
        left().min(Duration::from_secs(60)),
        interrupt,
        "ferry-guest-progress",
        |v| {
            v["vcpus"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["passes"].as_u64() >= Some(1)))
        },
    )?;
    src.cmd("ferry-guest-set-rate", json!({"rate": a.rate}))?;
    std::thread::sleep(Duration::from_millis(200));
    report.pages_before = src.pages_written()?;

    say(&format!("migrating to {uri} with default settings"));
    migrate::start(src.client()?, &uri, &[], &[])?;
    let mut bar = BarProgress::new();
    let mut none = NoProgress;
    let view: &mut dyn ProgressView = if a.quiet { &mut none } else { &mut bar };
    let outcome = migrate::watch(
        src.client()?,
        WatchOptions {
            interval: Duration::from_millis(150),
            timeout: Some(left()),
        },
        view,
        interrupt,
    )?;
    let completed = outcome.completed();
    let error = outcome.last.error.clone();
    report.outcome = Some(outcome);
    if let Some(path) = &a.report {
        // Also for a migration that did not complete: its timeline shows why.
        let written = migrate::write_report(src.client()?, path).map_err(|e| e.to_string());
        report.chart = Some((path.clone(), written.err()));
    }
    if interrupt.load(Ordering::Acquire) {
        return Err(DemoError::Interrupted);
    }
    if !completed {
        return Err(DemoError::Timeout(format!(
            "the migration did not complete: {}",
            error.unwrap_or_else(|| "no error reported".into())
        )));
    }
    say("migration completed; waiting for the guest to run on the destination");
    dst.wait_for(
        "the guest to run on the destination",
        left().min(Duration::from_secs(20)),
        interrupt,
        "query-status",
        |v| v["status"] == "running",
    )?;
    let v = dst.cmd("ferry-guest-verify", json!({}))?;
    report.pages_checked = v["pages-checked"].as_u64().unwrap_or(0);
    report.bad_pages = v["bad-pages"].as_u64();
    report.pages_after = dst.pages_written()?;
    say("the guest verified its memory on the destination; stopping both VMMs");
    src.stop();
    dst.stop();
    // `pair` and `dir` go here: namespaces and files are removed.
    Ok(())
}

/// Runs `ferry demo`; exit 0 only when the guest verified every page on the destination.
pub fn run(a: DemoArgs) -> i32 {
    if let Some(path) = &a.report {
        if let Err(e) = crate::report::Format::of(path) {
            eprintln!("ferry demo: --report: {e}");
            return 2;
        }
    }
    let interrupt = migrate::interrupt_flag();
    let mut removed = remove_stale();
    removed.extend(remove_stale_scratch());
    if !removed.is_empty() {
        eprintln!(
            "ferry demo: removed leftovers of earlier runs: {}",
            removed.join(", ")
        );
    }
    let t0 = Instant::now();
    let mut report = Report::default();
    if let Err(e) = demo(&a, interrupt, &mut report) {
        report.error = Some(if interrupt.load(Ordering::Acquire) {
            // The VMMs got the Ctrl-C too; whatever failed after it is a consequence.
            "interrupted (Ctrl-C); everything the demo started was stopped and removed".into()
        } else {
            e.to_string()
        });
    }
    report.wall = t0.elapsed();
    print!("{}", report.render());
    if report.passed() {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_passes_only_with_a_completed_migration_and_zero_bad_pages() {
        let done = migrate::Outcome {
            last: migrate::Snapshot {
                status: "completed".into(),
                ..Default::default()
            },
            samples: Vec::new(),
            interrupted: false,
            elapsed: Duration::ZERO,
        };
        let mut r = Report {
            outcome: Some(done.clone()),
            bad_pages: Some(0),
            pages_checked: 100,
            ..Report::default()
        };
        assert!(r.passed());
        assert!(r.render().ends_with("PASS\n"));
        r.bad_pages = Some(1);
        assert!(!r.passed());
        assert!(r.render().ends_with("FAIL\n"));
        r.bad_pages = None;
        assert!(!r.passed());
        let mut failed = done;
        failed.last.status = "failed".into();
        let r = Report {
            outcome: Some(failed),
            bad_pages: Some(0),
            pages_checked: 100,
            ..Report::default()
        };
        assert!(!r.passed());
    }
}
