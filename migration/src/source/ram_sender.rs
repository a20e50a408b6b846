//! Sends dirty pages on the main stream: zero runs as flags only, other pages whole.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use ram::{is_zero_page, AtomicBitmap, GuestRam, PAGE_SHIFT};

use crate::error::{MigrationError, Result};
use crate::info::{Channel, MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::stream::frame::FrameWriter;
use crate::stream::ram::{word, FLAG_PAGE, FLAG_ZERO};
use crate::vm::DirtyTracker;

/// Writes RAM records for the pages of a bitmap, accounting bytes and honouring the rate limit.
pub struct RamSender<'a, W: Write> {
    ram: &'a GuestRam,
    out: &'a mut FrameWriter<W>,
    counters: &'a MigrationCounters,
    limiter: &'a RateLimiter,
    cancel: &'a AtomicBool,
    phase: Phase,
    zero_run: Option<(u64, u32)>,
    accounted: u64,
    tracker: Option<&'a dyn DirtyTracker>,
    chunk: Option<(u64, u64)>,
}

impl<'a, W: Write> RamSender<'a, W> {
    /// A sender writing into `out`.
    pub fn new(
        ram: &'a GuestRam,
        out: &'a mut FrameWriter<W>,
        counters: &'a MigrationCounters,
        limiter: &'a RateLimiter,
        cancel: &'a AtomicBool,
        phase: Phase,
    ) -> Self {
        let accounted = out.bytes_written();
        RamSender {
            ram,
            out,
            counters,
            limiter,
            cancel,
            phase,
            zero_run: None,
            accounted,
            tracker: None,
            chunk: None,
        }
    }

    /// Lets `tracker` re-arm each clear chunk just before its pages are sent.
    pub fn with_tracker(mut self, tracker: &'a dyn DirtyTracker) -> Self {
        self.chunk = tracker.clear_chunk_pages().map(|c| (c.max(64), u64::MAX));
        self.tracker = Some(tracker);
        self
    }

    fn enter_chunk(&mut self, page: u64) -> Result<()> {
        if let (Some(t), Some((size, current))) = (self.tracker, self.chunk.as_mut()) {
            let c = page / *size;
            if c != *current {
                *current = c;
                t.prepare_send(c * *size, *size)
                    .map_err(MigrationError::Vm)?;
            }
        }
        Ok(())
    }

    /// Counts bytes written since the last call and waits for rate-limit budget.
    fn account(&mut self) -> Result<()> {
        let now = self.out.bytes_written();
        let delta = now - self.accounted;
        if delta > 0 {
            self.accounted = now;
            self.counters.add_sent(Channel::Main, self.phase, delta);
            if self.limiter.acquire(delta).is_err() || self.cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Cancelled);
            }
        }
        Ok(())
    }

    fn flush_zero_run(&mut self) -> Result<()> {
        if let Some((first, count)) = self.zero_run.take() {
            self.out.ram_record(
                word(first << PAGE_SHIFT, FLAG_ZERO),
                &[&count.to_le_bytes()],
            )?;
            self.counters.add_zero_pages(u64::from(count));
        }
        Ok(())
    }

    /// Sends page `page` (a RAM page number).
    pub fn send_page(&mut self, page: u64) -> Result<()> {
        let bytes = self
            .ram
            .page(page)
            .ok_or_else(|| MigrationError::Vm(format!("page {page} is outside guest RAM")))?;
        if is_zero_page(bytes) {
            match &mut self.zero_run {
                Some((first, count)) if *first + u64::from(*count) == page && *count < u32::MAX => {
                    *count += 1;
                }
                _ => {
                    self.flush_zero_run()?;
                    self.zero_run = Some((page, 1));
                }
            }
        } else {
            self.flush_zero_run()?;
            self.out
                .ram_record(word(page << PAGE_SHIFT, FLAG_PAGE), &[bytes])?;
            self.counters.add_normal_pages(1);
        }
        self.account()
    }

    /// Sends the pages outside the ranges `data_ranges()` returns (known to read as zero
    /// without touching them) as zero runs, and clears their bits from `bitmap`; returns the
    /// pages covered. Dirty tracking is re-armed for all of RAM first, so a page written
    /// after the ranges are taken is caught by the next sync.
    pub fn send_holes(
        &mut self,
        bitmap: &AtomicBitmap,
        data_ranges: impl FnOnce() -> Vec<(u64, u64)>,
    ) -> Result<u64> {
        if let Some(t) = self.tracker {
            t.prepare_send(0, self.ram.page_count())
                .map_err(MigrationError::Vm)?;
        }
        let data_ranges = data_ranges();
        let mut sent = 0u64;
        let mut next = 0u64;
        let pages = self.ram.page_count();
        let holes = data_ranges
            .iter()
            .map(|&(s, _)| s)
            .chain(std::iter::once(pages))
            .zip(std::iter::once(0).chain(data_ranges.iter().map(|&(_, e)| e)));
        for (hole_end, hole_start) in holes {
            let start = hole_start.max(next);
            let end = hole_end.min(pages);
            next = next.max(end);
            let mut p = start;
            while p < end {
                let count = (end - p).min(u64::from(u32::MAX));
                self.out.ram_record(
                    word(p << PAGE_SHIFT, FLAG_ZERO),
                    &[&(count as u32).to_le_bytes()],
                )?;
                self.counters.add_zero_pages(count);
                bitmap.clear_range(p, count);
                sent += count;
                p += count;
            }
            self.account()?;
        }
        Ok(sent)
    }

    /// Sends every page whose bit is set in `bitmap`, clearing the bits; returns the pages
    /// sent. `between_frames` runs after every 1024 pages (bandwidth estimates, checks).
    pub fn send_bitmap(
        &mut self,
        bitmap: &AtomicBitmap,
        mut between: impl FnMut(&MigrationCounters) -> Result<()>,
    ) -> Result<u64> {
        let mut sent = 0u64;
        for w in 0..bitmap.word_count() {
            let mut bits = bitmap.take_word(w);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let page = w as u64 * 64 + u64::from(b);
                if let Err(e) = self.enter_chunk(page).and_then(|_| self.send_page(page)) {
                    // Put back what was not sent so a later attempt does not lose it.
                    bitmap.or_word(w, bits | (1 << b));
                    return Err(e);
                }
                sent += 1;
                if sent.is_multiple_of(1024) {
                    between(self.counters)?;
                }
            }
        }
        self.finish()?;
        Ok(sent)
    }

    /// Flushes the pending zero run and the open frame.
    pub fn finish(&mut self) -> Result<()> {
        self.flush_zero_run()?;
        self.out.finish()?;
        self.account()
    }
}
