//! Property tests: random pages with random edits round-trip through the
//! encoder and decoder, and the encoder's output is canonical.

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::{decode, encode, encode_with, uleb128, Kernel};
use proptest::prelude::*;

const PAGE: usize = 4096;

/// A random page and a copy with random edits: single bytes and bursts,
/// at densities from none to most of the page.
fn edited_page() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::collection::vec(any::<u8>(), PAGE),
        prop::collection::vec((0usize..PAGE, 1usize..64, 1u8..=255), 0..200),
    )
        .prop_map(|(old, edits)| {
            let mut new = old.clone();
            for (at, len, xor) in edits {
                for b in new.iter_mut().skip(at).take(len) {
                    *b ^= xor;
                }
            }
            (old, new)
        })
}

/// Splits a delta into (zero run, changed bytes) pairs.
fn pairs(delta: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < delta.len() {
        let (z, n) = uleb128::decode(&delta[i..]).unwrap();
        i += n;
        let (nz, n) = uleb128::decode(&delta[i..]).unwrap();
        i += n;
        out.push((z, delta[i..i + nz as usize].to_vec()));
        i += nz as usize;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_edits_round_trip((old, new) in edited_page()) {
        // Room for any delta, so every case decodes.
        let mut dst = vec![0u8; 2 * PAGE + 8];
        let n = encode(&old, &new, &mut dst).unwrap();
        let mut page = old.clone();
        let end = decode(&dst[..n], &mut page).unwrap();
        prop_assert_eq!(&page, &new);
        prop_assert!(end <= PAGE);
        prop_assert_eq!(n == 0, old == new);
    }

    #[test]
    fn a_page_sized_room_either_fits_or_overflows_consistently((old, new) in edited_page()) {
        let mut big = vec![0u8; 2 * PAGE + 8];
        let full = encode(&old, &new, &mut big).unwrap();
        let mut dst = vec![0u8; PAGE];
        match encode(&old, &new, &mut dst) {
            Some(n) => {
                prop_assert_eq!(&dst[..n], &big[..full]);
                let mut page = old.clone();
                decode(&dst[..n], &mut page).unwrap();
                prop_assert_eq!(page, new);
            }
            // QEMU gives up when fewer than 2 bytes would be left or the
            // delta exceeds the room.
            None => prop_assert!(full + 2 > PAGE),
        }
    }

    #[test]
    fn runs_are_maximal_and_every_kernel_agrees((old, new) in edited_page()) {
        let mut dst = vec![0u8; 2 * PAGE + 8];
        let n = encode(&old, &new, &mut dst).unwrap();
        let delta = dst[..n].to_vec();
        for k in Kernel::ALL {
            let mut other = vec![0u8; 2 * PAGE + 8];
            let m = encode_with(k, &old, &new, &mut other).unwrap();
            prop_assert_eq!(&other[..m], &delta[..], "kernel {}", k.name());
        }
        let mut at = 0usize;
        for (i, (z, bytes)) in pairs(&delta).into_iter().enumerate() {
            prop_assert!(i == 0 || z > 0, "empty zero run after the first pair");
            prop_assert!(!bytes.is_empty());
            at += z as usize;
            // Zero run: all equal; changed run: all different, then equal
            // or the end of the page.
            prop_assert!((at - z as usize..at).all(|j| old[j] == new[j]));
            prop_assert!((at..at + bytes.len()).all(|j| old[j] != new[j] && new[j] == bytes[j - at]));
            at += bytes.len();
            prop_assert!(at == PAGE || old[at] == new[at]);
        }
        // The omitted tail is unchanged.
        prop_assert!(old[at..] == new[at..]);
    }
}
