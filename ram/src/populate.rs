//! Faulting guest memory in before it is needed, so that nothing on a critical path (the
//! guest's first run, a migration's receive loop) stalls on page faults.
//!
//! On a nested host a 4 KiB page fault costs microseconds; MADV_POPULATE_WRITE faults a
//! whole range in one system call for a fraction of the cost, and several threads on
//! disjoint chunks scale it further. Two ways to use it:
//! - [`GuestRam::populate_with_progress`]: everything, now, on N threads (`prealloc=on`);
//! - [`BackgroundPopulate`]: everything, in RAM-offset order, on threads that run beside the
//!   caller (an incoming migration, whose first pass writes pages in that same order). A
//!   chunk that already has resident pages (the receiver got there first) is skipped, so the
//!   populate threads leapfrog ahead of the receiver instead of trailing it.
//!
//! Populating never changes what memory reads: it only allocates pages (zero for fresh
//! memory, the file's bytes for a file).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{madvise, RamError, MADV_POPULATE_WRITE};
use crate::geometry::{PAGE_SHIFT, PAGE_SIZE};
use crate::guest_ram::GuestRam;

/// Bytes one populate step covers (one madvise call; also the progress granularity).
pub const POPULATE_CHUNK: u64 = 4 << 20;

/// What a populate run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PopulateStats {
    /// Bytes faulted in by this run (chunks skipped as already resident are not counted).
    pub bytes: u64,
    /// Bytes of the chunks skipped because they already had resident pages.
    pub skipped_bytes: u64,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Threads used.
    pub threads: usize,
}

impl PopulateStats {
    /// Bytes per second (0 when nothing took time).
    pub fn bytes_per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// The chunks of guest RAM in RAM-offset order: (host address, length).
fn chunks(ram: &GuestRam) -> Vec<(usize, usize)> {
    let pages = ram.page_count();
    chunks_of(ram, &[(0, pages)])
}

/// The chunks covering the page ranges `[start, end)` (sorted, RAM-offset page numbers),
/// clipped to guest RAM and split at region boundaries and every [`POPULATE_CHUNK`].
fn chunks_of(ram: &GuestRam, ranges: &[(u64, u64)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let (start, end) = (start << PAGE_SHIFT, end.min(ram.page_count()) << PAGE_SHIFT);
        let mut at = start;
        while at < end {
            let Some((host, room)) = ram.host_addr(at) else {
                break;
            };
            // Chunks end on POPULATE_CHUNK boundaries of RAM offset, so neighbouring ranges
            // never split a chunk twice.
            let to_boundary = POPULATE_CHUNK - at % POPULATE_CHUNK;
            let len = (end - at).min(room).min(to_boundary);
            out.push((host as usize, len as usize));
            at += len;
        }
    }
    out
}

/// Whether any page of `[addr, addr + len)` is resident (mincore), or None if unknown.
fn any_resident(addr: usize, len: usize, vec: &mut Vec<u8>) -> Option<bool> {
    let pages = len.div_ceil(PAGE_SIZE);
    vec.resize(pages, 0);
    // SAFETY: `addr` is page aligned and `[addr, addr + len)` is a live mapping owned by the
    // GuestRam the caller holds; mincore writes one byte per page into `vec`, which has
    // room for exactly that many.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    (r == 0).then(|| vec.iter().any(|&b| b & 1 != 0))
}

/// State shared by the threads of one populate run.
struct Job {
    chunks: Vec<(usize, usize)>,
    next: AtomicU64,
    done: AtomicU64,
    skipped: AtomicU64,
    stop: AtomicBool,
    skip_resident: bool,
}

impl Job {
    /// Populates chunks until none is left or `stop` is set; returns the first error.
    fn work(&self) -> Result<(), RamError> {
        let mut vec = Vec::new();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let i = self.next.fetch_add(1, Ordering::AcqRel) as usize;
            let Some(&(addr, len)) = self.chunks.get(i) else {
                return Ok(());
            };
            if self.skip_resident && any_resident(addr, len, &mut vec) == Some(true) {
                self.skipped.fetch_add(len as u64, Ordering::Relaxed);
                continue;
            }
            madvise(addr as *mut u8, len, MADV_POPULATE_WRITE, "POPULATE_WRITE")?;
            self.done.fetch_add(len as u64, Ordering::Relaxed);
        }
    }
}

fn thread_count(threads: usize, chunks: usize) -> usize {
    threads.clamp(1, chunks.max(1))
}

impl GuestRam {
    /// Faults in all guest memory, writable, on `threads` threads, calling `progress(done,
    /// total)` (bytes) about every 100 ms and once at the end.
    pub fn populate_with_progress(
        &self,
        threads: usize,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<PopulateStats, RamError> {
        let t0 = Instant::now();
        let job = Job {
            chunks: chunks(self),
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            skip_resident: false,
        };
        let total = self.size();
        let threads = thread_count(threads, job.chunks.len());
        let result = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let r = job.work();
                        if r.is_err() {
                            job.stop.store(true, Ordering::Release);
                        }
                        r
                    })
                })
                .collect();
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(100));
                progress(job.done.load(Ordering::Relaxed), total);
            }
            handles.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(RamError::Madvise {
                        what: "POPULATE_WRITE",
                        source: io::Error::other("a populate thread panicked"),
                    })
                })
            })
        });
        result?;
        let bytes = job.done.load(Ordering::Relaxed);
        progress(bytes, total);
        Ok(PopulateStats {
            bytes,
            skipped_bytes: 0,
            elapsed: t0.elapsed(),
            threads,
        })
    }

    /// Faults in every page by touching it from one thread (a read and a write-back of one
    /// byte per page): the slow way, measured against [`GuestRam::populate_with_progress`].
    ///
    /// Only for memory nothing else uses at the same time: a concurrent write between the
    /// read and the write-back would be undone.
    pub fn populate_by_touch(&self) -> PopulateStats {
        let t0 = Instant::now();
        for r in self.regions() {
            let mut at = 0usize;
            while at < r.size as usize {
                let p = (r.host_addr + at) as *mut u8;
                // SAFETY: `p` is inside a live mapping of this GuestRam; volatile so that the
                // write (of the byte just read) really happens and faults the page in writable.
                unsafe {
                    let b = std::ptr::read_volatile(p);
                    std::ptr::write_volatile(p, b);
                }
                at += PAGE_SIZE;
            }
        }
        PopulateStats {
            bytes: self.size(),
            skipped_bytes: 0,
            elapsed: t0.elapsed(),
            threads: 1,
        }
    }
}

/// Guest memory being populated in the background, in RAM-offset order.
///
/// Stops when everything is done, when [`BackgroundPopulate::stop`] is called, or when it
/// is dropped (which also waits for the threads).
pub struct BackgroundPopulate {
    job: Arc<Job>,
    total: u64,
    threads: Vec<JoinHandle<Result<(), RamError>>>,
    started: Instant,
    finished_at: Arc<AtomicU64>,
}

impl BackgroundPopulate {
    /// Starts `threads` threads populating all of `ram`, skipping chunks that already have
    /// resident pages.
    pub fn start(ram: Arc<GuestRam>, threads: usize) -> Result<BackgroundPopulate, RamError> {
        let all = chunks(&ram);
        Self::start_chunks(ram, all, threads)
    }

    /// Like [`BackgroundPopulate::start`], but only the page ranges `[start, end)` (sorted
    /// RAM-offset page numbers), e.g. the ranges a migration source says hold data.
    pub fn start_ranges(
        ram: Arc<GuestRam>,
        ranges: &[(u64, u64)],
        threads: usize,
    ) -> Result<BackgroundPopulate, RamError> {
        let some = chunks_of(&ram, ranges);
        Self::start_chunks(ram, some, threads)
    }

    fn start_chunks(
        ram: Arc<GuestRam>,
        chunks: Vec<(usize, usize)>,
        threads: usize,
    ) -> Result<BackgroundPopulate, RamError> {
        let total = chunks.iter().map(|&(_, len)| len as u64).sum();
        let job = Arc::new(Job {
            chunks,
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            skip_resident: true,
        });
        let n = thread_count(threads, job.chunks.len());
        let started = Instant::now();
        let finished_at = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicU64::new(n as u64));
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let worker = job.clone();
            // Each thread keeps the memory mapped while it works.
            let ram = ram.clone();
            let running = running.clone();
            let finished_at = finished_at.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ram-populate-{i}"))
                .spawn(move || {
                    let r = worker.work();
                    drop(ram);
                    if running.fetch_sub(1, Ordering::AcqRel) == 1 {
                        finished_at.store(
                            started.elapsed().as_nanos().max(1) as u64,
                            Ordering::Release,
                        );
                    }
                    r
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(source) => {
                    job.stop.store(true, Ordering::Release);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(RamError::Thread(source));
                }
            }
        }
        Ok(BackgroundPopulate {
            job,
            total,
            threads: handles,
            started,
            finished_at,
        })
    }

    /// Bytes populated so far.
    pub fn done_bytes(&self) -> u64 {
        self.job.done.load(Ordering::Relaxed)
    }

    /// Bytes skipped because they were already resident.
    pub fn skipped_bytes(&self) -> u64 {
        self.job.skipped.load(Ordering::Relaxed)
    }

    /// Bytes this populate covers (all of guest RAM, or the ranges asked for).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Whether every thread has ended.
    pub fn is_finished(&self) -> bool {
        self.finished_at.load(Ordering::Acquire) != 0
    }

    /// Asks the threads to stop after their current chunk.
    pub fn stop(&self) {
        self.job.stop.store(true, Ordering::Release);
    }

    /// Stops (if still running), waits for the threads and returns what they did.
    pub fn finish(mut self) -> Result<PopulateStats, RamError> {
        self.stop();
        self.join_all()
    }

    /// Waits for the threads to populate everything and returns what they did.
    pub fn wait(mut self) -> Result<PopulateStats, RamError> {
        self.join_all()
    }

    fn join_all(&mut self) -> Result<PopulateStats, RamError> {
        let n = self.threads.len();
        let mut first_err = None;
        for h in self.threads.drain(..) {
            let r = h.join().unwrap_or_else(|_| {
                Err(RamError::Thread(io::Error::other(
                    "a populate thread panicked",
                )))
            });
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let ns = self.finished_at.load(Ordering::Acquire);
        Ok(PopulateStats {
            bytes: self.done_bytes(),
            skipped_bytes: self.skipped_bytes(),
            elapsed: if ns == 0 {
                self.started.elapsed()
            } else {
                Duration::from_nanos(ns)
            },
            threads: n,
        })
    }
}

impl Drop for BackgroundPopulate {
    fn drop(&mut self) {
        self.stop();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, HugePages, MemoryConfig};

    fn ram(backend: Backend, size: u64) -> Arc<GuestRam> {
        Arc::new(
            GuestRam::new(&MemoryConfig {
                size,
                backend,
                hugepages: HugePages::None,
                prealloc: false,
            })
            .unwrap(),
        )
    }

    fn resident_pages(r: &GuestRam) -> usize {
        let mut v = Vec::new();
        r.regions()
            .iter()
            .map(|reg| {
                v.resize((reg.size as usize).div_ceil(PAGE_SIZE), 0);
                // SAFETY: the region is a live mapping; `v` has one byte per page.
                let rc = unsafe {
                    libc::mincore(
                        reg.host_addr as *mut libc::c_void,
                        reg.size as usize,
                        v.as_mut_ptr(),
                    )
                };
                assert_eq!(rc, 0);
                v.iter().filter(|&&b| b & 1 != 0).count()
            })
            .sum()
    }

    #[test]
    fn populate_makes_every_page_resident_and_keeps_contents() {
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let r = ram(backend.clone(), 32 << 20);
            r.write_u64(5 * 4096, 0x1234).unwrap();
            assert!(
                resident_pages(&r) < 8,
                "{backend:?}: fresh memory is not resident"
            );
            let mut calls = 0;
            let stats = r
                .populate_with_progress(2, |done, total| {
                    calls += 1;
                    assert!(done <= total);
                })
                .unwrap();
            assert!(calls >= 1, "progress is reported at least once");
            assert_eq!(stats.bytes, 32 << 20);
            assert_eq!(resident_pages(&r), (32 << 20) / PAGE_SIZE, "{backend:?}");
            assert_eq!(r.read_u64(5 * 4096).unwrap(), 0x1234, "contents survive");
            assert!(r.is_zero(6));
        }
    }

    #[test]
    fn touching_populates_too() {
        let r = ram(Backend::SharedMemfd, 8 << 20);
        r.write_u64(4096, 99).unwrap();
        let s = r.populate_by_touch();
        assert_eq!(s.bytes, 8 << 20);
        assert_eq!(resident_pages(&r), (8 << 20) / PAGE_SIZE);
        assert_eq!(r.read_u64(4096).unwrap(), 99);
    }

    #[test]
    fn background_populate_covers_everything_and_skips_resident_chunks() {
        let r = ram(Backend::SharedMemfd, 64 << 20);
        // The first chunk and one in the middle already hold data (a receiver was there).
        r.write_u64(0, 1).unwrap();
        r.write_u64(40 << 20, 2).unwrap();
        let bg = BackgroundPopulate::start(r.clone(), 2).unwrap();
        let stats = bg.wait().unwrap();
        assert_eq!(stats.skipped_bytes, 2 * POPULATE_CHUNK);
        assert_eq!(stats.bytes, (64 << 20) - 2 * POPULATE_CHUNK);
        assert_eq!(stats.threads, 2);
        // Every page of the populated chunks is resident, plus the two written pages.
        assert_eq!(
            resident_pages(&r),
            ((64 << 20) - 2 * POPULATE_CHUNK as usize) / PAGE_SIZE + 2
        );
        assert_eq!(r.read_u64(40 << 20).unwrap(), 2);
    }

    #[test]
    fn background_populate_of_ranges_touches_only_them() {
        let r = ram(Backend::AnonymousPrivate, 64 << 20);
        // Pages 100..300 (in the first chunk) and 5000..5001 (in the fifth).
        let bg =
            BackgroundPopulate::start_ranges(r.clone(), &[(100, 300), (5000, 5001)], 2).unwrap();
        assert_eq!(bg.total_bytes(), 201 * 4096);
        let stats = bg.wait().unwrap();
        assert_eq!(stats.bytes, 201 * 4096);
        assert_eq!(resident_pages(&r), 201);
        // Ranges beyond RAM are clipped; a range across a chunk boundary splits there.
        let all = r.page_count();
        assert_eq!(
            chunks_of(&r, &[(1020, 1030), (all - 1, all + 50)]),
            vec![
                (r.regions()[0].host_addr + 1020 * 4096, 4 * 4096),
                (r.regions()[0].host_addr + 1024 * 4096, 6 * 4096),
                (r.regions()[0].host_addr + (all as usize - 1) * 4096, 4096),
            ]
        );
    }

    #[test]
    fn background_populate_stops_when_asked() {
        let r = ram(Backend::AnonymousPrivate, 256 << 20);
        let bg = BackgroundPopulate::start(r.clone(), 1).unwrap();
        bg.stop();
        let stats = bg.finish().unwrap();
        assert!(stats.bytes < 256 << 20, "stopped early: {stats:?}");
        // Dropping a running one waits for its threads (no use-after-unmap).
        let bg = BackgroundPopulate::start(r, 2).unwrap();
        assert_eq!(bg.total_bytes(), 256 << 20);
        drop(bg);
    }
}
