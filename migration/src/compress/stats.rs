//! query-migrate's `compression` member and the counters behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ram::PAGE_SIZE;
use serde::Serialize;

/// query-migrate's `compression` member (QAPI `CompressionStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompressionStats {
    /// Pages sent compressed.
    pub pages: u64,
    /// Times a page was sent uncompressed because every thread was busy.
    pub busy: u64,
    /// Busy count per page processed, over the last period (between dirty syncs).
    pub busy_rate: f64,
    /// Bytes of compressed data sent.
    pub compressed_size: u64,
    /// Uncompressed bytes per compressed byte, over the last period.
    pub compression_rate: f64,
}

#[derive(Debug, Default)]
struct Period {
    busy: u64,
    pages: u64,
    compressed_size: u64,
    busy_rate: f64,
    compression_rate: f64,
}

/// Live compression counters, shared by the sender and query-migrate.
#[derive(Debug, Default)]
pub struct CompressCounters {
    pages: AtomicU64,
    busy: AtomicU64,
    compressed_size: AtomicU64,
    period: Mutex<Period>,
}

impl CompressCounters {
    /// Counts one page sent compressed as `bytes` bytes.
    pub fn add_compressed(&self, bytes: u64) {
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.compressed_size.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a page sent raw because every thread was busy.
    pub fn add_busy(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    /// Pages sent compressed so far.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Ends a period (QEMU's `migration_update_rates`): `other_pages` pages were sent
    /// otherwise (whole, zero) since the last call, besides the compressed ones.
    pub fn update_rates(&self, other_pages: u64) {
        let busy = self.busy.load(Ordering::Relaxed);
        let pages = self.pages.load(Ordering::Relaxed);
        let size = self.compressed_size.load(Ordering::Relaxed);
        let mut p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        let pages_processed = other_pages + (pages - p.pages);
        if pages_processed > 0 {
            p.busy_rate = (busy - p.busy) as f64 / pages_processed as f64;
        }
        p.busy = busy;
        let compressed = size - p.compressed_size;
        if compressed > 0 {
            p.compression_rate = ((pages - p.pages) * PAGE_SIZE as u64) as f64 / compressed as f64;
            p.pages = pages;
            p.compressed_size = size;
        }
    }

    /// The figures query-migrate shows.
    pub fn stats(&self) -> CompressionStats {
        let p = self.period.lock().unwrap_or_else(|e| e.into_inner());
        CompressionStats {
            pages: self.pages.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            busy_rate: p.busy_rate,
            compressed_size: self.compressed_size.load(Ordering::Relaxed),
            compression_rate: p.compression_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_cover_the_last_period_only() {
        let c = CompressCounters::default();
        for _ in 0..10 {
            c.add_compressed(1024);
        }
        c.add_busy();
        c.update_rates(10);
        let s = c.stats();
        assert_eq!((s.pages, s.busy, s.compressed_size), (10, 1, 10240));
        assert!((s.compression_rate - 4.0).abs() < 1e-9, "{s:?}");
        assert!((s.busy_rate - 0.05).abs() < 1e-9, "{s:?}");
        // Next period: 2 pages at 2048 bytes each, no busy.
        c.add_compressed(2048);
        c.add_compressed(2048);
        c.update_rates(2);
        let s = c.stats();
        assert!((s.compression_rate - 2.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.busy_rate, 0.0);
        // A period without compressed pages keeps the last ratio (as QEMU).
        c.update_rates(4);
        assert!((c.stats().compression_rate - 2.0).abs() < 1e-9);
    }

    #[test]
    fn serialises_with_qemu_names() {
        let v = serde_json::to_value(CompressionStats {
            pages: 1,
            busy: 2,
            busy_rate: 0.5,
            compressed_size: 3,
            compression_rate: 4.0,
        })
        .unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({"pages": 1, "busy": 2, "busy-rate": 0.5,
                "compressed-size": 3, "compression-rate": 4.0})
        );
    }
}
