//! One migration's timeline as an SVG chart.
//!
//! Panels, top to bottom:
//! 1. remaining memory (left axis, MiB) and the dirty and sending rates (right axis, MiB/s)
//!    over time, with every dirty sync (end of a pass) as a thin vertical line labelled
//!    `pN`, the switchover as a thick black line and the downtime as an orange band. Two
//!    dirty rates: query-migrate's (QEMU's, over periods of a second or more) and, dashed,
//!    what each pass's sync found dirty per second of that pass;
//! 2. the vCPU throttle (auto-converge's steps, labelled) and the expected downtime against
//!    `downtime-limit`;
//! 3. with multifd, the throughput of each channel.

use std::iter::once;

use migration::timeline::Timeline;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::series::{self, Series, MIB};
use super::ReportError;
use crate::cli::migrate::human_bytes;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Chart width in pixels.
pub const WIDTH: u32 = 1240;
/// Width of the legend column right of each panel.
const LEGEND_W: u32 = 250;
const FONT: &str = "sans-serif";
const HEADER_H: u32 = 80;
const MAIN_H: u32 = 420;
const THROTTLE_H: u32 = 210;
const CHANNELS_H: u32 = 260;

const REMAINING: RGBColor = RGBColor(31, 119, 180);
const DIRTY: RGBColor = RGBColor(214, 39, 40);
const DIRTIED: RGBColor = RGBColor(240, 120, 120);
const SEND: RGBColor = RGBColor(44, 160, 44);
const PASS: RGBColor = RGBColor(120, 120, 120);
const DOWNTIME: RGBColor = RGBColor(255, 127, 14);
const THROTTLE: RGBColor = RGBColor(148, 103, 189);
const EXPECTED: RGBColor = RGBColor(23, 190, 207);
/// Channel colours (ColorBrewer's Dark2: apart from the main panel's).
const CHANNELS: [RGBColor; 8] = [
    RGBColor(27, 158, 119),
    RGBColor(217, 95, 2),
    RGBColor(117, 112, 179),
    RGBColor(231, 41, 138),
    RGBColor(102, 166, 30),
    RGBColor(230, 171, 2),
    RGBColor(166, 118, 29),
    RGBColor(102, 102, 102),
];
const GRID: RGBColor = RGBColor(240, 240, 240);

pub(super) fn draw_err<E: std::error::Error + Send + Sync>(
    e: DrawingAreaErrorKind<E>,
) -> ReportError {
    ReportError::Draw(e.to_string())
}

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.1
    } else {
        1.0
    }
}

/// The chart of `tl` as an SVG document.
pub fn render_timeline(tl: &Timeline) -> Result<String, ReportError> {
    if tl.samples.is_empty() {
        return Err(ReportError::Empty(
            "the timeline has no samples (no migration has run)".into(),
        ));
    }
    let channels = series::channel_rates_mib_s(tl);
    let height = HEADER_H + MAIN_H + THROTTLE_H + if channels.is_empty() { 0 } else { CHANNELS_H };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (head, rest) = root.split_vertically(HEADER_H);
        header(&head, tl)?;
        let (main, rest) = rest.split_vertically(MAIN_H);
        main_panel(&main, tl)?;
        let (throttle, rest) = rest.split_vertically(THROTTLE_H);
        throttle_panel(&throttle, tl)?;
        if !channels.is_empty() {
            channel_panel(&rest, tl, &channels)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// The headline: outcome, times, passes, bytes.
pub fn title_line(tl: &Timeline) -> String {
    let last = tl.samples.last();
    let secs = tl
        .total_time
        .map(|ms| ms as f64 / 1000.0)
        .or_else(|| last.map(|s| s.t_ms / 1000.0))
        .unwrap_or(0.0);
    let sent = human_bytes(last.map_or(0, |s| s.transferred));
    let mut t = format!("Migration {} after {secs:.2} s", tl.status.as_str());
    if let Some(d) = tl.downtime {
        t.push_str(&format!(" · downtime {d} ms"));
    }
    t.push_str(&format!(
        " · {} passes · {sent} sent · guest RAM {}",
        tl.passes,
        human_bytes(tl.ram_total)
    ));
    t
}

/// The settings line, with the last XBZRLE / compression ratios when there are any.
pub fn settings_line(tl: &Timeline) -> String {
    let s = &tl.settings;
    let onoff = |b: bool| if b { "on" } else { "off" };
    let multifd = if s.multifd_channels > 0 {
        format!(
            "{} channels, {}",
            s.multifd_channels,
            s.multifd_compression.as_deref().unwrap_or("none")
        )
    } else {
        "off".into()
    };
    let bw = if s.max_bandwidth == 0 {
        "unlimited".to_string()
    } else {
        format!("{}/s", human_bytes(s.max_bandwidth))
    };
    let mut t = format!(
        "multifd {multifd} | xbzrle {} | auto-converge {} | downtime-limit {} ms | max-bandwidth {bw}",
        onoff(s.xbzrle),
        onoff(s.auto_converge),
        s.downtime_limit
    );
    let last_some =
        |f: fn(&migration::timeline::Sample) -> Option<f64>| tl.samples.iter().rev().find_map(f);
    if let Some(r) = last_some(|x| x.xbzrle_encoding_rate) {
        t.push_str(&format!(" | XBZRLE encoding rate {r:.2}"));
    }
    if let Some(r) = last_some(|x| x.compression_ratio) {
        t.push_str(&format!(" | compression ratio {r:.2}"));
    }
    t
}

fn header(area: &Area, tl: &Timeline) -> Result<(), ReportError> {
    area.draw(&Text::new(
        title_line(tl),
        (16, 12),
        (FONT, 26).into_font().color(&BLACK),
    ))
    .map_err(draw_err)?;
    area.draw(&Text::new(
        settings_line(tl),
        (16, 44),
        (FONT, 17).into_font().color(&RGBColor(80, 80, 80)),
    ))
    .map_err(draw_err)?;
    if let Some(e) = &tl.error_desc {
        area.draw(&Text::new(
            format!("error: {e}"),
            (16, 62),
            (FONT, 16).into_font().color(&DIRTY),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

/// What a legend entry shows beside its text.
#[derive(Debug, Clone, Copy)]
enum Mark {
    /// A line of this colour and width.
    Line(RGBColor, u32),
    /// A dashed line.
    Dashed(RGBColor),
    /// A filled box.
    Band(RGBAColor),
}

/// Draws `entries` in the legend column right of `chart`'s plotting area (past the right
/// axis when there is one), so a legend never hides a line.
fn legend<CT: CoordTranslate>(
    area: &Area,
    chart: &ChartContext<'_, SVGBackend<'_>, CT>,
    right_axis: bool,
    entries: &[(String, Mark)],
) -> Result<(), ReportError> {
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let (bx, by) = area.get_base_pixel();
    let x0 = xs.end - bx + if right_axis { 82 } else { 14 };
    let y0 = ys.start - by + 8;
    let font = (FONT, 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (text, mark)) in entries.iter().enumerate() {
        let y = y0 + 20 * i as i32;
        match *mark {
            Mark::Line(c, w) => area
                .draw(&PathElement::new(
                    vec![(x0, y), (x0 + 22, y)],
                    c.stroke_width(w),
                ))
                .map_err(draw_err)?,
            Mark::Dashed(c) => {
                for x in [x0, x0 + 9, x0 + 18] {
                    area.draw(&PathElement::new(
                        vec![(x, y), (x + 5, y)],
                        c.stroke_width(2),
                    ))
                    .map_err(draw_err)?;
                }
            }
            Mark::Band(c) => area
                .draw(&Rectangle::new([(x0, y - 6), (x0 + 22, y + 6)], c.filled()))
                .map_err(draw_err)?,
        }
        area.draw(&Text::new(text.clone(), (x0 + 30, y), font.clone()))
            .map_err(draw_err)?;
    }
    Ok(())
}

type Cart =
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>;

fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    span: f64,
    y_max: f64,
    right_axis: bool,
) -> Result<ChartContext<'a, SVGBackend<'b>, Cart>, ReportError> {
    let mut b = ChartBuilder::on(area);
    b.margin(10)
        .margin_right(if right_axis { LEGEND_W } else { LEGEND_W + 70 })
        .caption(caption, (FONT, 20))
        .x_label_area_size(38)
        .y_label_area_size(70);
    if right_axis {
        b.right_y_label_area_size(70);
    }
    b.build_cartesian_2d(0f64..span, 0f64..y_max)
        .map_err(draw_err)
}

fn mesh(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cart>,
    y_desc: &str,
) -> Result<(), ReportError> {
    chart
        .configure_mesh()
        .x_desc("time since migrate (s)")
        .y_desc(y_desc)
        .light_line_style(GRID)
        .max_light_lines(2)
        .label_style((FONT, 15))
        .draw()
        .map_err(draw_err)
}

fn vertical(x: f64, y_max: f64, style: ShapeStyle) -> PathElement<(f64, f64)> {
    PathElement::new(vec![(x, 0.0), (x, y_max)], style)
}

fn main_panel(area: &Area, tl: &Timeline) -> Result<(), ReportError> {
    let span = series::span_s(tl);
    let remaining = series::remaining_mib(tl);
    let dirty = series::dirty_rate_mib_s(tl);
    let dirtied = series::dirtied_per_pass_mib_s(tl);
    let send = series::send_rate_mib_s(tl);
    let y_max = nice_max(remaining.max().max(tl.ram_total as f64 / MIB * 0.05));
    let r_max = nice_max(dirty.max().max(send.max()).max(dirtied.max()));
    let mut chart = panel(
        area,
        "Remaining memory, dirty rate and sending rate",
        span,
        y_max,
        true,
    )?
    .set_secondary_coord(0f64..span, 0f64..r_max);
    mesh(&mut chart, "remaining (MiB)")?;
    chart
        .configure_secondary_axes()
        .y_desc("rate (MiB/s)")
        .label_style((FONT, 15))
        .draw()
        .map_err(draw_err)?;
    let mut entries = Vec::new();

    if let Some(d) = tl.downtime_interval {
        // At least a few pixels wide, or a 10 ms downtime in a 5 s chart is invisible.
        let x0 = d.start_ms / 1000.0;
        let x1 = (d.end_ms / 1000.0).max(x0 + span * 0.004);
        let band = DOWNTIME.mix(0.4);
        chart
            .draw_series(once(Rectangle::new(
                [(x0, 0.0), (x1, y_max)],
                band.filled(),
            )))
            .map_err(draw_err)?;
        entries.push((
            format!("downtime {} ms", tl.downtime.unwrap_or(0)),
            Mark::Band(band),
        ));
    }

    let passes = tl.pass_times();
    if !passes.is_empty() {
        chart
            .draw_series(
                passes
                    .iter()
                    .map(|&(_, t)| vertical(t / 1000.0, y_max, PASS.stroke_width(1))),
            )
            .map_err(draw_err)?;
        // Labels along the top, skipping those that would overlap the previous one.
        let style = (FONT, 13)
            .into_font()
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Left, VPos::Top));
        let mut last_x = f64::NEG_INFINITY;
        let mut labels = Vec::new();
        for &(p, t) in &passes {
            let x = t / 1000.0;
            if x - last_x >= span * 0.03 {
                labels.push(Text::new(format!(" p{p}"), (x, y_max), style.clone()));
                last_x = x;
            }
        }
        chart.draw_series(labels).map_err(draw_err)?;
        entries.push(("dirty sync: end of pass pN".into(), Mark::Line(PASS, 1)));
    }

    if let Some(sw) = tl.switchover_ms {
        chart
            .draw_series(once(vertical(sw / 1000.0, y_max, BLACK.stroke_width(2))))
            .map_err(draw_err)?;
        entries.push(("switchover (guest stopped)".into(), Mark::Line(BLACK, 2)));
    }

    chart
        .draw_series(LineSeries::new(
            remaining.points.clone(),
            REMAINING.stroke_width(3),
        ))
        .map_err(draw_err)?;
    entries.push((remaining.name.clone(), Mark::Line(REMAINING, 3)));
    chart
        .draw_secondary_series(DashedLineSeries::new(
            dirtied.points.clone(),
            6,
            4,
            DIRTIED.stroke_width(2),
        ))
        .map_err(draw_err)?;
    entries.push((dirtied.name.clone(), Mark::Dashed(DIRTIED)));
    for (s, c) in [(&dirty, DIRTY), (&send, SEND)] {
        chart
            .draw_secondary_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))
            .map_err(draw_err)?;
        entries.push((s.name.clone(), Mark::Line(c, 2)));
    }
    legend(area, &chart, true, &entries)
}

fn throttle_panel(area: &Area, tl: &Timeline) -> Result<(), ReportError> {
    let span = series::span_s(tl);
    let steps = series::throttle_steps(tl);
    let changes = series::throttle_changes(tl);
    let expected = series::expected_downtime_ms(tl);
    let limit = tl.settings.downtime_limit as f64;
    let e_max = nice_max(expected.max().max(limit));
    let mut chart = panel(
        area,
        "vCPU throttle (auto-converge) and expected downtime",
        span,
        100.0,
        true,
    )?
    .set_secondary_coord(0f64..span, 0f64..e_max);
    mesh(&mut chart, "throttle (%)")?;
    chart
        .configure_secondary_axes()
        .y_desc("downtime (ms)")
        .label_style((FONT, 15))
        .draw()
        .map_err(draw_err)?;
    let mut entries = Vec::new();
    if let Some(sw) = tl.switchover_ms {
        chart
            .draw_series(once(vertical(sw / 1000.0, 100.0, BLACK.stroke_width(2))))
            .map_err(draw_err)?;
    }
    chart
        .draw_series(LineSeries::new(
            steps.points.clone(),
            THROTTLE.stroke_width(2),
        ))
        .map_err(draw_err)?;
    entries.push((steps.name.clone(), Mark::Line(THROTTLE, 2)));
    let style = (FONT, 15)
        .into_font()
        .color(&THROTTLE)
        .pos(Pos::new(HPos::Left, VPos::Bottom));
    chart
        .draw_series(
            changes
                .iter()
                .map(|&(t, p)| Text::new(format!(" {p}%"), (t, f64::from(p)), style.clone())),
        )
        .map_err(draw_err)?;
    if changes.is_empty() {
        chart
            .draw_series(once(Text::new(
                "the guest was never throttled",
                (span * 0.02, 50.0),
                (FONT, 16).into_font().color(&RGBColor(120, 120, 120)),
            )))
            .map_err(draw_err)?;
    }
    chart
        .draw_secondary_series(LineSeries::new(
            expected.points.clone(),
            EXPECTED.stroke_width(2),
        ))
        .map_err(draw_err)?;
    entries.push((expected.name.clone(), Mark::Line(EXPECTED, 2)));
    if limit > 0.0 {
        chart
            .draw_secondary_series(DashedLineSeries::new(
                vec![(0.0, limit), (span, limit)],
                8,
                5,
                EXPECTED.stroke_width(1),
            ))
            .map_err(draw_err)?;
        entries.push((
            format!("downtime-limit ({} ms)", tl.settings.downtime_limit),
            Mark::Dashed(EXPECTED),
        ));
    }
    legend(area, &chart, true, &entries)
}

fn channel_panel(area: &Area, tl: &Timeline, channels: &[Series]) -> Result<(), ReportError> {
    let span = series::span_s(tl);
    let c_max = nice_max(channels.iter().map(Series::max).fold(0.0, f64::max));
    let mut chart = panel(
        area,
        &format!(
            "Throughput per multifd channel ({} channels)",
            channels.len()
        ),
        span,
        c_max,
        false,
    )?;
    mesh(&mut chart, "MiB/s")?;
    let mut entries = Vec::new();
    for (i, s) in channels.iter().enumerate() {
        let c = CHANNELS[i % CHANNELS.len()];
        chart
            .draw_series(LineSeries::new(s.points.clone(), c.stroke_width(2)))
            .map_err(draw_err)?;
        entries.push((s.name.clone(), Mark::Line(c, 2)));
    }
    legend(area, &chart, false, &entries)
}
