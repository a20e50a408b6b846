//! `ferry bench migrate --report DIR`: a timeline chart of every throughput row's
//! migration (`DATA-CONFIG-DEST.svg`) and `summary.svg`, GiB/s of guest memory per
//! configuration and data set with the TCP figure measured in the same run beside each.

use std::path::{Path, PathBuf};

use super::summary_chart::Band;
use super::{write_summary, write_timeline, ReportError, Summary, SummaryRow};
use crate::bench::migrate::throughput::{ThroughputRow, CONFIGS};
use crate::bench::migrate::MigrateReport;

/// The file name of a row's chart.
pub fn row_file(row: &ThroughputRow) -> String {
    format!("{}-{}-{}.svg", row.data_set, row.config, row.dest)
}

/// The summary chart's content (None when no throughput row ran).
pub fn summary(r: &MigrateReport) -> Option<Summary> {
    if r.throughput.is_empty() {
        return None;
    }
    let rows = r
        .throughput
        .iter()
        .map(|row| {
            let m = row.measured.as_ref();
            let streams = CONFIGS
                .iter()
                .find(|c| c.name == row.config)
                .map_or(1, |c| c.streams());
            SummaryRow {
                label: format!("{} · {} · {}", row.data_set, row.config, row.dest),
                value: m.map(|m| m.guest_gib_per_s),
                reference: m.and_then(|m| m.tcp_gib_per_s),
                reference_label: Some(format!(
                    "TCP, {streams} stream{}",
                    if streams == 1 { "" } else { "s" }
                )),
                note: row.unavailable.clone(),
            }
        })
        .collect();
    let kinds: Vec<&str> = r.data_sets.iter().map(|d| d.kind.as_str()).collect();
    Some(Summary {
        title: "ferry bench migrate: first-pass throughput".into(),
        subtitle: format!(
            "{} · {} CPUs · guest memory {} MiB{} · data sets: {}",
            r.hosts,
            r.cpus,
            r.memory_bytes >> 20,
            if r.quick { " (--quick)" } else { "" },
            if kinds.is_empty() {
                "-".to_string()
            } else {
                kinds.join(", ")
            }
        ),
        unit: "GiB/s".into(),
        value_legend: "Ferry: guest memory moved per second of the first pass".into(),
        reference_legend: "TCP over the same link, measured in the same run".into(),
        rows,
        bands: vec![
            Band {
                label: format!("QEMU 7.2 into fresh memory ({})", r.qemu.source),
                low: r.qemu.fresh_gib_per_s.0,
                high: r.qemu.fresh_gib_per_s.1,
            },
            Band {
                label: "QEMU 7.2 into preallocated memory (same source)".into(),
                low: r.qemu.prealloc_gib_per_s.0,
                high: r.qemu.prealloc_gib_per_s.1,
            },
        ],
    })
}

/// Writes the charts into `dir` (made if missing); returns the files written.
pub fn write(dir: &Path, r: &MigrateReport) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for row in &r.throughput {
        if let Some(tl) = row.measured.as_ref().and_then(|m| m.timeline.as_ref()) {
            let path = dir.join(row_file(row));
            write_timeline(&path, tl)?;
            files.push(path);
        }
    }
    if let Some(s) = summary(r) {
        let path = dir.join("summary.svg");
        write_summary(&path, &s)?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::migrate::throughput::Measured;
    use crate::bench::migrate::{Goals, QemuReference};
    use migration::info::MigrationStatus;
    use migration::timeline::{Sample, SampleKind, Timeline};

    fn measured(gib: f64, tcp: f64, timeline: Option<Timeline>) -> Measured {
        Measured {
            first_pass_s: 1.0,
            guest_gib_per_s: gib,
            wire_bytes: 1 << 30,
            wire_gib_per_s: gib,
            tcp_gib_per_s: Some(tcp),
            wire_vs_tcp: Some(gib / tcp),
            guest_vs_tcp: Some(gib / tcp),
            total_time_ms: 1000,
            downtime_ms: 5,
            normal_pages: 1,
            zero_pages: 1,
            multifd_bytes: 0,
            source_cpu_s_per_gib: None,
            dest_cpu_s_per_gib: None,
            dest_populate: None,
            digests_match: true,
            runs_guest_gib_per_s: vec![gib],
            timeline,
        }
    }

    fn sample(t_ms: f64, transferred: u64) -> Sample {
        Sample {
            t_ms,
            kind: SampleKind::Tick,
            status: MigrationStatus::Active,
            pass: 1,
            dirty_sync_count: 0,
            transferred,
            remaining: 1 << 20,
            dirty_pages_rate: 0,
            dirty_bytes_rate: 0,
            mbps: 0.0,
            send_rate: 0.0,
            pages_per_second: 0,
            expected_downtime: 0,
            cpu_throttle_percentage: 0,
            xbzrle_encoding_rate: None,
            xbzrle_cache_miss_rate: None,
            compression_ratio: None,
            channel_bytes: None,
        }
    }

    fn report(rows: Vec<ThroughputRow>) -> MigrateReport {
        MigrateReport {
            bench: "migrate",
            hosts: "loopback TCP (127.0.0.1)".into(),
            quick: true,
            cpus: 2,
            memory_bytes: 256 << 20,
            data_sets: Vec::new(),
            tcp: Vec::new(),
            tcp_memory: Vec::new(),
            tcp_memory_prealloc: None,
            throughput: rows,
            qemu: QemuReference {
                fresh_gib_per_s: (1.0, 1.4),
                prealloc_gib_per_s: (2.2, 4.0),
                source: "issue 12",
            },
            downtime: None,
            rate_limit: Vec::new(),
            dirty_sync: Vec::new(),
            populate: Vec::new(),
            goals: Goals::default(),
            commands: Vec::new(),
            errors: Vec::new(),
        }
    }

    #[test]
    fn a_chart_per_row_with_a_timeline_and_a_summary() {
        let tl = Timeline {
            samples: vec![
                sample(0.0, 0),
                sample(100.0, 1 << 20),
                sample(200.0, 2 << 20),
            ],
            ..Timeline::default()
        };
        let rows = vec![
            ThroughputRow {
                data_set: "random".into(),
                config: "plain".into(),
                dest: "fresh".into(),
                measured: Some(measured(2.5, 3.0, Some(tl))),
                unavailable: None,
            },
            ThroughputRow {
                data_set: "random".into(),
                config: "multifd-2".into(),
                dest: "fresh".into(),
                measured: Some(measured(2.0, 2.8, None)),
                unavailable: None,
            },
            ThroughputRow {
                data_set: "random".into(),
                config: "zlib-1".into(),
                dest: "fresh".into(),
                measured: None,
                unavailable: Some("the source refuses it".into()),
            },
        ];
        let r = report(rows);
        let s = summary(&r).unwrap();
        assert_eq!(s.rows.len(), 3);
        assert_eq!(s.rows[0].label, "random · plain · fresh");
        assert_eq!(s.rows[0].reference_label.as_deref(), Some("TCP, 1 stream"));
        assert_eq!(s.rows[1].reference_label.as_deref(), Some("TCP, 2 streams"));
        assert_eq!(s.rows[1].reference, Some(2.8));
        assert_eq!(s.rows[2].value, None);
        let dir = std::env::temp_dir().join(format!("ferry-bench-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = write(&dir.join("charts"), &r).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["random-plain-fresh.svg", "summary.svg"]);
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(summary(&report(Vec::new())).is_none());
    }
}
