//! The decoder rejects malformed deltas with an error, never a panic, and
//! never writes outside the page (nor inside it, on error).

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::{decode, XbzrleError};
use proptest::prelude::*;

const PAGE: usize = 4096;

/// Decodes onto a zeroed page that sits between guard bytes, and checks
/// that on error neither the page nor the guards changed.
fn reject(delta: &[u8]) -> XbzrleError {
    let mut buf = vec![0xeeu8; PAGE + 128];
    buf[64..64 + PAGE].fill(0);
    let err = decode(delta, &mut buf[64..64 + PAGE]).unwrap_err();
    assert!(
        buf[..64].iter().all(|&b| b == 0xee),
        "guard before the page"
    );
    assert!(buf[64 + PAGE..].iter().all(|&b| b == 0xee), "guard after");
    assert!(buf[64..64 + PAGE].iter().all(|&b| b == 0), "page touched");
    err
}

#[test]
fn zero_length_non_zero_run_is_rejected() {
    assert_eq!(
        reject(&[0x05, 0x00]),
        XbzrleError::EmptyNonZeroRun { offset: 1 }
    );
    // Also after a valid pair.
    assert_eq!(
        reject(&[0x00, 0x01, 0x09, 0x05, 0x00]),
        XbzrleError::EmptyNonZeroRun { offset: 4 }
    );
}

#[test]
fn zero_length_zero_run_after_the_first_pair_is_rejected() {
    assert_eq!(
        reject(&[0x00, 0x01, 0x09, 0x00, 0x01, 0x09]),
        XbzrleError::EmptyZeroRun { offset: 3 }
    );
}

#[test]
fn zero_run_past_the_end_of_the_page_is_rejected() {
    // 0x1001 = 4097 equal bytes.
    assert_eq!(
        reject(&[0x81, 0x20, 0x01, 0x01]),
        XbzrleError::RunPastPage {
            offset: 0,
            end: 4097,
            page_len: PAGE
        }
    );
}

#[test]
fn non_zero_run_past_the_end_of_the_page_is_rejected() {
    // 4095 equal bytes, then 2 changed ones.
    assert_eq!(
        reject(&[0xff, 0x1f, 0x02, 0xaa, 0xbb]),
        XbzrleError::RunPastPage {
            offset: 2,
            end: 4097,
            page_len: PAGE
        }
    );
}

#[test]
fn truncated_uleb128_is_rejected() {
    assert_eq!(reject(&[0xff]), XbzrleError::TruncatedLength { offset: 0 });
    assert_eq!(
        reject(&[0x05, 0x81]),
        XbzrleError::TruncatedLength { offset: 1 }
    );
    assert_eq!(
        reject(&[0x00, 0x01, 0x09, 0x80, 0x80]),
        XbzrleError::TruncatedLength { offset: 3 }
    );
}

#[test]
fn uleb128_longer_than_allowed_is_rejected() {
    assert_eq!(
        reject(&[0x80, 0x80, 0x80, 0x01, 0x01, 0x01]),
        XbzrleError::LengthTooLong { offset: 0 }
    );
    // A third byte that adds nothing: QEMU never accepts three bytes.
    assert_eq!(
        reject(&[0x85, 0x80, 0x00, 0x01, 0x01]),
        XbzrleError::LengthTooLong { offset: 0 }
    );
}

#[test]
fn truncated_run_bytes_are_rejected() {
    assert_eq!(
        reject(&[0x00, 0x05, 0x01, 0x02]),
        XbzrleError::TruncatedRun {
            offset: 2,
            needed: 5,
            available: 2
        }
    );
}

#[test]
fn zero_run_without_a_non_zero_run_is_rejected() {
    assert_eq!(
        reject(&[0x00, 0x01, 0x07, 0x05]),
        XbzrleError::MissingNonZeroRun { offset: 3 }
    );
}

#[test]
fn trailing_bytes_after_a_complete_page_are_rejected() {
    assert_eq!(
        reject(&[0xff, 0x1f, 0x01, 0x01, 0x00]),
        XbzrleError::TrailingBytes {
            offset: 4,
            count: 1
        }
    );
    assert_eq!(
        reject(&[0xff, 0x1f, 0x01, 0x01, 0x01, 0x01, 0x01]),
        XbzrleError::TrailingBytes {
            offset: 4,
            count: 3
        }
    );
}

#[test]
fn error_messages_name_the_offset() {
    assert_eq!(
        reject(&[0x05, 0x00]).to_string(),
        "XBZRLE non-zero run of length 0 at byte 1"
    );
}

/// Deltas that look like deltas: a few pairs with plausible and implausible
/// lengths, optionally cut short or extended.
fn near_valid_delta() -> impl Strategy<Value = Vec<u8>> {
    let length = prop_oneof![
        4 => 0u32..0x80,
        2 => 0x80u32..0x1100,
        1 => 0x1100u32..0x20_0000,
    ];
    (
        prop::collection::vec((length.clone(), 0u32..40), 0..8),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(pairs, cut, tail)| {
            let mut out = Vec::new();
            for (z, nz) in pairs {
                push_uleb(&mut out, z);
                push_uleb(&mut out, nz);
                out.extend((0..nz).map(|i| i as u8 | 1));
            }
            if cut && !out.is_empty() {
                out.pop();
            }
            out.extend(tail);
            out
        })
}

fn push_uleb(out: &mut Vec<u8>, mut n: u32) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Decodes onto a page between guards; asserts nothing outside the page
/// changes, and nothing inside it on error.
fn decode_guarded(delta: &[u8], page_len: usize) {
    let mut buf = vec![0xeeu8; page_len + 128];
    buf[64..64 + page_len].fill(0x11);
    let result = decode(delta, &mut buf[64..64 + page_len]);
    assert!(buf[..64].iter().all(|&b| b == 0xee));
    assert!(buf[64 + page_len..].iter().all(|&b| b == 0xee));
    match result {
        Ok(end) => assert!(end <= page_len),
        Err(_) => assert!(buf[64..64 + page_len].iter().all(|&b| b == 0x11)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_nor_write_outside_the_page(
        delta in prop::collection::vec(any::<u8>(), 0..64),
        page_len in prop_oneof![Just(4096usize), 0usize..300],
    ) {
        decode_guarded(&delta, page_len);
    }

    #[test]
    fn near_valid_deltas_never_panic_nor_write_outside_the_page(
        delta in near_valid_delta(),
        page_len in prop_oneof![Just(4096usize), 0usize..300],
    ) {
        decode_guarded(&delta, page_len);
    }
}
