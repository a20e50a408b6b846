//! [`PageClaims`]: which pages already have their start-instant copy.
//!
//! Two threads save pages during a background snapshot: the writer, walking RAM in order,
//! and the fault handler, serving guest writes to pages not saved yet. Each page must be
//! saved exactly once and with its contents of the start instant. The rule that makes this
//! hold without locks:
//!
//! 1. a thread copies a page *first*, and only then tries to claim it;
//! 2. only the thread whose claim succeeded keeps its copy (a losing copy is dropped);
//! 3. nobody removes a page's write protection before the page is claimed.
//!
//! So while a page is unclaimed it is still write-protected and its bytes are those of the
//! start instant; the winning copy was taken before the claim, hence while the page was
//! protected. A claimed page may be unprotected by anyone, any number of times.
//! Pages known to be zero at the start instant (never touched) are claimed at setup
//! without a copy.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page: set once the page's start-instant contents are secured.
#[derive(Debug)]
pub struct PageClaims {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageClaims {
    /// No page claimed, for `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageClaims {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Claims `page`; true when this call claimed it (false: already claimed, or out of range).
    pub fn claim(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        self.words[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Whether `page` is claimed (out-of-range pages count as claimed: nothing to save).
    pub fn is_claimed(&self, page: u64) -> bool {
        if page >= self.pages {
            return true;
        }
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1u64 << (page % 64)) != 0
    }

    /// Claims every page of `[start, start + count)`; returns how many this call claimed.
    pub fn claim_range(&self, start: u64, count: u64) -> u64 {
        let end = start.saturating_add(count).min(self.pages);
        let mut claimed = 0;
        let mut p = start;
        while p < end {
            let w = p / 64;
            let lo = p % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            claimed += u64::from((mask & !old).count_ones());
            p = w * 64 + hi;
        }
        claimed
    }

    /// Number of claimed pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_page_is_claimed_once() {
        let c = PageClaims::new(100);
        assert!(!c.is_claimed(5));
        assert!(c.claim(5));
        assert!(!c.claim(5));
        assert!(c.is_claimed(5));
        assert_eq!(c.count(), 1);
        assert!(!c.claim(100), "out of range is never claimed");
        assert!(c.is_claimed(100), "out of range needs no saving");
    }

    #[test]
    fn ranges_count_only_new_claims_and_clip() {
        let c = PageClaims::new(200);
        assert!(c.claim(70));
        assert_eq!(c.claim_range(60, 80), 79);
        assert_eq!(c.claim_range(0, 64), 60);
        assert_eq!(c.claim_range(190, 50), 10);
        assert_eq!(c.claim_range(0, 200), 200 - 150);
        assert_eq!(c.count(), 200);
        assert_eq!(c.claim_range(0, 200), 0);
    }

    #[test]
    fn racing_threads_claim_each_page_exactly_once() {
        let c = Arc::new(PageClaims::new(64 * 1024));
        let won: Vec<u64> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    for i in 0..c.pages() {
                        // Each thread walks in a different order.
                        let p = (i * (2 * t + 1)) % c.pages();
                        if c.claim(p) {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(won.iter().sum::<u64>(), 64 * 1024);
        assert_eq!(c.count(), 64 * 1024);
    }
}
