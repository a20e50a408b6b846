//! Fuzzes the XBZRLE encoder: the input is split into an old and a new page
//! of equal length and a room size; every kernel must give the same result,
//! and a delta must decode back to the new page.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::xbzrle::{decode, encode_with, Kernel};

fuzz_target!(|data: &[u8]| {
    let Some((&room, pages)) = data.split_first() else {
        return;
    };
    let len = pages.len() / 2;
    let (old, new) = (&pages[..len], &pages[len..2 * len]);
    // Room from none to twice the page, so overflow decisions are exercised.
    let dlen = (usize::from(room) * (2 * len + 8)) / 255;
    let mut first: Option<Option<Vec<u8>>> = None;
    for kernel in Kernel::ALL {
        let mut dst = vec![0u8; dlen];
        let out = encode_with(kernel, old, new, &mut dst).map(|n| dst[..n].to_vec());
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(f, &out, "kernel {} disagrees", kernel.name()),
        }
    }
    if let Some(Some(delta)) = first {
        let mut page = old.to_vec();
        decode(&delta, &mut page).expect("the encoder's output decodes");
        assert_eq!(page, new);
    }
});
