//! The outgoing side of a migration: the controller QMP talks to, and the migration thread.

mod compress;
pub mod local;
mod precopy;
pub mod ram_sender;

pub(crate) use precopy::spawn_reply_reader;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::json;

use crate::error::MigrationError;
use crate::events::MigrationEvents;
use crate::info::{MigrationCounters, MigrationStatus, RamTotals, SourceState};
use crate::options::{Capabilities, Capability, MigrationOptions, OptionsHooks};
use crate::rate_limit::RateLimiter;
use crate::timeline::{Figures, SampleKind, Timeline, TimelineSettings};
use crate::transport::{Channel, MigrationUri};
use crate::vm::SourceVm;

/// Figures the migration thread publishes for query-migrate.
#[derive(Debug, Default)]
struct Live {
    xbzrle: Mutex<Option<crate::info::XbzrleCacheStats>>,
    xbzrle_resize: AtomicU64,
    expected_downtime_ms: AtomicU64,
    mbps_bits: AtomicU64,
    pages_per_second: AtomicU64,
    remaining_bytes: AtomicU64,
    throttle: AtomicU8,
    multifd: Mutex<Option<Arc<crate::multifd::MultifdStats>>>,
    compression: Mutex<Option<Arc<crate::compress::CompressCounters>>>,
}

#[derive(Debug, Clone)]
struct StatusInfo {
    status: MigrationStatus,
    error: Option<String>,
    setup_time_ms: u64,
    total_time_ms: Option<u64>,
    downtime_ms: u64,
    downtime_us: u64,
}

/// State shared by the controller, the migration thread and the option hooks.
pub(crate) struct Shared {
    status: Mutex<StatusInfo>,
    status_cond: Condvar,
    pub(crate) counters: MigrationCounters,
    pub(crate) limiter: RateLimiter,
    pub(crate) cancel: AtomicBool,
    continue_requested: AtomicBool,
    pub(crate) options: Arc<MigrationOptions>,
    events: Arc<dyn MigrationEvents>,
    pub(crate) vm: Arc<dyn SourceVm>,
    channel: Mutex<Option<Channel>>,
    live: Live,
    start: Instant,
    caps: Capabilities,
    timeline: crate::timeline::Recorder,
    /// Postcopy: the switch request, the commit, pause and resume.
    pub(crate) postcopy: crate::postcopy::SourceControl,
}

impl Shared {
    fn lock_status(&self) -> MutexGuard<'_, StatusInfo> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `status`, emitting a MIGRATION event when the events capability is on.
    pub(crate) fn set_status(&self, status: MigrationStatus) {
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
        self.record_sample(SampleKind::Status, None);
        if self.caps.get(Capability::Events) {
            self.events
                .emit("MIGRATION", json!({ "status": status.as_str() }));
        }
    }

    pub(crate) fn status(&self) -> MigrationStatus {
        self.lock_status().status
    }

    /// Records `text` as the error (replacing any), e.g. why postcopy paused.
    pub(crate) fn set_error_text(&self, text: &str) {
        self.lock_status().error = Some(text.to_string());
    }

    /// Forgets the recorded error (postcopy resumed).
    pub(crate) fn clear_error(&self) {
        self.lock_status().error = None;
    }

    pub(crate) fn set_error(&self, e: &MigrationError) {
        let mut s = self.lock_status();
        if s.error.is_none() {
            s.error = Some(e.to_string());
        }
    }

    pub(crate) fn set_setup_time(&self, ms: u64) {
        self.lock_status().setup_time_ms = ms;
    }

    pub(crate) fn set_downtime(&self, ms: u64) {
        let mut s = self.lock_status();
        s.downtime_ms = ms;
        s.downtime_us = ms.saturating_mul(1000);
    }

    /// Records the downtime measured to the microsecond.
    pub(crate) fn set_downtime_exact(&self, d: std::time::Duration) {
        let mut s = self.lock_status();
        s.downtime_ms = d.as_millis() as u64;
        s.downtime_us = d.as_micros() as u64;
    }

    pub(crate) fn emit(&self, name: &str, data: serde_json::Value) {
        if self.caps.get(Capability::Events) {
            self.events.emit(name, data);
        }
    }

    pub(crate) fn caps(&self) -> &Capabilities {
        &self.caps
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    pub(crate) fn set_channel(&self, ch: Option<Channel>) {
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = ch;
    }

    pub(crate) fn publish(&self, expected_downtime_ms: u64, mbps: f64, pps: u64, remaining: u64) {
        self.live
            .expected_downtime_ms
            .store(expected_downtime_ms, Ordering::Relaxed);
        self.live.mbps_bits.store(mbps.to_bits(), Ordering::Relaxed);
        self.live.pages_per_second.store(pps, Ordering::Relaxed);
        self.live
            .remaining_bytes
            .store(remaining, Ordering::Relaxed);
    }

    pub(crate) fn set_throttle(&self, pct: u8) {
        self.live.throttle.store(pct, Ordering::Relaxed);
        self.vm.set_throttle(pct);
        self.record_sample(SampleKind::Throttle, None);
    }

    /// Adds a sample to the timeline; `remaining` overrides the published remaining bytes.
    pub(crate) fn record_sample(&self, kind: SampleKind, remaining: Option<u64>) {
        self.timeline.record(kind, remaining, || {
            let multifd = self
                .live
                .multifd
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let n = self.counters.multifd_channels();
            Figures {
                state: self.source_state(),
                compression_ratio: multifd
                    .filter(|m| m.method != crate::multifd::Method::None)
                    .map(|m| m.compression_ratio())
                    .or_else(|| self.legacy_compression_ratio()),
                channel_bytes: (n > 0).then(|| {
                    (0..n)
                        .map(|i| {
                            self.counters
                                .channel_bytes(crate::info::Channel::Multifd(i))
                        })
                        .collect()
                }),
            }
        });
    }

    /// Everything query-migrate reports about this migration.
    fn source_state(&self) -> SourceState {
        let s = self.lock_status().clone();
        let ram = self.vm.ram();
        let live = &self.live;
        let total_time_ms = s
            .total_time_ms
            .unwrap_or_else(|| self.start.elapsed().as_millis() as u64);
        let mbps = if s.status == MigrationStatus::Completed {
            crate::convergence::completed_mbps(
                self.counters.transferred(),
                total_time_ms,
                s.setup_time_ms,
            )
        } else {
            f64::from_bits(live.mbps_bits.load(Ordering::Relaxed))
        };
        let remaining = if s.status == MigrationStatus::Completed {
            0
        } else {
            live.remaining_bytes.load(Ordering::Relaxed)
        };
        let totals = RamTotals {
            total_bytes: ram.size(),
            remaining_bytes: remaining,
            page_size: ram::PAGE_SIZE as u64,
            mbps,
            pages_per_second: live.pages_per_second.load(Ordering::Relaxed),
        };
        let mut stats = self.counters.ram_stats(&totals);
        if s.status == MigrationStatus::Completed {
            stats.dirty_pages_rate = 0;
        }
        SourceState {
            status: s.status,
            setup_time_ms: s.setup_time_ms,
            total_time_ms,
            expected_downtime_ms: live.expected_downtime_ms.load(Ordering::Relaxed),
            downtime_ms: s.downtime_ms,
            ram: stats,
            xbzrle_cache: *live.xbzrle.lock().unwrap_or_else(|p| p.into_inner()),
            compression: live
                .compression
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|c| c.stats()),
            cpu_throttle_percentage: live.throttle.load(Ordering::Relaxed),
            error_desc: s.error,
            blocked_reasons: Vec::new(),
        }
    }

    /// A new XBZRLE cache size requested through migrate-set-parameters, if any.
    pub(crate) fn take_xbzrle_resize(&self) -> Option<u64> {
        match self.live.xbzrle_resize.swap(0, Ordering::AcqRel) {
            0 => None,
            n => Some(n),
        }
    }

    pub(crate) fn publish_xbzrle(&self, stats: crate::info::XbzrleCacheStats) {
        *self.live.xbzrle.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Page bytes per compressed byte so far, for the timeline (legacy `compress`).
    fn legacy_compression_ratio(&self) -> Option<f64> {
        let c = self
            .live
            .compression
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let s = c.as_ref()?.stats();
        (s.compressed_size > 0)
            .then(|| (s.pages * ram::PAGE_SIZE as u64) as f64 / s.compressed_size as f64)
    }

    pub(crate) fn set_compress_counters(&self, c: Arc<crate::compress::CompressCounters>) {
        *self
            .live
            .compression
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    pub(crate) fn set_multifd_stats(&self, stats: Arc<crate::multifd::MultifdStats>) {
        *self.live.multifd.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    pub(crate) fn throttle(&self) -> u8 {
        self.live.throttle.load(Ordering::Relaxed)
    }

    /// The switchover's first step (QEMU's finish-migrate, then pre-switchover): stops the
    /// vCPUs if they run, noting it in `stopped_vcpus` so that a failure resumes them, then
    /// with pause-before-switchover waits in `pre-switchover` for migrate-continue with the
    /// guest held stopped, calling `keepalive` every [`KEEPALIVE_INTERVAL`] meanwhile (the
    /// destination fails a stream silent for its io timeout). Returns when the vCPUs were
    /// stopped (None: they were not running).
    pub(crate) fn stop_for_switchover(
        &self,
        stopped_vcpus: &mut bool,
        keepalive: &mut dyn FnMut() -> Result<(), MigrationError>,
    ) -> Result<Option<Instant>, MigrationError> {
        let mut stopped_at = None;
        if self.vm.is_running() {
            stopped_at = Some(Instant::now());
            self.vm.stop_vcpus().map_err(MigrationError::Vm)?;
            *stopped_vcpus = true;
        }
        if self.caps().get(Capability::PauseBeforeSwitchover) {
            self.set_status(MigrationStatus::PreSwitchover);
            if !self.wait_continue(keepalive)? {
                return Err(MigrationError::Cancelled);
            }
        }
        Ok(stopped_at)
    }

    /// Waits until `migrate-continue` (true) or a cancel (false), calling `keepalive` every
    /// [`KEEPALIVE_INTERVAL`]; its error ends the wait.
    fn wait_continue(
        &self,
        keepalive: &mut dyn FnMut() -> Result<(), MigrationError>,
    ) -> Result<bool, MigrationError> {
        let mut last = Instant::now();
        loop {
            {
                let s = self.lock_status();
                if self.cancelled() {
                    return Ok(false);
                }
                if self.continue_requested.swap(false, Ordering::AcqRel) {
                    return Ok(true);
                }
                drop(
                    self.status_cond
                        .wait_timeout(s, std::time::Duration::from_millis(100))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0),
                );
            }
            if last.elapsed() >= KEEPALIVE_INTERVAL {
                keepalive()?;
                last = Instant::now();
            }
        }
    }
}

/// How often a source with nothing to send tells the destination it is alive.
pub(crate) const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends an empty keepalive frame on the main stream.
pub(crate) fn send_keepalive<W: std::io::Write>(
    out: &mut crate::stream::frame::FrameWriter<W>,
) -> Result<(), MigrationError> {
    out.frame(crate::stream::frame::FrameKind::Keepalive, &[])?;
    out.flush()?;
    Ok(())
}

impl crate::multifd::SendEnv for Shared {
    fn counters(&self) -> &MigrationCounters {
        &self.counters
    }

    fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    fn cancelled(&self) -> bool {
        Shared::cancelled(self)
    }
}

/// The hooks a running migration registers on the options store.
struct Hooks(Arc<Shared>);

impl OptionsHooks for Hooks {
    fn max_bandwidth_changed(&self, bytes_per_second: u64) {
        self.0.limiter.set_limit(bytes_per_second);
    }

    fn max_postcopy_bandwidth_changed(&self, bytes_per_second: u64) {
        // The store calls this only in postcopy, where the limiter paces the background pages.
        self.0.limiter.set_limit(bytes_per_second);
    }

    fn xbzrle_cache_size_changed(&self, bytes: u64) -> Result<(), String> {
        // The migration thread owns the cache; it applies the new size before its next page.
        self.0.live.xbzrle_resize.store(bytes, Ordering::Release);
        Ok(())
    }
}

/// An outgoing migration (one `migrate` command).
pub struct Outgoing {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    uri: MigrationUri,
}

impl Outgoing {
    /// Starts migrating `vm` to `uri` with the current settings of `options`.
    ///
    /// Returns once the migration thread runs; progress is in [`Outgoing::state`].
    pub fn start(
        uri: MigrationUri,
        vm: Arc<dyn SourceVm>,
        options: Arc<MigrationOptions>,
        events: Arc<dyn MigrationEvents>,
    ) -> Result<Arc<Outgoing>, MigrationError> {
        let (caps, params) = options.snapshot();
        local::check(&caps, &params, &uri, &vm.ram())?;
        let channels = if caps.get(Capability::Multifd) {
            usize::from(params.multifd_channels)
        } else {
            0
        };
        let shared = Arc::new(Shared {
            status: Mutex::new(StatusInfo {
                status: MigrationStatus::None,
                error: None,
                setup_time_ms: 0,
                total_time_ms: None,
                downtime_ms: 0,
                downtime_us: 0,
            }),
            status_cond: Condvar::new(),
            counters: MigrationCounters::new(channels),
            limiter: RateLimiter::with_limit(params.max_bandwidth),
            cancel: AtomicBool::new(false),
            continue_requested: AtomicBool::new(false),
            options: options.clone(),
            events,
            vm,
            channel: Mutex::new(None),
            live: Live::default(),
            start: Instant::now(),
            caps,
            timeline: crate::timeline::Recorder::new(
                Instant::now(),
                timeline_settings(&caps, &params),
            ),
            postcopy: Default::default(),
        });
        options.set_running(true);
        options.register_hooks(Arc::new(Hooks(shared.clone())));
        shared.set_status(MigrationStatus::Setup);
        let s = shared.clone();
        let u = uri.clone();
        let thread = match std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || precopy::run(s, u))
        {
            Ok(t) => t,
            Err(e) => {
                // Nothing runs: the settings are free again and the migration failed.
                let e = MigrationError::Vm(format!("cannot start the migration thread: {e}"));
                options.clear_hooks();
                options.set_running(false);
                shared.set_error(&e);
                shared.set_status(MigrationStatus::Failed);
                return Err(e);
            }
        };
        let s = shared.clone();
        // Without its sampler the timeline still gets syncs and state changes.
        let _ = std::thread::Builder::new()
            .name("migration-timeline".into())
            .spawn(move || {
                crate::timeline::run_sampler(
                    &s.timeline,
                    || !s.status().is_running(),
                    || s.record_sample(SampleKind::Tick, None),
                )
            });
        Ok(Arc::new(Outgoing {
            shared,
            thread: Mutex::new(Some(thread)),
            uri,
        }))
    }

    /// Where the migration goes.
    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// Current status.
    pub fn status(&self) -> MigrationStatus {
        self.shared.status()
    }

    /// The recorded error, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock_status().error.clone()
    }

    /// The guest's downtime in microseconds (query-migrate's `downtime` is in ms).
    pub fn downtime_us(&self) -> u64 {
        self.shared.lock_status().downtime_us
    }

    /// The live counters.
    pub fn counters(&self) -> &MigrationCounters {
        &self.shared.counters
    }

    /// `migrate_cancel`: refused once in postcopy (the guest may already run on the
    /// destination, so the source can never resume it), otherwise [`Outgoing::cancel`].
    pub fn try_cancel(&self) -> Result<(), String> {
        if self.status().in_postcopy() {
            return Err("Postcopy migration in progress, cannot cancel.".into());
        }
        self.cancel();
        Ok(())
    }

    /// `migrate-start-postcopy`: switch to postcopy as soon as the migration thread can
    /// (no error once the migration ended: that would race with the command, as in QEMU).
    pub fn start_postcopy(&self) -> Result<(), String> {
        if !self.shared.caps.get(Capability::PostcopyRam) {
            return Err(
                "Enable postcopy with migrate_set_capability before the start of migration".into(),
            );
        }
        if let MigrationUri::File { .. } = self.uri {
            return Err(
                "postcopy needs a return path from the destination: a file: migration cannot switch to postcopy"
                    .into(),
            );
        }
        self.shared.postcopy.request();
        if self.status() == MigrationStatus::Active {
            // A sender waiting for bandwidth notices the switch at once.
            self.shared.limiter.lift();
        }
        Ok(())
    }

    /// `migrate-pause` on the source: breaks the connections of a postcopy migration (both
    /// sides then enter postcopy-paused).
    pub fn pause(&self) -> Result<(), String> {
        if self.status() != MigrationStatus::PostcopyActive || !self.shared.postcopy.pause() {
            return Err(
                "migrate-pause is currently only supported during postcopy-active state".into(),
            );
        }
        Ok(())
    }

    /// `migrate {"uri": ..., "resume": true}`: resumes a paused postcopy migration over a
    /// new connection to `uri`.
    pub fn resume(&self, uri: MigrationUri) -> Result<(), String> {
        if self.status() != MigrationStatus::PostcopyPaused {
            return Err("Cannot resume if there is no paused migration".into());
        }
        self.shared.postcopy.resume(uri);
        Ok(())
    }

    /// Whether the guest was handed over in postcopy: it must never run here again.
    pub fn postcopy_committed(&self) -> bool {
        self.shared.postcopy.committed()
    }

    /// Postcopy figures of the source: pages sent because the destination asked for them,
    /// pages released by release-ram.
    pub fn postcopy_report(&self) -> Option<serde_json::Value> {
        self.shared.postcopy.committed().then(|| {
            json!({
                "switch-us": self.shared.postcopy.switch_us(),
                "urgent-pages": self.shared.postcopy.urgent_pages(),
                "released-pages": self.shared.postcopy.released_pages(),
                "requests": self.shared.counters.ram_stats(&RamTotals::default()).postcopy_requests,
            })
        })
    }

    /// Asks the migration to stop; the source keeps (or resumes) running. Does nothing once
    /// the migration is in postcopy (see [`Outgoing::try_cancel`]).
    pub fn cancel(&self) {
        let st = self.status();
        if !st.is_running() || st.in_postcopy() || self.shared.postcopy.committed() {
            return;
        }
        self.shared.cancel.store(true, Ordering::Release);
        self.shared.limiter.cancel();
        self.shared.set_status(MigrationStatus::Cancelling);
        if let Some(ch) = self
            .shared
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            ch.shutdown();
        }
        self.shared.status_cond.notify_all();
    }

    /// `migrate-continue`: leaves `pre-switchover`.
    pub fn migrate_continue(&self, state: MigrationStatus) -> Result<(), String> {
        let current = self.status();
        if current != state {
            return Err(format!(
                "Migration not in expected state: {}",
                current.as_str()
            ));
        }
        self.shared
            .continue_requested
            .store(true, Ordering::Release);
        self.shared.status_cond.notify_all();
        Ok(())
    }

    /// Blocks until the migration thread has finished.
    pub fn join(&self) {
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Multifd figures (per-channel bytes, packets and pages, compression ratio), when this
    /// migration uses multifd.
    pub fn multifd_report(&self) -> Option<crate::multifd::MultifdReport> {
        self.shared
            .live
            .multifd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.report())
    }

    /// Everything query-migrate reports about this migration.
    pub fn state(&self) -> SourceState {
        self.shared.source_state()
    }

    /// The migration's timeline so far (all of it once the migration ended).
    pub fn timeline(&self) -> Timeline {
        self.shared.timeline.timeline()
    }
}

/// The settings a timeline's chart names.
fn timeline_settings(caps: &Capabilities, params: &crate::options::Parameters) -> TimelineSettings {
    let multifd = caps.get(Capability::Multifd);
    TimelineSettings {
        multifd_channels: if multifd {
            u32::from(params.multifd_channels)
        } else {
            0
        },
        multifd_compression: multifd.then(|| {
            crate::multifd::Method::from(params.multifd_compression)
                .name()
                .to_string()
        }),
        xbzrle: caps.get(Capability::Xbzrle),
        auto_converge: caps.get(Capability::AutoConverge),
        downtime_limit: params.downtime_limit,
        max_bandwidth: params.max_bandwidth,
    }
}
