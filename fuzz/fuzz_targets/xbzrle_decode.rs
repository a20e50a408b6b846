//! Fuzzes the XBZRLE decoder with arbitrary deltas.
//!
//! The first input byte picks the page size (4096, or 1..=255 bytes to reach
//! the end-of-page checks quickly); the rest is the delta. Checked: no panic,
//! no write outside the page, the page untouched on error; and a delta that
//! is accepted describes a page the encoder encodes back to the same page.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::xbzrle::{decode, encode};

const GUARD: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&size, delta)) = data.split_first() else {
        return;
    };
    let page_len = if size == 0 { 4096 } else { usize::from(size) };
    let old: Vec<u8> = (0..page_len).map(|i| (i * 31 + 7) as u8).collect();
    let mut buf = vec![0xee_u8; page_len + 2 * GUARD];
    buf[GUARD..GUARD + page_len].copy_from_slice(&old);

    let result = decode(delta, &mut buf[GUARD..GUARD + page_len]);

    assert!(
        buf[..GUARD].iter().all(|&b| b == 0xee),
        "wrote before the page"
    );
    assert!(
        buf[GUARD + page_len..].iter().all(|&b| b == 0xee),
        "wrote after the page"
    );
    let new = &buf[GUARD..GUARD + page_len];
    match result {
        Err(_) => assert_eq!(new, &old[..], "page changed by a rejected delta"),
        Ok(end) => {
            assert!(end <= page_len);
            // Re-encode (with room for any delta) and apply to the old page.
            let mut dst = vec![0u8; 3 * page_len + 8];
            let n = encode(&old, new, &mut dst).expect("room for any delta");
            let mut again = old.clone();
            decode(&dst[..n], &mut again).expect("the encoder's output decodes");
            assert_eq!(&again[..], new);
        }
    }
});
