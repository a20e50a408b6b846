//! The *page digest*: one hash of all of guest RAM that can be assembled in any page order.
//!
//! It is the xxh3-64 of the little-endian array of every page's xxh3-64 hash, in RAM-offset
//! order. A snapshot computes it from the copies it writes (the writer and the fault
//! handler save pages in different orders), so it describes memory exactly at the start
//! instant; [`page_digest`] computes the same function over live memory (a restored guest).

use ram::{page_hash, GuestRam, PAGE_SIZE};

/// The hash of an all-zero page.
pub fn zero_page_hash() -> u64 {
    page_hash(&[0u8; PAGE_SIZE])
}

/// Page hashes collected in any order, finished into the page digest.
#[derive(Debug, Clone)]
pub struct PageDigest {
    hashes: Vec<u64>,
}

impl PageDigest {
    /// A digest of `pages` pages, all zero until set.
    pub fn new(pages: u64) -> Self {
        PageDigest {
            hashes: vec![zero_page_hash(); pages as usize],
        }
    }

    /// Records the hash of page `page` (ignored when out of range).
    pub fn set(&mut self, page: u64, hash: u64) {
        if let Some(h) = self.hashes.get_mut(page as usize) {
            *h = hash;
        }
    }

    /// The digest.
    pub fn finish(&self) -> u64 {
        digest_of_hashes(&self.hashes)
    }
}

fn digest_of_hashes(hashes: &[u64]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for chunk in hashes.chunks(512) {
        let mut bytes = [0u8; 512 * 8];
        for (i, x) in chunk.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
        }
        h.update(&bytes[..chunk.len() * 8]);
    }
    h.digest()
}

/// The page digest of `ram` as it is now (stop the guest for a stable answer).
pub fn page_digest(ram: &GuestRam) -> u64 {
    digest_of_hashes(&ram.page_hashes())
}

/// The page digest of `ram` reading only the pages of `data` (sorted page ranges); every
/// other page is taken to be zero without being read.
pub fn page_digest_of_ranges(ram: &GuestRam, data: &[(u64, u64)]) -> u64 {
    let mut d = PageDigest::new(ram.page_count());
    for &(s, e) in data {
        for p in s..e.min(ram.page_count()) {
            if let Some(bytes) = ram.page(p) {
                d.set(p, page_hash(bytes));
            }
        }
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::{Backend, MemoryConfig};

    #[test]
    fn out_of_order_hashes_give_the_live_digest() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend: Backend::SharedMemfd,
            ..MemoryConfig::default()
        })
        .unwrap();
        for p in [1u64, 7, 500, 1023] {
            ram.write_page(p, &[(p % 200) as u8 + 1; PAGE_SIZE])
                .unwrap();
        }
        let mut d = PageDigest::new(ram.page_count());
        for p in [1023u64, 7, 1, 500] {
            d.set(p, page_hash(ram.page(p).unwrap()));
        }
        assert_eq!(d.finish(), page_digest(&ram));
        assert_eq!(
            page_digest_of_ranges(&ram, &[(0, 8), (500, 501), (1000, 1024)]),
            page_digest(&ram),
            "pages outside the ranges are zero"
        );
        ram.write_page(2, &[9u8; PAGE_SIZE]).unwrap();
        assert_ne!(
            d.finish(),
            page_digest(&ram),
            "a changed page changes the digest"
        );
    }
}
