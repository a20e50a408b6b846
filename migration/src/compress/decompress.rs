//! The destination's decompression threads: each inflates a compressed page, checks it
//! against its hash and writes it into guest memory.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use ram::{page_hash, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::CompressPoolError;
use crate::dest::loader::PageBook;
use crate::multifd::compress::Decompressor;
use crate::multifd::Method;

struct Job {
    offset: u64,
    hash: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct Progress {
    pending: usize,
    error: Option<CompressPoolError>,
}

/// Decompression threads and the pages they have not finished yet.
pub struct DecompressPool {
    jobs: Option<Sender<Job>>,
    state: Arc<(Mutex<Progress>, Condvar)>,
    workers: Vec<JoinHandle<()>>,
}

/// Marks a job finished even if the worker panics on it.
struct Finished<'a>(&'a (Mutex<Progress>, Condvar));

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let (lock, cond) = self.0;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        p.pending = p.pending.saturating_sub(1);
        if std::thread::panicking() && p.error.is_none() {
            p.error = Some(CompressPoolError::WorkersGone("decompression"));
        }
        cond.notify_all();
    }
}

/// Compressed pages queued per worker before the loader waits (at most 8 KiB each).
const QUEUED_PER_THREAD: usize = 64;

impl DecompressPool {
    /// Starts `threads` workers writing into `ram` and recording pages in `book`; with
    /// `error_check` off (QEMU's `decompress-error-check`), a page that does not inflate is
    /// zeroed and kept suspect instead of failing the migration: a later copy repairs it, or
    /// the end of the stream reports it.
    pub fn start(
        ram: Arc<GuestRam>,
        book: Arc<PageBook>,
        threads: u8,
        error_check: bool,
    ) -> Result<Self, CompressPoolError> {
        // Bounded: a loader reading faster than the workers inflate waits for them instead of
        // queueing copies of the compressed pages without limit.
        let (tx, rx) =
            crossbeam_channel::bounded::<Job>(QUEUED_PER_THREAD * usize::from(threads.max(1)));
        let state: Arc<(Mutex<Progress>, Condvar)> = Arc::default();
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let d = Decompressor::new(Method::Zlib)?;
            let (ram, book, rx, state) = (ram.clone(), book.clone(), rx.clone(), state.clone());
            let h = std::thread::Builder::new()
                .name(format!("decompress-{i}"))
                .spawn(move || worker(&ram, &book, d, &rx, &state, error_check))
                .map_err(|source| CompressPoolError::Spawn {
                    what: "decompression",
                    source,
                })?;
            workers.push(h);
        }
        Ok(DecompressPool {
            jobs: Some(tx),
            state,
            workers,
        })
    }

    fn fail_fast(&self) -> Result<(), CompressPoolError> {
        let mut p = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        match p.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queues a compressed page; fails with an earlier page's error if one failed already.
    pub fn submit(&self, offset: u64, hash: u64, data: Vec<u8>) -> Result<(), CompressPoolError> {
        self.fail_fast()?;
        let jobs = self
            .jobs
            .as_ref()
            .ok_or(CompressPoolError::WorkersGone("decompression"))?;
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending += 1;
        if jobs.send(Job { offset, hash, data }).is_err() {
            let mut p = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
            p.pending -= 1;
            return Err(CompressPoolError::WorkersGone("decompression"));
        }
        Ok(())
    }

    /// Waits until every queued page is in guest memory; the first failure, if any.
    pub fn settle(&self) -> Result<(), CompressPoolError> {
        let (lock, cond) = &*self.state;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        while p.pending > 0 && p.error.is_none() {
            p = cond
                .wait_timeout(p, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        match p.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for DecompressPool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    ram: &GuestRam,
    book: &PageBook,
    mut d: Decompressor,
    jobs: &Receiver<Job>,
    state: &(Mutex<Progress>, Condvar),
    error_check: bool,
) {
    let mut page = vec![0u8; PAGE_SIZE];
    while let Ok(job) = jobs.recv() {
        let _finished = Finished(state);
        let n = job.offset >> PAGE_SHIFT;
        let result = d
            .decompress(&job.data, &mut page)
            .map_err(|e| CompressPoolError::Corrupt {
                offset: job.offset,
                why: e.to_string(),
            })
            .and_then(|()| {
                ram.write_page(n, &page)
                    .map_err(|_| CompressPoolError::OutOfRange(job.offset))
            });
        match result {
            Ok(()) => book.mark(n, page_hash(&page) == job.hash),
            Err(CompressPoolError::Corrupt { .. }) if !error_check => {
                page.fill(0);
                if ram.write_page(n, &page).is_ok() {
                    book.mark(n, false);
                }
            }
            Err(e) => {
                let mut p = state.0.lock().unwrap_or_else(|e| e.into_inner());
                if p.error.is_none() {
                    p.error = Some(e);
                }
            }
        }
    }
}
