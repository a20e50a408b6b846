//! Applies a migration stream to the destination's memory and state.

use std::sync::Arc;

use ram::{is_zero_page, page_hash, AtomicBitmap, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use crate::error::{MigrationError, Result};
use crate::postcopy::wire::Listen;
use crate::stream::frame::{Frame, FrameKind, FrameReader, StreamSource};
use crate::stream::header::{Header, FEATURE_VALIDATE_UUID};
use crate::stream::ram::{RamDirectory, RamRecord};
use crate::stream::ranges::{decode_ascending_ranges, decode_ranges, ranges_of, PageRange};
use crate::stream::StreamError;
use crate::vm::DestVm;

/// What the loader reports as it goes.
pub trait LoadProgress {
    /// A pass ended (PASS_END frame; with multifd, the flush point).
    fn pass_end(&mut self, pass: u64) -> Result<()>;
    /// The END frame arrived; runs before the completeness check.
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    /// A DATA_RANGES frame arrived: only `ranges` may hold data (checked against RAM).
    fn data_ranges(&mut self, ranges: &[PageRange]) -> Result<()> {
        let _ = ranges;
        Ok(())
    }
}

/// Checks the stream header against this VM.
pub fn check_header(header: &Header, vm: &dyn DestVm) -> Result<()> {
    let ram = vm.ram();
    if header.ram_size != ram.size() {
        return Err(StreamError::Mismatch(format!(
            "the source's guest has {} MiB of RAM, this VM {} MiB: start the destination with --memory {}M",
            header.ram_size >> 20,
            ram.size() >> 20,
            header.ram_size >> 20
        ))
        .into());
    }
    if header.vcpus != vm.vcpus() {
        return Err(StreamError::Mismatch(format!(
            "the source's guest has {} vCPUs, this VM {}: start the destination with --vcpus {}",
            header.vcpus,
            vm.vcpus(),
            header.vcpus
        ))
        .into());
    }
    // As QEMU: the source sends its UUID for checking when validate-uuid is on there.
    // A destination without a UUID of its own cannot check (QEMU only warns then).
    if header.has(FEATURE_VALIDATE_UUID) && vm.uuid() == [0; 16] {
        eprintln!(
            "ferry: warning: the source asks to validate its UUID {} but this VM has none (--uuid): not checked",
            uuid::Uuid::from_bytes(header.uuid)
        );
    } else if header.has(FEATURE_VALIDATE_UUID) && header.uuid != vm.uuid() {
        return Err(StreamError::Mismatch(format!(
            "UUID received is {} and local is {}",
            uuid::Uuid::from_bytes(header.uuid),
            uuid::Uuid::from_bytes(vm.uuid())
        ))
        .into());
    }
    Ok(())
}

/// Which pages a load has written, and which of them are suspect: shared by the main
/// stream's loader and every multifd channel, so a page is judged by its last copy
/// whichever connection carried it.
#[derive(Debug)]
pub struct PageBook {
    /// Pages written by this migration so far (a zero record for a page never written
    /// into fresh memory needs no work at all).
    received: AtomicBitmap,
    /// Pages whose last copy did not match its hash (see stream::ram).
    suspect: AtomicBitmap,
    fresh: bool,
}

impl PageBook {
    /// Bookkeeping for `pages` pages; `fresh` when the memory is known to be all zeros.
    pub fn new(pages: u64, fresh: bool) -> Self {
        PageBook {
            received: AtomicBitmap::new(pages),
            suspect: AtomicBitmap::new(pages),
            fresh,
        }
    }

    /// Records that `page` was written; `ok` says whether its bytes matched their hash.
    pub fn mark(&self, page: u64, ok: bool) {
        self.received.set(page);
        if ok {
            self.suspect.test_and_clear(page);
        } else {
            self.suspect.set(page);
        }
    }

    /// Whether the last copy of `page` did not match its hash.
    pub fn is_suspect(&self, page: u64) -> bool {
        self.suspect.get(page)
    }

    /// The pages whose last copy did not match its hash (postcopy fetches them again).
    pub fn suspect_ranges(&self) -> Vec<PageRange> {
        ranges_of(&self.suspect)
    }

    /// Makes `page` of `ram` read as zeros (writing only when it may not already).
    pub fn load_zero(&self, ram: &GuestRam, page: u64) -> Result<()> {
        let untouched = self.fresh && !self.received.get(page);
        if !untouched && !ram.page(page).is_some_and(is_zero_page) {
            ram.zero_page(page)
                .map_err(|e| MigrationError::Vm(e.to_string()))?;
        }
        self.mark(page, true);
        Ok(())
    }

    /// Fails if any page's last copy did not match its hash.
    pub fn check_complete(&self) -> Result<()> {
        let n = self.suspect.count_ones();
        if n == 0 {
            return Ok(());
        }
        let first = (0..self.suspect.len())
            .find(|&p| self.suspect.get(p))
            .unwrap_or(0);
        let what = StreamError::Checksum(if n == 1 {
            "one page (its data arrived corrupted and was never sent again)"
        } else {
            "several pages (their data arrived corrupted and was never sent again)"
        });
        Err(MigrationError::Stream(StreamError::Invalid(format!(
            "{what}: {n} page(s), the first at RAM offset {:#x}",
            first << PAGE_SHIFT
        ))))
    }
}

/// Applies RAM frames to guest memory.
pub struct RamLoader<'a> {
    ram: &'a GuestRam,
    book: Arc<PageBook>,
    scratch: Vec<u8>,
    /// Records applied.
    pub pages: u64,
    /// Set for a stream that must not carry pages (the memory is shared, x-ignore-shared).
    refuse_pages: bool,
    /// Decompression threads, when the stream announced compression.
    decompress: Option<crate::compress::DecompressPool>,
}

/// Records of a RAM frame read and applied at a time (32 pages: 128 KiB, well within a
/// core's L2 cache).
const LOAD_CHUNK_RECORDS: usize = 32;

impl<'a> RamLoader<'a> {
    /// A loader for `ram`; `fresh` when the memory is known to be all zeros.
    pub fn new(ram: &'a GuestRam, fresh: bool) -> Self {
        RamLoader {
            ram,
            book: Arc::new(PageBook::new(ram.page_count(), fresh)),
            scratch: Vec::new(),
            pages: 0,
            refuse_pages: false,
            decompress: None,
        }
    }

    /// Accepts compressed pages, inflated by `pool` (the stream announced compression).
    pub fn with_decompress(mut self, pool: crate::compress::DecompressPool) -> Self {
        self.decompress = Some(pool);
        self
    }

    /// Waits until every compressed page received so far is in guest memory.
    pub fn settle(&self) -> Result<()> {
        match &self.decompress {
            Some(pool) => Ok(pool.settle()?),
            None => Ok(()),
        }
    }

    /// Makes every RAM record an error: guest memory is shared with a running source
    /// (x-ignore-shared), so this process must not write it.
    pub fn refusing_pages(mut self) -> Self {
        self.refuse_pages = true;
        self
    }

    /// The page bookkeeping, to share with multifd channels.
    pub fn book(&self) -> Arc<PageBook> {
        self.book.clone()
    }

    fn page_mut_ptr(&self, offset: u64) -> Result<*mut u8> {
        self.ram
            .page_ptr(offset >> PAGE_SHIFT)
            .ok_or_else(|| MigrationError::Vm(format!("page {offset:#x} outside RAM")))
    }

    /// Reads a RAM frame's data into place and applies its records.
    pub fn apply<R: StreamSource>(
        &mut self,
        reader: &mut FrameReader<R>,
        dir: &RamDirectory,
    ) -> Result<()> {
        if self.refuse_pages && !dir.records.is_empty() {
            return Err(StreamError::Invalid(
                "RAM pages in a stream whose guest memory is shared (x-ignore-shared)".into(),
            )
            .into());
        }
        // Pages go straight into guest memory; deltas and compressed pages into scratch.
        let scratch_len: usize = dir
            .records
            .iter()
            .filter(|r| !matches!(r, RamRecord::Page { .. }))
            .map(|r| r.data_len())
            .sum();
        self.scratch.resize(scratch_len, 0);
        // The data is read and checked a few records at a time, so each page is hashed while
        // it is still in the CPU's cache rather than after the whole frame has gone through.
        let mut at = 0usize;
        for records in dir.records.chunks(LOAD_CHUNK_RECORDS) {
            at = self.apply_records(reader, records, at)?;
        }
        Ok(())
    }

    /// Reads the data of `records` (the next records of a RAM frame; their scratch data
    /// starts at `start`) into place and applies them; returns where the next scratch data
    /// goes.
    fn apply_records<R: StreamSource>(
        &mut self,
        reader: &mut FrameReader<R>,
        records: &[RamRecord],
        start: usize,
    ) -> Result<usize> {
        let mut iov = Vec::with_capacity(records.len());
        let mut at = start;
        for r in records {
            match *r {
                RamRecord::Page { offset, .. } => iov.push(libc::iovec {
                    iov_base: self.page_mut_ptr(offset)?.cast(),
                    iov_len: PAGE_SIZE,
                }),
                RamRecord::Xbzrle { len, .. } | RamRecord::Compressed { len, .. } => {
                    iov.push(libc::iovec {
                        iov_base: self.scratch[at..].as_mut_ptr().cast(),
                        iov_len: len,
                    });
                    at += len;
                }
                RamRecord::Zero { .. } => {}
            }
        }
        // SAFETY: every iovec points at a page of guest RAM (bounds checked when the directory
        // was decoded) or into `self.scratch`; the guest does not run during the load and no
        // Rust reference to those bytes is alive across this call.
        unsafe { reader.read_ram_data(&mut iov)? };
        let mut at = start;
        for r in records {
            match *r {
                RamRecord::Page { offset, hash } => {
                    let page = offset >> PAGE_SHIFT;
                    let ok = self.ram.page(page).is_some_and(|b| page_hash(b) == hash);
                    self.book.mark(page, ok);
                    self.pages += 1;
                }
                RamRecord::Zero { offset, count } => {
                    let first = offset >> PAGE_SHIFT;
                    for page in first..first + count {
                        self.book.load_zero(self.ram, page)?;
                    }
                    self.pages += count;
                }
                RamRecord::Xbzrle { offset, len, hash } => {
                    let page = offset >> PAGE_SHIFT;
                    let ptr = self.page_mut_ptr(offset)?;
                    // SAFETY: `ptr` is a page of guest RAM; the guest is not running on the
                    // destination and nothing else writes guest memory during the load.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr, PAGE_SIZE) };
                    crate::xbzrle::decode(&self.scratch[at..at + len], dst).map_err(|e| {
                        StreamError::Invalid(format!("XBZRLE page at {offset:#x}: {e}"))
                    })?;
                    // A delta applied to a suspect base stays suspect.
                    let ok = !self.book.is_suspect(page) && page_hash(dst) == hash;
                    self.book.mark(page, ok);
                    self.pages += 1;
                    at += len;
                }
                RamRecord::Compressed { offset, len, hash } => {
                    let Some(pool) = &self.decompress else {
                        return Err(StreamError::Invalid(format!(
                            "compressed page at {offset:#x}, but this stream did not announce compression"
                        ))
                        .into());
                    };
                    pool.submit(offset, hash, self.scratch[at..at + len].to_vec())?;
                    self.pages += 1;
                    at += len;
                }
            }
        }
        Ok(at)
    }

    /// Fails if any page's last copy did not match its hash.
    pub fn check_complete(&self) -> Result<()> {
        self.book.check_complete()
    }
}

/// Reads frames until END; returns the state payload.
pub fn load_stream<R: StreamSource>(
    reader: &mut FrameReader<R>,
    loader: &mut RamLoader<'_>,
    progress: &mut dyn LoadProgress,
) -> Result<Vec<u8>> {
    match load_stream_until(reader, loader, progress)? {
        LoadEnd::Complete(state) => Ok(state),
        LoadEnd::Postcopy { .. } => Err(StreamError::Invalid(
            "a switch to postcopy in a stream that cannot carry one".into(),
        )
        .into()),
    }
}

/// How the precopy part of a stream ended.
#[derive(Debug)]
pub enum LoadEnd {
    /// END: everything arrived; the state payload.
    Complete(Vec<u8>),
    /// POSTCOPY_LISTEN: the source switched to postcopy (see [`crate::postcopy`]).
    Postcopy {
        /// The state payload.
        state: Vec<u8>,
        /// Pages to drop and fetch again (the DISCARD frames).
        discard: Vec<PageRange>,
        /// The switch.
        listen: Listen,
    },
}

/// Reads frames until END or POSTCOPY_LISTEN.
pub fn load_stream_until<R: StreamSource>(
    reader: &mut FrameReader<R>,
    loader: &mut RamLoader<'_>,
    progress: &mut dyn LoadProgress,
) -> Result<LoadEnd> {
    let ram_size = loader.ram.size();
    let mut state: Option<Vec<u8>> = None;
    let mut discard: Vec<PageRange> = Vec::new();
    loop {
        match reader.next(ram_size)? {
            Frame::Ram(dir) => loader.apply(reader, &dir)?,
            Frame::Other(FrameKind::PassEnd, payload) => {
                loader.settle()?;
                let pass = payload
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or(StreamError::Truncated("in a PASS_END frame"))?;
                progress.pass_end(pass)?;
            }
            Frame::Other(FrameKind::State, payload) => {
                if state.is_some() {
                    return Err(StreamError::Invalid("two STATE frames".into()).into());
                }
                state = Some(payload.to_vec());
            }
            Frame::Other(FrameKind::End, _) => {
                loader.settle()?;
                progress.end()?;
                loader.check_complete()?;
                return state.map(LoadEnd::Complete).ok_or_else(|| {
                    StreamError::Invalid("the stream ended without vCPU and device state".into())
                        .into()
                });
            }
            Frame::Other(FrameKind::Discard, payload) => {
                discard.extend(decode_ranges(payload, ram_size >> PAGE_SHIFT)?);
            }
            Frame::Other(FrameKind::DataRanges, payload) => {
                progress.data_ranges(&decode_ascending_ranges(payload, ram_size >> PAGE_SHIFT)?)?;
            }
            Frame::Other(FrameKind::PostcopyListen, payload) => {
                loader.settle()?;
                let listen = Listen::decode(payload)?;
                let state = state.ok_or_else(|| {
                    StreamError::Invalid("POSTCOPY_LISTEN before the vCPU and device state".into())
                })?;
                return Ok(LoadEnd::Postcopy {
                    state,
                    discard,
                    listen,
                });
            }
            Frame::Other(kind @ (FrameKind::PostcopyRun | FrameKind::PostcopyHello), _) => {
                return Err(StreamError::Invalid(format!(
                    "{kind:?} frame before the switch to postcopy"
                ))
                .into());
            }
            Frame::Other(FrameKind::Ram, _) => {
                return Err(StreamError::Invalid("malformed RAM frame".into()).into());
            }
            // FrameReader::next skips these.
            Frame::Other(FrameKind::Keepalive, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::info::{MigrationCounters, Phase};
    use crate::rate_limit::RateLimiter;
    use crate::source::ram_sender::RamSender;
    use crate::stream::frame::FrameWriter;
    use crate::stream::ranges::encoded_pairs;
    use crate::test_pages::{anon_ram, fill_mixed};

    /// Records the DATA_RANGES the loader reports.
    #[derive(Default)]
    struct Seen(Vec<Vec<PageRange>>);

    impl LoadProgress for Seen {
        fn pass_end(&mut self, _pass: u64) -> Result<()> {
            Ok(())
        }
        fn data_ranges(&mut self, ranges: &[PageRange]) -> Result<()> {
            self.0.push(ranges.to_vec());
            Ok(())
        }
    }

    fn ending(out: &mut FrameWriter<Vec<u8>>) {
        out.frame(FrameKind::PassEnd, &1u64.to_le_bytes()).unwrap();
        out.frame(FrameKind::State, b"state").unwrap();
        out.frame(FrameKind::End, &[0u8; 16]).unwrap();
    }

    #[test]
    fn the_first_pass_tells_the_destination_which_pages_may_hold_data() {
        let src = anon_ram(4 << 20);
        // Two touched runs in 1024 pages; the rest was never touched.
        fill_mixed(&src, 1, 10..20);
        fill_mixed(&src, 1, 500..600);
        let (counters, limiter, cancel) = (
            MigrationCounters::new(0),
            RateLimiter::with_limit(0),
            AtomicBool::new(false),
        );
        let mut out = FrameWriter::new(Vec::new());
        let bitmap = AtomicBitmap::new(src.page_count());
        bitmap.set_all();
        let mut sender =
            RamSender::new(&src, &mut out, &counters, &limiter, &cancel, Phase::Precopy);
        sender.send_holes(&bitmap, || src.data_ranges()).unwrap();
        sender.send_bitmap(&bitmap, |_| Ok(())).unwrap();
        drop(sender);
        ending(&mut out);
        let stream = out.into_inner();

        let dst = anon_ram(4 << 20);
        let mut loader = RamLoader::new(&dst, true);
        let mut seen = Seen::default();
        let mut reader = FrameReader::new(&stream[..]);
        load_stream(&mut reader, &mut loader, &mut seen).unwrap();
        assert_eq!(seen.0.len(), 1, "one DATA_RANGES frame");
        let ranges = &seen.0[0];
        for p in (10..20).chain(500..600) {
            assert!(ranges.iter().any(|r| r.pages().contains(&p)), "page {p}");
        }
        let covered = crate::stream::ranges::page_count(ranges);
        assert!(
            covered < 200,
            "{covered} pages said to hold data: {ranges:?}"
        );
        for p in 0..src.page_count() {
            assert_eq!(src.page(p), dst.page(p), "page {p}");
        }
    }

    #[test]
    fn data_ranges_outside_guest_ram_are_refused() {
        for range in [(250, 7), (0, 0), (u64::MAX, 2)] {
            refuse_data_ranges(&[range], "outside guest RAM");
        }
    }

    #[test]
    fn overlapping_or_unordered_data_ranges_are_refused() {
        // A thousand copies of one whole-RAM range would otherwise make the destination plan
        // its populate over a thousand times its RAM.
        refuse_data_ranges(&[(0, 256); 1000], "overlaps or precedes");
        refuse_data_ranges(&[(10, 5), (12, 1)], "overlaps or precedes");
        refuse_data_ranges(&[(10, 5), (3, 1)], "overlaps or precedes");
    }

    /// Loads a stream whose DATA_RANGES frame holds `ranges` and expects the load to fail,
    /// with `refused` in its error, before any page.
    fn refuse_data_ranges(ranges: &[(u64, u64)], refused: &str) {
        let dst = anon_ram(1 << 20);
        let mut out = FrameWriter::new(Vec::new());
        out.frame(FrameKind::DataRanges, &encoded_pairs(ranges))
            .unwrap();
        ending(&mut out);
        let stream = out.into_inner();
        let mut loader = RamLoader::new(&dst, true);
        let mut seen = Seen::default();
        let e =
            load_stream(&mut FrameReader::new(&stream[..]), &mut loader, &mut seen).unwrap_err();
        assert!(
            e.to_string().contains(refused),
            "{:?}: {e}",
            &ranges[..ranges.len().min(2)]
        );
        assert!(seen.0.is_empty());
    }
}
