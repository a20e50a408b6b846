//! The source's compression threads: each takes a page number, copies the page, hashes the
//! copy and compresses it; the main thread collects the results and writes the records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ram::{page_hash, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::{CompressCounters, CompressPoolError};
use crate::multifd::compress::Compressor;
use crate::multifd::Method;

/// A page as a worker left it.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    /// Compressed: `data` is a zlib stream of the page whose hash is `hash`.
    Compressed {
        /// RAM offset.
        offset: u64,
        /// Hash of the page (of the copy that was compressed).
        hash: u64,
        /// zlib data.
        data: Vec<u8>,
    },
    /// The page did not shrink: its copy, to send as a whole page.
    Raw {
        /// RAM offset.
        offset: u64,
        /// Hash of the copy.
        hash: u64,
        /// The page's bytes.
        data: Vec<u8>,
    },
}

/// Compression threads and the pages in flight.
pub struct CompressPool {
    jobs: Option<Sender<u64>>,
    results: Receiver<Result<Done, CompressPoolError>>,
    threads: usize,
    in_flight: usize,
    wait: bool,
    workers: Vec<JoinHandle<()>>,
    counters: Arc<CompressCounters>,
}

/// What [`CompressPool::submit`] did with a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// A worker has it.
    Queued,
    /// Every worker is busy and `compress-wait-thread` is off: send the page raw.
    Busy,
}

/// Longest single wait for a worker before the cancel flag is looked at again.
const POLL: Duration = Duration::from_millis(100);

impl CompressPool {
    /// Starts `threads` workers compressing pages of `ram` with zlib at `level` (0 stores);
    /// `wait` is `compress-wait-thread`.
    pub fn start(
        ram: Arc<GuestRam>,
        threads: u8,
        level: u8,
        wait: bool,
        counters: Arc<CompressCounters>,
    ) -> Result<Self, CompressPoolError> {
        let threads = usize::from(threads.max(1));
        // One page per worker at a time, as QEMU's threads: a full queue means all are busy.
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<u64>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let compressor = Compressor::new(Method::Zlib, level)?;
            let (ram, jobs, results) = (ram.clone(), jobs_rx.clone(), res_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("compress-{i}"))
                .spawn(move || worker(&ram, compressor, level, &jobs, &results))
                .map_err(|source| CompressPoolError::Spawn {
                    what: "compression",
                    source,
                })?;
            workers.push(h);
        }
        Ok(CompressPool {
            jobs: Some(jobs_tx),
            results: res_rx,
            threads,
            in_flight: 0,
            wait,
            workers,
            counters,
        })
    }

    /// The counters query-migrate reads.
    pub fn counters(&self) -> &Arc<CompressCounters> {
        &self.counters
    }

    /// A finished page, if one is ready (never blocks).
    pub fn try_next(&mut self) -> Result<Option<Done>, CompressPoolError> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        match self.results.try_recv() {
            Ok(r) => {
                self.in_flight -= 1;
                r.map(Some)
            }
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(None),
            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                Err(CompressPoolError::WorkersGone("compression"))
            }
        }
    }

    /// The next finished page, waiting for one; None when nothing is in flight.
    pub fn next_pending(&mut self, cancel: &AtomicBool) -> Result<Option<Done>, CompressPoolError> {
        while self.in_flight > 0 {
            match self.results.recv_timeout(POLL) {
                Ok(r) => {
                    self.in_flight -= 1;
                    return r.map(Some);
                }
                Err(RecvTimeoutError::Timeout) if cancel.load(Ordering::Acquire) => {
                    return Ok(None)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CompressPoolError::WorkersGone("compression"))
                }
            }
        }
        Ok(None)
    }

    /// Whether every worker has a page.
    pub fn all_busy(&self) -> bool {
        self.in_flight >= self.threads
    }

    /// Whether the sender waits for a worker when all are busy (`compress-wait-thread`).
    pub fn waits(&self) -> bool {
        self.wait
    }

    /// Gives `page` to a worker; when all are busy and the pool does not wait, counts it as
    /// busy and returns [`Submitted::Busy`]. Collect results first (see [`Self::try_next`]).
    pub fn submit(&mut self, page: u64) -> Result<Submitted, CompressPoolError> {
        if self.all_busy() {
            self.counters.add_busy();
            return Ok(Submitted::Busy);
        }
        let jobs = self
            .jobs
            .as_ref()
            .ok_or(CompressPoolError::WorkersGone("compression"))?;
        jobs.send(page)
            .map_err(|_| CompressPoolError::WorkersGone("compression"))?;
        self.in_flight += 1;
        Ok(Submitted::Queued)
    }
}

impl Drop for CompressPool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(
    ram: &GuestRam,
    mut compressor: Compressor,
    level: u8,
    jobs: &Receiver<u64>,
    results: &Sender<Result<Done, CompressPoolError>>,
) {
    let mut copy = vec![0u8; PAGE_SIZE];
    let mut out = Vec::new();
    // Level 0 stores the page (a few bytes more than the page, as QEMU sends it); other
    // levels send a page that does not shrink as a whole page. The room always holds the
    // whole stream (zlib's bound for a page is 4110 bytes): a stream that does not fit
    // would cost a new zlib context (see multifd::compress).
    let room = 2 * PAGE_SIZE;
    while let Ok(page) = jobs.recv() {
        let offset = page << PAGE_SHIFT;
        let done = match ram.read_page(page, &mut copy) {
            Err(_) => Err(CompressPoolError::OutOfRange(offset)),
            Ok(()) => {
                let hash = page_hash(&copy);
                Ok(match compressor.compress_within(&copy, &mut out, room) {
                    Some(n) if level == 0 || n < PAGE_SIZE => Done::Compressed {
                        offset,
                        hash,
                        data: out[..n].to_vec(),
                    },
                    _ => Done::Raw {
                        offset,
                        hash,
                        data: copy.clone(),
                    },
                })
            }
        };
        if results.send(done).is_err() {
            return;
        }
    }
}
