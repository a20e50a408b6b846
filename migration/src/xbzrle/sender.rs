//! [`XbzrleEncoder`]: the per-migration XBZRLE state the migration thread
//! calls for each dirty page (QEMU's `save_xbzrle_page`), and the
//! destination's [`apply_delta`](super::apply_delta).
//!
//! # Why one copy
//!
//! The guest keeps running while its pages are sent and may write a page
//! while it is being encoded. The caller therefore copies the page out of
//! guest memory once, and everything is derived from that copy: the delta
//! is computed from it, the cache is updated with it, and a page sent whole
//! is sent from it. The destination's copy of the page and the source's
//! cache then always hold the same bytes, which is what the next delta is
//! computed against. (A write that lands after the copy dirties the page
//! again, so it goes out in a later round.)

use super::cache::PageCache;
use super::encode::encode;
use super::record::HEADER_LEN;
use super::stats::{XbzrleCacheStats, XbzrleCounters};
use super::XbzrleError;

/// What to send for a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Identical to the cached copy: send nothing.
    Unchanged,
    /// Send this delta in an XBZRLE record; the cache now holds the copy.
    Delta(&'a [u8]),
    /// Send the copy whole: the page was not cached, or its delta would not
    /// fit in a page.
    Whole {
        /// Whether the cache now holds the copy (false when the cache
        /// refused it, in the last stage, or for a page of the wrong size).
        cached: bool,
    },
}

/// Per-migration XBZRLE state: the page cache, a buffer for the delta and
/// the statistics.
#[derive(Debug)]
pub struct XbzrleEncoder {
    cache: PageCache,
    encoded: Vec<u8>,
    zero_page: Vec<u8>,
    counters: XbzrleCounters,
    last_stage: bool,
}

impl XbzrleEncoder {
    /// An encoder with a cache of `cache_size` bytes (`xbzrle-cache-size`)
    /// of [`ram::PAGE_SIZE`] pages.
    pub fn new(cache_size: u64) -> Result<Self, XbzrleError> {
        Ok(Self::with_cache(PageCache::new(
            cache_size,
            ram::PAGE_SIZE,
        )?))
    }

    /// An encoder around an existing cache (its page size is the page size).
    pub fn with_cache(cache: PageCache) -> Self {
        let page_size = cache.page_size();
        XbzrleEncoder {
            encoded: vec![0; page_size],
            zero_page: vec![0; page_size],
            cache,
            counters: XbzrleCounters::default(),
            last_stage: false,
        }
    }

    /// Encodes the page at RAM offset `addr` whose contents the caller
    /// copied once into `page`, during dirty-sync `generation`.
    ///
    /// On a miss the copy is inserted into the cache; on a hit the delta is
    /// computed against the cached copy and the cache is updated with the
    /// copy (QEMU's `save_xbzrle_page`). In the last stage the cache is no
    /// longer updated.
    pub fn encode_page(&mut self, addr: u64, page: &[u8], generation: u64) -> Outcome<'_> {
        let page_size = self.cache.page_size();
        if page.len() != page_size {
            return Outcome::Whole { cached: false };
        }
        let Some(old) = self.cache.touch(addr, generation) else {
            self.counters.cache_miss += 1;
            let cached =
                !self.last_stage && matches!(self.cache.insert(addr, page, generation), Ok(true));
            return Outcome::Whole { cached };
        };
        // A hit counts as an encoded page, whatever the result.
        self.counters.pages += 1;
        let result = encode(old, page, &mut self.encoded);
        if !self.last_stage && result != Some(0) {
            old.copy_from_slice(page);
        }
        match result {
            Some(0) => Outcome::Unchanged,
            None => {
                self.counters.overflow += 1;
                self.counters.bytes += page_size as u64;
                Outcome::Whole {
                    cached: !self.last_stage,
                }
            }
            Some(n) => {
                self.counters.bytes += (n + HEADER_LEN) as u64;
                Outcome::Delta(self.encoded.get(..n).unwrap_or_default())
            }
        }
    }

    /// Records that the page at `addr` was sent as a zero page (QEMU's
    /// `xbzrle_cache_zero_page`): a stale cached copy is replaced by zeros,
    /// and a page not yet cached is added so a small write to it later goes
    /// out as a delta. Does nothing in the last stage.
    pub fn cache_zero_page(&mut self, addr: u64, generation: u64) {
        if self.last_stage {
            return;
        }
        // Refusal and allocation failure only mean the page stays uncached;
        // a cached copy of this page is always overwritten.
        let _ = self.cache.insert(addr, &self.zero_page, generation);
    }

    /// Enters the last stage (vCPUs stopped): the cache is no longer
    /// updated, as it will not be used again.
    pub fn set_last_stage(&mut self, last_stage: bool) {
        self.last_stage = last_stage;
    }

    /// Applies a new `xbzrle-cache-size`, keeping the cached pages that fit.
    pub fn resize_cache(&mut self, new_size: u64) -> Result<(), XbzrleError> {
        Ok(self.cache.resize(new_size)?)
    }

    /// Ends a dirty-sync period in which `pages_sent` target pages were sent
    /// in all: recomputes `cache-miss-rate` and `encoding-rate`.
    pub fn update_rates(&mut self, pages_sent: u64) {
        let page_size = self.cache.page_size();
        self.counters.update_rates(pages_sent, page_size);
    }

    /// Adds page-header bytes past the first 8 written for an XBZRLE record
    /// (a block name), which QEMU counts in `bytes`.
    pub fn add_header_bytes(&mut self, n: u64) {
        self.counters.add_header_bytes(n);
    }

    /// The `xbzrle-cache` statistics of `query-migrate`.
    pub fn stats(&self) -> XbzrleCacheStats {
        self.counters.stats(self.cache.size())
    }

    /// The running counters.
    pub fn counters(&self) -> &XbzrleCounters {
        &self.counters
    }

    /// The page cache.
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xbzrle::apply_delta;

    const PAGE: usize = 4096;

    #[test]
    fn miss_then_delta_then_unchanged() {
        let mut enc = XbzrleEncoder::new(64 * 4096).unwrap();
        let mut guest = vec![0u8; PAGE];
        let mut dest = vec![0u8; PAGE];

        guest[10] = 1;
        let copy = guest.clone();
        assert_eq!(
            enc.encode_page(0x1000, &copy, 1),
            Outcome::Whole { cached: true }
        );
        dest.copy_from_slice(&copy);

        guest[PAGE - 1] = 1;
        let copy = guest.clone();
        match enc.encode_page(0x1000, &copy, 2) {
            Outcome::Delta(d) => {
                assert_eq!(d, [0xff, 0x1f, 0x01, 0x01]);
                apply_delta(&mut dest, d).unwrap();
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        assert_eq!(dest, guest);

        assert_eq!(enc.encode_page(0x1000, &guest, 3), Outcome::Unchanged);
        let s = enc.stats();
        assert_eq!((s.cache_miss, s.pages, s.overflow), (1, 2, 0));
        assert_eq!(s.bytes, 4 + 3);
        assert_eq!(s.cache_size, 64 * 4096);
    }

    #[test]
    fn overflow_sends_whole_and_caches_the_copy() {
        let mut enc = XbzrleEncoder::new(64 * 4096).unwrap();
        enc.encode_page(0, &vec![0u8; PAGE], 1);
        let all_new = vec![0xaau8; PAGE];
        assert_eq!(
            enc.encode_page(0, &all_new, 2),
            Outcome::Whole { cached: true }
        );
        assert_eq!(enc.cache().get(0), Some(&all_new[..]));
        let s = enc.stats();
        assert_eq!((s.overflow, s.pages, s.bytes), (1, 1, PAGE as u64));
    }

    #[test]
    fn last_stage_leaves_the_cache_alone() {
        let mut enc = XbzrleEncoder::new(64 * 4096).unwrap();
        enc.encode_page(0, &vec![0u8; PAGE], 1);
        enc.set_last_stage(true);
        let mut p = vec![0u8; PAGE];
        p[5] = 5;
        assert!(matches!(enc.encode_page(0, &p, 2), Outcome::Delta(_)));
        assert_eq!(enc.cache().get(0), Some(&vec![0u8; PAGE][..]));
        assert_eq!(
            enc.encode_page(0x1000, &p, 2),
            Outcome::Whole { cached: false }
        );
        assert!(enc.cache().get(0x1000).is_none());
    }

    #[test]
    fn zero_page_replaces_a_stale_copy() {
        let mut enc = XbzrleEncoder::new(64 * 4096).unwrap();
        enc.encode_page(0, &vec![7u8; PAGE], 1);
        enc.cache_zero_page(0, 2);
        assert_eq!(enc.cache().get(0), Some(&vec![0u8; PAGE][..]));
        enc.cache_zero_page(0x2000, 2);
        assert!(enc.cache().get(0x2000).is_some());
    }

    #[test]
    fn wrong_sized_page_is_sent_whole_uncached() {
        let mut enc = XbzrleEncoder::new(64 * 4096).unwrap();
        assert_eq!(
            enc.encode_page(0, &[0u8; 100], 1),
            Outcome::Whole { cached: false }
        );
        assert!(enc.cache().is_empty());
    }
}
