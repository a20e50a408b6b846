//! Encoder and decoder edge cases: exact bytes for the boundaries of the
//! format, and round trips for each.

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::{decode, encode, encode_with, Kernel};

const PAGE: usize = 4096;

/// Encodes with every kernel (asserting they agree) into `room` bytes.
fn encode_all(old: &[u8], new: &[u8], room: usize) -> Option<Vec<u8>> {
    let mut results = Kernel::ALL.into_iter().map(|k| {
        let mut dst = vec![0u8; room];
        encode_with(k, old, new, &mut dst).map(|n| dst[..n].to_vec())
    });
    let first = results.next().unwrap();
    for (k, other) in Kernel::ALL.into_iter().skip(1).zip(results) {
        assert_eq!(other, first, "kernel {} disagrees", k.name());
    }
    first
}

/// Encodes, checks the bytes, decodes onto a copy of `old`, checks `new`.
fn check(old: &[u8], new: &[u8], room: usize, expected_prefix: &[u8]) -> Vec<u8> {
    let delta = encode_all(old, new, room).expect("fits");
    assert!(
        delta.starts_with(expected_prefix),
        "delta starts {:02x?}, expected {:02x?}",
        &delta[..expected_prefix.len().min(delta.len())],
        expected_prefix
    );
    let mut page = old.to_vec();
    decode(&delta, &mut page).unwrap();
    assert_eq!(page, new);
    delta
}

#[test]
fn identical_page_encodes_to_zero_bytes() {
    let page: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
    assert_eq!(encode_all(&page, &page, PAGE), Some(vec![]));
}

#[test]
fn all_bytes_different_overflow() {
    let old = vec![0u8; PAGE];
    let new = vec![0xffu8; PAGE];
    assert_eq!(encode_all(&old, &new, PAGE), None);
    // With room enough, the delta is one pair: 00, 80 20 (4096), the page.
    let delta = check(&old, &new, PAGE + 3, &[0x00, 0x80, 0x20]);
    assert_eq!(delta.len(), 3 + PAGE);
}

#[test]
fn single_byte_changed_at_the_start() {
    let old = vec![0u8; PAGE];
    let mut new = old.clone();
    new[0] = 0xab;
    let delta = check(&old, &new, PAGE, &[0x00, 0x01, 0xab]);
    assert_eq!(delta.len(), 3);
}

#[test]
fn single_byte_changed_at_the_end() {
    let old = vec![0u8; PAGE];
    let mut new = old.clone();
    new[PAGE - 1] = 0xcd;
    let delta = check(&old, &new, PAGE, &[0xff, 0x1f, 0x01, 0xcd]);
    assert_eq!(delta.len(), 4);
}

#[test]
fn run_lengths_take_one_two_and_three_uleb_bytes() {
    // A page large enough for runs of 0x4000 bytes.
    let len = 0x8000;
    let old = vec![0u8; len];
    for (run, uleb) in [
        (0x7f_usize, &[0x7f_u8][..]),
        (0x80, &[0x80, 0x01]),
        (0x3fff, &[0xff, 0x7f]),
        (0x4000, &[0x80, 0x80, 0x01]),
    ] {
        // Zero run of `run` bytes, then one changed byte.
        let mut new = old.clone();
        new[run] = 1;
        let mut expected = uleb.to_vec();
        expected.extend_from_slice(&[0x01, 0x01]);
        let delta = check(&old, &new, len, &expected);
        assert_eq!(delta, expected, "zero run of {run:#x}");

        // Non-zero run of `run` bytes at the start.
        let mut new = old.clone();
        new[..run].fill(2);
        let mut expected = vec![0x00];
        expected.extend_from_slice(uleb);
        let delta = check(&old, &new, 2 * len, &expected);
        assert_eq!(
            delta.len(),
            1 + uleb.len() + run,
            "non-zero run of {run:#x}"
        );
    }
}

#[test]
fn alternating_bytes_overflow_a_page_and_round_trip_with_room() {
    let old = vec![0u8; PAGE];
    let new: Vec<u8> = (0..PAGE).map(|i| u8::from(i % 2 == 0)).collect();
    assert_eq!(encode_all(&old, &new, PAGE), None);
    // First pair 00 01 01, then 2047 pairs 01 01 01; the last byte is an
    // omitted trailing zero run.
    let delta = check(&old, &new, 2 * PAGE, &[0x00, 0x01, 0x01, 0x01, 0x01, 0x01]);
    assert_eq!(delta.len(), 3 * PAGE / 2);
}

#[test]
fn trailing_zero_run_is_omitted() {
    let old = vec![0u8; PAGE];
    let mut new = old.clone();
    new[100] = 5;
    let delta = check(&old, &new, PAGE, &[100, 1, 5]);
    assert_eq!(delta, [100, 1, 5]);
}

#[test]
fn pages_of_sizes_not_a_multiple_of_64_round_trip() {
    for len in [1usize, 7, 63, 65, 100, 129, 4095] {
        let old: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
        let mut new = old.clone();
        new[len - 1] ^= 0x40;
        new[len / 2] ^= 0x01;
        let delta = encode_all(&old, &new, 2 * len + 8).unwrap();
        let mut page = old.clone();
        decode(&delta, &mut page).unwrap();
        assert_eq!(page, new, "page of {len} bytes");
    }
}

#[test]
fn default_encoder_matches_every_kernel() {
    let old = vec![0u8; PAGE];
    let mut new = old.clone();
    for i in (3..PAGE).step_by(101) {
        new[i] = 9;
    }
    let mut dst = vec![0u8; PAGE];
    let n = encode(&old, &new, &mut dst).unwrap();
    assert_eq!(Some(dst[..n].to_vec()), encode_all(&old, &new, PAGE));
}
