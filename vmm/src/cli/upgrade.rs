//! `ferry upgrade --qmp SOCK [--binary PATH]`: replace a running Ferry process by a new one
//! (possibly a newer binary) while its guest keeps running, with a local migration.
//!
//! The steps are QMP commands anyone could send (see the README's "Local migration"):
//! 1. ask the old process how it was started (`ferry-query-config`);
//! 2. start the new binary with the same options plus `--incoming defer` and a QMP socket
//!    of its own, its output going where the old process's goes;
//! 3. on the new process: `migrate-set-capabilities` x-ignore-shared, then
//!    `migrate-incoming unix:PATH`;
//! 4. on the old process: x-ignore-shared, `migrate unix:PATH`, and wait for `completed`
//!    (guest memory is not copied: its memfd is passed over the socket);
//! 5. copy the old process's capabilities and parameters to the new one, `quit` the old
//!    one, and move the new QMP socket to the old path.
//!
//! A failure before the migration completed kills the new process and leaves the guest
//! running in the old one, as it was (x-ignore-shared back to its previous value).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use thiserror::Error;

use crate::qmp::{ClientError, QmpClient};

/// Arguments of `ferry upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The running Ferry's QMP socket (the new process serves QMP there afterwards).
    #[arg(long)]
    pub qmp: PathBuf,
    /// The Ferry binary to start (default: this `ferry`).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Give up (and keep the old process) after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Why an upgrade did not happen (the guest then runs in the old process).
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// A QMP socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// A QMP command failed.
    #[error("{who}: {command}: {source}")]
    Qmp {
        /// "old process" or "new process".
        who: &'static str,
        /// The command.
        command: String,
        /// The failure.
        #[source]
        source: ClientError,
    },
    /// The running process cannot be upgraded.
    #[error("{0}")]
    NotUpgradable(String),
    /// The new process could not be started or died.
    #[error("the new process: {0}")]
    NewProcess(String),
    /// The migration failed or was cancelled.
    #[error("the local migration did not complete ({status}): {error}; the guest keeps running in the old process")]
    Migration {
        /// Its final status.
        status: String,
        /// query-migrate's error-desc.
        error: String,
    },
    /// Time ran out.
    #[error("the upgrade did not finish within {0:?}; the guest keeps running in the old process")]
    Timeout(Duration),
}

/// What a successful upgrade did.
#[derive(Debug, Clone)]
pub struct UpgradeReport {
    /// The new process.
    pub new_pid: u32,
    /// The old process.
    pub old_pid: u32,
    /// Guest downtime as the old process measured it (ms).
    pub downtime_ms: u64,
    /// The migration's total time (ms).
    pub total_time_ms: u64,
    /// Bytes the migration sent (state and metadata: no guest memory).
    pub transferred: u64,
    /// Wall-clock time of the whole upgrade.
    pub elapsed: Duration,
}

/// Runs `ferry upgrade`; returns the exit code.
pub fn run(args: UpgradeArgs) -> i32 {
    match upgrade(&args) {
        Ok(r) => {
            println!(
                "ferry: upgraded: the guest runs in process {} now (was {}); downtime {} ms, migration {} ms, {} bytes sent, {:.0} ms in all; QMP at {}",
                r.new_pid,
                r.old_pid,
                r.downtime_ms,
                r.total_time_ms,
                r.transferred,
                r.elapsed.as_secs_f64() * 1000.0,
                args.qmp.display()
            );
            0
        }
        Err(e) => {
            eprintln!("ferry upgrade: {e}");
            1
        }
    }
}

/// The new process while it is not yet the guest's home: killed unless kept.
struct Replacement {
    child: Option<Child>,
    qmp_path: PathBuf,
}

impl Replacement {
    fn keep(mut self) -> u32 {
        let child = self.child.take();
        child.map_or(0, |c| c.id())
    }
}

impl Drop for Replacement {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(&self.qmp_path);
        }
    }
}

fn qmp_err<'a>(
    who: &'static str,
    command: &'a str,
) -> impl FnOnce(ClientError) -> UpgradeError + 'a {
    move |source| UpgradeError::Qmp {
        who,
        command: command.to_string(),
        source,
    }
}

/// Replaces the Ferry process serving `args.qmp` by a new one.
pub fn upgrade(args: &UpgradeArgs) -> Result<UpgradeReport, UpgradeError> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout.max(1));
    let mut old = QmpClient::connect(&args.qmp).map_err(|source| UpgradeError::Connect {
        path: args.qmp.clone(),
        source,
    })?;
    let config = old
        .execute("ferry-query-config", None)
        .map_err(qmp_err("old process", "ferry-query-config"))?;
    let old_pid = config.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32;
    check_upgradable(&mut old, &config)?;
    let argv: Vec<String> = config
        .get("argv")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let tag = format!("upgrade-{}", std::process::id());
    let new_qmp = sibling(&args.qmp, &tag);
    let migration_sock = std::env::temp_dir().join(format!("ferry-{tag}.sock"));
    let _ = std::fs::remove_file(&migration_sock);
    let new_args = replacement_args(&argv, &new_qmp)?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| UpgradeError::NewProcess(format!("cannot find this binary: {e}")))?,
    };
    let mut replacement = Replacement {
        child: Some(spawn(&binary, &new_args, old_pid)?),
        qmp_path: new_qmp.clone(),
    };
    let mut new = connect_new(&mut replacement, &new_qmp, deadline)?;
    new.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .map_err(qmp_err("new process", "migrate-set-capabilities"))?;
    let uri = format!("unix:{}", migration_sock.display());
    new.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .map_err(qmp_err("new process", "migrate-incoming"))?;

    let old_caps = old
        .execute("query-migrate-capabilities", None)
        .map_err(qmp_err("old process", "query-migrate-capabilities"))?;
    let old_params = old
        .execute("query-migrate-parameters", None)
        .map_err(qmp_err("old process", "query-migrate-parameters"))?;
    let had_ignore_shared = capability(&old_caps, "x-ignore-shared");
    set_ignore_shared(&mut old, true)?;
    let outcome = migrate_and_wait(&mut old, &uri, deadline, Duration::from_secs(args.timeout));
    let _ = std::fs::remove_file(&migration_sock);
    let last = match outcome {
        Ok(last) => last,
        Err(e) => {
            let _ = set_ignore_shared(&mut old, had_ignore_shared);
            return Err(e);
        }
    };
    // The guest runs in the new process now: it keeps the old one's settings.
    let new_pid = replacement.keep();
    carry_settings(&mut new, &old_caps, &old_params);
    let _ = old.execute("quit", None);
    wait_gone(old_pid, Duration::from_secs(10));
    std::fs::rename(&new_qmp, &args.qmp).map_err(|e| {
        UpgradeError::NewProcess(format!(
            "the guest runs in process {new_pid}, but its QMP socket could not move from {} to {}: {e}",
            new_qmp.display(),
            args.qmp.display()
        ))
    })?;
    let figure = |k: &str| last.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(UpgradeReport {
        new_pid,
        old_pid,
        downtime_ms: figure("downtime"),
        total_time_ms: figure("total-time"),
        transferred: last
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        elapsed: started.elapsed(),
    })
}

/// Refuses a process that cannot hand its guest over.
fn check_upgradable(old: &mut QmpClient, config: &Value) -> Result<(), UpgradeError> {
    if config.get("memory-handed-over") == Some(&Value::Bool(true)) {
        return Err(UpgradeError::NotUpgradable(
            "this process already handed its guest to another process".into(),
        ));
    }
    if config.get("memory-shared") != Some(&Value::Bool(true)) {
        return Err(UpgradeError::NotUpgradable(
            "the guest's memory is anonymous private (backend=anon): only memfd or shared-file guest memory can be handed to another process".into(),
        ));
    }
    let status = old
        .execute("query-status", None)
        .map_err(qmp_err("old process", "query-status"))?;
    let state = status.get("status").and_then(Value::as_str).unwrap_or("");
    if matches!(state, "inmigrate" | "postmigrate" | "shutdown") {
        return Err(UpgradeError::NotUpgradable(format!(
            "the guest is {state}: there is nothing to hand over"
        )));
    }
    let m = old
        .execute("query-migrate", None)
        .map_err(qmp_err("old process", "query-migrate"))?;
    let mstate = m.get("status").and_then(Value::as_str).unwrap_or("none");
    if !matches!(mstate, "none" | "completed" | "failed" | "cancelled") {
        return Err(UpgradeError::NotUpgradable(format!(
            "a migration is {mstate}: wait for it to end or cancel it"
        )));
    }
    Ok(())
}

/// The old command line, minus what the new process must not repeat (its QMP socket, an
/// incoming source, a restore file, a paused start), plus `--incoming defer` and `new_qmp`.
pub fn replacement_args(argv: &[String], new_qmp: &Path) -> Result<Vec<String>, UpgradeError> {
    if argv.first().map(String::as_str) != Some("run") {
        return Err(UpgradeError::NotUpgradable(format!(
            "the process was not started with `ferry run` (its arguments: {argv:?})"
        )));
    }
    let with_value = ["--qmp", "--incoming", "--restore"];
    let mut out = Vec::with_capacity(argv.len() + 4);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            it.next();
            continue;
        }
        if with_value
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
            || a == "-S"
            || a == "--paused"
        {
            continue;
        }
        out.push(a.clone());
    }
    out.extend([
        "--incoming".to_string(),
        "defer".to_string(),
        "--qmp".to_string(),
        new_qmp.display().to_string(),
    ]);
    Ok(out)
}

/// `PATH.TAG` beside `path`.
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}"));
    path.with_file_name(name)
}

/// Starts the new process in its own process group, its output going where the old
/// process's does (appending), so the console and logs continue in the same places.
fn spawn(binary: &Path, args: &[String], old_pid: u32) -> Result<Child, UpgradeError> {
    let same_output = |fd: u32| -> Stdio {
        OpenOptions::new()
            .append(true)
            .open(format!("/proc/{old_pid}/fd/{fd}"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::inherit())
    };
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(same_output(1))
        .stderr(same_output(2))
        .process_group(0)
        .spawn()
        .map_err(|e| UpgradeError::NewProcess(format!("cannot start {}: {e}", binary.display())))
}

/// Waits for the new process's QMP socket.
fn connect_new(
    replacement: &mut Replacement,
    path: &Path,
    deadline: Instant,
) -> Result<QmpClient, UpgradeError> {
    loop {
        if let Ok(c) = QmpClient::connect(path) {
            return Ok(c);
        }
        if let Some(child) = replacement.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(UpgradeError::NewProcess(format!(
                    "exited ({status}) before serving QMP; its error is in the old process's log"
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(UpgradeError::NewProcess(format!(
                "no QMP socket at {} in time",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn capability(caps: &Value, name: &str) -> bool {
    caps.as_array()
        .into_iter()
        .flatten()
        .find(|c| c.get("capability").and_then(Value::as_str) == Some(name))
        .and_then(|c| c.get("state"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn set_ignore_shared(old: &mut QmpClient, on: bool) -> Result<(), UpgradeError> {
    old.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]})),
    )
    .map(|_| ())
    .map_err(qmp_err("old process", "migrate-set-capabilities"))
}

/// Migrates and polls `query-migrate` until the migration ends; its last reply on success.
fn migrate_and_wait(
    old: &mut QmpClient,
    uri: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Value, UpgradeError> {
    old.execute("migrate", Some(json!({ "uri": uri })))
        .map_err(qmp_err("old process", "migrate"))?;
    loop {
        let m = old
            .execute("query-migrate", None)
            .map_err(qmp_err("old process", "query-migrate"))?;
        let status = m.get("status").and_then(Value::as_str).unwrap_or("none");
        match status {
            "completed" => return Ok(m),
            "failed" | "cancelled" => {
                return Err(UpgradeError::Migration {
                    status: status.to_string(),
                    error: m
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given")
                        .to_string(),
                })
            }
            _ => {}
        }
        if Instant::now() > deadline {
            let _ = old.execute("migrate_cancel", None);
            return Err(UpgradeError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Gives the new process the old one's capabilities and parameters (best effort: a
/// setting the new binary does not know is reported, not fatal).
fn carry_settings(new: &mut QmpClient, caps: &Value, params: &Value) {
    let list: Vec<Value> = caps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c.get("state") == Some(&Value::Bool(true)))
        .cloned()
        .collect();
    let mut with_off = list;
    // x-ignore-shared was only for the handover, unless the old process had it on.
    if !capability(caps, "x-ignore-shared") {
        with_off.push(json!({"capability": "x-ignore-shared", "state": false}));
    }
    if let Err(e) = new.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": with_off })),
    ) {
        eprintln!("ferry upgrade: warning: the new process refused the old capabilities: {e}");
    }
    if let Some(p) = params.as_object() {
        if let Err(e) = new.execute("migrate-set-parameters", Some(Value::Object(p.clone()))) {
            eprintln!("ferry upgrade: warning: the new process refused the old parameters: {e}");
        }
    }
}

/// Waits until process `pid` is gone.
fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let path = format!("/proc/{pid}");
    while Path::new(&path).exists() && Instant::now() < deadline {
        // A zombie (its parent has not reaped it yet) no longer holds anything.
        if std::fs::read_to_string(format!("{path}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replacement_keeps_the_options_and_swaps_qmp_and_incoming() {
        let argv = strings(&[
            "run",
            "--memory",
            "4G",
            "--qmp",
            "/run/f.sock",
            "-S",
            "--serial=file:/tmp/s",
            "--incoming=unix:/x",
            "--restore",
            "/snap",
            "--vcpus",
            "2",
        ]);
        let out = replacement_args(&argv, Path::new("/run/f.sock.new")).unwrap();
        assert_eq!(
            out,
            strings(&[
                "run",
                "--memory",
                "4G",
                "--serial=file:/tmp/s",
                "--vcpus",
                "2",
                "--incoming",
                "defer",
                "--qmp",
                "/run/f.sock.new"
            ])
        );
        assert!(replacement_args(&strings(&["demo"]), Path::new("/x")).is_err());
    }

    #[test]
    fn sibling_sockets_sit_beside_the_original() {
        assert_eq!(
            sibling(Path::new("/run/ferry.sock"), "upgrade-7"),
            PathBuf::from("/run/ferry.sock.upgrade-7")
        );
    }
}
