//! A fixed-size bitmap of pages that many threads set and one thread drains.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per page, settable from any thread without locks.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// A bitmap of `bits` clear bits.
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets bit `i` (ignored when out of range).
    pub fn set(&self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// Sets bits `[start, start + count)`, clipped to the bitmap.
    pub fn set_range(&self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.bits);
        let mut i = start;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[(i / 64) as usize].store(u64::MAX, Ordering::Release);
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Clears bits `[start, start + count)`, clipped to the bitmap.
    pub fn clear_range(&self, start: u64, count: u64) {
        let end = start.saturating_add(count).min(self.bits);
        let mut i = start;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[(i / 64) as usize].store(0, Ordering::Release);
                i += 64;
            } else {
                self.test_and_clear(i);
                i += 1;
            }
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits
            && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Atomically clears bit `i`, returning whether it was set.
    pub fn test_and_clear(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let mask = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Atomically takes (reads and clears) word `w` (bits `64*w .. 64*w+63`).
    pub fn take_word(&self, w: usize) -> u64 {
        self.words[w].swap(0, Ordering::AcqRel)
    }

    /// ORs `value` into word `w`.
    pub fn or_word(&self, w: usize, value: u64) {
        if value != 0 {
            self.words[w].fetch_or(value, Ordering::AcqRel);
        }
    }

    /// Reads word `w` without clearing it.
    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Number of 64-bit words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        self.set_range(0, self.bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear() {
        let b = AtomicBitmap::new(130);
        assert_eq!(b.word_count(), 3);
        b.set(0);
        b.set(129);
        b.set(130); // out of range: ignored
        assert!(b.get(0) && b.get(129) && !b.get(1));
        assert_eq!(b.count_ones(), 2);
        assert!(b.test_and_clear(129));
        assert!(!b.test_and_clear(129));
        assert_eq!(b.count_ones(), 1);
    }

    #[test]
    fn ranges_clip_to_length() {
        let b = AtomicBitmap::new(200);
        b.set_range(10, 1000);
        assert_eq!(b.count_ones(), 190);
        b.clear_all();
        b.set_all();
        assert_eq!(b.count_ones(), 200);
        assert_eq!(b.take_word(0), u64::MAX);
        assert_eq!(b.count_ones(), 136);
        b.clear_range(70, 100);
        assert_eq!(b.count_ones(), 36);
        assert!(b.get(69) && !b.get(70) && !b.get(169) && b.get(170));
    }
}
