//! Which pages of guest RAM may hold data: holes of a shared memfd or file, and pages an
//! anonymous mapping never touched, are known to read as zero without looking at them.
//!
//! Reading a never-touched page costs a page fault (and, for shared memory, allocates
//! it); a migration's first pass uses this to send such pages as zero runs instead.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::geometry::PAGE_SIZE;
use crate::guest_ram::{GuestRam, RamRegion};

/// Half-open ranges of RAM pages `[start, end)` that may hold data (everything else is zero).
pub type PageRanges = Vec<(u64, u64)>;

fn seek(fd: i32, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor has no memory effects.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Data ranges of a file-backed region from SEEK_DATA/SEEK_HOLE.
fn file_data_ranges(fd: i32, r: &RamRegion, out: &mut PageRanges) -> io::Result<()> {
    let end = r.ram_offset + r.size;
    let mut pos = r.ram_offset;
    while pos < end {
        let Some(data) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let first = data / PAGE_SIZE as u64;
        let last = hole.div_ceil(PAGE_SIZE as u64);
        match out.last_mut() {
            Some((_, e)) if *e >= first => *e = (*e).max(last),
            _ => out.push((first, last)),
        }
        pos = hole;
    }
    Ok(())
}

/// Present-or-swapped pages of a region from /proc/self/pagemap.
fn pagemap_ranges(r: &RamRegion, out: &mut PageRanges) -> io::Result<()> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let pages = r.size / PAGE_SIZE as u64;
    let first_vpn = r.host_addr as u64 / PAGE_SIZE as u64;
    let base_page = r.ram_offset / PAGE_SIZE as u64;
    const CHUNK: u64 = 64 << 10; // entries per read (512 KiB)
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut i = 0;
    while i < pages {
        let n = CHUNK.min(pages - i);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first_vpn + i) * 8)?;
        for (j, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let entry = u64::from_le_bytes(w);
            if entry & (3 << 62) != 0 {
                let p = base_page + i + j as u64;
                match out.last_mut() {
                    Some((_, e)) if *e == p => *e = p + 1,
                    _ => out.push((p, p + 1)),
                }
            }
        }
        i += n;
    }
    Ok(())
}

/// The union of two sorted lists of half-open ranges, merged where they touch.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> PageRanges {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: PageRanges = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some((_, last)) if *last >= s => *last = (*last).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The ranges of one region that may hold data.
fn region_ranges(shared: bool, file: Option<i32>, r: &RamRegion) -> io::Result<PageRanges> {
    let mut out = Vec::new();
    match (shared, file) {
        // The mapping is the file: its holes read as zero.
        (true, Some(fd)) => file_data_ranges(fd, r, &mut out)?,
        // A private mapping of a file: a page never written reads the file's bytes (even
        // before it is faulted in), a written one is an anonymous copy that pagemap sees.
        (false, Some(fd)) => {
            let mut from_file = Vec::new();
            file_data_ranges(fd, r, &mut from_file)?;
            pagemap_ranges(r, &mut out)?;
            out = union(&from_file, &out);
        }
        (_, None) => pagemap_ranges(r, &mut out)?,
    }
    Ok(out)
}

impl GuestRam {
    /// RAM page ranges that may hold data; pages outside them read as zero.
    ///
    /// Exact for shared memfds and shared files (SEEK_DATA), for anonymous mappings
    /// (pagemap: present or swapped), and for private mappings of a file (the file's data
    /// ranges plus the pages written since, from pagemap). When none works, every page is
    /// reported.
    pub fn data_ranges(&self) -> PageRanges {
        let mut out = Vec::new();
        let fd = self.backing_file().map(|f| f.as_raw_fd());
        for r in self.regions() {
            match region_ranges(self.is_shared(), fd, r) {
                Ok(ranges) => out.extend(ranges),
                Err(_) => {
                    let first = r.ram_offset / PAGE_SIZE as u64;
                    out.push((first, first + r.size / PAGE_SIZE as u64));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Backend, HugePages, MemoryConfig};
    use crate::guest_ram::GuestRam;

    fn ram(backend: Backend) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            backend,
            hugepages: HugePages::None,
            prealloc: false,
        })
        .unwrap()
    }

    fn file_ram(path: &std::path::Path, share: bool) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            backend: Backend::File {
                path: path.to_path_buf(),
                share,
            },
            hugepages: HugePages::None,
            prealloc: false,
        })
        .unwrap()
    }

    #[test]
    fn a_private_file_mapping_reports_the_files_data_before_it_is_touched() {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("ferry-residency-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        // Data in pages 10 and 3000 of the file; nothing else.
        f.write_all_at(&[0xab; 4096], 10 * 4096).unwrap();
        f.write_all_at(&[0xcd; 8], 3000 * 4096 + 16).unwrap();
        drop(f);
        for share in [false, true] {
            let r = file_ram(&path, share);
            // Written through the mapping: a private copy for share=off.
            r.write_u64(500 * 4096, 7).unwrap();
            let ranges = r.data_ranges();
            let covered = |p: u64| ranges.iter().any(|&(s, e)| p >= s && p < e);
            for p in [10u64, 3000, 500] {
                assert!(covered(p), "share={share}: page {p} not in {ranges:?}");
                assert!(!r.is_zero(p), "share={share}: page {p}");
            }
            for p in 0..r.page_count() {
                if !covered(p) {
                    assert!(r.is_zero(p), "share={share}: page {p} outside the ranges");
                }
            }
            let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            assert!(total < 64, "share={share}: far too much: {ranges:?}");
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn union_merges_overlapping_and_touching_ranges() {
        assert_eq!(
            super::union(&[(0, 2), (10, 12)], &[(1, 3), (3, 4), (20, 21)]),
            vec![(0, 4), (10, 12), (20, 21)]
        );
        assert_eq!(super::union(&[], &[(5, 6)]), vec![(5, 6)]);
    }

    #[test]
    fn untouched_memory_has_no_data() {
        for b in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let r = ram(b.clone());
            assert!(r.data_ranges().is_empty(), "{b:?}");
        }
    }

    #[test]
    fn written_pages_are_reported_and_nothing_is_missed() {
        for b in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let r = ram(b.clone());
            for p in [0u64, 1, 2, 100, 4095] {
                r.write_u64(p * 4096 + 8, 0xfeed).unwrap();
            }
            let ranges = r.data_ranges();
            let covered = |p: u64| ranges.iter().any(|&(s, e)| p >= s && p < e);
            for p in [0u64, 1, 2, 100, 4095] {
                assert!(covered(p), "{b:?}: page {p} not reported in {ranges:?}");
            }
            // Every page outside the ranges must really be zero.
            for p in 0..r.page_count() {
                if !covered(p) {
                    assert!(
                        r.is_zero(p),
                        "{b:?}: page {p} outside the ranges is not zero"
                    );
                }
            }
            let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            assert!(total < 64, "{b:?}: far too much reported: {ranges:?}");
        }
    }
}
