//! [`LatencyHistogram`]: lock-free log-linear histogram of durations (fault service times).
//!
//! Buckets are powers of two split into 16 linear steps, so a percentile read from it is at
//! most 1/16 (6.25 %) above the true value, from 1 ns to hours, in 1 KiB of counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

/// Counts of durations, recordable from any thread.
#[derive(Debug)]
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Median (µs).
    pub p50_us: f64,
    /// 90th percentile (µs).
    pub p90_us: f64,
    /// 99th percentile (µs).
    pub p99_us: f64,
    /// Largest sample (µs).
    pub max_us: f64,
    /// Mean (µs).
    pub mean_us: f64,
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (ns >> shift) & (SUB - 1);
    ((u64::from(shift) + 1) * SUB + mantissa) as usize
}

/// The largest value that falls in bucket `b`.
fn bucket_upper(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = b / SUB - 1;
    let mantissa = b % SUB;
    let low = (SUB + mantissa) << shift;
    low + ((1u64 << shift) - 1)
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0..=1): the upper edge of the bucket holding it.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.count();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                let max = self.max_ns.load(Ordering::Relaxed);
                return Duration::from_nanos(bucket_upper(b).min(max));
            }
        }
        Duration::from_nanos(self.max_ns.load(Ordering::Relaxed))
    }

    /// p50, p90, p99, max and mean.
    pub fn summary(&self) -> LatencySummary {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let count = self.count();
        LatencySummary {
            count,
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            max_us: self.max_ns.load(Ordering::Relaxed) as f64 / 1e3,
            mean_us: if count == 0 {
                0.0
            } else {
                self.sum_ns.load(Ordering::Relaxed) as f64 / count as f64 / 1e3
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 40, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b >= last || ns >= 1 << 40, "bucket order at {ns}");
            last = b;
            assert!(bucket_upper(b) >= ns, "{ns} above its bucket's edge");
            if b > 0 {
                assert!(
                    bucket_upper(b - 1) < ns,
                    "{ns} belongs to an earlier bucket"
                );
            }
            assert!(b < BUCKETS);
        }
    }

    #[test]
    fn quantiles_are_within_a_sixteenth() {
        let h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        for (got, want) in [(s.p50_us, 500.0), (s.p90_us, 900.0), (s.p99_us, 990.0)] {
            assert!(
                got >= want && got <= want * 1.0625 + 0.001,
                "{got} vs {want}"
            );
        }
        assert!((s.max_us - 1000.0).abs() < 1e-9);
        assert!((s.mean_us - 500.5).abs() < 1e-9);
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        let s = LatencyHistogram::new().summary();
        assert_eq!(s, LatencySummary::default());
    }
}
