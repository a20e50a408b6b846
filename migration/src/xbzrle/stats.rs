//! XBZRLE statistics: the `xbzrle-cache` member of `query-migrate`.
//!
//! Counters, as QEMU's `xbzrle_counters` in `migration/ram.c`:
//! - `pages`: pages that hit the cache (sent as a delta, skipped as
//!   unchanged, or sent whole after an overflow);
//! - `bytes`: for each delta, its length plus the 3 bytes of the record
//!   header (encoding flag and be16 length) plus any page-header bytes past
//!   the first 8 (a block name: see
//!   [`XbzrleCounters::add_header_bytes`]); for each overflow, a whole page;
//! - `cache-miss`: pages not found in the cache;
//! - `overflow`: pages whose delta did not fit in a page.
//!
//! The two rates are recomputed once per dirty-sync period by
//! [`XbzrleCounters::update_rates`], as QEMU's `migration_update_rates`
//! does at each bitmap sync:
//! - `cache-miss-rate` = misses in the period / target pages sent in the
//!   period (all pages, XBZRLE or not);
//! - `encoding-rate` = (pages hit in the period x page size) / `bytes` added
//!   in the period; 0 when no page hit or no byte was added.
//!
//! A period in which no page was sent leaves both rates as they were.

use serde::{Deserialize, Serialize};

/// `XBZRLECacheStats` of QEMU's QAPI schema, as `query-migrate` returns it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleCacheStats {
    /// XBZRLE cache size in bytes (`xbzrle-cache-size`).
    pub cache_size: u64,
    /// Bytes of XBZRLE data sent (see the module doc).
    pub bytes: u64,
    /// Pages that hit the cache.
    pub pages: u64,
    /// Pages not found in the cache.
    pub cache_miss: u64,
    /// Misses per page sent in the last sync period.
    pub cache_miss_rate: f64,
    /// Unencoded bytes per encoded byte in the last sync period.
    pub encoding_rate: f64,
    /// Deltas that did not fit in a page.
    pub overflow: u64,
}

/// Running XBZRLE counters and the per-period rates derived from them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XbzrleCounters {
    /// See [`XbzrleCacheStats::bytes`].
    pub bytes: u64,
    /// See [`XbzrleCacheStats::pages`].
    pub pages: u64,
    /// See [`XbzrleCacheStats::cache_miss`].
    pub cache_miss: u64,
    /// See [`XbzrleCacheStats::overflow`].
    pub overflow: u64,
    /// See [`XbzrleCacheStats::cache_miss_rate`].
    pub cache_miss_rate: f64,
    /// See [`XbzrleCacheStats::encoding_rate`].
    pub encoding_rate: f64,
    cache_miss_prev: u64,
    pages_prev: u64,
    bytes_prev: u64,
}

impl XbzrleCounters {
    /// Adds page-header bytes the stream wrote past the first 8 for an
    /// XBZRLE record (QEMU counts the block name of a record that starts a
    /// new RAM block: 1 + name length).
    pub fn add_header_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// Ends a sync period in which `pages_sent` target pages were sent in
    /// all (QEMU's `target_page_count` delta): recomputes the rates.
    pub fn update_rates(&mut self, pages_sent: u64, page_size: usize) {
        if pages_sent == 0 {
            return;
        }
        self.cache_miss_rate = (self.cache_miss - self.cache_miss_prev) as f64 / pages_sent as f64;
        self.cache_miss_prev = self.cache_miss;
        let unencoded = ((self.pages - self.pages_prev) * page_size as u64) as f64;
        let encoded = (self.bytes - self.bytes_prev) as f64;
        self.encoding_rate = if self.pages == self.pages_prev || encoded == 0.0 {
            0.0
        } else {
            unencoded / encoded
        };
        self.pages_prev = self.pages;
        self.bytes_prev = self.bytes;
    }

    /// The QMP view, for a cache of `cache_size` bytes.
    pub fn stats(&self, cache_size: u64) -> XbzrleCacheStats {
        XbzrleCacheStats {
            cache_size,
            bytes: self.bytes,
            pages: self.pages,
            cache_miss: self.cache_miss,
            cache_miss_rate: self.cache_miss_rate,
            encoding_rate: self.encoding_rate,
            overflow: self.overflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_serialize_with_qmp_names() {
        let s = XbzrleCacheStats {
            cache_size: 67108864,
            bytes: 20971520,
            pages: 2444343,
            cache_miss: 2244,
            cache_miss_rate: 0.125,
            encoding_rate: 80.5,
            overflow: 34434,
        };
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "cache-size": 67108864,
                "bytes": 20971520,
                "pages": 2444343,
                "cache-miss": 2244,
                "cache-miss-rate": 0.125,
                "encoding-rate": 80.5,
                "overflow": 34434
            })
        );
    }

    #[test]
    fn rates_are_per_period() {
        // Period 1: 10 pages sent, 4 misses, 2 hits encoded in 100 bytes.
        let mut c = XbzrleCounters {
            cache_miss: 4,
            pages: 2,
            bytes: 100,
            ..XbzrleCounters::default()
        };
        c.update_rates(10, 4096);
        assert_eq!(c.cache_miss_rate, 0.4);
        assert_eq!(c.encoding_rate, 2.0 * 4096.0 / 100.0);
        // Period 2: 5 pages sent, 1 miss, 1 hit that was unchanged.
        c.cache_miss += 1;
        c.pages += 1;
        c.update_rates(5, 4096);
        assert_eq!(c.cache_miss_rate, 0.2);
        assert_eq!(c.encoding_rate, 0.0, "no encoded byte in the period");
        // An empty period keeps the rates.
        c.update_rates(0, 4096);
        assert_eq!(c.cache_miss_rate, 0.2);
    }
}
