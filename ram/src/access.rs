//! Fast host-side page checks: zero detection and hashing.

use crate::geometry::PAGE_SIZE;

/// Whether a page (or any buffer whose length is a multiple of 64) is all zero bytes.
///
/// Reads 64 bytes per step with 8 independent OR lanes, which LLVM turns
/// into wide vector loads; exits at the first non-zero block.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for block in &mut chunks {
        let mut acc = 0u64;
        for lane in block.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(lane);
            acc |= u64::from_ne_bytes(word);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// A 64-bit hash of a page's contents (xxh3), for comparing memory across hosts.
pub fn page_hash(page: &[u8]) -> u64 {
    debug_assert!(page.len() <= PAGE_SIZE || page.len().is_multiple_of(PAGE_SIZE));
    xxhash_rust::xxh3::xxh3_64(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_every_single_byte() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        for pos in [0, 1, 7, 8, 63, 64, 2047, 4095] {
            page[pos] = 1;
            assert!(!is_zero_page(&page), "byte {pos}");
            page[pos] = 0;
        }
        assert!(is_zero_page(&[0u8; 100]));
        assert!(!is_zero_page(&[0, 0, 0, 1]));
    }

    #[test]
    fn hash_differs_on_one_bit() {
        let a = vec![7u8; PAGE_SIZE];
        let mut b = a.clone();
        b[100] ^= 1;
        assert_ne!(page_hash(&a), page_hash(&b));
        assert_eq!(page_hash(&a), page_hash(&a.clone()));
    }
}
