//! Page geometry: Ferry migrates and tracks guest memory in 4 KiB pages.

/// Size of a guest page as migration sees it (x86 base page).
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Size of a transparent/hugetlb huge page on x86-64.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Number of pages needed to hold `bytes` bytes (rounded up).
pub const fn pages_for(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE as u64)
}

/// Whether `value` is a multiple of [`PAGE_SIZE`].
pub const fn is_page_aligned(value: u64) -> bool {
    value.is_multiple_of(PAGE_SIZE as u64)
}

/// Rounds `value` up to the next multiple of `align` (a power of two).
pub const fn align_up(value: u64, align: u64) -> u64 {
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_for_rounds_up() {
        assert_eq!(pages_for(0), 0);
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(4096), 1);
        assert_eq!(pages_for(4097), 2);
    }

    #[test]
    fn alignment_helpers() {
        assert!(is_page_aligned(8192));
        assert!(!is_page_aligned(8193));
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(4096, 4096), 4096);
        assert_eq!(align_up(3 << 20, HUGE_PAGE_SIZE as u64), 4 << 20);
    }
}
