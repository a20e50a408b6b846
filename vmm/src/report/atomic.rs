//! Whole-or-nothing file writes: a temporary file beside the target, synced, then renamed.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::ReportError;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The temporary name for `path`: hidden, in the same directory (so rename is atomic),
/// unique per process and call.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let tmp = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(tmp)
}

/// Writes `path` with what `fill` writes: into a temporary file beside it, flushed and
/// synced, then renamed over `path`. When anything fails the temporary file is removed
/// and `path` is left as it was (absent, or its previous contents).
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.file_name().is_none() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        )));
    }
    let tmp = temp_path(path);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io)?;
    let result = (|| {
        let mut w = BufWriter::new(file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // Make the rename itself durable; a failure here loses nothing already visible.
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-atomic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = scratch("fail");
        let p = d.join("chart.svg");
        std::fs::write(&p, "old").unwrap();
        let r = write_atomic(&p, |w| {
            w.write_all(b"half a chart")?;
            Err(std::io::Error::other("the renderer gave up"))
        });
        assert!(matches!(r, Err(ReportError::Io { .. })));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(names(&d), vec!["chart.svg".to_string()]);
        write_atomic(&p, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(names(&d), vec!["chart.svg".to_string()]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let d = scratch("missing");
        let p = d.join("no/such/dir/chart.svg");
        let e = write_atomic(&p, |w| w.write_all(b"x")).unwrap_err();
        assert!(e.to_string().contains("chart.svg"), "{e}");
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
