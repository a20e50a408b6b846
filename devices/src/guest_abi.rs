//! The contract between Ferry and its test guest.
//!
//! The guest is a small x86-64 program that Ferry generates (see the vmm
//! crate's `guest` module). Each vCPU owns a *slice* of the working set and
//! loops over it: it writes page after page at a paced rate, bumping the
//! slice's *generation* after each full pass. Every page's contents are a pure
//! function of (page number, generation), see [`page_word`], so the guest
//! (and the host, and a test reading a snapshot file) can check any page.
//!
//! Which generation a page must hold is known from the position alone: pages
//! before the vCPU's current index hold the current generation, pages at or
//! after it the previous one (generation 0 = never written = all zeros). A
//! page that migration lost (an older copy, a torn copy, a copy of another
//! page) therefore fails the check.
//!
//! The host talks to each vCPU through its *mailbox*, one page of guest RAM
//! (its layout is [`mailbox`]); the guest notifies the host through port I/O
//! on [`CONTROL_PORT`].

/// Port of the 16550 UART (COM1).
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of UART registers.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// The guest's control port: `out CONTROL_PORT, eax` with an [`GuestEvent`] code.
pub const CONTROL_PORT: u16 = 0x510;
/// The guest's sleep port: `out SLEEP_PORT, eax` asks the VMM to idle the vCPU for up to
/// `eax` TSC ticks (the guest's HLT: it runs at CPL3 with interrupts off and cannot halt).
pub const SLEEP_PORT: u16 = 0x511;
/// Number of ports reserved for the control device.
pub const CONTROL_PORT_COUNT: u16 = 0x10;

/// Events the guest signals with `out CONTROL_PORT, eax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GuestEvent {
    /// The vCPU reached its workload loop.
    Started = 1,
    /// The vCPU finished a verify request (results are in its mailbox).
    VerifyDone = 2,
    /// The vCPU finished a full pass over its slice.
    PassDone = 3,
}

impl GuestEvent {
    /// Decodes an event code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(GuestEvent::Started),
            2 => Some(GuestEvent::VerifyDone),
            3 => Some(GuestEvent::PassDone),
            _ => None,
        }
    }
}

/// Byte offsets of the fields of a vCPU's mailbox page (all little-endian u64).
pub mod mailbox {
    /// Magic value identifying a mailbox ([`super::MAILBOX_MAGIC`]); written by the host.
    pub const MAGIC: u64 = 0x00;
    /// vCPU index; host.
    pub const VCPU_ID: u64 = 0x08;
    /// Guest-virtual address of the first page of this vCPU's slice; host.
    pub const SLICE_VA: u64 = 0x10;
    /// Number of pages in the slice; host.
    pub const SLICE_PAGES: u64 = 0x18;
    /// Working-set page number of the slice's first page; host.
    pub const FIRST_PAGE: u64 = 0x20;
    /// TSC ticks between two page writes (0 = as fast as possible); host, may change at run time.
    pub const TICKS_PER_PAGE: u64 = 0x28;
    /// Largest TSC jump (either way) the pacing absorbs before re-basing; host.
    pub const MAX_SKEW: u64 = 0x30;
    /// Verify request sequence number; host writes a new value to ask for a verify.
    pub const VERIFY_REQ: u64 = 0x38;
    /// Last verify request handled; guest.
    pub const VERIFY_ACK: u64 = 0x40;
    /// Bad pages found by the last verify; guest.
    pub const VERIFY_BAD: u64 = 0x48;
    /// Pages checked by the last verify; guest.
    pub const VERIFY_CHECKED: u64 = 0x50;
    /// Current generation; guest.
    pub const GEN: u64 = 0x58;
    /// Current index in the slice (next page to write); guest.
    pub const INDEX: u64 = 0x60;
    /// Pages written since boot; guest. Also the slice position: generation =
    /// PAGES_WRITTEN / SLICE_PAGES + 1 and index = PAGES_WRITTEN % SLICE_PAGES, stored with one
    /// instruction after each page write (GEN and INDEX are informational).
    pub const PAGES_WRITTEN: u64 = 0x68;
    /// Full passes completed since boot; guest.
    pub const PASSES: u64 = 0x70;
    /// Guest-virtual address of the banner text (vCPU 0 prints it); host.
    pub const BANNER_VA: u64 = 0x78;
    /// Length of the banner in bytes (0 = none); host.
    pub const BANNER_LEN: u64 = 0x80;
    /// Whether to signal [`super::GuestEvent::PassDone`] after each pass (1) or not (0); host.
    pub const REPORT_PASSES: u64 = 0x88;
    /// Index of the first bad page found by the last verify (u64::MAX if none); guest.
    pub const VERIFY_FIRST_BAD: u64 = 0x90;
    /// Minimum wait, in TSC ticks, worth an exit to the sleep port (0 = never sleep, spin); host.
    pub const SLEEP_MIN_TICKS: u64 = 0x98;
    /// Non-zero for the sparse pattern: after a page's first write, later generations only
    /// rewrite word 0 (8 bytes per page: the workload XBZRLE is made for); host.
    pub const SPARSE: u64 = 0xa0;
}

/// Value of [`mailbox::MAGIC`].
pub const MAILBOX_MAGIC: u64 = 0x4652_5259_4d42_4f58; // "FRRYMBOX"

/// Multiplier mixing the page number into a page's seed.
pub const SEED_PAGE_MUL: u64 = 0x9e37_79b9_7f4a_7c15;
/// Multiplier mixing the generation into a page's seed.
pub const SEED_GEN_MUL: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// Step between consecutive data words of a page (odd, so all words differ).
pub const WORD_STEP: u64 = 0x2545_f491_4f6c_dd1d;
/// 64-bit words per 4 KiB page.
pub const WORDS_PER_PAGE: u64 = 512;

/// The seed of a page's data words.
pub const fn page_seed(page: u64, generation: u64) -> u64 {
    (page.wrapping_add(1)).wrapping_mul(SEED_PAGE_MUL) ^ generation.wrapping_mul(SEED_GEN_MUL)
}

/// How the workload rewrites pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pattern {
    /// Every generation rewrites the whole page.
    #[default]
    Full,
    /// Every generation after the first rewrites only word 0 (the generation).
    Sparse,
}

/// Word `index` (0..512) of working-set page `page` at generation `generation`.
///
/// Generation 0 is all zeros; otherwise word 0 is the generation, word 1 the
/// page number, and word i >= 2 is `seed + i * WORD_STEP`, where the seed mixes the page
/// number with the generation (full pattern) or with 1 (sparse pattern).
pub const fn page_word(page: u64, generation: u64, index: u64, pattern: Pattern) -> u64 {
    if generation == 0 {
        return 0;
    }
    let data_gen = match pattern {
        Pattern::Full => generation,
        Pattern::Sparse => 1,
    };
    match index {
        0 => generation,
        1 => page,
        i => page_seed(page, data_gen).wrapping_add(i.wrapping_mul(WORD_STEP)),
    }
}

/// Fills `out` (4096 bytes) with the contents of `page` at `generation`.
pub fn fill_page(page: u64, generation: u64, pattern: Pattern, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&page_word(page, generation, i as u64, pattern).to_le_bytes());
    }
}

/// Checks `bytes` (4096) against `page` at `generation`.
pub fn page_matches(page: u64, generation: u64, pattern: Pattern, bytes: &[u8]) -> bool {
    bytes.len() == (WORDS_PER_PAGE * 8) as usize
        && bytes.chunks_exact(8).enumerate().all(|(i, w)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            u64::from_le_bytes(b) == page_word(page, generation, i as u64, pattern)
        })
}

/// The generation a page at `index` of a slice must hold, given the slice's current state.
pub const fn expected_generation(index: u64, current_index: u64, current_gen: u64) -> u64 {
    if index < current_index {
        current_gen
    } else {
        current_gen.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_zero_is_a_zero_page() {
        let mut p = vec![1u8; 4096];
        fill_page(7, 0, Pattern::Full, &mut p);
        assert!(p.iter().all(|&b| b == 0));
        assert!(page_matches(7, 0, Pattern::Full, &p));
    }

    #[test]
    fn pages_differ_by_page_and_generation() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_page(7, 3, Pattern::Full, &mut a);
        fill_page(8, 3, Pattern::Full, &mut b);
        assert_ne!(a, b);
        assert!(page_matches(7, 3, Pattern::Full, &a));
        assert!(
            !page_matches(7, 2, Pattern::Full, &a),
            "an older generation must not pass"
        );
        assert!(
            !page_matches(8, 3, Pattern::Full, &a),
            "another page's contents must not pass"
        );
        a[4000] ^= 0x10;
        assert!(
            !page_matches(7, 3, Pattern::Full, &a),
            "a flipped bit must not pass"
        );
    }

    #[test]
    fn sparse_generations_differ_in_one_word() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_page(7, 3, Pattern::Sparse, &mut a);
        fill_page(7, 4, Pattern::Sparse, &mut b);
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differing > 0 && differing <= 8);
        assert!(page_matches(7, 4, Pattern::Sparse, &b));
        assert!(
            !page_matches(7, 3, Pattern::Sparse, &b),
            "the generation word is checked"
        );
        assert!(!page_matches(7, 4, Pattern::Full, &b));
    }

    #[test]
    fn expected_generation_follows_position() {
        assert_eq!(expected_generation(0, 5, 3), 3);
        assert_eq!(expected_generation(4, 5, 3), 3);
        assert_eq!(expected_generation(5, 5, 3), 2);
        assert_eq!(expected_generation(9, 0, 1), 0);
    }
}
