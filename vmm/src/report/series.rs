//! The figures a timeline chart plots, as (seconds, value) points.

use migration::info::MigrationStatus;
use migration::timeline::{EventKind, Sample, Timeline};

/// Bytes in a MiB.
pub const MIB: f64 = (1u64 << 20) as f64;
/// Window over which sending and channel rates are averaged, ms.
pub const RATE_WINDOW_MS: f64 = 600.0;

/// A named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (time in seconds, value) points, in time order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The largest value (0 when empty).
    pub fn max(&self) -> f64 {
        self.points.iter().map(|p| p.1).fold(0.0, f64::max)
    }
}

fn seconds(s: &Sample) -> f64 {
    s.t_ms / 1000.0
}

/// The time the chart spans: the last sample's time, in seconds (at least a millisecond).
pub fn span_s(tl: &Timeline) -> f64 {
    tl.samples.last().map_or(0.0, seconds).max(0.001)
}

/// Remaining memory in MiB (from the first sample after setup: nothing is known before).
pub fn remaining_mib(tl: &Timeline) -> Series {
    Series {
        name: "remaining memory (MiB)".into(),
        points: tl
            .samples
            .iter()
            .filter(|s| s.status != MigrationStatus::Setup)
            .map(|s| (seconds(s), s.remaining as f64 / MIB))
            .collect(),
    }
}

/// What each dirty sync found dirty, per second of the pass it ended, in MiB/s: a step
/// from the pass's start (the previous sync, or the end of setup) to its sync. The sync
/// after the switchover is left out: the guest was stopped, so it measures no rate.
pub fn dirtied_per_pass_mib_s(tl: &Timeline) -> Series {
    let mut start_ms = tl
        .events
        .iter()
        .find_map(|e| match e.what {
            EventKind::Status {
                status: MigrationStatus::Active,
            } => Some(e.t_ms),
            _ => None,
        })
        .unwrap_or(0.0);
    let stopped = tl.switchover_ms.unwrap_or(f64::INFINITY);
    let mut points = Vec::new();
    for e in tl.events.iter().filter(|e| e.t_ms < stopped) {
        if let EventKind::Pass { remaining, .. } = e.what {
            let ms = e.t_ms - start_ms;
            if ms >= 1.0 {
                let rate = remaining as f64 * 1000.0 / ms / MIB;
                points.push((start_ms / 1000.0, rate));
                points.push((e.t_ms / 1000.0, rate));
            }
            start_ms = e.t_ms;
        }
    }
    Series {
        name: "dirtied per pass (MiB/s)".into(),
        points,
    }
}

/// Dirty rate in MiB/s.
pub fn dirty_rate_mib_s(tl: &Timeline) -> Series {
    Series {
        name: "dirty rate (MiB/s)".into(),
        points: tl
            .samples
            .iter()
            .map(|s| (seconds(s), s.dirty_bytes_rate as f64 / MIB))
            .collect(),
    }
}

/// Rate of a cumulative byte count over a trailing window of `window_ms` (or over the gap
/// to the previous point when that is longer), in MiB/s.
pub fn windowed_rate(points: &[(f64, u64)], window_ms: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut j = 0usize;
    for (i, &(t, bytes)) in points.iter().enumerate() {
        while j < i && t - points[j].0 > window_ms {
            j += 1;
        }
        let from = if j == i && i > 0 { i - 1 } else { j };
        let (t0, b0) = points[from];
        let rate = if t - t0 >= 1.0 {
            bytes.saturating_sub(b0) as f64 * 1000.0 / (t - t0) / MIB
        } else {
            out.last().map_or(0.0, |p: &(f64, f64)| p.1)
        };
        out.push((t / 1000.0, rate));
    }
    out
}

/// Sending rate (all channels) in MiB/s, averaged over [`RATE_WINDOW_MS`].
pub fn send_rate_mib_s(tl: &Timeline) -> Series {
    let pts: Vec<(f64, u64)> = tl.samples.iter().map(|s| (s.t_ms, s.transferred)).collect();
    Series {
        name: "sending rate (MiB/s)".into(),
        points: windowed_rate(&pts, RATE_WINDOW_MS),
    }
}

/// Throughput of each multifd channel in MiB/s (empty without multifd).
pub fn channel_rates_mib_s(tl: &Timeline) -> Vec<Series> {
    let n = tl
        .samples
        .iter()
        .filter_map(|s| s.channel_bytes.as_ref().map(Vec::len))
        .max()
        .unwrap_or(0);
    (0..n)
        .map(|c| {
            let pts: Vec<(f64, u64)> = tl
                .samples
                .iter()
                .filter_map(|s| {
                    s.channel_bytes
                        .as_ref()
                        .and_then(|b| b.get(c))
                        .map(|&b| (s.t_ms, b))
                })
                .collect();
            Series {
                name: format!("channel {c} (MiB/s)"),
                points: windowed_rate(&pts, RATE_WINDOW_MS),
            }
        })
        .collect()
}

/// The vCPU throttle as a step line, in percent.
pub fn throttle_steps(tl: &Timeline) -> Series {
    let mut points: Vec<(f64, f64)> = Vec::new();
    for s in &tl.samples {
        let v = f64::from(s.cpu_throttle_percentage);
        let t = seconds(s);
        if let Some(&(_, prev)) = points.last() {
            if prev != v {
                points.push((t, prev));
            }
        }
        points.push((t, v));
    }
    Series {
        name: "cpu-throttle-percentage (%)".into(),
        points,
    }
}

/// Where the throttle changed: (seconds, new percentage), the first 0 left out.
pub fn throttle_changes(tl: &Timeline) -> Vec<(f64, u8)> {
    let mut out = Vec::new();
    let mut prev = 0u8;
    for s in &tl.samples {
        if s.cpu_throttle_percentage != prev {
            out.push((seconds(s), s.cpu_throttle_percentage));
            prev = s.cpu_throttle_percentage;
        }
    }
    out
}

/// Expected downtime in ms, while the guest runs (it means nothing after the switchover).
pub fn expected_downtime_ms(tl: &Timeline) -> Series {
    let end = tl.switchover_ms.unwrap_or(f64::INFINITY);
    Series {
        name: "expected downtime (ms)".into(),
        points: tl
            .samples
            .iter()
            .filter(|s| s.t_ms <= end && s.status.is_active())
            .map(|s| (seconds(s), s.expected_downtime as f64))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::timeline::{Event, SampleKind};

    fn sample(t_ms: f64, transferred: u64, throttle: u8) -> Sample {
        Sample {
            t_ms,
            kind: SampleKind::Tick,
            status: MigrationStatus::Active,
            pass: 1,
            dirty_sync_count: 0,
            transferred,
            remaining: 2 << 20,
            dirty_pages_rate: 256,
            dirty_bytes_rate: 1 << 20,
            mbps: 0.0,
            send_rate: 0.0,
            pages_per_second: 0,
            expected_downtime: 10,
            cpu_throttle_percentage: throttle,
            xbzrle_encoding_rate: None,
            xbzrle_cache_miss_rate: None,
            compression_ratio: None,
            channel_bytes: Some(vec![transferred / 2, transferred / 2]),
        }
    }

    #[test]
    fn rates_average_over_the_window() {
        // 1 MiB every 100 ms: 10 MiB/s whatever the window.
        let pts: Vec<(f64, u64)> = (0..10).map(|i| (i as f64 * 100.0, i << 20)).collect();
        let r = windowed_rate(&pts, 400.0);
        assert_eq!(r.len(), 10);
        assert_eq!(r[0], (0.0, 0.0));
        for &(_, v) in &r[1..] {
            assert!((v - 10.0).abs() < 1e-9, "{v}");
        }
        // A window shorter than the gaps uses the previous point.
        let r = windowed_rate(&pts, 10.0);
        assert!((r[5].1 - 10.0).abs() < 1e-9);
    }

    #[test]
    fn series_come_from_the_samples() {
        let tl = Timeline {
            samples: vec![
                sample(0.0, 0, 0),
                sample(100.0, 1 << 20, 0),
                sample(200.0, 2 << 20, 20),
                sample(300.0, 3 << 20, 30),
            ],
            ..Timeline::default()
        };
        assert_eq!(remaining_mib(&tl).points[0], (0.0, 2.0));
        assert_eq!(dirty_rate_mib_s(&tl).max(), 1.0);
        let ch = channel_rates_mib_s(&tl);
        assert_eq!(ch.len(), 2);
        assert!((ch[1].points[3].1 - 5.0).abs() < 1e-9);
        assert_eq!(throttle_changes(&tl), vec![(0.2, 20), (0.3, 30)]);
        let steps = throttle_steps(&tl).points;
        // Each change is a vertical step: the old value then the new one at the same time.
        assert_eq!(
            steps,
            vec![
                (0.0, 0.0),
                (0.1, 0.0),
                (0.2, 0.0),
                (0.2, 20.0),
                (0.3, 20.0),
                (0.3, 30.0)
            ]
        );
        assert_eq!(span_s(&tl), 0.3);
        assert_eq!(expected_downtime_ms(&tl).points.len(), 4);
    }

    #[test]
    fn each_pass_dirtied_what_its_sync_found_over_its_duration() {
        let ev = |t_ms: f64, what: EventKind| Event { t_ms, what };
        let tl = Timeline {
            events: vec![
                ev(
                    10.0,
                    EventKind::Status {
                        status: MigrationStatus::Active,
                    },
                ),
                ev(
                    510.0,
                    EventKind::Pass {
                        pass: 1,
                        remaining: 50 << 20,
                    },
                ),
                ev(
                    760.0,
                    EventKind::Pass {
                        pass: 2,
                        remaining: 5 << 20,
                    },
                ),
            ],
            ..Timeline::default()
        };
        let s = dirtied_per_pass_mib_s(&tl);
        // 50 MiB over 0.5 s, then 5 MiB over 0.25 s.
        assert_eq!(
            s.points,
            vec![(0.01, 100.0), (0.51, 100.0), (0.51, 20.0), (0.76, 20.0)]
        );
        // A sync after the guest stopped measures nothing.
        let stopped = Timeline {
            switchover_ms: Some(700.0),
            ..tl
        };
        assert_eq!(dirtied_per_pass_mib_s(&stopped).points.len(), 2);
    }
}
