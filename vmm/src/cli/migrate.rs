//! `ferry migrate --qmp SRC.sock URI [--caps a,b] [--set name=value ...]`: a live
//! migration with a progress bar.
//!
//! The command is a QMP client: it optionally sets capabilities and
//! parameters, issues `migrate`, then polls `query-migrate` every
//! `--interval-ms` until the migration is completed, failed or cancelled,
//! drawing a progress bar (indicatif) with the figures QEMU users watch. It
//! ends with a summary and exits 0 only when the migration completed. Ctrl-C
//! cancels the migration (`migrate_cancel`) and waits for the source to
//! confirm.
//!
//! Every poll is kept as a [`Sample`]. `--report FILE.svg` (or `.json`)
//! writes the source's own timeline afterwards (`ferry-query-migrate-timeline`,
//! sampled at every dirty sync and every 50 ms, see `migration::timeline`),
//! as a chart drawn by [`crate::report`]. `ferry demo` drives its migration
//! through the same [`start`] and [`watch`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::qmp::{ClientError, QmpClient};

/// Arguments of `ferry migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The source VMM's QMP socket.
    #[arg(long)]
    pub qmp: PathBuf,
    /// Where to migrate: tcp:HOST:PORT, unix:PATH or file:PATH.
    pub uri: String,
    /// Capabilities to set first, comma-separated: NAME (on) or NAME=on|off.
    #[arg(long, value_delimiter = ',')]
    pub caps: Vec<String>,
    /// A parameter to set first: NAME=VALUE (sizes accept K, M, G suffixes); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// How often to poll query-migrate, in milliseconds (100..=1000).
    #[arg(long, default_value_t = 150)]
    pub interval_ms: u64,
    /// Give up (and cancel the migration) after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// No progress display, only the summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Afterwards, write the migration's timeline: a chart (FILE.svg) or the raw samples
    /// (FILE.json), from `ferry-query-migrate-timeline`.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// Why `ferry migrate` could not do its job.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The QMP socket could not be reached.
    #[error("cannot connect to the source's QMP socket: {0}")]
    Connect(#[source] ClientError),
    /// A QMP command failed.
    #[error("{command}: {source}")]
    Qmp {
        /// The command.
        command: String,
        /// The failure.
        #[source]
        source: ClientError,
    },
    /// A `--caps` item is malformed.
    #[error("--caps: '{0}' is not NAME, NAME=on or NAME=off")]
    BadCapability(String),
    /// A `--set` item is malformed.
    #[error("--set: '{0}' is not NAME=VALUE")]
    BadParameter(String),
    /// The migration did not end in time (it was cancelled).
    #[error("the migration did not finish within {0:?}")]
    Timeout(Duration),
    /// The report could not be written.
    #[error("the report: {0}")]
    Report(#[from] crate::report::ReportError),
}

/// The figures of one `query-migrate` reply that the progress display and summary use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `status`.
    pub status: String,
    /// `ram.transferred`, bytes.
    pub transferred: u64,
    /// `ram.remaining`, bytes.
    pub remaining: u64,
    /// `ram.total`, bytes.
    pub total: u64,
    /// `ram.mbps`, megabits per second.
    pub mbps: f64,
    /// `ram.dirty-pages-rate`, pages per second.
    pub dirty_pages_rate: u64,
    /// `ram.dirty-sync-count`: passes over memory so far.
    pub dirty_sync_count: u64,
    /// `ram.page-size`, bytes.
    pub page_size: u64,
    /// `ram.normal`, pages sent whole.
    pub normal_pages: u64,
    /// `ram.duplicate`, zero pages sent as flags.
    pub zero_pages: u64,
    /// `expected-downtime`, ms.
    pub expected_downtime_ms: Option<u64>,
    /// `downtime`, ms (completed migrations).
    pub downtime_ms: Option<u64>,
    /// `total-time`, ms.
    pub total_time_ms: Option<u64>,
    /// `setup-time`, ms.
    pub setup_time_ms: Option<u64>,
    /// `cpu-throttle-percentage`.
    pub throttle_pct: u64,
    /// `error-desc`.
    pub error: Option<String>,
}

impl Snapshot {
    /// Reads the figures out of a `query-migrate` reply (absent members read as 0/None).
    pub fn from_query(v: &Value) -> Snapshot {
        let ram = |k: &str| v.pointer(&format!("/ram/{k}")).and_then(Value::as_u64);
        let top = |k: &str| v.get(k).and_then(Value::as_u64);
        Snapshot {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            transferred: ram("transferred").unwrap_or(0),
            remaining: ram("remaining").unwrap_or(0),
            total: ram("total").unwrap_or(0),
            mbps: v
                .pointer("/ram/mbps")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            dirty_pages_rate: ram("dirty-pages-rate").unwrap_or(0),
            dirty_sync_count: ram("dirty-sync-count").unwrap_or(0),
            page_size: ram("page-size").unwrap_or(4096),
            normal_pages: ram("normal").unwrap_or(0),
            zero_pages: ram("duplicate").unwrap_or(0),
            expected_downtime_ms: top("expected-downtime"),
            downtime_ms: top("downtime"),
            total_time_ms: top("total-time"),
            setup_time_ms: top("setup-time"),
            throttle_pct: top("cpu-throttle-percentage").unwrap_or(0),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// Whether the migration has ended (completed, failed or cancelled).
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// Whether the migration is still going (any state but none and the finished ones).
    pub fn running(&self) -> bool {
        self.status != "none" && !self.finished()
    }

    /// Average throughput over the migration, bytes per second (from total time).
    pub fn throughput(&self) -> f64 {
        match self.total_time_ms {
            Some(ms) if ms > 0 => self.transferred as f64 * 1000.0 / ms as f64,
            _ => 0.0,
        }
    }
}

/// One poll of `query-migrate`.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Time since `migrate` was issued.
    pub at: Duration,
    /// The reply as QEMU-shaped JSON.
    pub reply: Value,
    /// Its figures.
    pub snapshot: Snapshot,
}

/// How a watched migration ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The last `query-migrate` figures.
    pub last: Snapshot,
    /// Every poll, oldest first (for reports).
    pub samples: Vec<Sample>,
    /// Whether the user interrupted (and the migration was cancelled).
    pub interrupted: bool,
    /// Wall-clock time from `migrate` to the end, as seen by the client.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether the migration completed.
    pub fn completed(&self) -> bool {
        self.last.status == "completed"
    }
}

/// Something that shows progress while a migration runs.
pub trait ProgressView {
    /// A new poll arrived.
    fn update(&mut self, elapsed: Duration, s: &Snapshot);
    /// The migration ended.
    fn finish(&mut self, s: &Snapshot);
}

/// Shows nothing.
pub struct NoProgress;

impl ProgressView for NoProgress {
    fn update(&mut self, _elapsed: Duration, _s: &Snapshot) {}
    fn finish(&mut self, _s: &Snapshot) {}
}

/// An indicatif bar on a terminal, or a line a second on stderr otherwise.
pub struct BarProgress {
    bar: ProgressBar,
    last_line: Option<Duration>,
}

impl BarProgress {
    /// A bar on stderr.
    pub fn new() -> BarProgress {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:24}] {percent:>3}%  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        BarProgress {
            bar,
            last_line: None,
        }
    }
}

impl Default for BarProgress {
    fn default() -> Self {
        BarProgress::new()
    }
}

impl ProgressView for BarProgress {
    fn update(&mut self, elapsed: Duration, s: &Snapshot) {
        let line = progress_line(s);
        if self.bar.is_hidden() {
            // Not a terminal: one plain line a second.
            if self
                .last_line
                .is_none_or(|t| elapsed.saturating_sub(t) >= Duration::from_secs(1))
            {
                self.last_line = Some(elapsed);
                eprintln!("[{:6.1}s] {line}", elapsed.as_secs_f64());
            }
            return;
        }
        if s.total > 0 {
            self.bar.set_length(s.total);
            // Position: how much of the memory is not waiting to be sent (QEMU: total - remaining).
            self.bar.set_position(s.total.saturating_sub(s.remaining));
        }
        self.bar.set_message(line);
        self.bar.tick();
    }

    fn finish(&mut self, _s: &Snapshot) {
        self.bar.finish_and_clear();
    }
}

/// Bytes with a binary unit.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The one-line progress message: status, pass, transferred, remaining, rate, dirty rate,
/// expected downtime, throttle.
pub fn progress_line(s: &Snapshot) -> String {
    let mut line = format!(
        "{} | pass {} | sent {} | left {} | {:.0} Mbit/s | dirty {} pages/s",
        s.status,
        s.dirty_sync_count + 1,
        human_bytes(s.transferred),
        human_bytes(s.remaining),
        s.mbps,
        s.dirty_pages_rate,
    );
    if let Some(d) = s.expected_downtime_ms {
        let _ = write!(line, " | downtime ~{d} ms");
    }
    if s.throttle_pct > 0 {
        let _ = write!(line, " | throttle {}%", s.throttle_pct);
    }
    line
}

/// The final summary, several lines.
pub fn summary(o: &Outcome) -> String {
    let s = &o.last;
    let mut text = format!("migration {}", s.status);
    if o.interrupted {
        text.push_str(" (interrupted by the user)");
    }
    text.push('\n');
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
    if s.status != "completed" {
        // Only `status` (and `error-desc`) remain once a migration failed or was cancelled.
        let sent = o.samples.iter().map(|x| x.snapshot.transferred).max();
        let _ = writeln!(
            text,
            "  transferred       {} before it ended, after {:.1} s",
            human_bytes(sent.unwrap_or(0)),
            o.elapsed.as_secs_f64()
        );
    } else {
        let _ = writeln!(text, "  total time        {}", ms(s.total_time_ms));
        let _ = writeln!(text, "  setup time        {}", ms(s.setup_time_ms));
        let _ = writeln!(text, "  downtime          {}", ms(s.downtime_ms));
        let _ = writeln!(
            text,
            "  transferred       {} ({} pages sent whole, {} zero pages as flags)",
            human_bytes(s.transferred),
            s.normal_pages,
            s.zero_pages
        );
        let _ = writeln!(
            text,
            "  throughput        {}/s ({:.0} Mbit/s)",
            human_bytes(s.throughput() as u64),
            s.mbps
        );
        let _ = writeln!(
            text,
            "  iterations        {} (dirty-sync-count)",
            s.dirty_sync_count
        );
    }
    if let Some(e) = &s.error {
        let _ = writeln!(text, "  error             {e}");
    }
    text
}

/// Sets capabilities from `--caps` items (`NAME`, `NAME=on`, `NAME=off`).
pub fn set_capabilities(client: &mut QmpClient, items: &[String]) -> Result<(), MigrateError> {
    let mut caps = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (name, state) = match item.split_once('=') {
            None => (item, true),
            Some((n, "on" | "true" | "yes")) => (n, true),
            Some((n, "off" | "false" | "no")) => (n, false),
            Some(_) => return Err(MigrateError::BadCapability(item.to_string())),
        };
        if name.is_empty() {
            return Err(MigrateError::BadCapability(item.to_string()));
        }
        caps.push(json!({"capability": name, "state": state}));
    }
    if caps.is_empty() {
        return Ok(());
    }
    execute(
        client,
        "migrate-set-capabilities",
        json!({ "capabilities": caps }),
    )
    .map(|_| ())
}

/// The JSON value of a `--set` value: a number, a size (8M), a boolean, or a string.
pub fn parameter_value(text: &str) -> Value {
    if let Ok(n) = text.parse::<u64>() {
        return json!(n);
    }
    if let Ok(n) = text.parse::<i64>() {
        return json!(n);
    }
    match text {
        "true" | "on" => return json!(true),
        "false" | "off" => return json!(false),
        _ => {}
    }
    let size_like = text.starts_with(|c: char| c.is_ascii_digit());
    if size_like {
        if let Ok(n) = ram::parse_size(text) {
            return json!(n);
        }
    }
    json!(text)
}

/// Sets parameters from `--set NAME=VALUE` items, all in one `migrate-set-parameters`.
pub fn set_parameters(client: &mut QmpClient, items: &[String]) -> Result<(), MigrateError> {
    let mut params = Map::new();
    for item in items {
        let Some((name, value)) = item.split_once('=') else {
            return Err(MigrateError::BadParameter(item.clone()));
        };
        if name.trim().is_empty() {
            return Err(MigrateError::BadParameter(item.clone()));
        }
        params.insert(name.trim().to_string(), parameter_value(value.trim()));
    }
    if params.is_empty() {
        return Ok(());
    }
    execute(client, "migrate-set-parameters", Value::Object(params)).map(|_| ())
}

/// Fetches the source's timeline of its current or last migration and writes it to `path`
/// (a chart for `.svg`, the raw timeline for `.json`).
pub fn write_report(client: &mut QmpClient, path: &Path) -> Result<(), MigrateError> {
    let v = execute(client, "ferry-query-migrate-timeline", json!({}))?;
    let timeline = crate::report::timeline_from_json(v)?;
    crate::report::write_timeline(path, &timeline)?;
    Ok(())
}

fn execute(client: &mut QmpClient, command: &str, args: Value) -> Result<Value, MigrateError> {
    client
        .execute(command, Some(args))
        .map_err(|source| MigrateError::Qmp {
            command: command.to_string(),
            source,
        })
}

/// Sets `caps` and `params`, then issues `migrate` to `uri`.
pub fn start(
    client: &mut QmpClient,
    uri: &str,
    caps: &[String],
    params: &[String],
) -> Result<(), MigrateError> {
    set_capabilities(client, caps)?;
    set_parameters(client, params)?;
    execute(client, "migrate", json!({ "uri": uri })).map(|_| ())
}

/// How [`watch`] polls.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Time between polls.
    pub interval: Duration,
    /// Cancel the migration and give up after this long.
    pub timeout: Option<Duration>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            interval: Duration::from_millis(150),
            timeout: None,
        }
    }
}

/// Polls `query-migrate` until the migration ends, feeding `view`.
///
/// When `interrupt` becomes true (Ctrl-C) the migration is cancelled once and
/// watched until the source reports it cancelled (or failed, or completed if it
/// was too late to cancel).
pub fn watch(
    client: &mut QmpClient,
    opts: WatchOptions,
    view: &mut dyn ProgressView,
    interrupt: &AtomicBool,
) -> Result<Outcome, MigrateError> {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut cancelled_by_us = false;
    let mut timed_out = false;
    loop {
        let reply = execute(client, "query-migrate", json!({}))?;
        let snapshot = Snapshot::from_query(&reply);
        let at = t0.elapsed();
        view.update(at, &snapshot);
        samples.push(Sample {
            at,
            reply,
            snapshot: snapshot.clone(),
        });
        // "none" long after `migrate` means the source forgot the migration: stop watching.
        let lost = snapshot.status == "none" && at > Duration::from_secs(5);
        if snapshot.finished() || lost {
            view.finish(&snapshot);
            if timed_out && snapshot.status != "completed" {
                return Err(MigrateError::Timeout(opts.timeout.unwrap_or_default()));
            }
            return Ok(Outcome {
                last: snapshot,
                samples,
                interrupted: cancelled_by_us && !timed_out,
                elapsed: at,
            });
        }
        let over_time = opts.timeout.is_some_and(|t| at > t);
        if !cancelled_by_us && (interrupt.load(Ordering::Acquire) || over_time) {
            timed_out = over_time && !interrupt.load(Ordering::Acquire);
            execute(client, "migrate_cancel", json!({}))?;
            cancelled_by_us = true;
        }
        std::thread::sleep(opts.interval);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing the process; returns the flag.
pub fn interrupt_flag() -> &'static AtomicBool {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
        }
    }
    &INTERRUPTED
}

/// Runs `ferry migrate`; returns the exit code (0 only when the migration completed).
pub fn run(a: MigrateArgs) -> i32 {
    if let Some(path) = &a.report {
        // A wrong extension is a usage error: say so before migrating.
        if let Err(e) = crate::report::Format::of(path) {
            eprintln!("ferry migrate: --report: {e}");
            return 2;
        }
    }
    let interrupt = interrupt_flag();
    let mut client = match QmpClient::connect(&a.qmp) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry migrate: {}", MigrateError::Connect(e));
            return 1;
        }
    };
    if let Err(e) = start(&mut client, &a.uri, &a.caps, &a.set) {
        eprintln!("ferry migrate: {e}");
        return match e {
            MigrateError::BadCapability(_) | MigrateError::BadParameter(_) => 2,
            _ => 1,
        };
    }
    let opts = WatchOptions {
        interval: Duration::from_millis(a.interval_ms.clamp(100, 1000)),
        timeout: a.timeout.map(Duration::from_secs),
    };
    let mut bar = BarProgress::new();
    let mut quiet = NoProgress;
    let view: &mut dyn ProgressView = if a.quiet { &mut quiet } else { &mut bar };
    match watch(&mut client, opts, view, interrupt) {
        Ok(outcome) => {
            print!("{}", summary(&outcome));
            let report_ok = match &a.report {
                Some(path) => match write_report(&mut client, path) {
                    Ok(()) => {
                        println!("  report            {}", path.display());
                        true
                    }
                    Err(e) => {
                        eprintln!("ferry migrate: {e}");
                        false
                    }
                },
                None => true,
            };
            if outcome.completed() && report_ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("ferry migrate: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_become_numbers_sizes_booleans_or_strings() {
        assert_eq!(parameter_value("300"), json!(300));
        assert_eq!(parameter_value("8M"), json!(8u64 << 20));
        assert_eq!(parameter_value("1G"), json!(1u64 << 30));
        assert_eq!(parameter_value("on"), json!(true));
        assert_eq!(parameter_value("false"), json!(false));
        assert_eq!(parameter_value("zstd"), json!("zstd"));
        assert_eq!(parameter_value("tls0"), json!("tls0"));
    }

    #[test]
    fn snapshot_reads_query_migrate_and_tolerates_missing_members() {
        let v = json!({
            "status": "completed", "total-time": 2000, "downtime": 12, "setup-time": 3,
            "ram": {"transferred": 4_000_000u64, "remaining": 0, "total": 1u64 << 28,
                    "mbps": 16.0, "dirty-sync-count": 5, "page-size": 4096,
                    "normal": 900, "duplicate": 60000, "dirty-pages-rate": 0},
        });
        let s = Snapshot::from_query(&v);
        assert_eq!(s.status, "completed");
        assert!(s.finished() && !s.running());
        assert_eq!(s.downtime_ms, Some(12));
        assert_eq!(s.dirty_sync_count, 5);
        assert_eq!(s.throughput(), 2_000_000.0);
        let empty = Snapshot::from_query(&json!({}));
        assert_eq!(empty.status, "none");
        assert_eq!(empty.transferred, 0);
        assert!(!empty.running());
        let setup = Snapshot::from_query(&json!({"status": "setup"}));
        assert!(setup.running());
    }

    #[test]
    fn progress_line_names_every_figure() {
        let s = Snapshot {
            status: "active".into(),
            transferred: 3 << 20,
            remaining: 1 << 20,
            mbps: 800.0,
            dirty_pages_rate: 1234,
            dirty_sync_count: 2,
            expected_downtime_ms: Some(40),
            throttle_pct: 30,
            ..Snapshot::default()
        };
        let l = progress_line(&s);
        for part in [
            "active",
            "pass 3",
            "sent 3.0 MiB",
            "left 1.0 MiB",
            "800 Mbit/s",
            "1234 pages/s",
            "~40 ms",
            "throttle 30%",
        ] {
            assert!(l.contains(part), "{part} missing from {l}");
        }
    }

    #[test]
    fn summary_of_a_failure_shows_the_error() {
        let o = Outcome {
            last: Snapshot {
                status: "failed".into(),
                error: Some("the destination failed: checksum".into()),
                ..Snapshot::default()
            },
            samples: Vec::new(),
            interrupted: false,
            elapsed: Duration::ZERO,
        };
        let s = summary(&o);
        assert!(s.starts_with("migration failed"), "{s}");
        assert!(s.contains("checksum"), "{s}");
        assert!(!o.completed());
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
