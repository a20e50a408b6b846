//! Migration charts: well-formed SVG holding every series, drawn by a real renderer
//! (resvg) into an image that is not blank, written whole or not at all; the JSON form
//! round-trips. These need no KVM: the timelines are made up here, shaped like a real
//! migration (see timeline_migration.rs for charts of real ones).
//!
//! Set FERRY_REPORT_KEEP=DIR to keep the SVG and PNG files for a look.

use std::path::{Path, PathBuf};

use migration::info::MigrationStatus;
use migration::timeline::{
    Event, EventKind, Interval, Sample, SampleKind, Timeline, TimelineSettings,
};
use tests::TempDir;
use vmm::report::{self, summary_chart::Band, ReportError, Summary, SummaryRow};

const MIB: u64 = 1 << 20;

/// A 3-second migration of 512 MiB: five passes, auto-converge steps 20% and 30% at
/// passes 3 and 4, switchover at 2.9 s, 40 ms downtime; `channels` multifd channels.
fn made_up_timeline(channels: usize) -> Timeline {
    let mut samples = Vec::new();
    let mut events = vec![Event {
        t_ms: 0.0,
        what: EventKind::Status {
            status: MigrationStatus::Setup,
        },
    }];
    let syncs: [f64; 5] = [800.0, 1500.0, 2000.0, 2460.0, 2900.0];
    let mut transferred = 0u64;
    let mut pass = 1u64;
    let mut t: f64 = 0.0;
    while t <= 2940.0 {
        let status = if t < 20.0 {
            MigrationStatus::Setup
        } else if t < 2900.0 {
            MigrationStatus::Active
        } else if t < 2940.0 {
            MigrationStatus::Device
        } else {
            MigrationStatus::Completed
        };
        let sync = syncs.iter().position(|&s| (s - t).abs() < 1.0);
        if let Some(i) = sync {
            pass = i as u64 + 1;
            events.push(Event {
                t_ms: t,
                what: EventKind::Pass {
                    pass,
                    remaining: (200 >> i) * MIB,
                },
            });
        }
        let throttle = match pass {
            0..=2 => 0,
            3 => 20,
            _ => 30,
        };
        transferred += if status == MigrationStatus::Setup {
            0
        } else {
            25 * MIB
        };
        let remaining = match syncs.iter().filter(|&&s| s <= t).count() {
            0 => 512 * MIB,
            k => (200 >> (k - 1)) * MIB,
        };
        samples.push(Sample {
            t_ms: t,
            kind: if sync.is_some() {
                SampleKind::Sync
            } else {
                SampleKind::Tick
            },
            status,
            pass: if sync.is_some() { pass } else { pass + 1 },
            dirty_sync_count: syncs.iter().filter(|&&s| s <= t).count() as u64,
            transferred,
            remaining: if status == MigrationStatus::Completed {
                0
            } else {
                remaining
            },
            dirty_pages_rate: 20_000 - u64::from(throttle) * 300,
            dirty_bytes_rate: (20_000 - u64::from(throttle) * 300) * 4096,
            mbps: 2000.0,
            send_rate: 250.0 * MIB as f64,
            pages_per_second: 60_000,
            expected_downtime: remaining / (250 * MIB / 1000),
            cpu_throttle_percentage: throttle,
            xbzrle_encoding_rate: None,
            xbzrle_cache_miss_rate: None,
            compression_ratio: (channels > 0).then_some(1.8),
            channel_bytes: (channels > 0).then(|| {
                (0..channels)
                    .map(|c| transferred / channels as u64 + c as u64)
                    .collect()
            }),
        });
        t += 20.0;
    }
    events.push(Event {
        t_ms: 20.0,
        what: EventKind::Status {
            status: MigrationStatus::Active,
        },
    });
    events.push(Event {
        t_ms: 1500.0,
        what: EventKind::Throttle { percentage: 20 },
    });
    events.push(Event {
        t_ms: 2000.0,
        what: EventKind::Throttle { percentage: 30 },
    });
    events.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    Timeline {
        status: MigrationStatus::Completed,
        ram_total: 512 * MIB,
        page_size: 4096,
        settings: TimelineSettings {
            multifd_channels: channels as u32,
            multifd_compression: (channels > 0).then(|| "zstd".to_string()),
            xbzrle: false,
            auto_converge: true,
            downtime_limit: 300,
            max_bandwidth: 0,
        },
        passes: syncs.len() as u64,
        switchover_ms: Some(2900.0),
        downtime_interval: Some(Interval {
            start_ms: 2900.0,
            end_ms: 2940.0,
        }),
        setup_time: Some(20),
        total_time: Some(2940),
        downtime: Some(40),
        samples,
        events,
        ..Timeline::default()
    }
}

fn keep(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("FERRY_REPORT_KEEP") {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(Path::new(&dir).join(name), bytes);
    }
}

/// Every `<text>` of a parsed SVG.
fn texts(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").to_string())
        .collect()
}

/// Polylines of more than two points whose stroke is `color` (`#RRGGBB`), with their
/// point counts (legend samples have two).
fn polylines(doc: &roxmltree::Document, color: &str) -> Vec<usize> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter(|n| {
            n.attribute("stroke")
                .is_some_and(|s| s.eq_ignore_ascii_case(color))
        })
        .map(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .count()
        })
        .filter(|&points| points > 2)
        .collect()
}

/// Vertical marker lines (two points) whose stroke is `color` and width `width`.
fn markers(doc: &roxmltree::Document, color: &str, width: &str) -> usize {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter(|n| {
            n.attribute("stroke")
                .is_some_and(|s| s.eq_ignore_ascii_case(color))
                && n.attribute("stroke-width") == Some(width)
        })
        .filter(|n| {
            let pts: Vec<&str> = n
                .attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .collect();
            pts.len() == 2 && pts[0].split(',').next() == pts[1].split(',').next()
        })
        .count()
}

/// Renders an SVG with resvg; returns the image and the share of pixels that are not
/// the white background.
fn render_png(svg: &str) -> (Vec<u8>, f64, resvg::tiny_skia::Pixmap) {
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // Text needs a font; DejaVu is the usual one on Debian. Without any, text is left out
    // and the checks below still see the lines and bars.
    let sans = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|name| name == "DejaVu Sans" || name.contains("Sans"));
    if let Some(name) = sans {
        db.set_sans_serif_family(name);
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).expect("resvg parses the chart");
    let size = tree.size().to_int_size();
    assert!(size.width() >= 800 && size.height() >= 200, "{size:?}");
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).expect("a pixmap");
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    let total = pixmap.pixels().len();
    let inked = pixmap
        .pixels()
        .iter()
        .filter(|p| p.alpha() > 0 && (p.red() < 245 || p.green() < 245 || p.blue() < 245))
        .count();
    let png = pixmap.encode_png().expect("PNG encoding");
    (png, inked as f64 / total as f64, pixmap)
}

/// Pixels close to `rgb`.
fn pixels_of(pixmap: &resvg::tiny_skia::Pixmap, rgb: (u8, u8, u8)) -> usize {
    pixmap
        .pixels()
        .iter()
        .filter(|p| {
            let d = |a: u8, b: u8| (i32::from(a) - i32::from(b)).abs();
            p.alpha() == 255
                && d(p.red(), rgb.0) < 12
                && d(p.green(), rgb.1) < 12
                && d(p.blue(), rgb.2) < 12
        })
        .count()
}

#[test]
fn timeline_chart_is_well_formed_svg_with_every_series_and_marker() {
    let tl = made_up_timeline(4);
    let svg = report::render_timeline(&tl).expect("chart");
    keep("made-up-multifd.svg", svg.as_bytes());
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let all = texts(&doc).join("\n");
    for label in [
        "remaining memory (MiB)",
        "dirty rate (MiB/s)",
        "dirtied per pass (MiB/s)",
        "sending rate (MiB/s)",
        "dirty sync: end of pass pN",
        " p1",
        " p5",
        "switchover (guest stopped)",
        "downtime 40 ms",
        "cpu-throttle-percentage (%)",
        " 20%",
        " 30%",
        "expected downtime (ms)",
        "downtime-limit (300 ms)",
        "Throughput per multifd channel (4 channels)",
        "channel 0 (MiB/s)",
        "channel 3 (MiB/s)",
        "completed after 2.94 s",
        "5 passes",
        "compression ratio 1.80",
    ] {
        assert!(
            all.contains(label),
            "'{label}' is not in the chart's text:\n{all}"
        );
    }
    // The remaining-memory line has a point per sample after setup.
    let after_setup = tl
        .samples
        .iter()
        .filter(|s| s.status != MigrationStatus::Setup)
        .count();
    assert_eq!(polylines(&doc, "#1F77B4"), vec![after_setup]);
    // Dirty (red) and sending (green) rates: one line each, a point per sample.
    assert_eq!(polylines(&doc, "#D62728"), vec![tl.samples.len()]);
    assert_eq!(polylines(&doc, "#2CA02C"), vec![tl.samples.len()]);
    // Throttle steps: the samples plus two vertical steps.
    assert_eq!(polylines(&doc, "#9467BD"), vec![tl.samples.len() + 2]);
    // Five pass lines and the switchover (in two panels), vertical.
    assert_eq!(markers(&doc, "#787878", "1"), 5, "a line per pass");
    assert_eq!(
        markers(&doc, "#000000", "2"),
        2,
        "the switchover in both panels"
    );
}

#[test]
fn timeline_chart_renders_to_an_image_that_is_not_blank() {
    let tl = made_up_timeline(2);
    let svg = report::render_timeline(&tl).expect("chart");
    let (png, inked, pixmap) = render_png(&svg);
    keep("made-up-multifd.png", &png);
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        inked > 0.02,
        "only {:.2}% of the pixels are not background",
        inked * 100.0
    );
    // The series are visible, not just axes: blue remaining, red dirty rate, orange
    // downtime band (drawn at 40% over white).
    assert!(pixels_of(&pixmap, (31, 119, 180)) > 500, "remaining line");
    assert!(pixels_of(&pixmap, (214, 39, 40)) > 500, "dirty-rate line");
    assert!(pixels_of(&pixmap, (148, 103, 189)) > 300, "throttle steps");
}

#[test]
fn without_multifd_there_is_no_channel_panel() {
    let tl = made_up_timeline(0);
    let svg = report::render_timeline(&tl).expect("chart");
    keep("made-up-plain.svg", svg.as_bytes());
    let doc = roxmltree::Document::parse(&svg).expect("well-formed");
    let all = texts(&doc).join("\n");
    assert!(!all.contains("multifd channel"));
    assert!(all.contains("multifd off"));
    let multifd =
        roxmltree::Document::parse(&report::render_timeline(&made_up_timeline(2)).unwrap())
            .unwrap()
            .root_element()
            .attribute("height")
            .and_then(|h| h.parse::<u32>().ok())
            .unwrap();
    let plain = doc
        .root_element()
        .attribute("height")
        .and_then(|h| h.parse::<u32>().ok())
        .unwrap();
    assert!(multifd > plain, "{multifd} vs {plain}");
}

#[test]
fn reports_are_written_whole_or_not_at_all() {
    let dir = TempDir::new("report-atomic");
    let svg_path = dir.path().join("chart.svg");
    std::fs::write(&svg_path, "previous chart").unwrap();
    // Nothing to draw: an error, and the previous file untouched, no temporary left.
    let empty = Timeline::default();
    assert!(matches!(
        report::write_timeline(&svg_path, &empty),
        Err(ReportError::Empty(_))
    ));
    assert_eq!(
        std::fs::read_to_string(&svg_path).unwrap(),
        "previous chart"
    );
    // A write that fails half way (the renderer's output cut short).
    let r = report::write_atomic(&svg_path, |w| {
        w.write_all(b"<svg")?;
        Err(std::io::Error::other("cut short"))
    });
    assert!(r.is_err());
    assert_eq!(
        std::fs::read_to_string(&svg_path).unwrap(),
        "previous chart"
    );
    // An unknown format creates nothing.
    let png_path = dir.path().join("chart.png");
    assert!(matches!(
        report::write_timeline(&png_path, &made_up_timeline(0)),
        Err(ReportError::Format(_))
    ));
    // A directory that does not exist: an error naming the file.
    let e = report::write_timeline(&dir.path().join("nope/chart.svg"), &made_up_timeline(0))
        .unwrap_err();
    assert!(e.to_string().contains("nope/chart.svg"), "{e}");
    assert_eq!(names(dir.path()), vec!["chart.svg".to_string()]);
    // Success replaces the file with a whole chart.
    report::write_timeline(&svg_path, &made_up_timeline(0)).unwrap();
    let text = std::fs::read_to_string(&svg_path).unwrap();
    roxmltree::Document::parse(&text).expect("whole");
    assert!(text.trim_end().ends_with("</svg>"));
    assert_eq!(names(dir.path()), vec!["chart.svg".to_string()]);
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("the directory lists")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_json_report_is_the_raw_timeline() {
    let dir = TempDir::new("report-json");
    let path: PathBuf = dir.path().join("timeline.json");
    let tl = made_up_timeline(2);
    report::write_timeline(&path, &tl).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["samples"][0]["t-ms"], 0.0);
    assert!(v["samples"][100]["channel-bytes"].is_array());
    let back = report::timeline_from_json(v).unwrap();
    assert_eq!(back, tl);
}

#[test]
fn summary_chart_renders_rows_and_same_run_references() {
    let summary = Summary {
        title: "ferry bench migrate: first-pass throughput".into(),
        subtitle: "loopback, 2 GiB guests".into(),
        unit: "GiB/s".into(),
        value_legend: "Ferry: guest memory moved".into(),
        reference_legend: "TCP over the same link, measured in the same run".into(),
        rows: vec![
            SummaryRow {
                label: "mixed · plain · fresh".into(),
                value: Some(3.1),
                reference: Some(2.4),
                reference_label: Some("TCP 1 stream".into()),
                note: None,
            },
            SummaryRow {
                label: "random · multifd-2 · fresh".into(),
                value: Some(2.2),
                reference: Some(2.6),
                reference_label: Some("TCP 2 streams".into()),
                note: None,
            },
            SummaryRow {
                label: "random · zlib-1 · fresh".into(),
                value: None,
                reference: None,
                reference_label: None,
                note: Some("the source refuses it".into()),
            },
        ],
        bands: vec![Band {
            label: "QEMU 7.2 into fresh memory (issue 12)".into(),
            low: 1.0,
            high: 1.4,
        }],
    };
    let dir = TempDir::new("report-summary");
    let path = dir.path().join("summary.svg");
    report::write_summary(&path, &summary).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    keep("made-up-summary.svg", svg.as_bytes());
    let doc = roxmltree::Document::parse(&svg).expect("well-formed");
    let all = texts(&doc).join("\n");
    for t in [
        "mixed · plain · fresh",
        "random · multifd-2 · fresh",
        " 3.10",
        " 2.40 (TCP 1 stream)",
        " 2.60 (TCP 2 streams)",
        "not measured: the source refuses it",
        "QEMU 7.2 into fresh memory (issue 12)",
    ] {
        assert!(all.contains(t), "'{t}' missing:\n{all}");
    }
    let (png, inked, pixmap) = render_png(&svg);
    keep("made-up-summary.png", &png);
    assert!(inked > 0.02, "{inked}");
    assert!(pixels_of(&pixmap, (31, 119, 180)) > 1000, "Ferry's bars");
    assert!(pixels_of(&pixmap, (160, 160, 160)) > 1000, "reference bars");
}
