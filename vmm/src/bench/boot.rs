//! `ferry bench boot`: how fast a real `ferry run` boots and how much memory the VMM
//! itself takes.
//!
//! Boot time is measured from just before the process is spawned to the moment the
//! guest's first serial byte arrives on the pipe that is its console (`--serial stdout`),
//! so it includes exec, KVM VM and vCPU creation, loading the guest and the guest's first
//! instructions. One untimed warm-up run first fills the page cache with the binary.
//!
//! The memory overhead is read from `/proc/PID/status` of the last timed run after it
//! has idled (no QMP client, no migration) for a while: guest RAM is a memfd mapped
//! MAP_SHARED, so the pages the guest touched are `RssShmem`; everything else resident,
//! `RssAnon + RssFile` (= `VmRSS - RssShmem`), is the VMM (see [`super::proc_status`]).

use std::io::Read;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use thiserror::Error;

use super::proc_status::ProcMemory;
use super::stats::Summary;

/// Boot-time goal from the micro-VMM issue.
pub const BOOT_GOAL_MS: f64 = 20.0;
/// Memory-overhead goal from the micro-VMM issue.
pub const OVERHEAD_GOAL_MIB: u64 = 16;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BootBenchConfig {
    /// The `ferry` binary to start.
    pub ferry: PathBuf,
    /// Timed runs.
    pub runs: usize,
    /// Untimed runs before them.
    pub warmup: usize,
    /// `--memory` of every run (must be memfd-backed, Ferry's default).
    pub memory: String,
    /// `--vcpus` of every run.
    pub vcpus: usize,
    /// `--workload` of every run (None: Ferry's default).
    pub workload: Option<String>,
    /// How long the last run idles before its memory is read.
    pub settle: Duration,
    /// Longest wait for a run's first serial byte.
    pub timeout: Duration,
}

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BootBenchError {
    /// Nothing to measure.
    #[error("--runs must be at least 1")]
    NoRuns,
    /// The memory option is unusable for the overhead method.
    #[error("--memory: {0}")]
    Memory(String),
    /// The binary could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A run printed nothing in time.
    #[error("run {run}: no serial output within {timeout:?}; ferry said: {stderr}")]
    NoOutput {
        /// Run number (0 = first warm-up).
        run: usize,
        /// The wait.
        timeout: Duration,
        /// The process's error output.
        stderr: String,
    },
    /// A run ended before printing anything.
    #[error("run {run}: ferry exited before any serial output; it said: {stderr}")]
    Exited {
        /// Run number.
        run: usize,
        /// The process's error output.
        stderr: String,
    },
    /// The console did not start with the test guest's banner.
    #[error("run {run}: the serial console does not start with the banner: {got:?}")]
    NoBanner {
        /// Run number.
        run: usize,
        /// What arrived instead.
        got: String,
    },
    /// Reading the pipe or /proc failed.
    #[error("run {run}: {what}: {source}")]
    Io {
        /// Run number.
        run: usize,
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Memory of the idle VMM.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    /// How long the process had idled after boot when measured.
    pub settle_ms: u64,
    /// The raw `/proc/PID/status` figures.
    pub process: ProcMemory,
    /// Guest RAM the guest has touched (RssShmem).
    pub guest_touched_kib: u64,
    /// Everything else: the VMM's own memory (RssAnon + RssFile).
    pub overhead_kib: u64,
    /// How the split was made, in words.
    pub method: &'static str,
}

/// Goals and whether they were met.
#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// Boot goal (median), ms.
    pub boot_ms: f64,
    /// Overhead goal, MiB.
    pub overhead_mib: u64,
    /// Whether the median boot time is under the goal.
    pub boot_met: bool,
    /// Whether the overhead is under the goal.
    pub overhead_met: bool,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// Always "boot".
    pub bench: &'static str,
    /// The measured command line.
    pub command: Vec<String>,
    /// Untimed warm-up runs.
    pub warmup_runs: usize,
    /// Spawn to first serial byte.
    pub first_serial_byte: Summary,
    /// Memory at idle.
    pub memory: MemoryFigures,
    /// The goals.
    pub goals: Goals,
}

const METHOD: &str = "guest RAM is a memfd mapped MAP_SHARED, so the pages the guest touched \
                      are RssShmem; the VMM's overhead is the rest of VmRSS: RssAnon (heap, \
                      stacks) + RssFile (binary, libraries)";

/// The banner's first bytes (see `Machine::build`).
const BANNER_START: &[u8] = b"Ferry test guest";

/// Kills and reaps the child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    fn stderr(&mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let mut s = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s.trim().to_string()
    }
}

/// Waits until `out` is readable (or at EOF); false on timeout.
fn readable(out: &ChildStdout, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if Instant::now() >= deadline => return Ok(false),
            Ok(0) => {}
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl BootBenchConfig {
    /// The `ferry run` arguments measured.
    pub fn run_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--memory".into(),
            self.memory.clone(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--serial".into(),
            "stdout".into(),
        ];
        if let Some(w) = &self.workload {
            a.push("--workload".into());
            a.push(w.clone());
        }
        a
    }

    /// One run: the time to the first serial byte, and the memory when `sample` is set.
    fn one_run(
        &self,
        run: usize,
        sample: bool,
    ) -> Result<(Duration, Option<ProcMemory>), BootBenchError> {
        let mut cmd = Command::new(&self.ferry);
        cmd.args(self.run_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let t0 = Instant::now();
        let child = cmd.spawn().map_err(|source| BootBenchError::Spawn {
            path: self.ferry.clone(),
            source,
        })?;
        let mut child = Reaped(child);
        let Some(mut out) = child.0.stdout.take() else {
            return Err(BootBenchError::Exited {
                run,
                stderr: "no stdout pipe".into(),
            });
        };
        let io = |what| move |source| BootBenchError::Io { run, what, source };
        if !readable(&out, self.timeout).map_err(io("waiting for serial output"))? {
            return Err(BootBenchError::NoOutput {
                run,
                timeout: self.timeout,
                stderr: child.stderr(),
            });
        }
        let mut first = [0u8; 1];
        let n = out.read(&mut first).map_err(io("reading serial output"))?;
        let elapsed = t0.elapsed();
        if n == 0 {
            return Err(BootBenchError::Exited {
                run,
                stderr: child.stderr(),
            });
        }
        // Not timed: the rest of the banner, to be sure the byte came from the guest.
        let mut got = first.to_vec();
        let deadline = Instant::now() + self.timeout;
        while got.len() < BANNER_START.len() && Instant::now() < deadline {
            let mut buf = [0u8; 64];
            if !readable(&out, deadline.saturating_duration_since(Instant::now()))
                .map_err(io("reading the banner"))?
            {
                break;
            }
            match out.read(&mut buf).map_err(io("reading the banner"))? {
                0 => break,
                k => got.extend_from_slice(&buf[..k]),
            }
        }
        if !got.starts_with(BANNER_START) {
            return Err(BootBenchError::NoBanner {
                run,
                got: String::from_utf8_lossy(&got).into_owned(),
            });
        }
        let memory = if sample {
            std::thread::sleep(self.settle);
            Some(ProcMemory::of_pid(child.0.id()).map_err(io("reading /proc/PID/status"))?)
        } else {
            None
        };
        Ok((elapsed, memory))
    }

    /// Runs the benchmark.
    pub fn run(
        &self,
        mut progress: impl FnMut(usize, Duration),
    ) -> Result<BootReport, BootBenchError> {
        if self.runs == 0 {
            return Err(BootBenchError::NoRuns);
        }
        let mem: ram::MemoryConfig = self
            .memory
            .parse()
            .map_err(|e: ram::config::MemoryConfigError| BootBenchError::Memory(e.to_string()))?;
        if mem.backend != ram::Backend::SharedMemfd {
            return Err(BootBenchError::Memory(
                "the overhead method needs memfd-backed guest RAM (the default backend)".into(),
            ));
        }
        for w in 0..self.warmup {
            self.one_run(w, false)?;
        }
        let mut times = Vec::with_capacity(self.runs);
        let mut memory = None;
        for i in 0..self.runs {
            let last = i + 1 == self.runs;
            let (t, m) = self.one_run(self.warmup + i, last)?;
            progress(i, t);
            times.push(t);
            memory = m.or(memory);
        }
        let summary = Summary::of(&times).ok_or(BootBenchError::NoRuns)?;
        let process = memory.unwrap_or_default();
        let overhead_kib = process.overhead_beyond_shmem_kib();
        let mut command = vec!["ferry".to_string()];
        command.extend(self.run_args());
        Ok(BootReport {
            bench: "boot",
            command,
            warmup_runs: self.warmup,
            goals: Goals {
                boot_ms: BOOT_GOAL_MS,
                overhead_mib: OVERHEAD_GOAL_MIB,
                boot_met: summary.median_ms < BOOT_GOAL_MS,
                overhead_met: overhead_kib < OVERHEAD_GOAL_MIB << 10,
            },
            first_serial_byte: summary,
            memory: MemoryFigures {
                settle_ms: self.settle.as_millis() as u64,
                guest_touched_kib: process.rss_shmem_kib,
                overhead_kib,
                process,
                method: METHOD,
            },
        })
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

impl BootReport {
    /// The report for people.
    pub fn to_text(&self) -> String {
        let s = &self.first_serial_byte;
        let m = &self.memory;
        let p = &m.process;
        format!(
            "ferry bench boot: {runs} runs (after {warm} warm-up) of `{cmd}`\n\
             \n\
             time from spawning the process to the guest's first serial byte:\n\
             \x20 median {med:.2} ms   min {min:.2} ms   max {max:.2} ms   (goal < {bg} ms: {bmet})\n\
             \n\
             memory of the idle VMM, {settle} ms after boot (/proc/PID/status of the last run):\n\
             \x20 VmRSS {rss} = RssAnon {anon} + RssFile {file} + RssShmem {shmem}; {threads} threads\n\
             \x20 guest RAM touched (RssShmem)             {guest}\n\
             \x20 VMM overhead (RssAnon + RssFile)         {over}   (goal < {og} MiB: {omet})\n\
             \x20 method: {method}\n",
            runs = s.runs,
            warm = self.warmup_runs,
            cmd = self.command.join(" "),
            med = s.median_ms,
            min = s.min_ms,
            max = s.max_ms,
            bg = self.goals.boot_ms,
            bmet = met(self.goals.boot_met),
            settle = m.settle_ms,
            rss = mib(p.vm_rss_kib),
            anon = mib(p.rss_anon_kib),
            file = mib(p.rss_file_kib),
            shmem = mib(p.rss_shmem_kib),
            threads = p.threads,
            guest = mib(m.guest_touched_kib),
            over = mib(m.overhead_kib),
            og = self.goals.overhead_mib,
            omet = met(self.goals.overhead_met),
            method = m.method,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BootBenchConfig {
        BootBenchConfig {
            ferry: PathBuf::from("/nonexistent/ferry"),
            runs: 3,
            warmup: 0,
            memory: "64M".into(),
            vcpus: 1,
            workload: Some("working-set=8M,rate=1000".into()),
            settle: Duration::from_millis(10),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn measures_ferry_run_with_the_console_on_stdout() {
        assert_eq!(
            config().run_args().join(" "),
            "run --memory 64M --vcpus 1 --serial stdout --workload working-set=8M,rate=1000"
        );
    }

    #[test]
    fn refuses_zero_runs() {
        let c = BootBenchConfig {
            runs: 0,
            ..config()
        };
        assert!(matches!(c.run(|_, _| {}), Err(BootBenchError::NoRuns)));
    }

    #[test]
    fn refuses_memory_the_overhead_method_cannot_split() {
        let c = BootBenchConfig {
            memory: "64M,backend=anon".into(),
            ..config()
        };
        assert!(matches!(c.run(|_, _| {}), Err(BootBenchError::Memory(_))));
    }

    #[test]
    fn reports_a_binary_that_cannot_start() {
        let e = config().run(|_, _| {}).unwrap_err();
        assert!(matches!(e, BootBenchError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/ferry"));
    }

    #[test]
    fn reports_a_process_that_prints_nothing() {
        let c = BootBenchConfig {
            ferry: PathBuf::from("/bin/true"),
            ..config()
        };
        let e = c.run(|_, _| {}).unwrap_err();
        assert!(matches!(e, BootBenchError::Exited { run: 0, .. }), "{e}");
    }

    #[test]
    fn text_report_names_every_figure() {
        let report = BootReport {
            bench: "boot",
            command: vec!["ferry".into(), "run".into()],
            warmup_runs: 1,
            first_serial_byte: Summary::of(&[Duration::from_millis(8)]).unwrap(),
            memory: MemoryFigures {
                settle_ms: 1000,
                process: ProcMemory {
                    vm_rss_kib: 10240,
                    vm_hwm_kib: 10240,
                    rss_anon_kib: 1024,
                    rss_file_kib: 2048,
                    rss_shmem_kib: 7168,
                    threads: 4,
                },
                guest_touched_kib: 7168,
                overhead_kib: 3072,
                method: METHOD,
            },
            goals: Goals {
                boot_ms: BOOT_GOAL_MS,
                overhead_mib: OVERHEAD_GOAL_MIB,
                boot_met: true,
                overhead_met: true,
            },
        };
        let t = report.to_text();
        for want in [
            "median 8.00 ms",
            "VmRSS 10.0 MiB = RssAnon 1.0 MiB + RssFile 2.0 MiB + RssShmem 7.0 MiB",
            "VMM overhead (RssAnon + RssFile)         3.0 MiB",
            "goal < 20 ms: met",
            "method: guest RAM is a memfd",
        ] {
            assert!(t.contains(want), "missing {want:?} in:\n{t}");
        }
        let j = serde_json::to_value(&report).unwrap();
        assert_eq!(j["memory"]["overhead_kib"], 3072);
        assert_eq!(j["first_serial_byte"]["median_ms"], 8.0);
    }
}
