//! Summary statistics of repeated measurements (median, min, max).

use std::time::Duration;

use serde::Serialize;

/// Median, minimum and maximum of a set of timings, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub runs: usize,
    /// Median (the mean of the two middle samples for an even count).
    pub median_ms: f64,
    /// Smallest sample.
    pub min_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Every sample, in the order measured.
    pub samples_ms: Vec<f64>,
}

impl Summary {
    /// Summarizes `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Summary {
            runs: n,
            median_ms: median,
            min_ms: sorted[0],
            max_ms: sorted[n - 1],
            samples_ms: ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn odd_count_takes_the_middle_sample() {
        let s = Summary::of(&ms(&[9, 1, 5])).unwrap();
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (5.0, 1.0, 9.0));
        assert_eq!(
            s.samples_ms,
            vec![9.0, 1.0, 5.0],
            "samples keep their order"
        );
    }

    #[test]
    fn even_count_averages_the_two_middle_samples() {
        let s = Summary::of(&ms(&[4, 1, 10, 2])).unwrap();
        assert_eq!(s.median_ms, 3.0);
        assert_eq!(s.runs, 4);
    }

    #[test]
    fn no_samples_no_summary() {
        assert!(Summary::of(&[]).is_none());
    }
}
