//! One `ferry run` started by the benchmark, with its QMP connection; killed on drop.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::BenchError;
use crate::hostpair::Host;
use crate::qmp::{Event, QmpClient};

/// A `ferry run` under measurement.
pub struct BenchVmm {
    /// A short name for messages ("source", "destination").
    pub name: String,
    child: Child,
    log: PathBuf,
    qmp: QmpClient,
    /// The command line, for the report.
    pub command: Vec<String>,
}

impl BenchVmm {
    /// A source running `workload` and a destination started with `--incoming incoming`,
    /// both local, with `memory` and 2 vCPUs (logs and sockets in `dir`).
    pub fn spawn_pair(
        ferry: &Path,
        dir: &Path,
        memory: &str,
        workload: &str,
        incoming: &str,
    ) -> Result<(BenchVmm, BenchVmm), BenchError> {
        let args = |extra: [&str; 2]| -> Vec<String> {
            ["--memory", memory, "--vcpus", "2", extra[0], extra[1]]
                .map(String::from)
                .to_vec()
        };
        let src = Self::spawn(
            ferry,
            None,
            dir,
            "source",
            &args(["--workload", workload]),
            &[],
        )?;
        let dst = Self::spawn(
            ferry,
            None,
            dir,
            "destination",
            &args(["--incoming", incoming]),
            &[],
        )?;
        Ok((src, dst))
    }

    /// Starts `ferry run ARGS --qmp DIR/NAME.sock --serial none` (on `host` when given) and
    /// connects to its QMP socket.
    pub fn spawn(
        ferry: &Path,
        host: Option<&Host>,
        dir: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<BenchVmm, BenchError> {
        let qmp_path = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&qmp_path);
        let log_file = File::create(&log).map_err(|e| BenchError::Io(log.clone(), e))?;
        let mut cmd = match host {
            Some(h) => h.command(ferry),
            None => std::process::Command::new(ferry),
        };
        let mut full: Vec<String> = vec!["run".into()];
        full.extend(args.iter().cloned());
        full.extend([
            "--qmp".into(),
            qmp_path.display().to_string(),
            "--serial".into(),
            "none".into(),
        ]);
        cmd.args(&full)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        // SAFETY: prctl is async-signal-safe; it only makes the child stop when the
        // benchmark dies without cleaning up.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::Io(ferry.to_path_buf(), e))?;
        let mut command: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(ns) = host.and_then(|h| h.netns.as_deref()) {
            command.extend(["ip".into(), "netns".into(), "exec".into(), ns.into()]);
        }
        command.push("ferry".into());
        command.extend(full);
        let mut child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let qmp = loop {
            if let Ok(c) = QmpClient::connect(&qmp_path) {
                break c;
            }
            if let Some(c) = child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(BenchError::Exited {
                        name: name.to_string(),
                        code: st.code(),
                        log: std::fs::read_to_string(&log).unwrap_or_default(),
                    });
                }
            }
            if Instant::now() > deadline {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(BenchError::Timeout(format!(
                    "{name} did not serve QMP within 60 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let child = child.ok_or_else(|| BenchError::Timeout(format!("{name}: no process")))?;
        Ok(BenchVmm {
            name: name.to_string(),
            child,
            log,
            qmp,
            command,
        })
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a QMP command.
    pub fn cmd(&mut self, command: &str, args: Value) -> Result<Value, BenchError> {
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            other => Some(other),
        };
        self.qmp
            .execute(command, args)
            .map_err(|e| BenchError::Qmp {
                name: self.name.clone(),
                command: command.to_string(),
                error: e.to_string(),
            })
    }

    /// Turns migration capabilities on or off.
    pub fn set_caps(&mut self, caps: &[(&str, bool)]) -> Result<(), BenchError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.cmd("migrate-set-capabilities", json!({ "capabilities": list }))
            .map(|_| ())
    }

    /// Sets migration parameters.
    pub fn set_params(&mut self, params: Value) -> Result<(), BenchError> {
        self.cmd("migrate-set-parameters", params).map(|_| ())
    }

    /// query-migrate.
    pub fn query_migrate(&mut self) -> Result<Value, BenchError> {
        self.cmd("query-migrate", json!({}))
    }

    /// Polls query-migrate every `poll` until the migration ends; returns the last reply.
    pub fn wait_migration_end(
        &mut self,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Value, BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            if matches!(
                info["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return Ok(info);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout(format!(
                    "{}: the migration did not end within {timeout:?} (last: {info})",
                    self.name
                )));
            }
            std::thread::sleep(poll);
        }
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.qmp.take_events()
    }

    /// Waits for the process to exit on its own; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the process has used so far (user + system, all threads), seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id())
    }
}

/// User + system CPU time of process `pid` from /proc/PID/stat, seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&text).map(|ticks| ticks as f64 / clock_ticks())
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

impl Drop for BenchVmm {
    fn drop(&mut self) {
        self.qmp.set_timeout(Duration::from_millis(500));
        let _ = self.qmp.execute("quit", None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15_even_with_spaces_in_the_name() {
        let line = "1234 (ferry (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0";
        assert_eq!(parse_cpu_ticks(line), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
    }
}
