//! The guest-memory images the throughput and rate rows load (`--memory SIZE,mem-path=IMAGE`).
//!
//! The real ones are 2 GiB each, made by `scripts/bench-data.sh` (shared/bench-data/
//! gen_dataset.py): `mixed` (half zero pages, half pages of /usr/lib) and `random`
//! (incompressible). For a quick smoke run without them, [`synthesize`] writes small
//! stand-ins of the same two kinds: `random` from a xorshift generator, `mixed` with a
//! zero page or a page of this machine's /usr/lib files (or of text, when there are none)
//! per coin toss.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The two data sets.
pub const KINDS: [&str; 2] = ["mixed", "random"];

/// One image.
#[derive(Debug, Clone, Serialize)]
pub struct DataSet {
    /// "mixed" or "random".
    pub kind: String,
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Whether the benchmark made it (a small stand-in) instead of finding it.
    pub synthesized: bool,
}

/// The default place of the images (what scripts/bench-data.sh uses).
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_BENCH_DATA") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("ferry").join("bench-data")
}

/// The image of `kind` in `dir` if it holds at least `min_size` bytes.
pub fn find(dir: &Path, kind: &str, min_size: u64) -> Option<DataSet> {
    let path = dir.join(format!("{kind}.img"));
    let size = std::fs::metadata(&path).ok()?.len();
    (size >= min_size).then(|| DataSet {
        kind: kind.to_string(),
        path,
        size,
        synthesized: false,
    })
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Up to `want` bytes of this machine's /usr/lib files (sorted walk), for "mixed" pages.
fn usr_lib_bytes(want: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(want);
    let mut stack = vec![PathBuf::from("/usr/lib")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries.iter().rev() {
            let Ok(meta) = std::fs::symlink_metadata(p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p.clone());
            }
        }
        for p in entries {
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if let Ok(mut f) = std::fs::File::open(&p) {
                let room = want - out.len();
                let _ = Read::take(&mut f, room as u64).read_to_end(&mut out);
            }
            if out.len() >= want {
                return out;
            }
        }
    }
    out
}

/// Writes a `size`-byte stand-in image of `kind` into `dir`.
pub fn synthesize(dir: &Path, kind: &str, size: u64) -> std::io::Result<DataSet> {
    let path = dir.join(format!("{kind}-{}M.img", size >> 20));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ size);
    let mut page = vec![0u8; 4096];
    let pages = size / 4096;
    let lib = if kind == "mixed" {
        usr_lib_bytes((pages as usize / 2 + 64) * 4096)
    } else {
        Vec::new()
    };
    let mut lib_at = 0usize;
    for _ in 0..pages {
        match kind {
            "mixed" if rng.next() & 1 == 0 => page.fill(0),
            "mixed" => {
                if lib_at + 4096 <= lib.len() {
                    page.copy_from_slice(&lib[lib_at..lib_at + 4096]);
                    lib_at += 4096;
                } else {
                    // No /usr/lib to read: compressible text-like bytes.
                    for b in page.iter_mut() {
                        *b = b'a' + (rng.next() % 16) as u8;
                    }
                }
            }
            _ => rng.fill(&mut page),
        }
        f.write_all(&page)?;
    }
    f.flush()?;
    Ok(DataSet {
        kind: kind.to_string(),
        path,
        size: pages * 4096,
        synthesized: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthesized_images_have_the_size_and_character_asked_for() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = synthesize(&dir, "mixed", 4 << 20).unwrap();
        let r = synthesize(&dir, "random", 4 << 20).unwrap();
        for d in [&m, &r] {
            assert_eq!(std::fs::metadata(&d.path).unwrap().len(), 4 << 20);
            assert!(d.synthesized);
        }
        let zero_pages = |p: &Path| {
            std::fs::read(p)
                .unwrap()
                .chunks(4096)
                .filter(|c| c.iter().all(|&b| b == 0))
                .count()
        };
        let zm = zero_pages(&m.path);
        assert!(
            (300..=724).contains(&zm),
            "about half of 1024 pages are zero: {zm}"
        );
        assert_eq!(zero_pages(&r.path), 0);
        assert!(
            find(&dir, "random", 1).is_none(),
            "stand-ins are not the real sets"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finds_an_image_only_when_big_enough() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("random.img"), vec![1u8; 8192]).unwrap();
        assert!(find(&dir, "random", 8192).is_some());
        assert!(find(&dir, "random", 8193).is_none());
        assert!(find(&dir, "mixed", 1).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
