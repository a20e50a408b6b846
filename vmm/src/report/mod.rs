//! Migration reports people can look at: a chart of one migration's timeline, a summary
//! chart of `ferry bench migrate`, or the raw timeline as JSON.
//!
//! - [`series`]: the figures a chart plots, derived from a [`Timeline`] (windowed rates,
//!   throttle steps), kept apart from drawing so they can be tested as numbers;
//! - [`timeline_chart`]: remaining memory and dirty/sending rates over time with the
//!   passes, the switchover and the downtime interval marked; throttle steps and expected
//!   downtime below; per-channel throughput when multifd ran;
//! - [`summary_chart`]: GiB/s per configuration and data set, with the reference figures
//!   measured in the same run beside them ([`bench_migrate`] fills it from
//!   `ferry bench migrate` and writes a chart per row next to it);
//! - [`atomic`]: every file is written to a temporary name beside its target, synced and
//!   renamed, so a failure never leaves half a file behind.
//!
//! Charts are SVG drawn by plotters' SVG backend (no system libraries, no fonts needed to
//! draw; text is left to whatever displays the SVG).

pub mod atomic;
pub mod bench_migrate;
pub mod series;
pub mod summary_chart;
pub mod timeline_chart;

use std::path::{Path, PathBuf};

use migration::timeline::Timeline;
use thiserror::Error;

pub use atomic::write_atomic;
pub use summary_chart::{render_summary, Summary, SummaryRow};
pub use timeline_chart::render_timeline;

/// Why a report could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The file name asks for a format Ferry does not write.
    #[error("{0}: a report is .svg (a chart) or .json (the raw timeline)")]
    Format(PathBuf),
    /// There is nothing to draw.
    #[error("nothing to draw: {0}")]
    Empty(String),
    /// plotters failed to draw.
    #[error("drawing the chart: {0}")]
    Draw(String),
    /// The timeline could not be encoded or decoded.
    #[error("the timeline as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing the file failed (nothing was left at the target).
    #[error("writing {path}: {source}")]
    Io {
        /// The target file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What a report file holds, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An SVG chart.
    Svg,
    /// The raw timeline.
    Json,
}

impl Format {
    /// The format a path's extension names (case-insensitive).
    pub fn of(path: &Path) -> Result<Format, ReportError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("json") => Ok(Format::Json),
            _ => Err(ReportError::Format(path.to_path_buf())),
        }
    }
}

/// Writes `timeline` to `path`: a chart for `.svg`, the raw timeline for `.json`.
///
/// The chart is drawn before anything is written; the file appears whole or not at all.
pub fn write_timeline(path: &Path, timeline: &Timeline) -> Result<(), ReportError> {
    let bytes = match Format::of(path)? {
        Format::Svg => render_timeline(timeline)?.into_bytes(),
        Format::Json => {
            let mut v = serde_json::to_vec_pretty(timeline)?;
            v.push(b'\n');
            v
        }
    };
    write_atomic(path, |w| w.write_all(&bytes))
}

/// Writes a summary chart (SVG) to `path`, whole or not at all.
pub fn write_summary(path: &Path, summary: &Summary) -> Result<(), ReportError> {
    let svg = render_summary(summary)?;
    write_atomic(path, |w| w.write_all(svg.as_bytes()))
}

/// A timeline from `ferry-query-migrate-timeline`'s reply.
pub fn timeline_from_json(v: serde_json::Value) -> Result<Timeline, ReportError> {
    Ok(serde_json::from_value(v)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_chooses_the_format() {
        assert_eq!(Format::of(Path::new("a/b.svg")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("B.SVG")).unwrap(), Format::Svg);
        assert_eq!(Format::of(Path::new("t.json")).unwrap(), Format::Json);
        assert!(matches!(
            Format::of(Path::new("t.png")),
            Err(ReportError::Format(_))
        ));
        assert!(Format::of(Path::new("noext")).is_err());
    }
}
