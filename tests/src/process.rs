//! A `ferry run` process under test, with its QMP connection.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::qmp::{ClientError, QmpClient};

use crate::{ferry_bin, TempDir};

/// How to start a `ferry run`.
#[derive(Debug, Clone)]
pub struct FerryOptions {
    /// `--memory`.
    pub memory: String,
    /// `--vcpus`.
    pub vcpus: usize,
    /// `--workload` (None: Ferry's default).
    pub workload: Option<String>,
    /// `--incoming`.
    pub incoming: Option<String>,
    /// Extra arguments.
    pub extra: Vec<String>,
    /// Run inside this network namespace (`ip netns exec NAME`).
    pub netns: Option<String>,
}

impl Default for FerryOptions {
    fn default() -> Self {
        FerryOptions {
            memory: "256M".into(),
            vcpus: 1,
            workload: Some("working-set=64M,rate=20000".into()),
            incoming: None,
            extra: Vec::new(),
            netns: None,
        }
    }
}

/// A running `ferry run` (killed on drop).
pub struct Ferry {
    child: Option<Child>,
    /// Its scratch directory (QMP socket, serial file, logs).
    pub dir: TempDir,
    /// The QMP socket.
    pub qmp_path: PathBuf,
    /// The serial console file.
    pub serial_path: PathBuf,
    /// The stderr log.
    pub log_path: PathBuf,
    qmp: Option<QmpClient>,
}

impl Ferry {
    /// Starts `ferry run` with `opts` and connects to its QMP socket.
    pub fn start(tag: &str, opts: &FerryOptions) -> Ferry {
        let dir = TempDir::new(tag);
        let qmp_path = dir.join("qmp.sock");
        let serial_path = dir.join("serial.txt");
        let log_path = dir.join("stderr.txt");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--memory".into(),
            opts.memory.clone(),
            "--vcpus".into(),
            opts.vcpus.to_string(),
            "--qmp".into(),
            qmp_path.display().to_string(),
            "--serial".into(),
            format!("file:{}", serial_path.display()),
        ];
        if let Some(w) = &opts.workload {
            args.push("--workload".into());
            args.push(w.clone());
        }
        if let Some(i) = &opts.incoming {
            args.push("--incoming".into());
            args.push(i.clone());
        }
        args.extend(opts.extra.iter().cloned());
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = cmd
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", ferry_bin().display()));
        let mut f = Ferry {
            child: Some(child),
            dir,
            qmp_path,
            serial_path,
            log_path,
            qmp: None,
        };
        f.connect();
        f
    }

    fn connect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = QmpClient::connect(&self.qmp_path) {
                self.qmp = Some(c);
                return;
            }
            if let Some(code) = self.try_wait() {
                panic!(
                    "ferry exited with {code:?} before serving QMP:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("ferry did not serve QMP within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process's stderr to satisfy `done` (another process's
    /// failure can be seen before this one has written why); returns the log either way.
    pub fn wait_log(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if done(&log) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// A KiB figure of the process's `/proc/PID/status` (`RssAnon`, `RssShmem`, `VmRSS`...);
    /// 0 when the process or the field is gone.
    pub fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), field)
    }

    /// The QMP client.
    pub fn qmp(&mut self) -> &mut QmpClient {
        if self.qmp.is_none() {
            self.connect();
        }
        self.qmp.as_mut().expect("connected")
    }

    /// Runs a QMP command; panics on any error (with the process log).
    pub fn cmd(&mut self, command: &str, args: Value) -> Value {
        match self.try_cmd(command, args) {
            Ok(v) => v,
            Err(e) => panic!("QMP {command} failed: {e}\nferry log:\n{}", self.log()),
        }
    }

    /// Runs a QMP command and returns its result or error.
    pub fn try_cmd(&mut self, command: &str, args: Value) -> Result<Value, ClientError> {
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            other => Some(other),
        };
        self.qmp().execute(command, args)
    }

    /// Runs a QMP command that must fail; returns the error description.
    pub fn cmd_err(&mut self, command: &str, args: Value) -> String {
        match self.try_cmd(command, args) {
            Ok(v) => panic!("QMP {command} succeeded with {v} but should have failed"),
            Err(ClientError::Command(e)) => e.desc,
            Err(e) => panic!("QMP {command}: {e}"),
        }
    }

    /// Total pages the guest has written.
    pub fn pages_written(&mut self) -> u64 {
        self.cmd("ferry-guest-progress", json!({}))["pages-written"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Asks the guest to verify its memory; returns (pages checked, bad pages).
    pub fn guest_verify(&mut self) -> (u64, u64) {
        let r = self.cmd("ferry-guest-verify", json!({}));
        (
            r["pages-checked"].as_u64().unwrap_or(0),
            r["bad-pages"].as_u64().unwrap_or(u64::MAX),
        )
    }

    /// query-status's status string.
    pub fn status(&mut self) -> String {
        self.cmd("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Polls query-migrate until `done(info)` or the timeout; returns the last reply.
    pub fn wait_migration(&mut self, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.cmd("query-migrate", json!({}));
            if done(&info) {
                return info;
            }
            if Instant::now() > deadline {
                panic!("migration did not reach the expected state within {timeout:?}: {info}\nlog:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a finished migration (completed, failed or cancelled); returns query-migrate.
    pub fn wait_migration_end(&mut self, timeout: Duration) -> Value {
        self.wait_migration(timeout, |i| {
            matches!(
                i["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
    }

    /// Whether the process has exited; its exit code if so.
    pub fn try_wait(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(st.code()),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(code) = self.try_wait() {
                return code;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A KiB figure of `/proc/PID/status` (`RssShmem`, `VmRSS`...); 0 when the process or the
/// field is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
