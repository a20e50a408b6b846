//! The destination's page receivers: RAM frames read into a staging buffer, each page
//! checked against its hash and placed atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
//!
//! In postcopy the source is stopped, so every page it sends is final: a page whose bytes do
//! not match their hash was corrupted in transit. It is not placed but asked for again
//! (the precopy "suspect" rule cannot apply: the guest may touch the page at any moment).
//! Pages no longer needed (a requested page that also came in the background stream) are
//! skipped.

use std::sync::Arc;

use ram::{page_hash, PAGE_SHIFT, PAGE_SIZE};

use super::link::{Acker, ReplyLink};
use super::pages::PageTracker;
use super::registration::{MissingRegistration, Placement};
use super::PostcopyError;
use crate::stream::frame::{Frame, FrameKind, FrameReader, StreamSource};
use crate::stream::ram::{RamDirectory, RamRecord};
use crate::stream::ranges::PageRange;
use crate::stream::{Reply, StreamError};

/// Places received pages.
pub struct Placer {
    /// The registered RAM.
    pub reg: Arc<MissingRegistration>,
    /// The page bookkeeping.
    pub tracker: Arc<PageTracker>,
    /// RECEIVED batching.
    pub acker: Arc<Acker>,
    /// The return path (acknowledgements).
    pub main: Arc<ReplyLink>,
    /// Where a corrupt page is asked for again.
    pub requests: Arc<ReplyLink>,
    staging: Vec<u8>,
}

/// A non-RAM frame met by [`Placer::next`].
#[derive(Debug)]
pub enum Event {
    /// POSTCOPY_RUN: start the guest.
    Run,
    /// END: the source sent every page.
    End,
}

/// Classifies a stream error: the link broke (recoverable) or the stream is wrong.
pub fn stream_failure(e: StreamError) -> PostcopyError {
    match e {
        StreamError::Io(_) | StreamError::Truncated(_) | StreamError::Checksum(_) => {
            PostcopyError::Link(e.to_string())
        }
        other => PostcopyError::Stream(other),
    }
}

impl Placer {
    /// A placer over `reg` and `tracker`.
    pub fn new(
        reg: Arc<MissingRegistration>,
        tracker: Arc<PageTracker>,
        acker: Arc<Acker>,
        main: Arc<ReplyLink>,
        requests: Arc<ReplyLink>,
    ) -> Self {
        Placer {
            reg,
            tracker,
            acker,
            main,
            requests,
            staging: Vec::new(),
        }
    }

    /// Reads frames, placing the pages of RAM frames, until a POSTCOPY_RUN or END frame.
    pub fn next<R: StreamSource>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<Event, PostcopyError> {
        let ram_size = self.tracker.page_count() * PAGE_SIZE as u64;
        loop {
            match reader.next(ram_size).map_err(stream_failure)? {
                Frame::Ram(dir) => self.apply(reader, &dir)?,
                Frame::Other(FrameKind::PostcopyRun, _) => return Ok(Event::Run),
                Frame::Other(FrameKind::End, _) => return Ok(Event::End),
                Frame::Other(kind, _) => {
                    return Err(PostcopyError::Protocol(format!(
                        "unexpected {kind:?} frame during postcopy"
                    )))
                }
            }
        }
    }

    /// Reads one RAM frame's data and places its pages.
    fn apply<R: StreamSource>(
        &mut self,
        reader: &mut FrameReader<R>,
        dir: &RamDirectory,
    ) -> Result<(), PostcopyError> {
        self.staging.resize(dir.data_len, 0);
        let mut iov = [libc::iovec {
            iov_base: self.staging.as_mut_ptr().cast(),
            iov_len: dir.data_len,
        }];
        // SAFETY: the iovec describes `self.staging`, a live buffer of data_len bytes that
        // nothing else borrows during the call.
        unsafe { reader.read_ram_data(&mut iov) }.map_err(stream_failure)?;
        let mut at = 0usize;
        for r in &dir.records {
            match *r {
                RamRecord::Page { offset, hash } => {
                    let page = offset >> PAGE_SHIFT;
                    let end = at + PAGE_SIZE;
                    let data = &self.staging[at..end];
                    at = end;
                    if !self.tracker.is_needed(page) {
                        self.tracker.placed(page, true);
                        continue;
                    }
                    if page_hash(data) != hash {
                        if self.tracker.rerequest(page) {
                            self.requests.send(&Reply::PageRequest(vec![PageRange {
                                first: page,
                                count: 1,
                            }]));
                        }
                        continue;
                    }
                    let how = self.reg.place(page, data)?;
                    self.done(page, how);
                }
                RamRecord::Zero { offset, count } => {
                    let first = offset >> PAGE_SHIFT;
                    for page in first..first + count {
                        if self.tracker.is_needed(page) {
                            let how = self.reg.place_zero(page)?;
                            self.done(page, how);
                        }
                    }
                }
                RamRecord::Xbzrle { offset, .. } | RamRecord::Compressed { offset, .. } => {
                    return Err(PostcopyError::Protocol(format!(
                        "an encoded page at {offset:#x} during postcopy (postcopy sends whole pages)"
                    )));
                }
            }
        }
        Ok(())
    }

    fn done(&self, page: u64, how: Placement) {
        if self.tracker.placed(page, how == Placement::AlreadyPresent) {
            self.acker.placed(page, &self.main);
        }
    }
}
