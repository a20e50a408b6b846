//! Background snapshots: memory as it was at one instant, written while the guest runs.
//!
//! `migrate {"uri": "file:PATH"}` with the `background-snapshot` capability (QEMU's
//! `bg_migration_thread` and `ram_write_tracking_*`):
//!
//! ```text
//!  QMP          snapshot thread                fault handler           guest (vCPUs)
//!   |-migrate-->| open PATH, write the header
//!   |           | stop vCPUs ...................................... [stopped: the stall]
//!   |           | save vCPU + VM + device state (kept for the STATE frame)
//!   |           | data ranges (holes = never written = zero)
//!   |           | register RAM with userfaultfd (WP), protect all of it
//!   |           | claim holes; start the handler -->|
//!   |           | resume vCPUs ...................................... [running]
//!   |           |                                    |<-- WP fault ---- write to page p
//!   |           |                                    | copy p, claim p
//!   |           |<------------------ copy of p ------| unprotect p ---> write proceeds
//!   |           | for each page in RAM order: copy (still protected), claim,
//!   |           |   unprotect, write RAM frame (skip pages claimed by the handler)
//!   |           | write the handler's copies as they come
//!   |           | all pages in the file: stop the handler, unregister RAM
//!   |           | STATE frame (from the stall), END frame, fsync
//!   |<-query----| status completed; query-migrate's downtime = the stall
//! ```
//!
//! The file is an ordinary Ferry stream (header with `FEATURE_SNAPSHOT`, RAM frames, STATE,
//! END), so `ferry run --incoming file:PATH` (or `--restore PATH`) resumes the guest at the
//! start instant. How the two savers never lose or double a page: [`claims`].
//!
//! A guest that is paused when the snapshot starts stays paused until it ends (`cont` is
//! refused meanwhile), so its memory is saved without any write protection, as
//! Firecracker saves a paused VM; the snapshot fails if the guest runs again anyway.
//!
//! A failure (disk full, the file removed, a userfaultfd error) or `migrate_cancel` stops
//! the writer, lifts every protection, unregisters RAM and removes the partial file; the
//! guest keeps running throughout. The snapshot also records the *page digest* of the
//! start instant ([`digest`]), which a test compares with the restored guest's memory.

pub mod claims;
pub mod digest;
pub mod fault;
pub mod latency;
pub mod pagemap;
pub mod probe;
pub mod protect;
mod run;
#[cfg(test)]
mod tests;
pub mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use thiserror::Error;

use crate::events::MigrationEvents;
use crate::info::{MigrationCounters, MigrationStatus, RamTotals, SourceState};
use crate::options::{Capabilities, Capability, MigrationOptions, OptionsHooks};
use crate::rate_limit::RateLimiter;
use crate::stream::StreamError;
use crate::transport::{MigrationUri, TransportError};
use crate::vm::SourceVm;

pub use claims::PageClaims;
pub use digest::{page_digest, PageDigest};
pub use fault::FaultStats;
pub use latency::{LatencyHistogram, LatencySummary};
pub use probe::{probe_unpopulated_wp, UnpopulatedWpReport};
pub use protect::{ProtectError, UnpopulatedStrategy, WriteProtector};
pub use writer::WriterProgress;

/// Why a background snapshot failed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Write protection could not be set up or changed.
    #[error(transparent)]
    Protect(#[from] ProtectError),
    /// Writing the stream failed (disk full, I/O error).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The file could not be opened.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The VM refused an operation (stopping, saving state).
    #[error("{0}")]
    Vm(String),
    /// migrate_cancel.
    #[error("snapshot was cancelled")]
    Cancelled,
    /// A URI that is not a file.
    #[error("background-snapshot writes to a file: use a file: URI (not '{0}')")]
    NotAFile(String),
    /// The target file disappeared under the snapshot.
    #[error("the snapshot file {} was removed or replaced while being written", .0.display())]
    FileRemoved(PathBuf),
    /// The self-check of [`SnapshotSettings::verify_digest`] failed.
    #[error("the snapshot does not hold guest memory as it was at its start: page digest {written:016x} written, {live:016x} in memory")]
    DigestMismatch {
        /// Digest of the pages written.
        written: u64,
        /// Digest of memory taken during the stall.
        live: u64,
    },
    /// A thread could not be started.
    #[error("cannot start a snapshot thread: {0}")]
    Thread(#[source] io::Error),
    /// The fault handler met an error.
    #[error("the write-fault handler failed: {0}")]
    Fault(String),
}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Stream(StreamError::Io(e))
    }
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Ferry's own snapshot settings (beside QEMU's capabilities and parameters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotSettings {
    /// Hash the data pages of guest memory during the stall (lengthening it) and fail the
    /// snapshot unless the file holds exactly that memory: an end-to-end self-check.
    pub verify_digest: bool,
}

/// What `ferry-query-snapshot` reports about the last background snapshot.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotReport {
    /// Current status.
    pub status: MigrationStatus,
    /// The file written.
    pub file: String,
    /// How long the guest was stopped at the start (state saved, RAM protected), in ms.
    pub stall_ms: f64,
    /// Milliseconds from `migrate` to the guest running again.
    pub setup_ms: f64,
    /// Milliseconds from `migrate` to the end (so far, while running).
    pub duration_ms: f64,
    /// Whether the guest ran during the snapshot (a paused guest is saved unprotected).
    pub guest_running: bool,
    /// How unpopulated pages were protected (None when nothing was protected).
    pub unpopulated: Option<UnpopulatedStrategy>,
    /// Pages of guest RAM.
    pub pages_total: u64,
    /// Pages in the file so far.
    pub pages_done: u64,
    /// Pages known zero at the start (written as zero runs, never read).
    pub hole_pages: u64,
    /// Pages the writer copied.
    pub pages_copied: u64,
    /// Pages the fault handler copied.
    pub pages_from_faults: u64,
    /// Write-protect faults served.
    pub faults: u64,
    /// Fault service time (reading the fault to waking the writer thread).
    pub fault_latency: LatencySummary,
    /// Bytes written to the file.
    pub bytes: u64,
    /// Page digest of the pages written to the file (hex), once completed: guest memory
    /// at the start instant.
    pub start_digest: Option<String>,
    /// With [`SnapshotSettings::verify_digest`]: the page digest of live guest memory
    /// taken during the stall (hex); the snapshot fails if it differs from `start_digest`.
    pub stall_digest: Option<String>,
    /// The error, if it failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct StatusInfo {
    status: MigrationStatus,
    error: Option<String>,
    setup_time_ms: u64,
    total_time_ms: Option<u64>,
    stall_ms: f64,
}

/// State shared by the controller, the snapshot thread and the option hooks.
struct Shared {
    status: Mutex<StatusInfo>,
    status_cond: Condvar,
    counters: MigrationCounters,
    limiter: RateLimiter,
    cancel: AtomicBool,
    options: Arc<MigrationOptions>,
    events: Arc<dyn MigrationEvents>,
    vm: Arc<dyn SourceVm>,
    caps: Capabilities,
    start: Instant,
    progress: WriterProgress,
    faults: Mutex<Option<Arc<FaultStats>>>,
    details: Mutex<Details>,
    path: PathBuf,
    settings: SnapshotSettings,
}

/// Facts learned along the way, for the report.
#[derive(Debug, Default, Clone)]
struct Details {
    unpopulated: Option<UnpopulatedStrategy>,
    hole_pages: u64,
    start_digest: Option<u64>,
    stall_digest: Option<u64>,
    guest_running: bool,
}

impl Shared {
    fn lock_status(&self) -> MutexGuard<'_, StatusInfo> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn details(&self) -> MutexGuard<'_, Details> {
        self.details.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, status: MigrationStatus) {
        {
            let mut s = self.lock_status();
            if s.status == status {
                return;
            }
            s.status = status;
            if matches!(
                status,
                MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
            ) {
                s.total_time_ms = Some(self.start.elapsed().as_millis() as u64);
            }
        }
        self.status_cond.notify_all();
        if self.caps.get(Capability::Events) {
            self.events
                .emit("MIGRATION", json!({ "status": status.as_str() }));
        }
    }

    fn status(&self) -> MigrationStatus {
        self.lock_status().status
    }

    fn set_error(&self, e: &SnapshotError) {
        let mut s = self.lock_status();
        if s.error.is_none() {
            s.error = Some(e.to_string());
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// Feeds `max-bandwidth` changes to the running snapshot.
struct Hooks(Arc<Shared>);

impl OptionsHooks for Hooks {
    fn max_bandwidth_changed(&self, bytes_per_second: u64) {
        self.0.limiter.set_limit(bytes_per_second);
    }
}

/// A background snapshot (one `migrate` with `background-snapshot` on).
pub struct BackgroundSnapshot {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl BackgroundSnapshot {
    /// Starts a snapshot of `vm` to `uri` (a `file:` URI) with the settings of `options`.
    ///
    /// Returns once the snapshot thread runs; progress is in [`BackgroundSnapshot::state`].
    pub fn start(
        uri: MigrationUri,
        vm: Arc<dyn SourceVm>,
        options: Arc<MigrationOptions>,
        events: Arc<dyn MigrationEvents>,
    ) -> Result<Arc<BackgroundSnapshot>> {
        Self::start_with(uri, vm, options, events, SnapshotSettings::default())
    }

    /// [`BackgroundSnapshot::start`] with Ferry's own `settings`.
    pub fn start_with(
        uri: MigrationUri,
        vm: Arc<dyn SourceVm>,
        options: Arc<MigrationOptions>,
        events: Arc<dyn MigrationEvents>,
        settings: SnapshotSettings,
    ) -> Result<Arc<BackgroundSnapshot>> {
        let MigrationUri::File { path, offset } = &uri else {
            return Err(SnapshotError::NotAFile(uri.to_string()));
        };
        let (caps, params) = options.snapshot();
        let shared = Arc::new(Shared {
            status: Mutex::new(StatusInfo {
                status: MigrationStatus::None,
                error: None,
                setup_time_ms: 0,
                total_time_ms: None,
                stall_ms: 0.0,
            }),
            status_cond: Condvar::new(),
            counters: MigrationCounters::new(0),
            limiter: RateLimiter::with_limit(params.max_bandwidth),
            cancel: AtomicBool::new(false),
            options: options.clone(),
            events,
            vm,
            caps,
            start: Instant::now(),
            progress: WriterProgress::default(),
            faults: Mutex::new(None),
            details: Mutex::new(Details::default()),
            path: path.clone(),
            settings,
        });
        options.set_running(true);
        options.register_hooks(Arc::new(Hooks(shared.clone())));
        shared.set_status(MigrationStatus::Setup);
        let s = shared.clone();
        let (path, offset) = (path.clone(), *offset);
        let thread = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || run::run(s, path, offset));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                options.clear_hooks();
                options.set_running(false);
                shared.set_status(MigrationStatus::Failed);
                return Err(SnapshotError::Thread(e));
            }
        };
        Ok(Arc::new(BackgroundSnapshot {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Current status.
    pub fn status(&self) -> MigrationStatus {
        self.shared.status()
    }

    /// The recorded error, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock_status().error.clone()
    }

    /// Asks the snapshot to stop; the guest keeps running and nothing stays protected.
    pub fn cancel(&self) {
        if !self.status().is_running() {
            return;
        }
        self.shared.cancel.store(true, Ordering::Release);
        self.shared.limiter.cancel();
        self.shared.set_status(MigrationStatus::Cancelling);
    }

    /// Blocks until the snapshot thread has finished.
    pub fn join(&self) {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// The page digest of guest memory at the start instant (known once completed).
    pub fn start_digest(&self) -> Option<u64> {
        self.shared.details().start_digest
    }

    /// Everything query-migrate reports about this snapshot.
    pub fn state(&self) -> SourceState {
        let s = self.shared.lock_status().clone();
        let total_time_ms = s
            .total_time_ms
            .unwrap_or_else(|| self.shared.start.elapsed().as_millis() as u64);
        let ram = self.shared.vm.ram();
        let done = self.shared.progress.pages_done.load(Ordering::Relaxed);
        let remaining = if s.status == MigrationStatus::Completed {
            0
        } else {
            ram.page_count().saturating_sub(done) * ram::PAGE_SIZE as u64
        };
        let streaming_ms = total_time_ms.saturating_sub(s.setup_time_ms).max(1);
        let transferred = self.shared.counters.transferred();
        let totals = RamTotals {
            total_bytes: ram.size(),
            remaining_bytes: remaining,
            page_size: ram::PAGE_SIZE as u64,
            mbps: transferred as f64 * 8.0 / 1e6 / (streaming_ms as f64 / 1e3),
            pages_per_second: done * 1000 / streaming_ms,
        };
        SourceState {
            status: s.status,
            setup_time_ms: s.setup_time_ms,
            total_time_ms,
            expected_downtime_ms: 0,
            downtime_ms: s.stall_ms.round() as u64,
            ram: self.shared.counters.ram_stats(&totals),
            xbzrle_cache: None,
            compression: None,
            cpu_throttle_percentage: 0,
            error_desc: s.error,
            blocked_reasons: Vec::new(),
        }
    }

    /// The snapshot's own figures (`ferry-query-snapshot`).
    pub fn report(&self) -> SnapshotReport {
        let s = self.shared.lock_status().clone();
        let d = self.shared.details().clone();
        let p = &self.shared.progress;
        let faults = self
            .shared
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let total_ms = s.total_time_ms.map_or_else(
            || self.shared.start.elapsed().as_secs_f64() * 1e3,
            |t| t as f64,
        );
        SnapshotReport {
            status: s.status,
            file: self.shared.path.display().to_string(),
            stall_ms: s.stall_ms,
            setup_ms: s.setup_time_ms as f64,
            duration_ms: total_ms,
            guest_running: d.guest_running,
            unpopulated: d.unpopulated,
            pages_total: self.shared.vm.ram().page_count(),
            pages_done: p.pages_done.load(Ordering::Relaxed),
            hole_pages: d.hole_pages,
            pages_copied: p.pages_copied.load(Ordering::Relaxed),
            pages_from_faults: p.pages_from_faults.load(Ordering::Relaxed),
            faults: faults
                .as_ref()
                .map_or(0, |f| f.faults.load(Ordering::Relaxed)),
            fault_latency: faults
                .as_ref()
                .map_or_else(LatencySummary::default, |f| f.latency.summary()),
            bytes: self.shared.counters.transferred(),
            start_digest: d.start_digest.map(|x| format!("{x:016x}")),
            stall_digest: d.stall_digest.map(|x| format!("{x:016x}")),
            error: s.error,
        }
    }
}
