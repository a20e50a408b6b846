//! Guest memory for unit tests: small anonymous RAM filled with a mix of zero, text-like,
//! random and repeated-byte pages (what compression and zero detection meet in real guests).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ram::{Backend, GuestRam, MemoryConfig, PAGE_SIZE};

/// `size` bytes of anonymous guest RAM.
pub fn anon_ram(size: u64) -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(&MemoryConfig {
            size,
            backend: Backend::AnonymousPrivate,
            ..MemoryConfig::default()
        })
        .unwrap(),
    )
}

/// Fills `pages` with the mix, a different one for each `generation`.
pub fn fill_mixed(ram: &GuestRam, generation: u64, pages: impl Iterator<Item = u64>) {
    let mut x = 0x1234_5678_9abc_def0u64 ^ generation;
    for p in pages {
        let mut page = vec![0u8; PAGE_SIZE];
        match (p + generation) % 4 {
            0 => {}
            1 => {
                let text = format!("page {p} generation {generation} lorem ipsum dolor sit amet ");
                for (i, b) in page.iter_mut().enumerate() {
                    *b = text.as_bytes()[i % text.len()];
                }
            }
            2 => {
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            _ => page.fill((p ^ generation) as u8 | 1),
        }
        ram.write_page(p, &page).unwrap();
    }
}
