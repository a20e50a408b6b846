//! Rate-limiter accuracy end to end: the rate a real migration reaches against
//! max-bandwidth.
//!
//! One source with the random data set (an idle guest); for each limit a new, preallocated
//! destination (the limiter is measured, not the receiver),
//! `migrate-set-parameters {"max-bandwidth": LIMIT}`, `migrate`, then two samples of
//! query-migrate's `ram.transferred` inside the first pass (after a warm-up of a few
//! windows) and `migrate_cancel`. A limit the link cannot carry (above 90% of the fastest
//! unlimited migration of this run) is reported as such instead of measured.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::data::DataSet;
use super::{BenchEnv, BenchError};

/// The limits measured, bytes per second.
pub const LIMITS: [u64; 4] = [32 << 20, 256 << 20, 1 << 30, 2 << 30];

/// One limit.
#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    /// max-bandwidth, bytes per second.
    pub limit: u64,
    /// Measured bytes per second (None when not measured).
    pub measured: Option<f64>,
    /// (measured / limit - 1) x 100.
    pub error_pct: Option<f64>,
    /// Length of the measuring window, seconds.
    pub window_s: Option<f64>,
    /// Why it was not measured.
    pub note: Option<String>,
}

fn human(bytes_per_s: f64) -> String {
    let mib = bytes_per_s / (1u64 << 20) as f64;
    if mib >= 1024.0 {
        format!("{:.2} GiB/s", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB/s")
    }
}

fn transferred(src: &mut super::proc::BenchVmm) -> Result<(Instant, u64, String), BenchError> {
    let info = src.query_migrate()?;
    let at = Instant::now();
    Ok((
        at,
        info["ram"]["transferred"].as_u64().unwrap_or(0),
        info["status"].as_str().unwrap_or("").to_string(),
    ))
}

fn measure(
    env: &BenchEnv,
    src: &mut super::proc::BenchVmm,
    memory: u64,
    limit: u64,
) -> Result<RateRow, BenchError> {
    // A preallocated destination, so that what is measured is the limiter and not a
    // receiver faulting in fresh memory.
    let dst_args: Vec<String> = vec![
        "--memory".into(),
        format!("{}M,prealloc=on", memory >> 20),
        "--vcpus".into(),
        "1".into(),
        "--incoming".into(),
        "defer".into(),
        "-S".into(),
    ];
    let mut dst = env.spawn(env.dest_host(), "destination", &dst_args, &[])?;
    let addr = env.dest_addr();
    dst.cmd("migrate-incoming", json!({"uri": format!("tcp:{addr}:0")}))?;
    let port = dst.query_migrate()?["socket-address"][0]["port"]
        .as_str()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| BenchError::Failed("the destination names no port".into()))?;
    src.set_params(json!({ "max-bandwidth": limit }))?;
    env.note_command(format!(
        "QMP source: migrate-set-parameters {{\"max-bandwidth\": {limit}}}; migrate {{\"uri\": \"tcp:{addr}:PORT\"}}; query-migrate x2; migrate_cancel"
    ));
    // The first pass lasts about memory / limit (random data: every page is sent).
    let pass = memory as f64 / limit as f64;
    let cap = if env.quick { 1.0 } else { 5.0 };
    let warmup = (pass * 0.1).clamp(0.1, 0.5);
    let window = (pass * 0.7).min(cap);
    src.cmd("migrate", json!({"uri": format!("tcp:{addr}:{port}")}))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, bytes, status) = transferred(src)?;
        if status == "active" && bytes > 0 {
            break;
        }
        if Instant::now() > deadline || !matches!(status.as_str(), "setup" | "active") {
            return Err(BenchError::Failed(format!(
                "the migration did not start sending (status {status})"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs_f64(warmup));
    // Samples every 20 ms over the window; the rate is the least-squares slope of bytes
    // over time, so neither the limiter's 100 ms windows nor the sampling instants
    // quantize it.
    let (t1, b1, _) = transferred(src)?;
    let mut samples = vec![(0.0f64, 0.0f64)];
    let mut status = String::from("active");
    let mut t2 = t1;
    while (t2 - t1).as_secs_f64() < window && status == "active" {
        std::thread::sleep(Duration::from_millis(20));
        let (t, b, st) = transferred(src)?;
        status = st;
        t2 = t;
        samples.push(((t - t1).as_secs_f64(), b.saturating_sub(b1) as f64));
    }
    src.cmd("migrate_cancel", json!({}))?;
    let end = src.wait_migration_end(Duration::from_secs(30), Duration::from_millis(20))?;
    drop(dst);
    if status != "active" {
        return Ok(RateRow {
            limit,
            measured: None,
            error_pct: None,
            window_s: None,
            note: Some(format!(
                "the pass ended inside the window (status {status}, then {})",
                end["status"]
            )),
        });
    }
    let secs = (t2 - t1).as_secs_f64();
    let rate = slope(&samples);
    Ok(RateRow {
        limit,
        measured: Some(rate),
        error_pct: Some((rate / limit as f64 - 1.0) * 100.0),
        window_s: Some(secs),
        note: None,
    })
}

/// Least-squares slope of y over x (0 for fewer than two distinct x).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Runs the section; `link` is the fastest unlimited migration of this run (bytes/s).
pub fn run(
    env: &BenchEnv,
    random: &DataSet,
    memory: u64,
    link: Option<f64>,
) -> Result<Vec<RateRow>, BenchError> {
    let src_args: Vec<String> = vec![
        "--memory".into(),
        format!(
            "{}M,mem-path={},share=off",
            memory >> 20,
            random.path.display()
        ),
        "--vcpus".into(),
        "1".into(),
        "--workload".into(),
        "working-set=0".into(),
    ];
    let mut src = env.spawn(env.source_host(), "source", &src_args, &[])?;
    let mut rows = Vec::new();
    for limit in LIMITS {
        if let Some(l) = link.filter(|&l| limit as f64 > 0.9 * l) {
            rows.push(RateRow {
                limit,
                measured: None,
                error_pct: None,
                window_s: None,
                note: Some(format!(
                    "the link does not allow it: the fastest unlimited migration of this run reached {}",
                    human(l)
                )),
            });
            continue;
        }
        let pass = memory as f64 / limit as f64;
        if pass < 0.5 {
            rows.push(RateRow {
                limit,
                measured: None,
                error_pct: None,
                window_s: None,
                note: Some(format!(
                    "{} MiB of guest memory last only {:.2} s at this rate: use a larger --memory",
                    memory >> 20,
                    pass
                )),
            });
            continue;
        }
        env.say(format!("rate: max-bandwidth {}", human(limit as f64)));
        let row = measure(env, &mut src, memory, limit)?;
        if let (Some(m), Some(e)) = (row.measured, row.error_pct) {
            env.say(format!("  measured {} ({e:+.2}%)", human(m)));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The section as a table.
pub fn table(rows: &[RateRow]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nrate limiter (measured rate of a migration against max-bandwidth; goal +-3%):"
    );
    for r in rows {
        match (r.measured, r.error_pct) {
            (Some(m), Some(e)) => {
                let _ = writeln!(
                    t,
                    "  max-bandwidth {:>11}: measured {:>11} over {:.2} s, {e:+.2}%",
                    human(r.limit as f64),
                    human(m),
                    r.window_s.unwrap_or(0.0)
                );
            }
            _ => {
                let _ = writeln!(
                    t,
                    "  max-bandwidth {:>11}: {}",
                    human(r.limit as f64),
                    r.note.as_deref().unwrap_or("not measured")
                );
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_slope_of_bytes_over_time() {
        let pts: Vec<(f64, f64)> = (0..50)
            .map(|i| {
                let t = i as f64 * 0.02;
                // 100 MB/s in 100 ms steps: the slope still finds ~100 MB/s.
                (t, (t * 10.0).floor() * 10e6)
            })
            .collect();
        let r = slope(&pts);
        assert!((r / 100e6 - 1.0).abs() < 0.1, "{r}");
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
    }

    #[test]
    fn rates_print_in_mib_or_gib() {
        assert_eq!(human((32u64 << 20) as f64), "32.0 MiB/s");
        assert_eq!(human((2u64 << 30) as f64), "2.00 GiB/s");
    }

    #[test]
    fn the_table_shows_measured_and_skipped_limits() {
        let t = table(&[
            RateRow {
                limit: 32 << 20,
                measured: Some((32u64 << 20) as f64 * 1.01),
                error_pct: Some(1.0),
                window_s: Some(2.0),
                note: None,
            },
            RateRow {
                limit: 2 << 30,
                measured: None,
                error_pct: None,
                window_s: None,
                note: Some("the link does not allow it".into()),
            },
        ]);
        assert!(t.contains("+1.00%"), "{t}");
        assert!(t.contains("2.00 GiB/s: the link does not allow it"), "{t}");
    }
}
