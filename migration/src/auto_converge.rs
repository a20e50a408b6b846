//! Auto-converge: QEMU's rule for throttling vCPUs that dirty memory faster
//! than the migration sends it, and the vCPU-side throttle it drives.
//!
//! The rule (`migration_trigger_throttle` and `mig_throttle_guest_down` in
//! QEMU 8.1's `migration/ram.c`) is judged on every closed dirty-sync period
//! (a sync more than 1 s after the period started, see
//! [`DirtyPeriodTracker`](crate::convergence::DirtyPeriodTracker)):
//!
//! 1. the period is *high* when the bytes dirtied exceed
//!    `throttle-trigger-threshold` % of the bytes sent in it;
//! 2. every high period increments a counter (a low period does not reset
//!    it); at 2 the counter resets and, with the `auto-converge` capability on,
//!    the guest is throttled down:
//!    - not throttling yet: `cpu-throttle-initial`;
//!    - otherwise the current percentage plus `cpu-throttle-increment`, or
//!      with `cpu-throttle-tailslow` plus
//!      `min(cpu_now - cpu_ideal, increment)` where `cpu_now = 100 - throttle`
//!      and `cpu_ideal = cpu_now * threshold_bytes / dirty_bytes`; then capped
//!      at `max-cpu-throttle`;
//! 3. the result is kept within [1, 99] (`cpu_throttle_set`). As in QEMU the
//!    initial percentage is not capped by `max-cpu-throttle`.
//!
//! Parameters are passed to every decision, so changes made during a
//! migration count from the next period.
//!
//! [`ThrottleSlice`] is the vCPU side (`cpu-throttle.c`): how long a vCPU
//! throttled at a percentage sleeps after each 10 ms of running.

use std::time::Duration;

use crate::convergence::DirtyPeriod;

/// Lowest throttle percentage once throttling (QEMU's `CPU_THROTTLE_PCT_MIN`).
pub const CPU_THROTTLE_PCT_MIN: u8 = 1;

/// Highest throttle percentage (QEMU's `CPU_THROTTLE_PCT_MAX`).
pub const CPU_THROTTLE_PCT_MAX: u8 = 99;

/// Running time between two throttle sleeps (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const CPU_THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);

/// High periods needed before each throttle step (QEMU's `dirty_rate_high_cnt >= 2`).
pub const HIGH_PERIODS_PER_STEP: u32 = 2;

/// The auto-converge settings, as set by `migrate-set-capabilities` and
/// `migrate-set-parameters`, read at each decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleParams {
    /// The `auto-converge` capability.
    pub auto_converge: bool,
    /// `throttle-trigger-threshold`, percent (1..=100).
    pub throttle_trigger_threshold: u8,
    /// `cpu-throttle-initial`, percent (1..=99).
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`, percent (1..=99).
    pub cpu_throttle_increment: u8,
    /// `cpu-throttle-tailslow`.
    pub cpu_throttle_tailslow: bool,
    /// `max-cpu-throttle`, percent (1..=99).
    pub max_cpu_throttle: u8,
}

impl Default for ThrottleParams {
    /// QEMU's defaults, with the capability off.
    fn default() -> Self {
        Self {
            auto_converge: false,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
        }
    }
}

/// Clamps a throttle percentage to [1, 99] as QEMU's `cpu_throttle_set` does.
pub fn clamp_throttle(pct: u8) -> u8 {
    clamp_pct(u64::from(pct))
}

fn clamp_pct(pct: u64) -> u8 {
    let clamped = pct.clamp(
        u64::from(CPU_THROTTLE_PCT_MIN),
        u64::from(CPU_THROTTLE_PCT_MAX),
    );
    u8::try_from(clamped).unwrap_or(CPU_THROTTLE_PCT_MAX)
}

/// The auto-converge trigger: counts high dirty periods, decides throttle steps.
#[derive(Debug, Clone, Default)]
pub struct AutoConverge {
    dirty_rate_high_cnt: u32,
}

impl AutoConverge {
    /// A trigger with no high period counted.
    pub fn new() -> Self {
        Self::default()
    }

    /// High periods counted toward the next step.
    pub fn high_periods(&self) -> u32 {
        self.dirty_rate_high_cnt
    }

    /// Judges a closed period; returns the new throttle percentage to apply, if any.
    ///
    /// `current_pct` is the throttle in force (`0` = not throttling).
    pub fn on_period(
        &mut self,
        period: &DirtyPeriod,
        params: &ThrottleParams,
        current_pct: u8,
    ) -> Option<u8> {
        let threshold_bytes = u128::from(period.transferred_bytes)
            * u128::from(params.throttle_trigger_threshold)
            / 100;
        let threshold_bytes = u64::try_from(threshold_bytes).unwrap_or(u64::MAX);
        if period.dirty_bytes <= threshold_bytes {
            return None;
        }
        self.dirty_rate_high_cnt += 1;
        if self.dirty_rate_high_cnt < HIGH_PERIODS_PER_STEP {
            return None;
        }
        self.dirty_rate_high_cnt = 0;
        if !params.auto_converge {
            return None;
        }
        Some(throttle_step(
            params,
            current_pct,
            period.dirty_bytes,
            threshold_bytes,
        ))
    }

    /// Forgets counted periods (QEMU's `mig_throttle_counter_reset`).
    pub fn reset(&mut self) {
        self.dirty_rate_high_cnt = 0;
    }
}

/// The next throttle percentage (QEMU's `mig_throttle_guest_down`).
pub fn throttle_step(
    params: &ThrottleParams,
    current_pct: u8,
    dirty_bytes: u64,
    threshold_bytes: u64,
) -> u8 {
    if current_pct == 0 {
        return clamp_pct(u64::from(params.cpu_throttle_initial));
    }
    let now = u64::from(current_pct);
    let increment = u64::from(params.cpu_throttle_increment);
    let step = if params.cpu_throttle_tailslow && dirty_bytes > 0 {
        // The CPU share that would bring the dirty rate down to the threshold.
        let cpu_now = 100u64.saturating_sub(now);
        let cpu_ideal = (cpu_now as f64 * (threshold_bytes as f64 / dirty_bytes as f64)) as u64;
        cpu_now.saturating_sub(cpu_ideal).min(increment)
    } else {
        increment
    };
    clamp_pct((now + step).min(u64::from(params.max_cpu_throttle)))
}

/// One throttle cycle of a vCPU: run, then sleep, so that it runs `100 - pct` % of the time.
///
/// QEMU kicks every vCPU each [`period`](Self::period) and the kicked vCPU
/// sleeps [`sleep`](Self::sleep) (up to 990 ms at 99 %). Older QEMU slept in
/// one `g_usleep`, which delayed a pause by up to that long; newer QEMU waits
/// on the vCPU's halt condition in millisecond steps and stops as soon as the
/// vCPU is asked to stop. Ferry keeps the full sleep (the throttle would not
/// hold otherwise) but requires the wait to be interruptible: the vCPU thread
/// must sleep on its condition variable to a fixed deadline and leave it when
/// a pause or state request arrives (the vmm's `interruptible_sleep`), so no
/// cap on a single sleep is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSlice {
    /// Running time between sleeps ([`CPU_THROTTLE_TIMESLICE`]).
    pub run: Duration,
    /// Sleep after each run: `pct / (100 - pct) * run`.
    pub sleep: Duration,
}

impl ThrottleSlice {
    /// The cycle at `pct` percent (clamped to [1, 99]); `None` when `pct` is 0.
    pub fn for_percentage(pct: u8) -> Option<Self> {
        if pct == 0 {
            return None;
        }
        let pct = u128::from(clamp_pct(u64::from(pct)));
        let run_ns = CPU_THROTTLE_TIMESLICE.as_nanos();
        // Rounded up: QEMU adds 1 ns to its floating-point result for the same reason.
        let sleep_ns = (pct * run_ns).div_ceil(100 - pct);
        Some(Self {
            run: CPU_THROTTLE_TIMESLICE,
            sleep: Duration::from_nanos(u64::try_from(sleep_ns).unwrap_or(u64::MAX)),
        })
    }

    /// Time between two throttle kicks of a vCPU: `run + sleep`
    /// (QEMU's timer period `CPU_THROTTLE_TIMESLICE_NS / (1 - pct)`).
    pub fn period(&self) -> Duration {
        self.run + self.sleep
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// A period of >1 s in which `dirty` MiB were dirtied while `sent` MiB were sent.
    fn period(dirty: u64, sent: u64) -> DirtyPeriod {
        DirtyPeriod {
            duration_ms: 1001,
            dirty_pages: dirty * MB / 4096,
            dirty_bytes: dirty * MB,
            transferred_bytes: sent * MB,
            dirty_pages_rate: dirty * MB / 4096,
        }
    }

    fn on() -> ThrottleParams {
        ThrottleParams {
            auto_converge: true,
            ..ThrottleParams::default()
        }
    }

    /// Feeds `periods` to a fresh trigger, applying each decision; returns the
    /// throttle after each period.
    fn run(periods: &[DirtyPeriod], params: &ThrottleParams) -> Vec<u8> {
        let mut ac = AutoConverge::new();
        let mut pct = 0;
        periods
            .iter()
            .map(|p| {
                if let Some(next) = ac.on_period(p, params, pct) {
                    pct = next;
                }
                pct
            })
            .collect()
    }

    #[test]
    fn no_throttle_before_two_high_periods() {
        let high = period(60, 100); // 60 MiB dirtied > 50% of 100 MiB sent
        assert_eq!(run(&[high], &on()), vec![0]);
        assert_eq!(run(&[high, high], &on()), vec![0, 20]);
    }

    #[test]
    fn exactly_at_the_threshold_is_not_high() {
        let at = period(50, 100);
        assert_eq!(run(&[at, at, at, at], &on()), vec![0, 0, 0, 0]);
    }

    #[test]
    fn a_low_period_does_not_reset_the_count() {
        let (high, low) = (period(60, 100), period(10, 100));
        assert_eq!(run(&[high, low, high], &on()), vec![0, 0, 20]);
    }

    #[test]
    fn throttle_starts_at_initial_then_steps_by_increment_up_to_max() {
        let high = period(90, 100);
        let params = ThrottleParams {
            max_cpu_throttle: 45,
            ..on()
        };
        let seq = run(&[high; 10], &params);
        assert_eq!(seq, vec![0, 20, 20, 30, 30, 40, 40, 45, 45, 45]);
    }

    #[test]
    fn default_max_caps_at_99() {
        let high = period(90, 100);
        let seq = run(&[high; 40], &on());
        assert_eq!(seq[1], 20);
        assert_eq!(seq[15], 90);
        assert_eq!(seq[17], 99);
        assert_eq!(*seq.last().unwrap(), 99);
    }

    #[test]
    fn tailslow_steps_toward_the_ideal_cpu_share() {
        let params = ThrottleParams {
            cpu_throttle_tailslow: true,
            cpu_throttle_increment: 30,
            ..on()
        };
        // 80 MiB dirtied, 100 sent, threshold 50 MiB: cpu_now 80,
        // cpu_ideal = 80 * 50 / 80 = 50, step min(30, 30) = 30.
        assert_eq!(throttle_step(&params, 20, 80 * MB, 50 * MB), 50);
        // 55 dirtied: cpu_ideal = 80 * 50 / 55 = 72.7 -> 72, step 8.
        assert_eq!(throttle_step(&params, 20, 55 * MB, 50 * MB), 28);
        // The increment still bounds the step.
        assert_eq!(throttle_step(&params, 20, 1000 * MB, 50 * MB), 50);
        // A whole sequence: initial 20, then the tailslow steps.
        let seq = run(&[period(55, 100); 6], &params);
        assert_eq!(seq, vec![0, 20, 20, 28, 28, 35]);
    }

    #[test]
    fn initial_is_not_capped_by_max_but_by_99() {
        let params = ThrottleParams {
            cpu_throttle_initial: 60,
            max_cpu_throttle: 30,
            ..on()
        };
        assert_eq!(throttle_step(&params, 0, 1, 0), 60);
        assert_eq!(
            throttle_step(&params, 60, 1, 0),
            30,
            "next step caps at max"
        );
    }

    #[test]
    fn capability_off_counts_but_never_throttles() {
        let high = period(90, 100);
        let mut ac = AutoConverge::new();
        let off = ThrottleParams::default();
        assert_eq!(ac.on_period(&high, &off, 0), None);
        assert_eq!(ac.high_periods(), 1);
        assert_eq!(ac.on_period(&high, &off, 0), None);
        assert_eq!(ac.high_periods(), 0, "the count resets as in QEMU");
    }

    #[test]
    fn parameter_changes_mid_way_are_honoured() {
        let high = period(90, 100);
        let mut ac = AutoConverge::new();
        let mut params = on();
        let mut pct = 0;
        let mut step = |params: &ThrottleParams| {
            for _ in 0..2 {
                if let Some(next) = ac.on_period(&high, params, pct) {
                    pct = next;
                }
            }
            pct
        };
        assert_eq!(step(&params), 20);
        params.cpu_throttle_increment = 25;
        assert_eq!(step(&params), 45);
        params.max_cpu_throttle = 50;
        assert_eq!(step(&params), 50);
        // A higher trigger threshold makes the same period low.
        params.throttle_trigger_threshold = 95;
        params.max_cpu_throttle = 99;
        assert_eq!(step(&params), 50);
    }

    #[test]
    fn syncs_less_than_a_second_apart_are_judged_as_one_period() {
        use crate::convergence::{DirtyPeriodTracker, SyncReport};
        // Syncs every 500 ms dirtying far more than is sent: every period
        // closes after >1 s, i.e. every third sync, not every sync.
        let mut tracker = DirtyPeriodTracker::new(4096);
        let mut ac = AutoConverge::new();
        let mut pct = 0;
        let mut closed = 0;
        for i in 0..=6u64 {
            let sync = SyncReport {
                started_ms: i * 500,
                finished_ms: i * 500,
                newly_dirty_pages: 10_000,
                transferred_bytes: i * 1000,
            };
            if let Some(p) = tracker.on_sync(&sync) {
                closed += 1;
                if let Some(next) = ac.on_period(&p, &on(), pct) {
                    pct = next;
                }
            }
        }
        assert_eq!(closed, 2, "periods close at 1500 ms and 3000 ms");
        assert_eq!(pct, 20);
    }

    #[test]
    fn slice_sleeps_so_the_vcpu_runs_the_rest_of_the_time() {
        assert_eq!(ThrottleSlice::for_percentage(0), None);
        let s = ThrottleSlice::for_percentage(20).unwrap();
        assert_eq!(s.run, Duration::from_millis(10));
        assert_eq!(s.sleep, Duration::from_micros(2500));
        assert_eq!(s.period(), Duration::from_micros(12_500));
        assert_eq!(
            ThrottleSlice::for_percentage(50).unwrap().sleep,
            Duration::from_millis(10)
        );
        assert_eq!(
            ThrottleSlice::for_percentage(99).unwrap().sleep,
            Duration::from_millis(990)
        );
        assert_eq!(
            ThrottleSlice::for_percentage(100).unwrap().sleep,
            Duration::from_millis(990)
        );
        // 30%: 4.2857142... ms, rounded up to the nanosecond.
        assert_eq!(
            ThrottleSlice::for_percentage(30).unwrap().sleep,
            Duration::from_nanos(4_285_715)
        );
        for pct in 1..=99u8 {
            let s = ThrottleSlice::for_percentage(pct).unwrap();
            let sleeping = s.sleep.as_secs_f64() / s.period().as_secs_f64();
            assert!(
                (sleeping - f64::from(pct) / 100.0).abs() < 1e-6,
                "pct {pct}"
            );
        }
    }

    #[test]
    fn clamp_keeps_percentages_within_1_and_99() {
        assert_eq!(clamp_throttle(0), 1);
        assert_eq!(clamp_throttle(50), 50);
        assert_eq!(clamp_throttle(150), 99);
    }
}
