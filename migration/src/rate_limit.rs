//! `max-bandwidth` as QEMU enforces it, a budget per 100 ms window, made exact.
//!
//! QEMU (`migration/migration-stats.c`) gives every window of `BUFFER_DELAY`
//! (100 ms) a budget of `max-bandwidth / XFER_LIMIT_RATIO` bytes, shared by the
//! main stream and every multifd channel; a sender that finds the budget spent
//! sleeps until the window ends. `0` (`RATE_LIMIT_DISABLED`) means unlimited,
//! and the final switchover runs unlimited.
//!
//! QEMU forgets what the last write of a window overshot and starts each new
//! window at the time the migration thread happened to look, so its long-run
//! rate drifts from the setting. [`RateLimiter`] keeps QEMU's window and budget
//! but is exact over time:
//!
//! - windows sit on a fixed grid (`start + k * 100 ms`), so a late wake-up
//!   does not stretch the next window;
//! - an overshoot is debt carried into the next window;
//! - a budget left unused when a window ends is dropped (no burst after idle);
//! - budgets that are not whole bytes (`max-bandwidth` not a multiple of 10)
//!   carry their remainder, so even 5 bytes/s is honoured;
//! - a sender blocks on a condition variable until the window ends and is
//!   woken at once when the limit changes, is lifted, or the migration is
//!   cancelled.
//!
//! Over any interval the bytes let through differ from `limit * interval` by
//! at most one window's budget plus the overshoot of the last writes; over
//! whole windows the rate is exact.
//!
//! The fast path (budget left in the current window) is a few atomic loads
//! and one clock read; the lock is taken only to start a new window or to wait.
//!
//! Time comes from a [`Clock`]: [`MonotonicClock`] in production,
//! [`ManualClock`] in tests, where waiting simply moves time forward.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Length of one rate-limit window (QEMU's `BUFFER_DELAY`).
pub const BUFFER_DELAY: Duration = Duration::from_millis(100);

/// Windows per second: the budget of a window is `limit / XFER_LIMIT_RATIO`.
pub const XFER_LIMIT_RATIO: u64 = 10;

/// The limit value meaning "no limit" (QEMU's `RATE_LIMIT_DISABLED`).
pub const RATE_LIMIT_DISABLED: u64 = 0;

const WINDOW_NS: u64 = 100_000_000;

/// Errors of a blocked sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// The migration was cancelled while the sender waited for budget.
    #[error("migration cancelled while waiting for bandwidth budget")]
    Cancelled,
}

/// A source of monotonic time and a way to wait on it.
pub trait Clock: Send + Sync {
    /// Nanoseconds since this clock's fixed origin; never decreases.
    fn now_ns(&self) -> u64;

    /// Waits on `cv` (releasing `guard`) until `deadline_ns` or a notification.
    ///
    /// May return early (spurious wake-ups); callers re-check their condition.
    fn wait_until<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T>;
}

/// The real clock: `std::time::Instant` and `Condvar::wait_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn wait_until<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T> {
        let now = self.now_ns();
        if deadline_ns <= now {
            return guard;
        }
        let timeout = Duration::from_nanos(deadline_ns - now);
        match cv.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

/// A clock that only moves when told to, or when someone waits on it.
///
/// Waiting until a deadline moves the clock to that deadline and returns at
/// once, as if the wait had timed out: single-threaded tests of waiting code
/// run instantly and see exact times.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(start_ns),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.now.fetch_add(ns, Ordering::SeqCst);
    }

    /// Moves the clock to `ns` if that is later than its reading.
    pub fn advance_to(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn wait_until<'a, T>(
        &self,
        _cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T> {
        self.advance_to(deadline_ns);
        guard
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }

    fn wait_until<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T> {
        (**self).wait_until(cv, guard, deadline_ns)
    }
}

impl<C: Clock> Clock for &C {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }

    fn wait_until<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline_ns: u64,
    ) -> MutexGuard<'a, T> {
        (**self).wait_until(cv, guard, deadline_ns)
    }
}

/// Window bookkeeping changed only under the lock.
#[derive(Debug)]
struct Window {
    /// Clock time at which the current window started.
    start_ns: u64,
    /// Tenths of a byte of budget owed to the coming windows.
    remainder: u64,
}

/// Budget of `windows` consecutive windows at `limit` bytes/s, carrying tenths.
fn budget_of(limit: u64, windows: u64, remainder: &mut u64) -> u64 {
    let ratio = u128::from(XFER_LIMIT_RATIO);
    let tenths = u128::from(limit) * u128::from(windows) + u128::from(*remainder);
    // The remainder is below XFER_LIMIT_RATIO, so it fits.
    *remainder = u64::try_from(tenths % ratio).unwrap_or(0);
    u64::try_from(tenths / ratio).unwrap_or(u64::MAX)
}

/// The budget of one window rounded up (QEMU's `limit / XFER_LIMIT_RATIO`, exact).
fn window_budget_ceil(limit: u64) -> u64 {
    limit.div_ceil(XFER_LIMIT_RATIO)
}

/// One migration's bandwidth limit, shared by all its sending threads.
///
/// `Sync`: share it behind an `Arc`. Senders call [`acquire`](Self::acquire)
/// (or [`wait_for_budget`](Self::wait_for_budget) then
/// [`account`](Self::account)); the QMP thread calls
/// [`set_limit`](Self::set_limit); the migration thread calls
/// [`lift`](Self::lift) for the switchover and [`cancel`](Self::cancel) to
/// release every blocked sender.
#[derive(Debug)]
pub struct RateLimiter<C: Clock = MonotonicClock> {
    clock: C,
    /// Bytes per second; `0` = unlimited.
    limit: AtomicU64,
    lifted: AtomicBool,
    cancelled: AtomicBool,
    /// Bytes accounted since creation, by every channel.
    sent: AtomicU64,
    /// Value of `sent` below which the current window still has budget.
    mark: AtomicU64,
    /// Clock time at which the current window ends.
    window_end_ns: AtomicU64,
    window: Mutex<Window>,
    wake: Condvar,
}

impl RateLimiter<MonotonicClock> {
    /// A limiter at `bytes_per_sec` (`0` = unlimited) on the real clock.
    pub fn with_limit(bytes_per_sec: u64) -> Self {
        Self::new(bytes_per_sec, MonotonicClock::new())
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter at `bytes_per_sec` (`0` = unlimited); its first window starts now.
    pub fn new(bytes_per_sec: u64, clock: C) -> Self {
        let now = clock.now_ns();
        let mut remainder = 0;
        let first = budget_of(bytes_per_sec, 1, &mut remainder);
        Self {
            clock,
            limit: AtomicU64::new(bytes_per_sec),
            lifted: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            mark: AtomicU64::new(first),
            window_end_ns: AtomicU64::new(now.saturating_add(WINDOW_NS)),
            window: Mutex::new(Window {
                start_ns: now,
                remainder,
            }),
            wake: Condvar::new(),
        }
    }

    /// The clock this limiter reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The configured limit in bytes per second (`0` = unlimited).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// The budget of one window at the configured limit (QEMU's `rate_limit_max`).
    pub fn window_budget(&self) -> u64 {
        self.limit() / XFER_LIMIT_RATIO
    }

    /// Total bytes accounted by every channel since creation.
    pub fn transferred(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Bytes sent beyond the current window's budget, owed to the next windows.
    pub fn debt(&self) -> u64 {
        self.sent
            .load(Ordering::Acquire)
            .saturating_sub(self.mark.load(Ordering::Acquire))
    }

    /// Whether the limit is lifted for the switchover.
    pub fn is_lifted(&self) -> bool {
        self.lifted.load(Ordering::Acquire)
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Records `bytes` as sent by some channel (never blocks).
    pub fn account(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Blocks until the current window has budget, then accounts `bytes`.
    ///
    /// The write that follows may overshoot the budget; the overshoot is debt
    /// paid by the next window.
    pub fn acquire(&self, bytes: u64) -> Result<(), RateLimitError> {
        self.wait_for_budget()?;
        self.account(bytes);
        Ok(())
    }

    /// Blocks until the current window has budget (QEMU's `migration_rate_limit`).
    pub fn wait_for_budget(&self) -> Result<(), RateLimitError> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(RateLimitError::Cancelled);
        }
        if self.unlimited() {
            return Ok(());
        }
        let now = self.clock.now_ns();
        if now < self.window_end_ns.load(Ordering::Acquire) && self.has_budget_in_window() {
            return Ok(());
        }
        self.wait_slow()
    }

    /// Whether a sender may write now (the negation of QEMU's `migration_rate_exceeded`).
    pub fn has_budget(&self) -> bool {
        if self.cancelled.load(Ordering::Acquire) {
            return false;
        }
        if self.unlimited() {
            return true;
        }
        let now = self.clock.now_ns();
        if now < self.window_end_ns.load(Ordering::Acquire) {
            return self.has_budget_in_window();
        }
        let mut window = self.lock();
        self.roll(&mut window, now);
        self.has_budget_in_window()
    }

    /// Sets the limit in bytes per second (`0` = unlimited), effective at once.
    ///
    /// The current window is settled at the old limit and a new window starts
    /// now with the new budget; debt is carried, unused budget is dropped.
    /// While the limit is lifted the new value waits for [`restore`](Self::restore).
    pub fn set_limit(&self, bytes_per_sec: u64) {
        let mut window = self.lock();
        let now = self.clock.now_ns();
        let old = self.limit.load(Ordering::Acquire);
        let lifted = self.lifted.load(Ordering::Acquire);
        if old != RATE_LIMIT_DISABLED && !lifted {
            self.roll(&mut window, now);
        }
        self.limit.store(bytes_per_sec, Ordering::Release);
        if bytes_per_sec != RATE_LIMIT_DISABLED && !lifted {
            self.start_window(&mut window, now, old != RATE_LIMIT_DISABLED);
        }
        drop(window);
        self.wake.notify_all();
    }

    /// Suspends the limit (the final switchover runs unlimited); wakes every sender.
    pub fn lift(&self) {
        let window = self.lock();
        self.lifted.store(true, Ordering::Release);
        drop(window);
        self.wake.notify_all();
    }

    /// Ends a [`lift`](Self::lift): a new window starts now; bytes sent while
    /// lifted are not charged.
    pub fn restore(&self) {
        let mut window = self.lock();
        let now = self.clock.now_ns();
        if self.lifted.swap(false, Ordering::AcqRel)
            && self.limit.load(Ordering::Acquire) != RATE_LIMIT_DISABLED
        {
            self.start_window(&mut window, now, false);
        }
        drop(window);
        self.wake.notify_all();
    }

    /// Cancels the migration: every blocked and future wait fails.
    pub fn cancel(&self) {
        let window = self.lock();
        self.cancelled.store(true, Ordering::Release);
        drop(window);
        self.wake.notify_all();
    }

    fn unlimited(&self) -> bool {
        self.limit.load(Ordering::Acquire) == RATE_LIMIT_DISABLED
            || self.lifted.load(Ordering::Acquire)
    }

    fn has_budget_in_window(&self) -> bool {
        // Load the mark first: a stale mark can only be lower than the real one.
        let mark = self.mark.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire) < mark
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_slow(&self) -> Result<(), RateLimitError> {
        let mut window = self.lock();
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return Err(RateLimitError::Cancelled);
            }
            if self.unlimited() {
                return Ok(());
            }
            let now = self.clock.now_ns();
            self.roll(&mut window, now);
            if self.has_budget_in_window() {
                return Ok(());
            }
            let deadline = window.start_ns.saturating_add(WINDOW_NS);
            window = self.clock.wait_until(&self.wake, window, deadline);
        }
    }

    /// Moves to the window containing `now`, granting the budgets of the
    /// windows that passed, minus debt, without saving unused budget.
    fn roll(&self, window: &mut Window, now: u64) {
        if now < window.start_ns.saturating_add(WINDOW_NS) {
            return;
        }
        let passed = (now - window.start_ns) / WINDOW_NS;
        window.start_ns = window
            .start_ns
            .saturating_add(passed.saturating_mul(WINDOW_NS));
        let limit = self.limit.load(Ordering::Acquire);
        let granted = budget_of(limit, passed, &mut window.remainder);
        let sent = self.sent.load(Ordering::Acquire);
        let old_mark = self.mark.load(Ordering::Acquire);
        let cap = sent.saturating_add(window_budget_ceil(limit));
        let mark = old_mark.saturating_add(granted).min(cap);
        self.mark.store(mark, Ordering::Release);
        self.window_end_ns
            .store(window.start_ns.saturating_add(WINDOW_NS), Ordering::Release);
    }

    /// Starts a fresh window at `now` with one budget at the current limit.
    fn start_window(&self, window: &mut Window, now: u64, carry_debt: bool) {
        window.start_ns = now;
        window.remainder = 0;
        let limit = self.limit.load(Ordering::Acquire);
        let first = budget_of(limit, 1, &mut window.remainder);
        let sent = self.sent.load(Ordering::Acquire);
        let base = if carry_debt {
            self.mark.load(Ordering::Acquire).min(sent)
        } else {
            sent
        };
        self.mark
            .store(base.saturating_add(first), Ordering::Release);
        self.window_end_ns
            .store(now.saturating_add(WINDOW_NS), Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::thread;

    const MS: u64 = 1_000_000;

    fn limiter(limit: u64) -> RateLimiter<Arc<ManualClock>> {
        RateLimiter::new(limit, Arc::new(ManualClock::new(0)))
    }

    /// Acquires `chunk`-byte writes until the clock reaches `until_ns`;
    /// returns the bytes granted before `until_ns`.
    fn granted_before(rl: &RateLimiter<Arc<ManualClock>>, chunk: u64, until_ns: u64) -> u64 {
        let mut granted = 0;
        loop {
            rl.wait_for_budget().expect("not cancelled");
            if rl.clock().now_ns() >= until_ns {
                return granted;
            }
            rl.account(chunk);
            granted += chunk;
        }
    }

    #[test]
    fn window_budget_is_a_tenth_of_the_limit_per_100ms() {
        let rl = limiter(1000);
        assert_eq!(rl.window_budget(), 100);
        rl.acquire(60).unwrap();
        rl.acquire(39).unwrap();
        assert_eq!(rl.clock().now_ns(), 0, "99 of 100 bytes: no wait yet");
        rl.acquire(1).unwrap();
        assert_eq!(rl.clock().now_ns(), 0, "one byte of budget was left");
        assert!(!rl.has_budget());
        rl.acquire(10).unwrap();
        assert_eq!(rl.clock().now_ns(), 100 * MS, "waited for the next window");
        assert_eq!(rl.transferred(), 110);
    }

    #[test]
    fn overshoot_is_carried_as_debt_into_following_windows() {
        let rl = limiter(1000);
        rl.acquire(250).unwrap();
        assert_eq!(rl.debt(), 150);
        rl.wait_for_budget().unwrap();
        // Window 1 pays 100 of the debt, window 2 the last 50 and leaves 50.
        assert_eq!(rl.clock().now_ns(), 200 * MS);
        assert_eq!(rl.debt(), 0);
        rl.acquire(49).unwrap();
        rl.acquire(1).unwrap();
        assert_eq!(rl.clock().now_ns(), 200 * MS);
        rl.wait_for_budget().unwrap();
        assert_eq!(rl.clock().now_ns(), 300 * MS);
    }

    #[test]
    fn long_run_rate_is_exact_despite_overshooting_chunks() {
        // 7-byte writes never divide the 100-byte budget: QEMU would overshoot
        // every window and send 1050 bytes/s; debt keeps it at 1000.
        let rl = limiter(1000);
        let granted = granted_before(&rl, 7, 10_000 * MS);
        assert!((10_000..10_007).contains(&granted), "granted {granted}");
    }

    #[test]
    fn fractional_budgets_carry_their_remainder() {
        // 15 bytes/s: windows of 1.5 bytes alternate 1 and 2.
        let rl = limiter(15);
        assert_eq!(granted_before(&rl, 1, 10_000 * MS), 150);
        // 5 bytes/s: QEMU's budget would be 0 (= unlimited); ours is one byte per 200 ms.
        let rl = limiter(5);
        assert_eq!(granted_before(&rl, 1, 1_000 * MS), 5);
    }

    #[test]
    fn unused_budget_is_not_saved_for_later() {
        let rl = limiter(1000);
        rl.acquire(50).unwrap();
        rl.clock().advance(Duration::from_secs(1));
        let start = rl.clock().now_ns();
        let burst = granted_before(&rl, 1, start + 1);
        assert_eq!(burst, 100, "one window's budget, not ten");
    }

    #[test]
    fn windows_stay_on_their_grid_when_the_sender_is_late() {
        let rl = limiter(1000);
        rl.acquire(100).unwrap();
        // The sender comes back 30 ms into window 1: window 1 still ends at 200 ms.
        rl.clock().advance_to(130 * MS);
        rl.acquire(100).unwrap();
        rl.wait_for_budget().unwrap();
        assert_eq!(rl.clock().now_ns(), 200 * MS);
    }

    #[test]
    fn raising_the_limit_takes_effect_at_once() {
        let rl = limiter(1000);
        rl.acquire(100).unwrap();
        assert!(!rl.has_budget());
        rl.clock().advance_to(40 * MS);
        rl.set_limit(2000);
        assert!(rl.has_budget(), "a new window starts with the new budget");
        assert_eq!(granted_before(&rl, 1, 40 * MS + 1), 200);
        rl.wait_for_budget().unwrap();
        assert_eq!(
            rl.clock().now_ns(),
            140 * MS,
            "the grid restarts at the change"
        );
    }

    #[test]
    fn lowering_the_limit_keeps_the_debt() {
        let rl = limiter(10_000);
        rl.acquire(1_500).unwrap(); // 500 over the 1000-byte budget
        rl.set_limit(1_000);
        assert_eq!(rl.debt(), 400, "500 of debt minus the new 100-byte window");
        rl.wait_for_budget().unwrap();
        assert_eq!(rl.clock().now_ns(), 500 * MS);
        assert_eq!(rl.limit(), 1_000);
        assert_eq!(rl.window_budget(), 100);
    }

    #[test]
    fn lifted_limit_lets_everything_through_and_restore_starts_clean() {
        let rl = limiter(1000);
        rl.acquire(100).unwrap();
        rl.lift();
        assert!(rl.is_lifted());
        for _ in 0..100 {
            rl.acquire(1 << 20).unwrap();
        }
        assert_eq!(rl.clock().now_ns(), 0, "never waited while lifted");
        rl.restore();
        assert!(!rl.is_lifted());
        assert_eq!(rl.debt(), 0, "bytes sent while lifted are not charged");
        assert_eq!(granted_before(&rl, 1, 1), 100);
        rl.wait_for_budget().unwrap();
        assert_eq!(rl.clock().now_ns(), 100 * MS);
    }

    #[test]
    fn zero_means_unlimited_and_can_be_set_live() {
        let rl = limiter(RATE_LIMIT_DISABLED);
        for _ in 0..1000 {
            rl.acquire(1 << 30).unwrap();
        }
        assert_eq!(rl.clock().now_ns(), 0);
        rl.set_limit(1000);
        assert_eq!(rl.debt(), 0, "unlimited bytes are not debt");
        assert_eq!(granted_before(&rl, 10, 1), 100);
        rl.set_limit(RATE_LIMIT_DISABLED);
        let before = rl.clock().now_ns();
        for _ in 0..1000 {
            rl.acquire(1 << 30).unwrap();
        }
        assert_eq!(rl.clock().now_ns(), before);
    }

    #[test]
    fn cancel_fails_waits() {
        let rl = limiter(1000);
        rl.cancel();
        assert_eq!(rl.wait_for_budget(), Err(RateLimitError::Cancelled));
        assert_eq!(rl.acquire(1), Err(RateLimitError::Cancelled));
        assert!(!rl.has_budget());
    }

    /// Spawns a sender stuck behind ~1 day of debt; returns how long it waited.
    fn blocked_sender_released_by(
        release: impl FnOnce(&RateLimiter),
    ) -> (Duration, Result<(), RateLimitError>) {
        let rl = Arc::new(RateLimiter::with_limit(10));
        rl.account(1 << 20);
        let waiter = {
            let rl = Arc::clone(&rl);
            thread::spawn(move || {
                let start = Instant::now();
                let result = rl.wait_for_budget();
                (start.elapsed(), result)
            })
        };
        thread::sleep(Duration::from_millis(50));
        release(&rl);
        waiter.join().expect("waiter thread")
    }

    #[test]
    fn cancel_wakes_a_blocked_sender_promptly() {
        let (waited, result) = blocked_sender_released_by(RateLimiter::cancel);
        assert_eq!(result, Err(RateLimitError::Cancelled));
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    }

    #[test]
    fn lift_wakes_a_blocked_sender_promptly() {
        let (waited, result) = blocked_sender_released_by(RateLimiter::lift);
        assert_eq!(result, Ok(()));
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    }

    #[test]
    fn disabling_the_limit_wakes_a_blocked_sender_promptly() {
        let (waited, result) = blocked_sender_released_by(|rl| rl.set_limit(0));
        assert_eq!(result, Ok(()));
        assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    }

    #[test]
    fn two_threads_on_the_real_clock_get_the_configured_rate() {
        const LIMIT: u64 = 256 << 20;
        const CHUNK: u64 = 64 << 10;
        const RUN: Duration = Duration::from_secs(1);
        let rl = Arc::new(RateLimiter::with_limit(LIMIT));
        let deadline = u64::try_from(RUN.as_nanos()).unwrap();
        let senders: Vec<_> = (0..2)
            .map(|_| {
                let rl = Arc::clone(&rl);
                thread::spawn(move || {
                    let mut granted = 0u64;
                    while rl.acquire(CHUNK).is_ok() {
                        if rl.clock().now_ns() >= deadline {
                            break;
                        }
                        granted += CHUNK;
                    }
                    granted
                })
            })
            .collect();
        let total: u64 = senders.into_iter().map(|s| s.join().expect("sender")).sum();
        let rate = total as f64 / RUN.as_secs_f64();
        let error = (rate / LIMIT as f64 - 1.0) * 100.0;
        assert!(
            error.abs() < 10.0,
            "achieved {rate:.0} B/s, error {error:.2}%"
        );
    }
}
