//! Rate limiter accuracy on the real clock, and the cost of its fast path.
//!
//! Accuracy: two sender threads copy 64 KiB chunks as fast as they can
//! through one limiter for 3 s at 32 MiB/s, 100 MB/s, 256 MiB/s, 1 GiB/s
//! and 2 GiB/s; the achieved rate is the bytes granted before the 3 s mark
//! divided by 3 s, and its error is printed in percent (at 100 MB/s the 3 s
//! total is not a whole number of chunks, so the last overshoot shows). The
//! same run through a model of QEMU's scheme (overshoot forgotten, a window
//! restarts when the sender looks) is printed alongside for comparison.
//!
//! Then criterion times `acquire` when unlimited and when within budget.
//!
//! `CARGO_TARGET_DIR=/work/target-h4 cargo bench -p migration --bench rate_limit`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use criterion::Criterion;
use migration::rate_limit::{Clock, MonotonicClock, RateLimiter};

const CHUNK: usize = 64 << 10;
const SENDERS: usize = 2;
const RUN: Duration = Duration::from_secs(3);
const WINDOW_NS: u64 = 100_000_000;

const RATES: [(u64, &str); 5] = [
    (32 << 20, "32 MiB/s"),
    (100_000_000, "100 MB/s"),
    (256 << 20, "256 MiB/s"),
    (1 << 30, "1 GiB/s"),
    (2 << 30, "2 GiB/s"),
];

/// Something senders ask before each chunk.
trait Limiter: Send + Sync {
    /// Blocks until the chunk may go, accounts it, returns the grant time (ns).
    fn grant(&self, bytes: u64) -> u64;
}

impl Limiter for RateLimiter {
    fn grant(&self, bytes: u64) -> u64 {
        // Never cancelled here.
        let _ = self.acquire(bytes);
        self.clock().now_ns()
    }
}

/// QEMU's scheme: `migration_rate_exceeded` (used > budget) and
/// `migration_update_counters` restarting the window at the time it looks.
struct QemuModel {
    clock: MonotonicClock,
    budget: u64,
    sent: AtomicU64,
    /// (window start ns, bytes at window start)
    window: Mutex<(u64, u64)>,
}

impl QemuModel {
    fn new(limit: u64) -> Self {
        Self {
            clock: MonotonicClock::new(),
            budget: limit / 10,
            sent: AtomicU64::new(0),
            window: Mutex::new((0, 0)),
        }
    }
}

impl Limiter for QemuModel {
    fn grant(&self, bytes: u64) -> u64 {
        loop {
            let now = self.clock.now_ns();
            let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
            if now >= window.0 + WINDOW_NS {
                *window = (now, self.sent.load(Ordering::Acquire));
            }
            let used = self.sent.load(Ordering::Acquire) - window.1;
            if used <= self.budget {
                break;
            }
            let wake = window.0 + WINDOW_NS;
            drop(window);
            thread::sleep(Duration::from_nanos(wake.saturating_sub(now)));
        }
        self.sent.fetch_add(bytes, Ordering::AcqRel);
        self.clock.now_ns()
    }
}

/// Runs the senders; returns the achieved rate's error in percent.
fn error_percent(limiter: Arc<dyn Limiter>, limit: u64) -> f64 {
    let deadline = RUN.as_nanos() as u64;
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let limiter = Arc::clone(&limiter);
            thread::spawn(move || {
                let src = vec![0x5au8; CHUNK];
                let mut dst = vec![0u8; CHUNK];
                let mut granted = 0u64;
                loop {
                    if limiter.grant(CHUNK as u64) >= deadline {
                        return granted;
                    }
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                    granted += CHUNK as u64;
                }
            })
        })
        .collect();
    let total: u64 = senders.into_iter().map(|s| s.join().unwrap_or(0)).sum();
    let rate = total as f64 / RUN.as_secs_f64();
    (rate / limit as f64 - 1.0) * 100.0
}

fn accuracy() {
    println!(
        "rate limiter accuracy: {SENDERS} senders, {} KiB chunks, {} s per rate",
        CHUNK >> 10,
        RUN.as_secs()
    );
    println!(
        "{:>10}  {:>12}  {:>12}",
        "limit", "Ferry error", "QEMU model"
    );
    for (limit, name) in RATES {
        let ferry = error_percent(Arc::new(RateLimiter::with_limit(limit)), limit);
        let qemu = error_percent(Arc::new(QemuModel::new(limit)), limit);
        println!("{name:>10}  {ferry:>+11.3}%  {qemu:>+11.3}%");
    }
}

fn fast_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit");
    group.measurement_time(Duration::from_secs(2));
    let unlimited = RateLimiter::with_limit(0);
    group.bench_function("acquire unlimited", |b| {
        b.iter(|| unlimited.acquire(black_box(CHUNK as u64)))
    });
    // A budget no sender can spend: every call is the fast path except the
    // one that starts each new window.
    let roomy = RateLimiter::with_limit(u64::MAX / 4);
    group.bench_function("acquire within budget", |b| {
        b.iter(|| roomy.acquire(black_box(CHUNK as u64)))
    });
    group.finish();
}

fn main() {
    accuracy();
    let mut c = Criterion::default().configure_from_args();
    fast_path(&mut c);
    c.final_summary();
}
