//! [`PageTracker`]: which pages the destination still lacks during postcopy, which of them
//! were requested, who waits for them — shared by the fault thread and the receivers.
//!
//! A page is *needed* from the switch (it was discarded: never sent, dirtied since it was
//! sent, or suspect) until a copy of it is in place. The order of operations makes the
//! bookkeeping race-free without holding a lock across ioctls:
//! - a receiver places the page first (`UFFDIO_COPY`, which wakes the waiters), and only
//!   then clears *needed* under the lock ([`PageTracker::placed`]);
//! - the fault thread decides under the same lock ([`PageTracker::fault`]): a page no
//!   longer needed is present (or was never sent and reads as zero), so it resolves the
//!   fault itself; a needed page gets the waiter recorded and, once, a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ram::AtomicBitmap;
use serde::Serialize;

use super::blocktime::{Blocktime, BlocktimeReport};
use crate::snapshot::{LatencyHistogram, LatencySummary};
use crate::stream::ranges::{ranges_of, PageRange};

/// What the fault thread should do about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// The page is not needed: make it present locally (zero page, or just wake).
    ResolveLocally,
    /// Ask the source for the page.
    Request,
    /// Already asked for; wait.
    AlreadyRequested,
}

/// Figures of the destination's postcopy, for `x-ferry-postcopy` in query-migrate.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PostcopyDestStats {
    /// Pages needed at the switch.
    pub pages_needed: u64,
    /// Pages still missing.
    pub pages_missing: u64,
    /// Missing-page faults read from the userfaultfd.
    pub faults: u64,
    /// Pages requested from the source.
    pub requests: u64,
    /// Faults on pages that needed nothing from the source.
    pub local_faults: u64,
    /// Pages placed that were requested (urgent).
    pub urgent_pages: u64,
    /// Pages placed from the background stream.
    pub background_pages: u64,
    /// Copies that found their page already present.
    pub duplicate_pages: u64,
    /// Pages whose bytes did not match their hash (asked for again).
    pub corrupt_pages: u64,
    /// From a fault's request to its page in place (the fault round trip).
    pub fault_latency: LatencySummary,
    /// Milliseconds from the switch until every page was in place (once done).
    pub duration_ms: Option<u64>,
}

struct Inner {
    blocktime: Option<Blocktime>,
    /// When each outstanding request was made.
    asked_at: HashMap<u64, Instant>,
}

/// The destination's page bookkeeping for one postcopy migration.
pub struct PageTracker {
    needed: AtomicBitmap,
    requested: AtomicBitmap,
    remaining: AtomicU64,
    total_needed: u64,
    inner: Mutex<Inner>,
    cond: Condvar,
    origin: Instant,
    done_at_ms: AtomicU64,
    latency: LatencyHistogram,
    faults: AtomicU64,
    requests: AtomicU64,
    local_faults: AtomicU64,
    urgent: AtomicU64,
    background: AtomicU64,
    duplicates: AtomicU64,
    corrupt: AtomicU64,
}

impl PageTracker {
    /// Bookkeeping for `pages` pages of which `needed` must come from the source;
    /// `vcpu_tids` enables blocktime accounting for those threads.
    pub fn new(pages: u64, needed: &[PageRange], vcpu_tids: Option<Vec<i32>>) -> Self {
        let bm = AtomicBitmap::new(pages);
        for r in needed {
            bm.set_range(r.first, r.count);
        }
        let n = bm.count_ones();
        PageTracker {
            needed: bm,
            requested: AtomicBitmap::new(pages),
            remaining: AtomicU64::new(n),
            total_needed: n,
            inner: Mutex::new(Inner {
                blocktime: vcpu_tids.map(Blocktime::new),
                asked_at: HashMap::new(),
            }),
            cond: Condvar::new(),
            origin: Instant::now(),
            done_at_ms: AtomicU64::new(0),
            latency: LatencyHistogram::new(),
            faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            local_faults: AtomicU64::new(0),
            urgent: AtomicU64::new(0),
            background: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Pages of guest RAM.
    pub fn page_count(&self) -> u64 {
        self.needed.len()
    }

    /// Whether `page` still has to come from the source.
    pub fn is_needed(&self, page: u64) -> bool {
        self.needed.get(page)
    }

    /// Pages still missing.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Thread `tid` faulted on `page`.
    pub fn fault(&self, page: u64, tid: i32) -> FaultAction {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        if !self.needed.get(page) {
            drop(inner);
            self.local_faults.fetch_add(1, Ordering::Relaxed);
            return FaultAction::ResolveLocally;
        }
        let now = self.now_ns();
        if let Some(b) = inner.blocktime.as_mut() {
            b.on_fault(tid, page, now);
        }
        if self.requested.get(page) {
            return FaultAction::AlreadyRequested;
        }
        self.requested.set(page);
        inner.asked_at.insert(page, Instant::now());
        self.requests.fetch_add(1, Ordering::Relaxed);
        FaultAction::Request
    }

    /// Marks `page` as requested (a corrupt copy asked for again); false if it already was.
    pub fn rerequest(&self, page: u64) -> bool {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.asked_at.entry(page).or_insert_with(Instant::now);
        !self.requested.get(page) && {
            self.requested.set(page);
            true
        }
    }

    /// A copy of `page` is in place now (placed by the caller, or found present); returns
    /// whether it was still needed.
    pub fn placed(&self, page: u64, already_present: bool) -> bool {
        let mut inner = self.lock();
        if !self.needed.test_and_clear(page) {
            drop(inner);
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if already_present {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        let now = self.now_ns();
        if let Some(b) = inner.blocktime.as_mut() {
            b.on_placed(page, now);
        }
        let urgent = self.requested.test_and_clear(page);
        if let Some(t) = inner.asked_at.remove(&page) {
            self.latency.record(t.elapsed());
        }
        drop(inner);
        if urgent {
            self.urgent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.background.fetch_add(1, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done_at_ms.store(
                self.origin.elapsed().as_millis().max(1) as u64,
                Ordering::Release,
            );
            self.cond.notify_all();
        }
        true
    }

    /// Waits until every page is in place, `stop()` says to give up, or `timeout` passes;
    /// returns whether every page is in place.
    pub fn wait_complete(&self, timeout: Duration, stop: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if self.remaining() == 0 {
                return true;
            }
            let now = Instant::now();
            if stop() || now >= deadline {
                return false;
            }
            let slice = (deadline - now).min(Duration::from_millis(20));
            inner = self
                .cond
                .wait_timeout(inner, slice)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Pages still missing, as ranges (the NEED list of a recovery).
    pub fn needed_ranges(&self) -> Vec<PageRange> {
        let _inner = self.lock();
        ranges_of(&self.needed)
    }

    /// Pages requested and still missing (asked for again after a recovery).
    pub fn outstanding_requests(&self) -> Vec<u64> {
        let _inner = self.lock();
        ranges_of(&self.requested)
            .iter()
            .flat_map(|r| r.pages())
            .filter(|&p| self.needed.get(p))
            .collect()
    }

    /// Blocktime so far, when measured.
    pub fn blocktime(&self) -> Option<BlocktimeReport> {
        self.lock().blocktime.as_ref().map(Blocktime::report)
    }

    /// The figures so far.
    pub fn stats(&self) -> PostcopyDestStats {
        let done = self.done_at_ms.load(Ordering::Acquire);
        PostcopyDestStats {
            pages_needed: self.total_needed,
            pages_missing: self.remaining(),
            faults: self.faults.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            local_faults: self.local_faults.load(Ordering::Relaxed),
            urgent_pages: self.urgent.load(Ordering::Relaxed),
            background_pages: self.background.load(Ordering::Relaxed),
            duplicate_pages: self.duplicates.load(Ordering::Relaxed),
            corrupt_pages: self.corrupt.load(Ordering::Relaxed),
            fault_latency: self.latency.summary(),
            duration_ms: (done != 0 || self.total_needed == 0).then_some(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(tids: Option<Vec<i32>>) -> PageTracker {
        PageTracker::new(
            100,
            &[
                PageRange {
                    first: 10,
                    count: 5,
                },
                PageRange {
                    first: 50,
                    count: 1,
                },
            ],
            tids,
        )
    }

    #[test]
    fn faults_request_a_needed_page_once_and_resolve_others_locally() {
        let t = tracker(None);
        assert_eq!(t.remaining(), 6);
        assert_eq!(t.fault(3, 0), FaultAction::ResolveLocally);
        assert_eq!(t.fault(10, 0), FaultAction::Request);
        assert_eq!(t.fault(10, 0), FaultAction::AlreadyRequested);
        assert_eq!(t.outstanding_requests(), vec![10]);
        assert!(t.placed(10, false));
        assert!(!t.placed(10, true), "a second copy is a duplicate");
        assert_eq!(t.fault(10, 0), FaultAction::ResolveLocally);
        let s = t.stats();
        assert_eq!(
            (
                s.requests,
                s.urgent_pages,
                s.duplicate_pages,
                s.local_faults
            ),
            (1, 1, 1, 2)
        );
        assert_eq!(s.fault_latency.count, 1);
        assert!(t.outstanding_requests().is_empty());
    }

    #[test]
    fn completion_is_signalled_when_the_last_needed_page_arrives() {
        let t = std::sync::Arc::new(tracker(None));
        let t2 = t.clone();
        let w = std::thread::spawn(move || t2.wait_complete(Duration::from_secs(10), || false));
        for p in [10, 11, 12, 13, 14] {
            assert!(t.placed(p, false));
        }
        assert_eq!(
            t.needed_ranges(),
            vec![PageRange {
                first: 50,
                count: 1
            }]
        );
        assert!(!t.wait_complete(Duration::from_millis(10), || false));
        assert!(t.placed(50, false));
        assert!(w.join().unwrap());
        assert!(t.needed_ranges().is_empty());
        assert!(t.stats().duration_ms.is_some());
        assert_eq!(t.stats().background_pages, 6);
    }

    #[test]
    fn blocktime_follows_faults_and_placements() {
        let t = tracker(Some(vec![7]));
        assert_eq!(t.fault(11, 7), FaultAction::Request);
        std::thread::sleep(Duration::from_millis(3));
        t.placed(11, false);
        let b = t.blocktime().unwrap();
        assert!(b.per_vcpu_ms[0] >= 2, "{b:?}");
        assert_eq!(b.total_ms, b.per_vcpu_ms[0]);
        assert!(tracker(None).blocktime().is_none());
    }

    #[test]
    fn corrupt_pages_are_asked_for_again() {
        let t = tracker(None);
        assert!(t.rerequest(12));
        assert!(!t.rerequest(12));
        assert_eq!(t.stats().corrupt_pages, 2);
        assert_eq!(t.outstanding_requests(), vec![12]);
    }
}
