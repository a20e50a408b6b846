//! A migration's timeline: what query-migrate said, sampled over the whole migration.
//!
//! Operators tune a migration by looking at how remaining memory, dirty rate,
//! bandwidth and throttle moved over time. QEMU leaves it to them to poll
//! query-migrate; Ferry records it. A [`Recorder`] belongs to one outgoing
//! migration and keeps, in memory:
//!
//! - a [`Sample`] at every dirty-log sync ([`SampleKind::Sync`]), at every state
//!   change ([`SampleKind::Status`]) and throttle change ([`SampleKind::Throttle`]),
//!   and otherwise at least every [`SAMPLE_INTERVAL`] ([`SampleKind::Tick`]);
//! - [`Event`]s derived from the samples: every state change, throttle step and
//!   pass (dirty sync), with its time.
//!
//! Memory is bounded: past [`MAX_SAMPLES`] samples the older half is thinned
//! (every other tick sample goes, syncs and changes stay), past [`MAX_EVENTS`]
//! events every other old pass event goes. The counts of what went are in the
//! timeline ([`Timeline::decimated`]), so nothing is lost silently.
//!
//! The sample that records a final state (completed, failed, cancelled) closes the
//! timeline: it carries the same figures as the final query-migrate, and later
//! samples are ignored. `ferry-query-migrate-timeline` returns [`Timeline`] as JSON
//! (kebab-case names, as QMP's).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::info::{MigrationStatus, SourceState};

/// The longest time between two samples while a migration runs.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// Samples kept before the older half is thinned.
pub const MAX_SAMPLES: usize = 4096;
/// Events kept before old pass events are thinned.
pub const MAX_EVENTS: usize = 1024;

/// Why a sample was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SampleKind {
    /// The periodic sample.
    Tick,
    /// Right after a dirty-log sync (one per pass).
    Sync,
    /// Right after a state change.
    Status,
    /// Right after the vCPU throttle changed.
    Throttle,
}

/// One point of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sample {
    /// Milliseconds since `migrate` (microsecond precision).
    pub t_ms: f64,
    /// Why it was taken.
    pub kind: SampleKind,
    /// The migration's state.
    pub status: MigrationStatus,
    /// The pass (1-based) being sent; for a sync sample the pass that sync ended.
    pub pass: u64,
    /// query-migrate's `dirty-sync-count`.
    pub dirty_sync_count: u64,
    /// Bytes sent so far, every channel (`ram.transferred`).
    pub transferred: u64,
    /// Bytes still to send (`ram.remaining`; exact at a sync sample).
    pub remaining: u64,
    /// Pages dirtied per second (`ram.dirty-pages-rate`).
    pub dirty_pages_rate: u64,
    /// Bytes dirtied per second (`dirty-pages-rate * page-size`).
    pub dirty_bytes_rate: u64,
    /// Sending rate as query-migrate reports it (`ram.mbps`, Mbit/s).
    pub mbps: f64,
    /// Bytes sent per second since the previous sample.
    pub send_rate: f64,
    /// `ram.pages-per-second`.
    pub pages_per_second: u64,
    /// `expected-downtime` in milliseconds.
    pub expected_downtime: u64,
    /// `cpu-throttle-percentage` (0: not throttled).
    pub cpu_throttle_percentage: u8,
    /// XBZRLE's unencoded bytes per encoded byte in the last period, when XBZRLE is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_encoding_rate: Option<f64>,
    /// XBZRLE's cache misses per page in the last period, when XBZRLE is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_miss_rate: Option<f64>,
    /// Page bytes before compression per byte sent, when multifd or `compress` compresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_ratio: Option<f64>,
    /// Bytes sent so far on each multifd channel, when multifd is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_bytes: Option<Vec<u64>>,
}

/// What happened, derived from the samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    /// The migration entered `status`.
    Status {
        /// The new state.
        status: MigrationStatus,
    },
    /// The vCPU throttle changed.
    Throttle {
        /// The new `cpu-throttle-percentage`.
        #[serde(rename = "cpu-throttle-percentage")]
        percentage: u8,
    },
    /// A dirty-log sync ended pass `pass`.
    Pass {
        /// The pass that ended (= dirty-sync-count after the sync).
        pass: u64,
        /// Bytes found dirty by the sync.
        remaining: u64,
    },
}

/// An [`EventKind`] with its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Event {
    /// Milliseconds since `migrate`.
    pub t_ms: f64,
    /// What happened.
    #[serde(flatten)]
    pub what: EventKind,
}

/// A span of time on the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interval {
    /// Start, ms since `migrate`.
    pub start_ms: f64,
    /// End, ms since `migrate`.
    pub end_ms: f64,
}

/// The settings a migration ran with, for the chart's caption.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TimelineSettings {
    /// Multifd channels (0: multifd off).
    pub multifd_channels: u32,
    /// `multifd-compression`, when multifd is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<String>,
    /// Whether XBZRLE is on.
    pub xbzrle: bool,
    /// Whether auto-converge is on.
    pub auto_converge: bool,
    /// `downtime-limit`, ms.
    pub downtime_limit: u64,
    /// `max-bandwidth`, bytes per second (0: unlimited).
    pub max_bandwidth: u64,
}

/// A migration's recorded timeline (`ferry-query-migrate-timeline`'s reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// The migration's state when the timeline was read (`none`: no migration).
    pub status: MigrationStatus,
    /// Guest RAM size in bytes.
    pub ram_total: u64,
    /// Guest page size in bytes.
    pub page_size: u64,
    /// The settings the migration ran with.
    pub settings: TimelineSettings,
    /// The longest time between samples while running, ms.
    pub sample_interval_ms: u64,
    /// Dirty-log syncs recorded (equals the final dirty-sync-count).
    pub passes: u64,
    /// Samples thinned out to bound memory.
    pub decimated_samples: u64,
    /// Pass events thinned out to bound memory.
    pub decimated_events: u64,
    /// When the guest was stopped for the switchover, ms: once completed, the downtime's
    /// start; before, when pre-switchover or device was entered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_ms: Option<f64>,
    /// The guest's downtime: query-migrate's `downtime`, ending at completion (after a
    /// postcopy phase: starting at the switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_interval: Option<Interval>,
    /// Final `setup-time`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Final `total-time`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Final `downtime`, ms (completed migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Final `error-desc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// The samples, oldest first, non-decreasing in time.
    pub samples: Vec<Sample>,
    /// State changes, throttle steps and passes, oldest first.
    pub events: Vec<Event>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            status: MigrationStatus::None,
            ram_total: 0,
            page_size: ram::PAGE_SIZE as u64,
            settings: TimelineSettings::default(),
            sample_interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            passes: 0,
            decimated_samples: 0,
            decimated_events: 0,
            switchover_ms: None,
            downtime_interval: None,
            setup_time: None,
            total_time: None,
            downtime: None,
            error_desc: None,
            samples: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl Timeline {
    /// The last sample, if any.
    pub fn last(&self) -> Option<&Sample> {
        self.samples.last()
    }

    /// Whether multifd per-channel figures are present.
    pub fn has_channels(&self) -> bool {
        self.samples
            .iter()
            .any(|s| s.channel_bytes.as_ref().is_some_and(|c| !c.is_empty()))
    }

    /// Times of the pass events (dirty syncs), ms.
    pub fn pass_times(&self) -> Vec<(u64, f64)> {
        self.events
            .iter()
            .filter_map(|e| match e.what {
                EventKind::Pass { pass, .. } => Some((pass, e.t_ms)),
                _ => None,
            })
            .collect()
    }
}

/// What one sample reads from the migration (see [`Figures::from_state`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// query-migrate's figures.
    pub state: SourceState,
    /// Page bytes before compression per byte sent, when multifd or `compress` compresses.
    pub compression_ratio: Option<f64>,
    /// Bytes per multifd channel, when multifd is on.
    pub channel_bytes: Option<Vec<u64>>,
}

impl Figures {
    /// Figures of a query-migrate state without multifd extras.
    pub fn from_state(state: SourceState) -> Self {
        Figures {
            state,
            compression_ratio: None,
            channel_bytes: None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    timeline: Timeline,
    last_t_ms: f64,
    last_sample_at: Option<Instant>,
    last_status: Option<MigrationStatus>,
    last_throttle: u8,
    postcopy: bool,
    closed: bool,
}

/// Records one outgoing migration's timeline; shared by the migration thread, the
/// sampling thread and QMP.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
}

fn is_final(status: MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
    )
}

impl Recorder {
    /// An empty timeline whose times count from `start` (when `migrate` was issued).
    pub fn new(start: Instant, settings: TimelineSettings) -> Self {
        Recorder {
            start,
            inner: Mutex::new(Inner {
                timeline: Timeline {
                    settings,
                    ..Timeline::default()
                },
                last_t_ms: 0.0,
                last_sample_at: None,
                last_status: None,
                last_throttle: 0,
                postcopy: false,
                closed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a sample of `figures` (read under the recorder's lock, so samples are in
    /// time order whoever takes them). `remaining` overrides the state's remaining bytes
    /// (a sync knows them exactly before they are published). Ignored once closed.
    pub fn record(
        &self,
        kind: SampleKind,
        remaining: Option<u64>,
        figures: impl FnOnce() -> Figures,
    ) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        let f = figures();
        let now = Instant::now();
        let micros = now.saturating_duration_since(self.start).as_micros() as f64;
        // Never earlier than the previous sample, whatever the clock did.
        let t_ms = (micros / 1000.0).max(inner.last_t_ms);
        inner.last_t_ms = t_ms;
        inner.last_sample_at = Some(now);
        let st = &f.state;
        let page_size = st.ram.page_size.max(1);
        let count = st.ram.dirty_sync_count;
        let finished = is_final(st.status);
        // While pages are sent the pass in progress is the one after the last sync; a sync
        // sample, and anything after the guest stopped, belongs to the last sync's pass.
        let sending = matches!(
            st.status,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling
        );
        let pass = if kind != SampleKind::Sync && sending {
            count + 1
        } else {
            count.max(1)
        };
        let send_rate = match inner.timeline.samples.last() {
            Some(prev) if t_ms - prev.t_ms >= 1.0 => {
                st.ram.transferred.saturating_sub(prev.transferred) as f64 * 1000.0
                    / (t_ms - prev.t_ms)
            }
            Some(prev) => prev.send_rate,
            None => 0.0,
        };
        let sample = Sample {
            t_ms,
            kind,
            status: st.status,
            pass,
            dirty_sync_count: count,
            transferred: st.ram.transferred,
            remaining: remaining.unwrap_or(st.ram.remaining),
            dirty_pages_rate: st.ram.dirty_pages_rate,
            dirty_bytes_rate: st.ram.dirty_pages_rate.saturating_mul(page_size),
            mbps: st.ram.mbps,
            send_rate,
            pages_per_second: st.ram.pages_per_second,
            expected_downtime: st.expected_downtime_ms,
            cpu_throttle_percentage: st.cpu_throttle_percentage,
            xbzrle_encoding_rate: st.xbzrle_cache.map(|x| x.encoding_rate),
            xbzrle_cache_miss_rate: st.xbzrle_cache.map(|x| x.cache_miss_rate),
            compression_ratio: f.compression_ratio,
            channel_bytes: f.channel_bytes.clone(),
        };
        let tl = &mut inner.timeline;
        tl.status = st.status;
        if st.ram.total > 0 {
            tl.ram_total = st.ram.total;
            tl.page_size = page_size;
        }
        let mut events = Vec::new();
        if inner.last_status != Some(st.status) {
            events.push(EventKind::Status { status: st.status });
        }
        if inner.last_throttle != st.cpu_throttle_percentage {
            events.push(EventKind::Throttle {
                percentage: st.cpu_throttle_percentage,
            });
        }
        if kind == SampleKind::Sync {
            events.push(EventKind::Pass {
                pass: count,
                remaining: sample.remaining,
            });
        }
        inner.last_status = Some(st.status);
        inner.last_throttle = st.cpu_throttle_percentage;
        inner.postcopy |= st.status.in_postcopy();
        let postcopy = inner.postcopy;
        let tl = &mut inner.timeline;
        if kind == SampleKind::Sync {
            tl.passes += 1;
        }
        // The guest stops for the switchover just before pre-switchover or device; the
        // final state fixes it exactly from query-migrate's downtime (below).
        if matches!(
            st.status,
            MigrationStatus::PreSwitchover | MigrationStatus::Device
        ) && tl.switchover_ms.is_none()
        {
            tl.switchover_ms = Some(t_ms);
        }
        for what in events {
            tl.events.push(Event { t_ms, what });
        }
        tl.samples.push(sample);
        if finished {
            tl.setup_time = Some(st.setup_time_ms);
            tl.total_time = Some(st.total_time_ms);
            tl.error_desc = st.error_desc.clone();
            if st.status == MigrationStatus::Completed {
                tl.downtime = Some(st.downtime_ms);
                let downtime = st.downtime_ms as f64;
                let interval = match (postcopy, tl.switchover_ms) {
                    // Postcopy: the guest stopped at the switchover and ran again on the
                    // destination `downtime` later, long before the migration completed.
                    (true, Some(start_ms)) => Interval {
                        start_ms,
                        end_ms: (start_ms + downtime).min(t_ms),
                    },
                    // Precopy: downtime ends as the migration completes; the guest stopped
                    // `downtime` before.
                    _ => Interval {
                        start_ms: (t_ms - downtime).max(0.0),
                        end_ms: t_ms,
                    },
                };
                tl.switchover_ms = Some(interval.start_ms);
                tl.downtime_interval = Some(interval);
            }
            inner.closed = true;
        }
        thin_samples(&mut inner.timeline);
        thin_events(&mut inner.timeline);
    }

    /// How long until the next periodic sample is due (zero: now); None once closed.
    pub fn due_in(&self) -> Option<Duration> {
        let inner = self.lock();
        if inner.closed {
            return None;
        }
        Some(match inner.last_sample_at {
            Some(at) => SAMPLE_INTERVAL.saturating_sub(at.elapsed()),
            None => Duration::ZERO,
        })
    }

    /// Whether a final state was recorded.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A copy of the timeline so far.
    pub fn timeline(&self) -> Timeline {
        self.lock().timeline.clone()
    }
}

/// Takes a periodic sample whenever one is due, until the recorder closes or `done`
/// says so; `sample` records a [`SampleKind::Tick`].
pub fn run_sampler(recorder: &Recorder, done: impl Fn() -> bool, sample: impl Fn()) {
    while !done() {
        match recorder.due_in() {
            None => return,
            Some(d) if d.is_zero() => sample(),
            Some(d) => std::thread::sleep(d),
        }
    }
}

/// Past [`MAX_SAMPLES`], removes every other tick sample of the older half (or every
/// other sample there, when it holds too few ticks), keeping the very first.
fn thin_samples(tl: &mut Timeline) {
    if tl.samples.len() < MAX_SAMPLES {
        return;
    }
    let half = tl.samples.len() / 2;
    let ticks = tl.samples[1..half]
        .iter()
        .filter(|s| s.kind == SampleKind::Tick)
        .count();
    let only_ticks = ticks >= half / 4;
    let mut toggle = false;
    let before = tl.samples.len();
    let mut i = 0usize;
    tl.samples.retain(|s| {
        let idx = i;
        i += 1;
        if idx == 0 || idx >= half || (only_ticks && s.kind != SampleKind::Tick) {
            return true;
        }
        toggle = !toggle;
        !toggle
    });
    tl.decimated_samples += (before - tl.samples.len()) as u64;
}

/// Past [`MAX_EVENTS`], removes every other pass event of the older half.
fn thin_events(tl: &mut Timeline) {
    if tl.events.len() < MAX_EVENTS {
        return;
    }
    let half = tl.events.len() / 2;
    let mut toggle = false;
    let before = tl.events.len();
    let mut i = 0usize;
    tl.events.retain(|e| {
        let idx = i;
        i += 1;
        if idx >= half || !matches!(e.what, EventKind::Pass { .. }) {
            return true;
        }
        toggle = !toggle;
        !toggle
    });
    tl.decimated_events += (before - tl.events.len()) as u64;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::info::MigrationStats;
    use std::sync::Arc;

    fn state(status: MigrationStatus, transferred: u64, syncs: u64, throttle: u8) -> Figures {
        Figures::from_state(SourceState {
            status,
            setup_time_ms: 3,
            total_time_ms: 1000,
            expected_downtime_ms: 40,
            downtime_ms: 12,
            ram: MigrationStats {
                transferred,
                remaining: 1 << 20,
                total: 1 << 30,
                page_size: 4096,
                dirty_pages_rate: 100,
                dirty_sync_count: syncs,
                mbps: 800.0,
                ..MigrationStats::default()
            },
            cpu_throttle_percentage: throttle,
            ..SourceState::default()
        })
    }

    #[test]
    fn state_and_throttle_changes_and_syncs_become_events() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        r.record(SampleKind::Status, None, || {
            state(MigrationStatus::Setup, 0, 0, 0)
        });
        r.record(SampleKind::Status, None, || {
            state(MigrationStatus::Active, 10, 0, 0)
        });
        r.record(SampleKind::Tick, None, || {
            state(MigrationStatus::Active, 20, 0, 0)
        });
        r.record(SampleKind::Sync, Some(4096), || {
            state(MigrationStatus::Active, 30, 1, 0)
        });
        r.record(SampleKind::Throttle, None, || {
            state(MigrationStatus::Active, 40, 1, 20)
        });
        let t = r.timeline();
        let kinds: Vec<EventKind> = t.events.iter().map(|e| e.what.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Status {
                    status: MigrationStatus::Setup
                },
                EventKind::Status {
                    status: MigrationStatus::Active
                },
                EventKind::Pass {
                    pass: 1,
                    remaining: 4096
                },
                EventKind::Throttle { percentage: 20 },
            ]
        );
        assert_eq!(t.passes, 1);
        assert_eq!(
            t.samples[3].remaining, 4096,
            "a sync knows remaining exactly"
        );
        assert_eq!(
            t.samples[3].pass, 1,
            "a sync sample belongs to the pass it ended"
        );
        assert_eq!(
            t.samples[4].pass, 2,
            "after the first sync the second pass runs"
        );
        assert_eq!(t.samples[4].dirty_bytes_rate, 100 * 4096);
        assert_eq!(t.ram_total, 1 << 30);
    }

    #[test]
    fn a_final_state_closes_the_timeline_with_the_final_figures() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        r.record(SampleKind::Status, None, || {
            state(MigrationStatus::Active, 10, 0, 0)
        });
        std::thread::sleep(Duration::from_millis(15));
        r.record(SampleKind::Status, None, || {
            state(MigrationStatus::Device, 20, 3, 0)
        });
        r.record(SampleKind::Status, None, || {
            state(MigrationStatus::Completed, 30, 4, 0)
        });
        assert!(r.is_closed());
        assert_eq!(r.due_in(), None);
        r.record(SampleKind::Tick, None, || {
            state(MigrationStatus::Completed, 99, 9, 0)
        });
        let t = r.timeline();
        assert_eq!(t.samples.len(), 3, "nothing after the final state");
        let last = t.last().unwrap();
        assert_eq!(last.transferred, 30);
        assert_eq!(last.pass, 4);
        assert_eq!(t.status, MigrationStatus::Completed);
        assert_eq!(t.downtime, Some(12));
        assert_eq!(t.total_time, Some(1000));
        let sw = t.switchover_ms.unwrap();
        let d = t.downtime_interval.unwrap();
        assert_eq!(d.start_ms, sw);
        assert_eq!(d.end_ms, last.t_ms, "downtime ends at completion");
        assert!((d.end_ms - d.start_ms - 12.0).abs() < 1e-9, "{d:?}");
    }

    #[test]
    fn after_postcopy_the_downtime_starts_at_the_switchover() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        for status in [MigrationStatus::Active, MigrationStatus::Device] {
            r.record(SampleKind::Status, None, || state(status, 10, 1, 0));
        }
        std::thread::sleep(Duration::from_millis(30));
        for status in [MigrationStatus::PostcopyActive, MigrationStatus::Completed] {
            r.record(SampleKind::Status, None, || state(status, 20, 2, 0));
        }
        let t = r.timeline();
        let device = t.samples[1].t_ms;
        let d = t.downtime_interval.unwrap();
        assert_eq!(d.start_ms, device);
        assert_eq!(d.end_ms, device + 12.0);
        assert_eq!(t.switchover_ms, Some(device));
    }

    #[test]
    fn samples_from_many_threads_stay_in_time_order() {
        let r = Arc::new(Recorder::new(Instant::now(), TimelineSettings::default()));
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        r.record(SampleKind::Tick, None, || {
                            state(MigrationStatus::Active, n * 1000 + i, 0, 0)
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let t = r.timeline();
        assert_eq!(t.samples.len(), 800);
        assert!(t.samples.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
    }

    #[test]
    fn memory_stays_bounded_and_syncs_survive_thinning() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        let total = 3 * MAX_SAMPLES as u64;
        let mut syncs = 0;
        for i in 0..total {
            if i % 50 == 0 {
                syncs += 1;
                r.record(SampleKind::Sync, None, || {
                    state(MigrationStatus::Active, i, syncs, 0)
                });
            } else {
                r.record(SampleKind::Tick, None, || {
                    state(MigrationStatus::Active, i, syncs, 0)
                });
            }
        }
        let t = r.timeline();
        assert!(t.samples.len() < MAX_SAMPLES, "{}", t.samples.len());
        assert_eq!(
            t.samples.len() as u64 + t.decimated_samples,
            total,
            "every thinned sample is counted"
        );
        let kept_syncs = t
            .samples
            .iter()
            .filter(|s| s.kind == SampleKind::Sync)
            .count() as u64;
        assert_eq!(kept_syncs, syncs, "sync samples are never thinned here");
        assert_eq!(t.passes, syncs);
        assert_eq!(t.samples[0].transferred, 0, "the first sample stays");
        assert_eq!(t.last().unwrap().transferred, total - 1);
        assert!(t.samples.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
    }

    #[test]
    fn pass_events_are_thinned_past_the_bound() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        for i in 1..=(2 * MAX_EVENTS as u64) {
            r.record(SampleKind::Sync, None, || {
                state(MigrationStatus::Active, i, i, 0)
            });
        }
        let t = r.timeline();
        assert!(t.events.len() < MAX_EVENTS + 1);
        assert_eq!(t.passes, 2 * MAX_EVENTS as u64);
        assert!(t.decimated_events > 0);
        assert!(
            matches!(t.events[0].what, EventKind::Status { .. }),
            "state changes stay"
        );
    }

    #[test]
    fn periodic_samples_come_at_the_interval() {
        let r = Recorder::new(Instant::now(), TimelineSettings::default());
        assert_eq!(r.due_in(), Some(Duration::ZERO));
        let count = std::sync::atomic::AtomicUsize::new(0);
        let t0 = Instant::now();
        run_sampler(
            &r,
            || t0.elapsed() > Duration::from_millis(500),
            || {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                r.record(SampleKind::Tick, None, || {
                    state(MigrationStatus::Active, 1, 0, 0)
                });
            },
        );
        let n = count.load(std::sync::atomic::Ordering::Relaxed);
        // 500 ms at 50 ms: 11 samples (one at once), fewer when wake-ups come late.
        assert!((7..=11).contains(&n), "{n} samples");
        let t = r.timeline();
        assert!(t
            .samples
            .windows(2)
            .all(|w| w[1].t_ms - w[0].t_ms >= SAMPLE_INTERVAL.as_millis() as f64 - 1.0));
    }

    #[test]
    fn json_uses_kebab_case_and_round_trips() {
        let r = Recorder::new(
            Instant::now(),
            TimelineSettings {
                multifd_channels: 2,
                multifd_compression: Some("zstd".into()),
                ..TimelineSettings::default()
            },
        );
        r.record(SampleKind::Sync, None, || Figures {
            compression_ratio: Some(2.5),
            channel_bytes: Some(vec![1, 2]),
            ..state(MigrationStatus::Active, 5, 1, 0)
        });
        let t = r.timeline();
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["samples"][0]["channel-bytes"], serde_json::json!([1, 2]));
        assert_eq!(v["samples"][0]["kind"], "sync");
        assert_eq!(v["events"][1]["event"], "pass");
        assert_eq!(v["settings"]["multifd-compression"], "zstd");
        assert!(v["samples"][0].get("xbzrle-encoding-rate").is_none());
        let back: Timeline = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
        assert!(back.has_channels());
        assert_eq!(back.pass_times().len(), 1);
    }
}
