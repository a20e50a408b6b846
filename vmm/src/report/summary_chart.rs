//! `ferry bench migrate`'s summary chart: one horizontal pair of bars per row (a
//! configuration and data set): what Ferry reached and, beside it, the reference measured
//! in the same run; optional bands for outside figures (QEMU's, quoted by an issue).

use std::iter::once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::timeline_chart::draw_err;
use super::ReportError;

const FONT: &str = "sans-serif";
const WIDTH: u32 = 1100;
const LABEL_W: u32 = 270;
const ROW_H: u32 = 46;
const VALUE: RGBColor = RGBColor(31, 119, 180);
const REFERENCE: RGBColor = RGBColor(160, 160, 160);
const BAND: RGBColor = RGBColor(255, 127, 14);

/// One row: a configuration on a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// Row label, e.g. "random · multifd-2 · fresh".
    pub label: String,
    /// Ferry's figure (None: the row did not run).
    pub value: Option<f64>,
    /// The same-run reference figure for this row.
    pub reference: Option<f64>,
    /// What the reference is, e.g. "TCP 2 streams".
    pub reference_label: Option<String>,
    /// Why the row has no figure, when it has none.
    pub note: Option<String>,
}

/// A range of an outside figure drawn across every row.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    /// Legend text.
    pub label: String,
    /// Low end.
    pub low: f64,
    /// High end.
    pub high: f64,
}

/// The whole summary chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Headline.
    pub title: String,
    /// Second line (hosts, memory, data sets).
    pub subtitle: String,
    /// Unit of the x axis, e.g. "GiB/s".
    pub unit: String,
    /// Legend of Ferry's bars.
    pub value_legend: String,
    /// Legend of the reference bars.
    pub reference_legend: String,
    /// The rows, top to bottom.
    pub rows: Vec<SummaryRow>,
    /// Outside figures as bands.
    pub bands: Vec<Band>,
}

/// The summary as an SVG document.
pub fn render_summary(s: &Summary) -> Result<String, ReportError> {
    if s.rows.is_empty() {
        return Err(ReportError::Empty("the summary has no rows".into()));
    }
    let n = s.rows.len();
    let legend_n = 2 + s.bands.len() as u32;
    let chart_h = ROW_H * n as u32 + 70;
    let height = 72 + chart_h + 22 * legend_n + 16;
    let x_max = s
        .rows
        .iter()
        .flat_map(|r| [r.value, r.reference])
        .flatten()
        .chain(s.bands.iter().map(|b| b.high))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let x_max = if x_max > 0.0 { x_max * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        root.draw(&Text::new(
            s.title.clone(),
            (16, 12),
            (FONT, 26).into_font().color(&BLACK),
        ))
        .map_err(draw_err)?;
        root.draw(&Text::new(
            s.subtitle.clone(),
            (16, 44),
            (FONT, 17).into_font().color(&RGBColor(80, 80, 80)),
        ))
        .map_err(draw_err)?;
        let (_, rest) = root.split_vertically(72);
        let (body, below) = rest.split_vertically(chart_h);
        let mut chart = ChartBuilder::on(&body)
            .margin(10)
            .margin_left(LABEL_W)
            .margin_right(30)
            .x_label_area_size(40)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc(s.unit.clone())
            .light_line_style(RGBColor(236, 236, 236))
            .max_light_lines(1)
            .label_style((FONT, 15))
            .draw()
            .map_err(draw_err)?;
        for (i, b) in s.bands.iter().enumerate() {
            chart
                .draw_series(once(Rectangle::new(
                    [(b.low, 0.0), (b.high.max(b.low), n as f64)],
                    BAND.mix(0.15 + 0.1 * i as f64).filled(),
                )))
                .map_err(draw_err)?;
        }
        let base = |i: usize| (n - 1 - i) as f64;
        chart
            .draw_series(s.rows.iter().enumerate().filter_map(|(i, r)| {
                r.value.map(|v| {
                    Rectangle::new([(0.0, base(i) + 0.52), (v, base(i) + 0.9)], VALUE.filled())
                })
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(s.rows.iter().enumerate().filter_map(|(i, r)| {
                r.reference.map(|v| {
                    Rectangle::new(
                        [(0.0, base(i) + 0.1), (v, base(i) + 0.48)],
                        REFERENCE.filled(),
                    )
                })
            }))
            .map_err(draw_err)?;
        let left = Pos::new(HPos::Left, VPos::Center);
        for (i, r) in s.rows.iter().enumerate() {
            let y = base(i);
            match r.value {
                Some(v) => chart
                    .draw_series(once(Text::new(
                        format!(" {v:.2}"),
                        (v, y + 0.71),
                        (FONT, 15).into_font().color(&VALUE).pos(left),
                    )))
                    .map_err(draw_err)?,
                None => chart
                    .draw_series(once(Text::new(
                        format!(
                            " not measured: {}",
                            r.note.as_deref().unwrap_or("no figure")
                        ),
                        (0.0, y + 0.71),
                        (FONT, 15)
                            .into_font()
                            .color(&RGBColor(150, 50, 50))
                            .pos(left),
                    )))
                    .map_err(draw_err)?,
            };
            if let Some(v) = r.reference {
                let what = r.reference_label.as_deref().unwrap_or("reference");
                chart
                    .draw_series(once(Text::new(
                        format!(" {v:.2} ({what})"),
                        (v, y + 0.29),
                        (FONT, 13)
                            .into_font()
                            .color(&RGBColor(90, 90, 90))
                            .pos(left),
                    )))
                    .map_err(draw_err)?;
            }
            let (px, py) = chart.backend_coord(&(0.0, y + 0.5));
            root.draw(&Text::new(
                r.label.clone(),
                (px - 10, py),
                (FONT, 16)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(draw_err)?;
        }
        // The legend below the chart, where it hides no bar.
        let mut entries: Vec<(String, RGBAColor)> = vec![
            (s.value_legend.clone(), VALUE.to_rgba()),
            (s.reference_legend.clone(), REFERENCE.to_rgba()),
        ];
        for (i, b) in s.bands.iter().enumerate() {
            entries.push((b.label.clone(), BAND.mix(0.15 + 0.1 * i as f64)));
        }
        let x0 = LABEL_W as i32 + 10;
        let font = (FONT, 15)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (i, (text, color)) in entries.into_iter().enumerate() {
            let y = 10 + 22 * i as i32;
            below
                .draw(&Rectangle::new(
                    [(x0, y - 6), (x0 + 22, y + 6)],
                    color.filled(),
                ))
                .map_err(draw_err)?;
            below
                .draw(&Text::new(text, (x0 + 30, y), font.clone()))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_row_and_reference_is_drawn() {
        let s = Summary {
            title: "ferry bench migrate".into(),
            subtitle: "loopback".into(),
            unit: "GiB/s".into(),
            value_legend: "Ferry".into(),
            reference_legend: "TCP, same run".into(),
            rows: vec![
                SummaryRow {
                    label: "random plain fresh".into(),
                    value: Some(2.5),
                    reference: Some(3.0),
                    reference_label: Some("TCP 1 stream".into()),
                    note: None,
                },
                SummaryRow {
                    label: "random zstd-1 fresh".into(),
                    value: None,
                    reference: None,
                    reference_label: None,
                    note: Some("not built".into()),
                },
            ],
            bands: vec![Band {
                label: "QEMU 7.2".into(),
                low: 1.0,
                high: 1.4,
            }],
        };
        let svg = render_summary(&s).unwrap();
        for text in [
            "random plain fresh",
            "random zstd-1 fresh",
            "2.50",
            "3.00 (TCP 1 stream)",
            "not measured: not built",
            "QEMU 7.2",
            "TCP, same run",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // Background, band, two bars, legend boxes: rectangles.
        assert!(svg.matches("<rect").count() >= 5);
        assert!(render_summary(&Summary::default()).is_err());
    }
}
