//! Bandwidth, expected downtime, dirty rate, and when to switch over.
//!
//! The precopy loop uses three pieces, all fed with explicit times so tests
//! are exact:
//!
//! ```text
//! every loop turn      BandwidthEstimator::update(progress)      (closes a window every >= 100 ms)
//!                        -> threshold_bytes = bandwidth * downtime-limit
//!                        -> expected-downtime = dirty bytes at last sync / bandwidth
//! then                 switchover_decision(Pending::Estimate(dirty bytes), threshold, ..)
//!                        Iterate      -> send more pages
//!                        SyncExactly  -> sync the dirty log, then
//!                                        switchover_decision(Pending::Exact(dirty bytes), ..)
//!                        Complete     -> lift the rate limit, stop the vCPUs, send the rest
//! after each pass      sync, then after_sync(dirty bytes, bytes queued on the sockets, ..)
//!                        Iterate / DrainFirst (let the queues drain, guest running) / Complete
//! every dirty-log sync DirtyPeriodTracker::on_sync(report)       (closes a period after > 1 s)
//!                        -> dirty-pages-rate, and the period auto-converge judges
//! ```
//!
//! These follow QEMU 8.1's `migration_update_counters`,
//! `migration_iteration_run` and `migration_bitmap_sync`/`migration_update_rates`;
//! where Ferry differs (nanosecond windows, smoothing) the item's doc says so.

use std::time::Duration;

use crate::rate_limit::BUFFER_DELAY;

/// Shortest window over which bandwidth is measured (QEMU's `BUFFER_DELAY`).
pub const BANDWIDTH_WINDOW: Duration = BUFFER_DELAY;

/// Time constant of the exponential smoothing of bandwidth and page rate.
pub const SMOOTHING_TIME_CONSTANT: Duration = Duration::from_secs(1);

/// A window must carry more than this many bytes to update the expected downtime (QEMU's rule).
pub const MIN_BYTES_FOR_DOWNTIME: u64 = 10_000;

/// Length after which a dirty-sync period closes (QEMU: "more than 1 second").
pub const DIRTY_PERIOD_MS: u64 = 1_000;

const NS_PER_SEC: f64 = 1e9;

/// What the migration loop knows at one instant, for [`BandwidthEstimator::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Clock time, nanoseconds.
    pub now_ns: u64,
    /// Bytes sent so far by every channel (`transferred` in query-migrate).
    pub transferred_bytes: u64,
    /// Pages sent so far: normal + zero + XBZRLE pages.
    pub transferred_pages: u64,
    /// Dirty bytes found pending at the last dirty-log sync.
    pub dirty_bytes_last_sync: u64,
    /// Last dirty-pages-rate (pages/s) from [`DirtyPeriodTracker`].
    pub dirty_pages_rate: u64,
}

/// The parameters the switchover threshold depends on, read at each update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchoverLimits {
    /// `downtime-limit` in milliseconds.
    pub downtime_limit_ms: u64,
    /// Bandwidth to assume for the switchover in bytes/s, `0` = use the estimate
    /// (QEMU 8.2's `avail-switchover-bandwidth`).
    pub switchover_bandwidth: u64,
}

/// Rates measured over one closed window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowRates {
    /// Window length.
    pub duration: Duration,
    /// Bytes sent during the window.
    pub bytes: u64,
    /// Pages sent during the window.
    pub pages: u64,
    /// `bytes / duration`, bytes per second.
    pub bytes_per_sec: f64,
    /// `pages / duration`, pages per second.
    pub pages_per_sec: f64,
}

/// Bandwidth over windows of at least 100 ms, the switchover threshold and
/// the expected downtime.
///
/// QEMU uses the last window's raw bandwidth for everything. Raw 100 ms
/// windows are noisy (a window may hold zero or two rate-limit budgets, or a
/// long dirty-log sync), so Ferry keeps an exponentially smoothed bandwidth
/// (time constant [`SMOOTHING_TIME_CONSTANT`]) and decides with
/// `min(raw, smoothed)`: a drop counts at once, a lucky fast window does not
/// trigger an early switchover. `mbps` and `pages-per-second` report the
/// smoothed rates.
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    start_ns: u64,
    start_bytes: u64,
    start_pages: u64,
    last: Option<WindowRates>,
    smoothed_bytes_per_sec: f64,
    smoothed_pages_per_sec: f64,
    decision_bytes_per_sec: f64,
    threshold_bytes: u64,
    expected_downtime_ms: u64,
}

impl BandwidthEstimator {
    /// Starts measuring at `progress`; expected downtime starts at the limit, as in QEMU.
    pub fn new(progress: &Progress, limits: &SwitchoverLimits) -> Self {
        Self {
            start_ns: progress.now_ns,
            start_bytes: progress.transferred_bytes,
            start_pages: progress.transferred_pages,
            last: None,
            smoothed_bytes_per_sec: 0.0,
            smoothed_pages_per_sec: 0.0,
            decision_bytes_per_sec: 0.0,
            threshold_bytes: 0,
            expected_downtime_ms: limits.downtime_limit_ms,
        }
    }

    /// Closes the window if it has lasted [`BANDWIDTH_WINDOW`]; returns its rates.
    ///
    /// Until the first window closes the bandwidth is unknown and the
    /// threshold is 0: only a migration with nothing left to send switches over.
    pub fn update(
        &mut self,
        progress: &Progress,
        limits: &SwitchoverLimits,
    ) -> Option<WindowRates> {
        let window_ns = u64::try_from(BANDWIDTH_WINDOW.as_nanos()).unwrap_or(u64::MAX);
        let elapsed_ns = progress.now_ns.checked_sub(self.start_ns)?;
        if elapsed_ns < window_ns {
            return None;
        }
        let bytes = progress.transferred_bytes.saturating_sub(self.start_bytes);
        let pages = progress.transferred_pages.saturating_sub(self.start_pages);
        let seconds = elapsed_ns as f64 / NS_PER_SEC;
        let rates = WindowRates {
            duration: Duration::from_nanos(elapsed_ns),
            bytes,
            pages,
            bytes_per_sec: bytes as f64 * NS_PER_SEC / elapsed_ns as f64,
            pages_per_sec: pages as f64 * NS_PER_SEC / elapsed_ns as f64,
        };

        if self.last.is_none() {
            self.smoothed_bytes_per_sec = rates.bytes_per_sec;
            self.smoothed_pages_per_sec = rates.pages_per_sec;
        } else {
            let alpha = 1.0 - (-seconds / SMOOTHING_TIME_CONSTANT.as_secs_f64()).exp();
            self.smoothed_bytes_per_sec +=
                alpha * (rates.bytes_per_sec - self.smoothed_bytes_per_sec);
            self.smoothed_pages_per_sec +=
                alpha * (rates.pages_per_sec - self.smoothed_pages_per_sec);
        }
        self.last = Some(rates);

        self.decision_bytes_per_sec = if limits.switchover_bandwidth != 0 {
            limits.switchover_bandwidth as f64
        } else {
            rates.bytes_per_sec.min(self.smoothed_bytes_per_sec)
        };
        self.threshold_bytes =
            (self.decision_bytes_per_sec * limits.downtime_limit_ms as f64 / 1000.0) as u64;
        if progress.dirty_pages_rate != 0
            && bytes > MIN_BYTES_FOR_DOWNTIME
            && self.decision_bytes_per_sec > 0.0
        {
            self.expected_downtime_ms = (progress.dirty_bytes_last_sync as f64 * 1000.0
                / self.decision_bytes_per_sec) as u64;
        }

        self.restart(progress);
        Some(rates)
    }

    /// Starts a new window at `progress` without judging the current one
    /// (QEMU's `update_iteration_initial_status`, e.g. after a recovery).
    pub fn restart(&mut self, progress: &Progress) {
        self.start_ns = progress.now_ns;
        self.start_bytes = progress.transferred_bytes;
        self.start_pages = progress.transferred_pages;
    }

    /// The rates of the last closed window (QEMU's raw figures).
    pub fn last_window(&self) -> Option<WindowRates> {
        self.last
    }

    /// Bandwidth the switchover threshold uses, bytes per second (0 until known).
    pub fn bandwidth(&self) -> f64 {
        self.decision_bytes_per_sec
    }

    /// Smoothed throughput in megabits per second (query-migrate's `mbps`).
    pub fn mbps(&self) -> f64 {
        self.smoothed_bytes_per_sec * 8.0 / 1e6
    }

    /// Smoothed pages per second (query-migrate's `pages-per-second`).
    pub fn pages_per_second(&self) -> u64 {
        self.smoothed_pages_per_sec as u64
    }

    /// Bytes that can be sent within `downtime-limit` (QEMU's `threshold_size`).
    pub fn threshold_bytes(&self) -> u64 {
        self.threshold_bytes
    }

    /// Expected downtime in milliseconds (query-migrate's `expected-downtime`).
    pub fn expected_downtime_ms(&self) -> u64 {
        self.expected_downtime_ms
    }
}

/// Average throughput of a finished migration in Mbit/s, as QEMU reports it
/// once completed: all bytes over the time after setup.
pub fn completed_mbps(transferred_bytes: u64, total_time_ms: u64, setup_time_ms: u64) -> f64 {
    let transfer_ms = total_time_ms.saturating_sub(setup_time_ms);
    if transfer_ms == 0 {
        return 0.0;
    }
    transferred_bytes as f64 * 8.0 / transfer_ms as f64 / 1000.0
}

/// How much is left to send, and how it was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Dirty bytes known without syncing the dirty log (cheap, may be stale).
    Estimate(u64),
    /// Dirty bytes right after a dirty-log sync.
    Exact(u64),
}

/// What the migration loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverDecision {
    /// Send another round of dirty pages.
    Iterate,
    /// The estimate fits the downtime budget: sync the dirty log and decide
    /// again with [`Pending::Exact`].
    SyncExactly,
    /// Stop the guest and send what is left (QEMU's `migration_completion`).
    Complete,
}

/// The switchover rule of QEMU's `migration_iteration_run`.
///
/// `can_switchover` is false while a `switchover-ack` is awaited.
pub fn switchover_decision(
    pending: Pending,
    threshold_bytes: u64,
    can_switchover: bool,
) -> SwitchoverDecision {
    match pending {
        // An estimate within budget (0 included) is only a hint: measure exactly.
        Pending::Estimate(bytes) if bytes <= threshold_bytes => SwitchoverDecision::SyncExactly,
        // Nothing dirty is left: done, whatever the bandwidth.
        Pending::Exact(0) if can_switchover => SwitchoverDecision::Complete,
        // What is left can be sent within downtime-limit.
        Pending::Exact(bytes) if bytes < threshold_bytes && can_switchover => {
            SwitchoverDecision::Complete
        }
        // Too much left, or the destination has not acknowledged: keep going.
        _ => SwitchoverDecision::Iterate,
    }
}

/// What the migration loop does after an exact sync, given what the sockets still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSync {
    /// Send another round of dirty pages.
    Iterate,
    /// The dirty bytes fit the budget but the bytes still queued on the sockets do not:
    /// let the queues drain with the guest running, then send and sync again.
    DrainFirst,
    /// Stop the guest and send what is left.
    Complete,
}

/// Ferry's addition to QEMU's rule after an exact sync: bytes already written to the sockets
/// but not yet acknowledged by the peer (the tail of the last pass, up to a socket buffer's
/// worth: a quarter of a second or more on a slow link) must also arrive before the
/// destination can start the guest, so they count as pending. QEMU leaves them out, which
/// on a slow link makes the real downtime exceed `downtime-limit`.
pub fn after_sync(
    dirty_bytes: u64,
    queued_bytes: u64,
    threshold_bytes: u64,
    can_switchover: bool,
) -> AfterSync {
    let with_queue = Pending::Exact(dirty_bytes.saturating_add(queued_bytes));
    match switchover_decision(with_queue, threshold_bytes, can_switchover) {
        SwitchoverDecision::Complete => AfterSync::Complete,
        _ if queued_bytes > 0
            && switchover_decision(
                Pending::Exact(dirty_bytes),
                threshold_bytes,
                can_switchover,
            ) == SwitchoverDecision::Complete =>
        {
            AfterSync::DrainFirst
        }
        _ => AfterSync::Iterate,
    }
}

/// One dirty-log sync, for [`DirtyPeriodTracker::on_sync`]; times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// Clock time when the sync started.
    pub started_ms: u64,
    /// Clock time when the sync finished.
    pub finished_ms: u64,
    /// Pages this sync found newly dirty (not already pending).
    pub newly_dirty_pages: u64,
    /// Bytes sent so far by every channel, read after the sync.
    pub transferred_bytes: u64,
}

/// A closed dirty-sync period: what the guest dirtied and what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyPeriod {
    /// Period length in milliseconds (more than [`DIRTY_PERIOD_MS`]).
    pub duration_ms: u64,
    /// Pages newly dirtied during the period.
    pub dirty_pages: u64,
    /// `dirty_pages * page_size`.
    pub dirty_bytes: u64,
    /// Bytes sent during the period.
    pub transferred_bytes: u64,
    /// `dirty_pages * 1000 / duration_ms`, pages per second.
    pub dirty_pages_rate: u64,
}

/// Dirty-rate bookkeeping across dirty-log syncs (QEMU's period counters in
/// `migration_bitmap_sync` and `migration_update_rates`).
///
/// A period starts at the first sync's start; every later sync adds its
/// newly dirty pages; a sync that ends more than 1 s after the period start
/// closes it.
#[derive(Debug, Clone)]
pub struct DirtyPeriodTracker {
    page_size: u64,
    period_start_ms: Option<u64>,
    dirty_pages: u64,
    transferred_at_start: u64,
    dirty_pages_rate: u64,
}

impl DirtyPeriodTracker {
    /// A tracker for pages of `page_size` bytes; nothing counted yet.
    pub fn new(page_size: u64) -> Self {
        Self {
            page_size,
            period_start_ms: None,
            dirty_pages: 0,
            transferred_at_start: 0,
            dirty_pages_rate: 0,
        }
    }

    /// Records a sync; returns the period it closes, if any.
    pub fn on_sync(&mut self, sync: &SyncReport) -> Option<DirtyPeriod> {
        let start = *self.period_start_ms.get_or_insert(sync.started_ms);
        self.dirty_pages = self.dirty_pages.saturating_add(sync.newly_dirty_pages);
        if sync.finished_ms <= start.saturating_add(DIRTY_PERIOD_MS) {
            return None;
        }
        let duration_ms = sync.finished_ms - start;
        let period = DirtyPeriod {
            duration_ms,
            dirty_pages: self.dirty_pages,
            dirty_bytes: self.dirty_pages.saturating_mul(self.page_size),
            transferred_bytes: sync
                .transferred_bytes
                .saturating_sub(self.transferred_at_start),
            dirty_pages_rate: self.dirty_pages.saturating_mul(1000) / duration_ms,
        };
        self.dirty_pages_rate = period.dirty_pages_rate;
        self.period_start_ms = Some(sync.finished_ms);
        self.dirty_pages = 0;
        self.transferred_at_start = sync.transferred_bytes;
        Some(period)
    }

    /// Starts a new period now (QEMU's `mig_throttle_counter_reset`).
    pub fn reset(&mut self, now_ms: u64, transferred_bytes: u64) {
        self.period_start_ms = Some(now_ms);
        self.dirty_pages = 0;
        self.transferred_at_start = transferred_bytes;
    }

    /// Pages dirtied per second in the last closed period (query-migrate's `dirty-pages-rate`).
    pub fn dirty_pages_rate(&self) -> u64 {
        self.dirty_pages_rate
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn limits(downtime_limit_ms: u64) -> SwitchoverLimits {
        SwitchoverLimits {
            downtime_limit_ms,
            switchover_bandwidth: 0,
        }
    }

    fn at(ms: u64, bytes: u64) -> Progress {
        Progress {
            now_ns: ms * MS,
            transferred_bytes: bytes,
            transferred_pages: bytes / 4096,
            dirty_bytes_last_sync: 0,
            dirty_pages_rate: 0,
        }
    }

    #[test]
    fn windows_shorter_than_100ms_are_not_measured() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(300));
        assert_eq!(est.update(&at(99, 5_000_000), &limits(300)), None);
        assert_eq!(est.threshold_bytes(), 0, "bandwidth unknown: threshold 0");
        assert_eq!(est.bandwidth(), 0.0);
        let rates = est.update(&at(100, 10_000_000), &limits(300)).unwrap();
        assert_eq!(rates.duration, Duration::from_millis(100));
        assert_eq!(rates.bytes, 10_000_000);
        assert_eq!(rates.bytes_per_sec, 100_000_000.0);
    }

    #[test]
    fn bytes_queued_on_the_sockets_count_as_pending() {
        // 1 MB dirty fits a 3 MB budget; with 4 MB still queued it does not: drain first.
        assert_eq!(after_sync(1 << 20, 0, 3 << 20, true), AfterSync::Complete);
        assert_eq!(
            after_sync(1 << 20, 1 << 20, 3 << 20, true),
            AfterSync::Complete
        );
        assert_eq!(
            after_sync(1 << 20, 4 << 20, 3 << 20, true),
            AfterSync::DrainFirst
        );
        // Too much dirty whatever the queue: iterate.
        assert_eq!(after_sync(4 << 20, 0, 3 << 20, true), AfterSync::Iterate);
        assert_eq!(
            after_sync(4 << 20, 1 << 20, 3 << 20, true),
            AfterSync::Iterate
        );
        // Nothing dirty and nothing queued completes before the bandwidth is known; with
        // bytes still queued it waits for them.
        assert_eq!(after_sync(0, 0, 0, true), AfterSync::Complete);
        assert_eq!(after_sync(0, 64 << 10, 0, true), AfterSync::DrainFirst);
        // A switchover-ack still awaited holds everything back.
        assert_eq!(after_sync(0, 0, 3 << 20, false), AfterSync::Iterate);
        assert_eq!(
            after_sync(1 << 20, 4 << 20, 3 << 20, false),
            AfterSync::Iterate
        );
    }

    #[test]
    fn threshold_is_bandwidth_times_downtime_limit() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(300));
        est.update(&at(100, 10_000_000), &limits(300)).unwrap();
        assert_eq!(est.threshold_bytes(), 30_000_000);
        assert_eq!(est.mbps(), 800.0);
        assert_eq!(est.pages_per_second(), 24_410); // 2441 pages in 0.1 s
                                                    // downtime-limit is read at each update.
        est.update(&at(200, 20_000_000), &limits(50)).unwrap();
        assert_eq!(est.threshold_bytes(), 5_000_000);
    }

    #[test]
    fn switchover_bandwidth_overrides_the_estimate() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(300));
        let lim = SwitchoverLimits {
            downtime_limit_ms: 300,
            switchover_bandwidth: 1_000_000_000,
        };
        est.update(&at(100, 10_000_000), &lim).unwrap();
        assert_eq!(est.threshold_bytes(), 300_000_000);
        assert_eq!(est.mbps(), 800.0, "reported throughput stays measured");
    }

    #[test]
    fn expected_downtime_starts_at_the_limit_and_needs_dirty_rate_and_traffic() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(300));
        assert_eq!(est.expected_downtime_ms(), 300);
        // No dirty rate yet: unchanged.
        let mut p = at(100, 10_000_000);
        p.dirty_bytes_last_sync = 5_000_000;
        est.update(&p, &limits(300)).unwrap();
        assert_eq!(est.expected_downtime_ms(), 300);
        // Dirty rate known, 10 MB in the window at 100 MB/s: 5 MB takes 50 ms.
        let mut p = at(200, 20_000_000);
        p.dirty_bytes_last_sync = 5_000_000;
        p.dirty_pages_rate = 1000;
        est.update(&p, &limits(300)).unwrap();
        assert_eq!(est.expected_downtime_ms(), 50);
        // A window of only 10000 bytes does not recompute it.
        let mut p = at(300, 20_010_000);
        p.dirty_bytes_last_sync = 1;
        p.dirty_pages_rate = 1000;
        est.update(&p, &limits(300)).unwrap();
        assert_eq!(est.expected_downtime_ms(), 50);
    }

    #[test]
    fn a_lucky_fast_window_does_not_raise_the_threshold_but_a_slow_one_lowers_it() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(1000));
        let mut bytes = 0;
        for ms in (100..=2000).step_by(100) {
            bytes += 10_000_000; // 100 MB/s
            est.update(&at(ms, bytes), &limits(1000)).unwrap();
        }
        assert_eq!(est.threshold_bytes(), 100_000_000);
        bytes += 30_000_000; // one window at 300 MB/s
        est.update(&at(2100, bytes), &limits(1000)).unwrap();
        assert!(
            est.threshold_bytes() < 120_000_000,
            "{}",
            est.threshold_bytes()
        );
        assert_eq!(est.last_window().unwrap().bytes_per_sec, 300_000_000.0);
        bytes += 2_000_000; // one window at 20 MB/s
        est.update(&at(2200, bytes), &limits(1000)).unwrap();
        assert_eq!(est.threshold_bytes(), 20_000_000);
    }

    #[test]
    fn restart_drops_the_current_window() {
        let mut est = BandwidthEstimator::new(&at(0, 0), &limits(300));
        est.restart(&at(500, 1_000_000_000));
        assert_eq!(est.update(&at(550, 1_000_000_000), &limits(300)), None);
        let rates = est.update(&at(600, 1_001_000_000), &limits(300)).unwrap();
        assert_eq!(rates.bytes, 1_000_000);
    }

    #[test]
    fn completed_mbps_excludes_setup_time() {
        assert_eq!(completed_mbps(125_000_000, 1100, 100), 1000.0);
        assert_eq!(completed_mbps(1, 100, 100), 0.0);
    }

    #[test]
    fn switchover_rule_follows_qemu() {
        use Pending::{Estimate, Exact};
        use SwitchoverDecision::{Complete, Iterate, SyncExactly};
        // First iteration: bandwidth unknown, threshold 0.
        assert_eq!(switchover_decision(Estimate(1 << 30), 0, true), Iterate);
        assert_eq!(switchover_decision(Estimate(0), 0, true), SyncExactly);
        assert_eq!(switchover_decision(Exact(0), 0, true), Complete);
        assert_eq!(switchover_decision(Exact(1), 0, true), Iterate);
        // Bandwidth known.
        assert_eq!(switchover_decision(Estimate(1001), 1000, true), Iterate);
        assert_eq!(switchover_decision(Estimate(1000), 1000, true), SyncExactly);
        assert_eq!(switchover_decision(Exact(999), 1000, true), Complete);
        assert_eq!(
            switchover_decision(Exact(1000), 1000, true),
            Iterate,
            "strictly under"
        );
        assert_eq!(switchover_decision(Exact(5000), 1000, true), Iterate);
        // Waiting for switchover-ack.
        assert_eq!(switchover_decision(Estimate(10), 1000, false), SyncExactly);
        assert_eq!(switchover_decision(Exact(10), 1000, false), Iterate);
        assert_eq!(switchover_decision(Exact(0), 1000, false), Iterate);
    }

    fn sync(started_ms: u64, finished_ms: u64, pages: u64, sent: u64) -> SyncReport {
        SyncReport {
            started_ms,
            finished_ms,
            newly_dirty_pages: pages,
            transferred_bytes: sent,
        }
    }

    #[test]
    fn dirty_period_closes_only_after_more_than_one_second() {
        let mut t = DirtyPeriodTracker::new(4096);
        assert_eq!(
            t.on_sync(&sync(0, 50, 1000, 0)),
            None,
            "setup sync opens the period"
        );
        assert_eq!(t.on_sync(&sync(600, 610, 200, 1_000_000)), None);
        assert_eq!(
            t.on_sync(&sync(990, 1000, 300, 2_000_000)),
            None,
            "exactly 1 s is not more"
        );
        let period = t.on_sync(&sync(1000, 1001, 500, 3_000_000)).unwrap();
        assert_eq!(
            period,
            DirtyPeriod {
                duration_ms: 1001,
                dirty_pages: 2000,
                dirty_bytes: 2000 * 4096,
                transferred_bytes: 3_000_000,
                dirty_pages_rate: 2000 * 1000 / 1001,
            }
        );
        assert_eq!(t.dirty_pages_rate(), 1998);
    }

    #[test]
    fn next_period_starts_where_the_last_one_closed() {
        let mut t = DirtyPeriodTracker::new(4096);
        t.on_sync(&sync(0, 10, 0, 0));
        t.on_sync(&sync(1500, 1500, 100, 5_000)).unwrap();
        assert_eq!(t.on_sync(&sync(2400, 2500, 10, 6_000)), None);
        let p = t.on_sync(&sync(2500, 2600, 90, 9_000)).unwrap();
        assert_eq!(p.duration_ms, 1100);
        assert_eq!(p.dirty_pages, 100);
        assert_eq!(p.transferred_bytes, 4_000);
        assert_eq!(p.dirty_pages_rate, 90);
    }

    #[test]
    fn reset_restarts_the_period() {
        let mut t = DirtyPeriodTracker::new(4096);
        t.on_sync(&sync(0, 10, 500, 0));
        t.reset(900, 7_000);
        assert_eq!(t.on_sync(&sync(1500, 1600, 10, 8_000)), None);
        let p = t.on_sync(&sync(1900, 1901, 10, 9_000)).unwrap();
        assert_eq!(p.dirty_pages, 20);
        assert_eq!(p.transferred_bytes, 2_000);
    }
}
