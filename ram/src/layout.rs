//! Where guest RAM sits in guest physical address space.
//!
//! Like a PC: up to 3 GiB of RAM from GPA 0, the rest from 4 GiB, leaving
//! [3 GiB, 4 GiB) free. KVM needs a few pages of GPA outside RAM on Intel
//! hosts (the real-mode TSS and identity map), which go just below 4 GiB.

/// Top of the low RAM range.
pub const LOW_RAM_END: u64 = 3 << 30;
/// Start of the high RAM range.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// GPA of KVM's three-page real-mode TSS (outside RAM).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// GPA of KVM's identity-map page (outside RAM), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the first byte in the dense RAM-offset space.
    pub ram_offset: u64,
}

/// The GPA ranges for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(LOW_RAM_END);
    let mut out = vec![RamRange {
        gpa: 0,
        size: low,
        ram_offset: 0,
    }];
    if size > low {
        out.push(RamRange {
            gpa: HIGH_RAM_START,
            size: size - low,
            ram_offset: low,
        });
    }
    out
}

// KVM's pages must sit in the hole between the RAM ranges.
const _: () = assert!(KVM_TSS_ADDR >= LOW_RAM_END && KVM_TSS_ADDR + 0x3000 <= HIGH_RAM_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                gpa: 0,
                size: 512 << 20,
                ram_offset: 0
            }]
        );
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(6 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, 3 << 30);
        assert_eq!(r[1].gpa, 4 << 30);
        assert_eq!(r[1].size, 3 << 30);
        assert_eq!(r[1].ram_offset, 3 << 30);
    }
}
