//! `/proc/self/pagemap` for guest RAM: which pages are present, which are still
//! write-protected by userfaultfd (bit 57, what tests and cleanup checks read).
//!
//! Note: a write-protect *marker* on a page that was never populated reads as a swap entry
//! (bit 62) with bit 57 set, so "present or swapped" stops meaning "holds data" once RAM is
//! protected; [`present_pages`] therefore looks at bit 63 only.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use ram::{GuestRam, PAGE_SIZE};

/// Bit 63: page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: page swapped (or a pte marker).
pub const PM_SWAP: u64 = 1 << 62;
/// Bit 57: page write-protected by userfaultfd.
pub const PM_UFFD_WP: u64 = 1 << 57;

/// Entries read per pread (512 KiB).
const CHUNK: usize = 64 << 10;

/// Calls `f(page_index, entry)` for each of the `pages` pages from host address `addr`
/// (of process `pid`, or this one).
pub fn for_each_entry(
    pid: Option<u32>,
    addr: usize,
    pages: usize,
    mut f: impl FnMut(usize, u64),
) -> io::Result<()> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/pagemap"),
        None => "/proc/self/pagemap".to_string(),
    };
    let file = File::open(path)?;
    let first = addr / PAGE_SIZE;
    let mut buf = vec![0u8; CHUNK.min(pages.max(1)) * 8];
    let mut done = 0;
    while done < pages {
        let n = CHUNK.min(pages - done);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, ((first + done) * 8) as u64)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            f(done + i, u64::from_le_bytes(w));
        }
        done += n;
    }
    Ok(())
}

/// `struct pm_scan_arg` (linux/fs.h).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range is registered with WP_ASYNC.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

nix::ioctl_readwrite!(
    /// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` (Linux 6.7+).
    pagemap_scan,
    b'f',
    16,
    PmScanArg
);

/// Reads and re-arms the pages written under `UFFD_FEATURE_WP_ASYNC` protection with one
/// `PAGEMAP_SCAN` walk per call.
pub struct PagemapScanner {
    pagemap: File,
    regions: Vec<PageRegion>,
}

impl PagemapScanner {
    /// Opens `/proc/self/pagemap`.
    pub fn new() -> io::Result<Self> {
        Ok(PagemapScanner {
            pagemap: File::open("/proc/self/pagemap")?,
            regions: vec![PageRegion::default(); 4096],
        })
    }

    /// Calls `f(first, count)` for every run of pages of `[addr, addr + len)` written since
    /// they were last protected (page indexes from `addr`), and protects them again.
    pub fn take_written(
        &mut self,
        addr: usize,
        len: usize,
        mut f: impl FnMut(u64, u64),
    ) -> io::Result<()> {
        let end = (addr + len) as u64;
        let mut at = addr as u64;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` is a live pm_scan_arg whose `vec` points at `self.regions`
            // (vec_len entries), which the kernel fills; nothing else borrows them.
            let n =
                unsafe { pagemap_scan(std::os::fd::AsRawFd::as_raw_fd(&self.pagemap), &mut arg) }
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            for r in &self.regions[..(n as usize).min(self.regions.len())] {
                let first = (r.start - addr as u64) / PAGE_SIZE as u64;
                f(first, (r.end - r.start) / PAGE_SIZE as u64);
            }
            if arg.walk_end <= at {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// Pages of guest RAM whose uffd-wp bit is set (0 once a snapshot has cleaned up).
pub fn protected_pages(ram: &GuestRam) -> io::Result<u64> {
    let mut n = 0;
    for r in ram.regions() {
        for_each_entry(
            None,
            r.host_addr,
            (r.size / PAGE_SIZE as u64) as usize,
            |_, e| {
                if e & PM_UFFD_WP != 0 {
                    n += 1;
                }
            },
        )?;
    }
    Ok(n)
}

/// RAM page numbers `[start, end)` whose page is present in memory (bit 63), merged.
pub fn present_pages(ram: &GuestRam) -> io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in ram.regions() {
        let base = r.ram_offset / PAGE_SIZE as u64;
        for_each_entry(
            None,
            r.host_addr,
            (r.size / PAGE_SIZE as u64) as usize,
            |i, e| {
                if e & PM_PRESENT != 0 {
                    let p = base + i as u64;
                    match out.last_mut() {
                        Some((_, end)) if *end == p => *end = p + 1,
                        _ => out.push((p, p + 1)),
                    }
                }
            },
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::{Backend, MemoryConfig};

    #[test]
    fn present_pages_follow_writes() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend: Backend::AnonymousPrivate,
            ..MemoryConfig::default()
        })
        .unwrap();
        ram.write_page(3, &[1u8; 4096]).unwrap();
        ram.write_page(4, &[1u8; 4096]).unwrap();
        ram.write_page(9, &[1u8; 4096]).unwrap();
        let p = present_pages(&ram).unwrap();
        for page in [3, 4, 9] {
            assert!(
                p.iter().any(|&(s, e)| s <= page && page < e),
                "{page}: {p:?}"
            );
        }
        assert!(
            p.windows(2).all(|w| w[0].1 < w[1].0),
            "sorted and merged: {p:?}"
        );
        assert_eq!(protected_pages(&ram).unwrap(), 0);
    }
}
