//! Where everything of the test guest sits in guest memory.
//!
//! ```text
//! GPA (identity-mapped, first 2 MiB)      what
//! 0x0000_1000                              GDT (null, code64 DPL0, data DPL0, code64 DPL3, data DPL3, TSS)
//! 0x0000_2000                              PML4
//! 0x0000_3000                              PDPT for the identity map
//! 0x0000_4000                              PD for the identity map (one 2 MiB page)
//! 0x0000_5000                              PDPT for the working-set window
//! 0x0000_8000 .. 0x0000_a069               64-bit TSS with an I/O bitmap (serial + control ports)
//! 0x0001_0000 .. 0x0005_0000               PDs for the working-set window (64 pages: up to 64 GiB)
//! 0x0005_0000 .. 0x0006_0000               guest code
//! 0x0006_0000 .. 0x0006_1000               banner text
//! 0x0008_0000 + 0x1000 * vcpu              mailbox of each vCPU (up to 64)
//! 0x0010_0000 + 0x4000 * vcpu              stack of each vCPU (16 KiB, top at +0x4000)
//! RAM offset 2 MiB ..                      the working set, seen by the guest at WS_VA
//! ```

/// GPA of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// GPA of the PML4.
pub const PML4_GPA: u64 = 0x2000;
/// GPA of the identity map's PDPT.
pub const PDPT_ID_GPA: u64 = 0x3000;
/// GPA of the identity map's PD.
pub const PD_ID_GPA: u64 = 0x4000;
/// GPA of the working-set window's PDPT.
pub const PDPT_WS_GPA: u64 = 0x5000;
/// GPA of the TSS.
pub const TSS_GPA: u64 = 0x8000;
/// Offset of the I/O permission bitmap inside the TSS.
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// TSS limit: header, 8 KiB bitmap and the terminating 0xff byte.
pub const TSS_LIMIT: u32 = (TSS_IOMAP_OFFSET + 8192) as u32;
/// GPA of the first working-set PD.
pub const PD_WS_GPA: u64 = 0x10000;
/// Number of working-set PD pages (each maps 1 GiB).
pub const PD_WS_PAGES: u64 = 64;
/// GPA of the guest code.
pub const CODE_GPA: u64 = 0x50000;
/// Maximum size of the guest code.
pub const CODE_MAX: u64 = 0x10000;
/// GPA of the banner text.
pub const BANNER_GPA: u64 = 0x60000;
/// Maximum banner length.
pub const BANNER_MAX: u64 = 0x1000;
/// GPA of vCPU 0's mailbox.
pub const MAILBOX_GPA: u64 = 0x80000;
/// GPA of vCPU 0's stack bottom.
pub const STACK_GPA: u64 = 0x100000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// Most vCPUs the layout holds.
pub const MAX_VCPUS: usize = 64;
/// RAM offset where the working set starts.
pub const WS_RAM_OFFSET: u64 = 2 << 20;
/// Guest-virtual base of the working-set window (PML4 slot 1).
pub const WS_VA: u64 = 0x80_0000_0000;
/// GDT selectors.
pub const SEL_USER_CODE: u16 = 0x18 | 3;
/// User data selector.
pub const SEL_USER_DATA: u16 = 0x20 | 3;
/// TSS selector.
pub const SEL_TSS: u16 = 0x28;

/// Derived positions for one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Pages in the working set.
    pub ws_pages: u64,
}

impl GuestLayout {
    /// GPA of vCPU `i`'s mailbox.
    pub fn mailbox_gpa(i: usize) -> u64 {
        MAILBOX_GPA + 0x1000 * i as u64
    }

    /// Initial stack pointer of vCPU `i`.
    pub fn stack_top(i: usize) -> u64 {
        STACK_GPA + STACK_SIZE * (i as u64 + 1)
    }

    /// Largest working set (pages) for `ram_size` bytes of RAM.
    pub fn max_ws_pages(ram_size: u64) -> u64 {
        let by_ram = ram_size.saturating_sub(WS_RAM_OFFSET) / 4096;
        by_ram.min(PD_WS_PAGES * 512 * 512)
    }

    /// Splits the working set between vCPUs: (first page, pages) of vCPU `i`.
    pub fn slice(&self, i: usize) -> (u64, u64) {
        let n = self.vcpus.max(1) as u64;
        let q = self.ws_pages / n;
        let r = self.ws_pages % n;
        let i = i as u64;
        (i * q + i.min(r), q + u64::from(i < r))
    }
}

// The system area must fit under the working set, checked at compile time.
const _: () = {
    assert!(STACK_GPA + STACK_SIZE * MAX_VCPUS as u64 <= WS_RAM_OFFSET);
    assert!(MAILBOX_GPA + 0x1000 * MAX_VCPUS as u64 <= STACK_GPA);
    assert!(TSS_GPA + (TSS_LIMIT as u64) < PD_WS_GPA);
    assert!(PD_WS_GPA + PD_WS_PAGES * 4096 <= CODE_GPA);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_working_set() {
        let l = GuestLayout {
            vcpus: 3,
            ws_pages: 10,
        };
        assert_eq!(l.slice(0), (0, 4));
        assert_eq!(l.slice(1), (4, 3));
        assert_eq!(l.slice(2), (7, 3));
    }
}
