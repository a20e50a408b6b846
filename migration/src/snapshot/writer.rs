//! The snapshot writer: walks guest RAM in order and writes every page's start-instant
//! contents into RAM frames, together with the copies the fault handler made.
//!
//! Pages are never written straight from guest memory (the guest runs and the file must
//! hold the start instant): the writer copies a batch of still-protected pages into its own
//! buffer, claims them, removes their protection (the copy is safe, so the guest need not
//! wait for the disk), and only then writes the frame. Pages the fault handler already
//! claimed are skipped; its copies are written as they arrive. Pages known to be zero at the
//! start (holes) go out as zero runs without being read.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ram::{is_zero_page, page_hash, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::claims::PageClaims;
use super::digest::PageDigest;
use super::fault::FaultCopy;
use super::protect::WriteProtector;
use super::SnapshotError;
use crate::info::{Channel, MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::stream::frame::FrameWriter;
use crate::stream::ram::{RamEntry, RamRecord};

/// Pages the writer copies per batch (2 MiB, and batches are 2 MiB-aligned): lifting the
/// protection of a whole huge page keeps it huge, so KVM maps it again with one fault
/// instead of 512 (measured: a THP-backed guest runs at 40-85 % of its speed during a
/// snapshot instead of 30 %).
pub const BATCH_PAGES: u64 = 512;
/// Most fault copies written in one frame.
const FAULT_COPIES_PER_FRAME: usize = 256;

/// Where the writer's figures go (shared with query-migrate).
#[derive(Debug, Default)]
pub struct WriterProgress {
    /// Pages accounted for in the file (holes, copies, zero pages).
    pub pages_done: AtomicU64,
    /// Pages the writer copied itself.
    pub pages_copied: AtomicU64,
    /// Pages saved from fault-handler copies.
    pub pages_from_faults: AtomicU64,
}

/// Records of one frame, with zero pages merged into runs.
struct FrameBuilder<'b> {
    entries: Vec<RamEntry>,
    data: Vec<&'b [u8]>,
    zero_run: Option<(u64, u64)>,
    zero_pages: u64,
    normal_pages: u64,
}

impl<'b> FrameBuilder<'b> {
    fn new() -> Self {
        FrameBuilder {
            entries: Vec::with_capacity(2 * BATCH_PAGES as usize),
            data: Vec::with_capacity(2 * BATCH_PAGES as usize),
            zero_run: None,
            zero_pages: 0,
            normal_pages: 0,
        }
    }

    fn flush_zero_run(&mut self) {
        if let Some((first, count)) = self.zero_run.take() {
            self.entries.push(
                RamRecord::Zero {
                    offset: first << PAGE_SHIFT,
                    count,
                }
                .entry(),
            );
        }
    }

    fn zeros(&mut self, first: u64, count: u64) {
        self.zero_pages += count;
        match &mut self.zero_run {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => {
                self.flush_zero_run();
                self.zero_run = Some((first, count));
            }
        }
    }

    /// Adds page `page` with `bytes`; returns its hash.
    fn page(&mut self, page: u64, bytes: &'b [u8]) -> u64 {
        let hash = page_hash(bytes);
        if is_zero_page(bytes) {
            self.zeros(page, 1);
        } else {
            self.flush_zero_run();
            self.normal_pages += 1;
            self.entries.push(
                RamRecord::Page {
                    offset: page << PAGE_SHIFT,
                    hash,
                }
                .entry(),
            );
            self.data.push(bytes);
        }
        hash
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.zero_run.is_none()
    }
}

/// Writes a snapshot's RAM frames.
pub struct SnapshotWriter<'a, W: Write> {
    /// Guest memory.
    pub ram: &'a GuestRam,
    /// The stream.
    pub out: &'a mut FrameWriter<W>,
    /// Which pages are saved.
    pub claims: &'a PageClaims,
    /// The protection to lift once pages are saved (None: the guest is paused, nothing is
    /// protected).
    pub protector: Option<&'a WriteProtector>,
    /// Copies from the fault handler.
    pub faults: &'a Receiver<FaultCopy>,
    /// Page hashes of the start instant.
    pub digest: &'a mut PageDigest,
    /// query-migrate counters.
    pub counters: &'a MigrationCounters,
    /// max-bandwidth.
    pub limiter: &'a RateLimiter,
    /// Set by migrate_cancel.
    pub cancel: &'a AtomicBool,
    /// Pages done, for progress.
    pub progress: &'a WriterProgress,
    batch: Vec<u8>,
    accounted: u64,
}

impl<'a, W: Write> SnapshotWriter<'a, W> {
    /// A writer; nothing is written yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ram: &'a GuestRam,
        out: &'a mut FrameWriter<W>,
        claims: &'a PageClaims,
        protector: Option<&'a WriteProtector>,
        faults: &'a Receiver<FaultCopy>,
        digest: &'a mut PageDigest,
        counters: &'a MigrationCounters,
        limiter: &'a RateLimiter,
        cancel: &'a AtomicBool,
        progress: &'a WriterProgress,
    ) -> Self {
        let accounted = out.bytes_written();
        SnapshotWriter {
            ram,
            out,
            claims,
            protector,
            faults,
            digest,
            counters,
            limiter,
            cancel,
            progress,
            batch: vec![0u8; BATCH_PAGES as usize * PAGE_SIZE],
            accounted,
        }
    }

    fn account(&mut self) -> Result<(), SnapshotError> {
        let now = self.out.bytes_written();
        let delta = now - self.accounted;
        if delta > 0 {
            self.accounted = now;
            self.counters.add_sent(Channel::Main, Phase::Precopy, delta);
            if self.limiter.acquire(delta).is_err() {
                return Err(SnapshotError::Cancelled);
            }
        }
        if self.cancel.load(Ordering::Acquire) {
            return Err(SnapshotError::Cancelled);
        }
        Ok(())
    }

    fn emit(&mut self, mut frame: FrameBuilder<'_>) -> Result<(), SnapshotError> {
        frame.flush_zero_run();
        if frame.entries.is_empty() {
            return Ok(());
        }
        self.out.ram_frame(&frame.entries, &frame.data)?;
        self.counters.add_zero_pages(frame.zero_pages);
        self.counters.add_normal_pages(frame.normal_pages);
        self.progress
            .pages_done
            .fetch_add(frame.zero_pages + frame.normal_pages, Ordering::Relaxed);
        self.account()
    }

    /// Writes up to `max` pending fault copies; returns how many.
    fn write_fault_copies(&mut self, max: usize) -> Result<u64, SnapshotError> {
        let copies: Vec<FaultCopy> = self.faults.try_iter().take(max).collect();
        self.write_copies(&copies)
    }

    fn write_copies(&mut self, copies: &[FaultCopy]) -> Result<u64, SnapshotError> {
        if copies.is_empty() {
            return Ok(0);
        }
        let mut frame = FrameBuilder::new();
        for c in copies {
            let hash = frame.page(c.page, &c.data);
            self.digest.set(c.page, hash);
        }
        self.emit(frame)?;
        self.progress
            .pages_from_faults
            .fetch_add(copies.len() as u64, Ordering::Relaxed);
        Ok(copies.len() as u64)
    }

    /// Writes pages `[first, first + count)`, known zero at the start instant (already
    /// claimed), as one zero run, and lifts their protection.
    pub fn save_hole(&mut self, first: u64, count: u64) -> Result<(), SnapshotError> {
        if count == 0 {
            return Ok(());
        }
        if let Some(p) = self.protector {
            p.unprotect(first, count)?;
        }
        let mut frame = FrameBuilder::new();
        frame.zeros(first, count);
        self.emit(frame)
    }

    /// Saves the pages of `[first, end)` that nobody has claimed yet, in aligned batches.
    pub fn save_range(&mut self, first: u64, end: u64) -> Result<(), SnapshotError> {
        let mut start = first;
        while start < end {
            let stop = ((start / BATCH_PAGES + 1) * BATCH_PAGES).min(end);
            self.save_batch(start, stop)?;
            start = stop;
        }
        Ok(())
    }

    fn save_batch(&mut self, start: u64, end: u64) -> Result<(), SnapshotError> {
        // 1. Copy every unclaimed page (still protected, so still at the start instant).
        let mut copied: Vec<(u64, usize)> = Vec::with_capacity((end - start) as usize);
        for page in start..end {
            if self.claims.is_claimed(page) {
                continue;
            }
            let Some(bytes) = self.ram.page(page) else {
                return Err(SnapshotError::Vm(format!(
                    "page {page} is outside guest RAM"
                )));
            };
            let slot = copied.len();
            self.batch[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(bytes);
            copied.push((page, slot));
        }
        // 2. Keep the copies whose claim wins (the others belong to the fault handler).
        copied.retain(|&(page, _)| self.claims.claim(page));
        // 3. Every page of the batch is claimed now: the guest may write them again.
        if let Some(p) = self.protector {
            p.unprotect(start, end - start)?;
        }
        self.progress
            .pages_copied
            .fetch_add(copied.len() as u64, Ordering::Relaxed);
        // 4. Write the copies, and whatever the fault handler saved meanwhile.
        let faults: Vec<FaultCopy> = self
            .faults
            .try_iter()
            .take(FAULT_COPIES_PER_FRAME)
            .collect();
        let mut frame = FrameBuilder::new();
        for &(page, slot) in &copied {
            let hash = frame.page(page, &self.batch[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE]);
            self.digest.set(page, hash);
        }
        for c in &faults {
            let hash = frame.page(c.page, &c.data);
            self.digest.set(c.page, hash);
        }
        if frame.is_empty() {
            return self.account();
        }
        frame.flush_zero_run();
        if frame.entries.is_empty() {
            return self.account();
        }
        self.out.ram_frame(&frame.entries, &frame.data)?;
        self.counters.add_zero_pages(frame.zero_pages);
        self.counters.add_normal_pages(frame.normal_pages);
        self.progress
            .pages_done
            .fetch_add(frame.zero_pages + frame.normal_pages, Ordering::Relaxed);
        self.progress
            .pages_from_faults
            .fetch_add(faults.len() as u64, Ordering::Relaxed);
        self.account()
    }

    /// Writes pending fault copies until every page of RAM is in the file, calling
    /// `check` between waits (handler errors, file checks).
    pub fn drain_until_complete(
        &mut self,
        mut check: impl FnMut() -> Result<(), SnapshotError>,
    ) -> Result<(), SnapshotError> {
        let total = self.ram.page_count();
        let mut idle = 0u32;
        while self.progress.pages_done.load(Ordering::Relaxed) < total {
            if self.write_fault_copies(FAULT_COPIES_PER_FRAME)? > 0 {
                idle = 0;
                continue;
            }
            check()?;
            match self.faults.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => {
                    idle = 0;
                    self.write_copies(std::slice::from_ref(&c))?;
                }
                Err(RecvTimeoutError::Timeout) => {
                    idle += 1;
                    if self.cancel.load(Ordering::Acquire) {
                        return Err(SnapshotError::Cancelled);
                    }
                    if idle > 300 {
                        return Err(SnapshotError::Vm(format!(
                            "{} page(s) were claimed but never reached the writer",
                            total - self.progress.pages_done.load(Ordering::Relaxed)
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SnapshotError::Vm(
                        "the fault handler stopped before the snapshot was complete".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Writes any fault copies waiting now (call between batches to keep the queue short).
    pub fn write_pending_faults(&mut self) -> Result<(), SnapshotError> {
        while self.write_fault_copies(FAULT_COPIES_PER_FRAME)? > 0 {}
        Ok(())
    }
}
