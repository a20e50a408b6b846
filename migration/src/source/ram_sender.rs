//! Sends dirty pages on the main stream in RAM frames: zero runs as directory entries only,
//! other pages straight from guest memory (or, with XBZRLE, as deltas against the cache).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use ram::{is_zero_page, page_hash, AtomicBitmap, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use crate::compress::{CompressPool, Done, Submitted};
use crate::error::{MigrationError, Result};
use crate::info::{Channel, MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::stream::frame::{FrameKind, FrameWriter};
use crate::stream::ram::{RamEntry, RamRecord};
use crate::stream::ranges::data_ranges_payload;
use crate::vm::DirtyTracker;
use crate::xbzrle::{Outcome, XbzrleEncoder};

/// Most records in one RAM frame (QEMU's multifd packets carry 128 pages).
pub const FRAME_ENTRIES: usize = 128;
/// Data bytes after which a RAM frame is sent.
pub const FRAME_DATA: usize = 512 << 10;

/// Where a record's data comes from.
enum DataRef<'a> {
    /// Straight from guest memory (sent without a copy).
    Guest(&'a [u8]),
    /// From the sender's arena (XBZRLE deltas, cached copies).
    Arena(usize, usize),
}

/// XBZRLE state for a pass from the second on.
pub struct XbzrleStage<'e> {
    /// The encoder (cache and statistics) of this migration.
    pub encoder: &'e mut XbzrleEncoder,
    /// The dirty-sync count, which ages cache entries.
    pub generation: u64,
}

/// Writes RAM frames for the pages of a bitmap, accounting bytes and honouring the rate limit.
pub struct RamSender<'a, 'e, W: Write> {
    ram: &'a GuestRam,
    out: &'a mut FrameWriter<W>,
    counters: &'a MigrationCounters,
    limiter: &'a RateLimiter,
    cancel: &'a AtomicBool,
    phase: Phase,
    zero_run: Option<(u64, u64)>,
    accounted: u64,
    tracker: Option<&'a dyn DirtyTracker>,
    chunk: Option<(u64, u64)>,
    entries: Vec<RamEntry>,
    data: Vec<DataRef<'a>>,
    data_len: usize,
    arena: Vec<u8>,
    copy: Vec<u8>,
    xbzrle: Option<XbzrleStage<'e>>,
    compress: Option<&'e mut CompressPool>,
    /// Pages sent as XBZRLE deltas or found unchanged.
    pub xbzrle_pages: u64,
    stop: Option<&'a AtomicBool>,
}

impl<'a, 'e, W: Write> RamSender<'a, 'e, W> {
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
            entries: Vec::with_capacity(FRAME_ENTRIES + 1),
            data: Vec::with_capacity(FRAME_ENTRIES + 1),
            data_len: 0,
            arena: Vec::new(),
            copy: vec![0u8; PAGE_SIZE],
            xbzrle: None,
            compress: None,
            xbzrle_pages: 0,
            stop: None,
        }
    }

    /// Makes [`RamSender::send_bitmap`] return early (the pages not sent stay in the bitmap)
    /// once `stop` is set: a switch to postcopy does not wait for the end of a pass.
    pub fn with_stop(mut self, stop: Option<&'a AtomicBool>) -> Self {
        self.stop = stop;
        self
    }

    /// Lets `tracker` re-arm each clear chunk just before its pages are sent.
    pub fn with_tracker(mut self, tracker: &'a dyn DirtyTracker) -> Self {
        self.chunk = tracker.clear_chunk_pages().map(|c| (c.max(64), u64::MAX));
        self.tracker = Some(tracker);
        self
    }

    /// Sends pages through XBZRLE (from the second pass on).
    pub fn with_xbzrle(mut self, stage: Option<XbzrleStage<'e>>) -> Self {
        self.xbzrle = stage;
        self
    }

    /// Compresses pages on `pool`'s threads (legacy `compress`; not with XBZRLE).
    pub fn with_compress(mut self, pool: Option<&'e mut CompressPool>) -> Self {
        self.compress = pool;
        self
    }

    /// Hands `page` to a compression thread; false when it must be sent raw (every thread
    /// busy and `compress-wait-thread` off).
    fn compress_page(&mut self, page: u64) -> Result<bool> {
        self.collect_compressed(false)?;
        let cancel = self.cancel;
        let Some(pool) = self.compress.as_deref_mut() else {
            return Ok(false);
        };
        if pool.all_busy() && pool.waits() {
            let done = pool.next_pending(cancel)?;
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Cancelled);
            }
            if let Some(d) = done {
                self.push_done(d)?;
            }
        }
        let Some(pool) = self.compress.as_deref_mut() else {
            return Ok(false);
        };
        Ok(pool.submit(page)? == Submitted::Queued)
    }

    /// Writes the pages the compression threads finished; with `all`, waits for every one.
    fn collect_compressed(&mut self, all: bool) -> Result<()> {
        loop {
            let cancel = self.cancel;
            let Some(pool) = self.compress.as_deref_mut() else {
                return Ok(());
            };
            let next = if all {
                pool.next_pending(cancel)?
            } else {
                pool.try_next()?
            };
            match next {
                Some(d) => self.push_done(d)?,
                None => return Ok(()),
            }
        }
    }

    fn push_done(&mut self, done: Done) -> Result<()> {
        match done {
            Done::Compressed { offset, hash, data } => {
                if let Some(pool) = self.compress.as_deref() {
                    pool.counters().add_compressed(data.len() as u64);
                }
                self.push_owned(
                    RamRecord::Compressed {
                        offset,
                        len: data.len(),
                        hash,
                    },
                    &data,
                )
            }
            Done::Raw { offset, hash, data } => {
                self.counters.add_normal_pages(1);
                self.push_owned(RamRecord::Page { offset, hash }, &data)
            }
        }
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
            if self.limiter.acquire(delta).is_err() {
                return Err(MigrationError::Cancelled);
            }
        }
        if self.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Sends the open frame, if it has anything.
    fn flush_frame(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let arena = &self.arena;
        let slices: Vec<&[u8]> = self
            .data
            .iter()
            .map(|d| match *d {
                DataRef::Guest(s) => s,
                DataRef::Arena(start, len) => &arena[start..start + len],
            })
            .collect();
        self.out.ram_frame(&self.entries, &slices)?;
        self.entries.clear();
        self.data.clear();
        self.data_len = 0;
        self.arena.clear();
        self.account()
    }

    fn push(&mut self, record: RamRecord, data: Option<DataRef<'a>>) -> Result<()> {
        self.entries.push(record.entry());
        if let Some(d) = data {
            self.data_len += match d {
                DataRef::Guest(s) => s.len(),
                DataRef::Arena(_, len) => len,
            };
            self.data.push(d);
        }
        if self.entries.len() >= FRAME_ENTRIES || self.data_len >= FRAME_DATA {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn push_owned(&mut self, record: RamRecord, bytes: &[u8]) -> Result<()> {
        let start = self.arena.len();
        self.arena.extend_from_slice(bytes);
        self.push(record, Some(DataRef::Arena(start, bytes.len())))
    }

    fn flush_zero_run(&mut self) -> Result<()> {
        if let Some((first, count)) = self.zero_run.take() {
            self.counters.add_zero_pages(count);
            self.push(
                RamRecord::Zero {
                    offset: first << PAGE_SHIFT,
                    count,
                },
                None,
            )?;
        }
        Ok(())
    }

    fn zero_page(&mut self, page: u64) -> Result<()> {
        match &mut self.zero_run {
            Some((first, count)) if *first + *count == page => *count += 1,
            _ => {
                self.flush_zero_run()?;
                self.zero_run = Some((page, 1));
            }
        }
        Ok(())
    }

    /// Sends page `page` (a RAM page number).
    pub fn send_page(&mut self, page: u64) -> Result<()> {
        let ram = self.ram;
        let bytes = ram
            .page(page)
            .ok_or_else(|| MigrationError::Vm(format!("page {page} is outside guest RAM")))?;
        let offset = page << PAGE_SHIFT;
        if self.xbzrle.is_some() {
            return self.send_page_xbzrle(offset, bytes);
        }
        if is_zero_page(bytes) {
            return self.zero_page(page);
        }
        if self.compress.is_some() && self.compress_page(page)? {
            return Ok(());
        }
        self.flush_zero_run()?;
        self.counters.add_normal_pages(1);
        // Hashed and sent straight from guest memory: if the guest changes the page
        // meanwhile, the destination sees a mismatch, keeps the page as suspect, and the
        // page (dirty again) is sent again later (see stream::ram).
        let hash = page_hash(bytes);
        self.push(
            RamRecord::Page { offset, hash },
            Some(DataRef::Guest(bytes)),
        )
    }

    /// XBZRLE path: one copy of the page; the delta, the cache and the hash come from it.
    fn send_page_xbzrle(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let mut copy = std::mem::take(&mut self.copy);
        copy.copy_from_slice(bytes);
        let result = self.send_copy_xbzrle(offset, &copy);
        self.copy = copy;
        result
    }

    fn send_copy_xbzrle(&mut self, offset: u64, copy: &[u8]) -> Result<()> {
        let Some(stage) = self.xbzrle.as_mut() else {
            return Ok(());
        };
        if is_zero_page(copy) {
            stage.encoder.cache_zero_page(offset, stage.generation);
            return self.zero_page(offset >> PAGE_SHIFT);
        }
        let generation = stage.generation;
        let hash = page_hash(copy);
        let delta = match stage.encoder.encode_page(offset, copy, generation) {
            Outcome::Unchanged => {
                self.xbzrle_pages += 1;
                return Ok(());
            }
            Outcome::Delta(d) => Some(d.to_vec()),
            Outcome::Whole { .. } => None,
        };
        self.flush_zero_run()?;
        match delta {
            Some(d) => {
                self.xbzrle_pages += 1;
                self.push_owned(
                    RamRecord::Xbzrle {
                        offset,
                        len: d.len(),
                        hash,
                    },
                    &d,
                )
            }
            None => {
                self.counters.add_normal_pages(1);
                self.push_owned(RamRecord::Page { offset, hash }, copy)
            }
        }
    }

    /// Sends the ranges `data_ranges()` returns (DATA_RANGES, so that the destination
    /// allocates nothing else), then the pages outside them (known to read as zero without
    /// touching them) as zero runs, and clears their bits from `bitmap`; returns the pages
    /// covered. Dirty tracking is re-armed for all of RAM first, so a page written after the
    /// ranges are taken is caught by the next sync.
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
        self.send_data_ranges(&data_ranges)?;
        let pages = self.ram.page_count();
        let mut sent = 0u64;
        let mut next = 0u64;
        let holes = data_ranges
            .iter()
            .map(|&(s, _)| s)
            .chain(std::iter::once(pages))
            .zip(std::iter::once(0).chain(data_ranges.iter().map(|&(_, e)| e)));
        for (hole_end, hole_start) in holes {
            let start = hole_start.max(next);
            let end = hole_end.min(pages);
            next = next.max(end);
            if start < end {
                self.flush_zero_run()?;
                self.zero_run = Some((start, end - start));
                bitmap.clear_range(start, end - start);
                sent += end - start;
            }
        }
        self.flush_zero_run()?;
        Ok(sent)
    }

    /// Sends a DATA_RANGES frame covering `ranges` (sorted `[start, end)` page numbers),
    /// coarsened to fit one frame.
    fn send_data_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        self.flush_zero_run()?;
        self.flush_frame()?;
        self.out
            .frame(FrameKind::DataRanges, &data_ranges_payload(ranges))?;
        self.account()
    }

    /// Sends every page whose bit is set in `bitmap`, clearing the bits; returns the pages
    /// sent. `between` runs after every 1024 pages (bandwidth estimates, checks).
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
                if self.stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                    bitmap.or_word(w, bits);
                    self.finish()?;
                    return Ok(sent);
                }
                if sent.is_multiple_of(1024) {
                    between(self.counters)?;
                }
            }
        }
        self.finish()?;
        Ok(sent)
    }

    /// Writes every page still with a compression thread, then flushes the pending zero run
    /// and the open frame.
    pub fn finish(&mut self) -> Result<()> {
        self.collect_compressed(true)?;
        self.flush_zero_run()?;
        self.flush_frame()?;
        self.account()
    }
}
