//! A model of QEMU's scalar `xbzrle_encode_buffer`, step for step (byte
//! loops up to a word boundary, word loops, the three room checks in their
//! places), and tests that Ferry's encoder produces the same bytes and the
//! same overflow decisions for every kernel, every page and every room.
//!
//! The benchmark includes this file (`#[path]`) to compare against the
//! model's speed.

use migration::xbzrle::{encode_with, Kernel};

/// QEMU's `uleb128_encode_small`: lengths up to 0x3fff in one or two bytes.
fn uleb_small(dst: &mut [u8], n: usize) -> usize {
    assert!(n <= 0x3fff, "QEMU cannot encode a run of {n:#x} bytes");
    if n < 0x80 {
        dst[0] = n as u8;
        1
    } else {
        dst[0] = (n as u8) | 0x80;
        dst[1] = (n >> 7) as u8;
        2
    }
}

fn word(buf: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[i..i + 8]);
    u64::from_ne_bytes(w)
}

/// Whether some byte of `x` is zero (the classic bit trick QEMU uses).
fn has_zero_byte(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    x.wrapping_sub(ONES) & !x & (ONES << 7) != 0
}

/// QEMU's scalar encoder as a model: `None` is QEMU's -1.
pub fn qemu_encode(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let slen = old.len();
    let dlen = dst.len();
    let (mut d, mut i) = (0usize, 0usize);
    let (mut zrun, mut nzrun) = (0usize, 0usize);
    while i < slen {
        if d + 2 > dlen {
            return None;
        }
        // Zero run: bytes until the rest is a whole number of words, then
        // words, then bytes.
        let mut res = (slen - i) % 8;
        while res > 0 && old[i] == new[i] {
            zrun += 1;
            i += 1;
            res -= 1;
        }
        if res == 0 {
            while i < slen && word(old, i) == word(new, i) {
                i += 8;
                zrun += 8;
            }
            while i < slen && old[i] == new[i] {
                zrun += 1;
                i += 1;
            }
        }
        if zrun == slen {
            return Some(0);
        }
        if i == slen {
            return Some(d);
        }
        d += uleb_small(&mut dst[d..], zrun);
        zrun = 0;
        let start = i;
        if d + 2 > dlen {
            return None;
        }
        // Non-zero run: likewise, a word ends the run when one of its
        // bytes is equal.
        let mut res = (slen - i) % 8;
        while res > 0 && old[i] != new[i] {
            i += 1;
            nzrun += 1;
            res -= 1;
        }
        if res == 0 {
            while i < slen {
                if has_zero_byte(word(old, i) ^ word(new, i)) {
                    while old[i] != new[i] {
                        nzrun += 1;
                        i += 1;
                    }
                    break;
                }
                i += 8;
                nzrun += 8;
            }
        }
        d += uleb_small(&mut dst[d..], nzrun);
        if d + nzrun > dlen {
            return None;
        }
        dst[d..d + nzrun].copy_from_slice(&new[start..start + nzrun]);
        d += nzrun;
        nzrun = 0;
    }
    Some(d)
}

/// The model's output as owned bytes.
pub fn model_bytes(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
    let mut dst = vec![0u8; dlen];
    qemu_encode(old, new, &mut dst).map(|n| dst[..n].to_vec())
}

/// Asserts that every kernel of Ferry's encoder matches the model.
pub fn assert_matches_qemu(old: &[u8], new: &[u8], dlen: usize) {
    let want = model_bytes(old, new, dlen);
    for k in Kernel::ALL {
        let mut dst = vec![0u8; dlen];
        let got = encode_with(k, old, new, &mut dst).map(|n| dst[..n].to_vec());
        assert_eq!(
            got,
            want,
            "kernel {} differs from QEMU (page {} bytes, room {dlen})",
            k.name(),
            old.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;

    #[test]
    fn model_gives_qemu_last_byte_vector() {
        let old = vec![0u8; PAGE];
        let mut new = old.clone();
        new[PAGE - 1] = 1;
        assert_eq!(
            model_bytes(&old, &new, PAGE),
            Some(vec![0xff, 0x1f, 0x01, 0x01])
        );
    }

    #[test]
    fn every_room_size_matches_qemu_around_the_limit() {
        // A page whose delta is a few hundred bytes, ending in a zero run
        // (so QEMU's extra check before the trailing run matters) or in a
        // non-zero run (so it does not).
        for ends_changed in [false, true] {
            let old = vec![0u8; PAGE];
            let mut new = old.clone();
            for i in (0..PAGE).step_by(37) {
                new[i] = 1;
            }
            if ends_changed {
                new[PAGE - 1] = 1;
            }
            let full = model_bytes(&old, &new, PAGE).unwrap().len();
            for dlen in 0..full + 8 {
                assert_matches_qemu(&old, &new, dlen);
            }
        }
    }

    #[test]
    fn tiny_rooms_match_qemu_even_for_identical_pages() {
        let page = vec![9u8; 64];
        for dlen in 0..4 {
            assert_matches_qemu(&page, &page, dlen);
        }
    }

    #[test]
    fn run_length_boundaries_match_qemu() {
        // Runs of 0x7f, 0x80 and 0x3fff bytes: the ULEB128 1/2-byte edges.
        for run in [0x7f_usize, 0x80, 0x3ffe, 0x3fff] {
            let len = 0x4000;
            let old = vec![0u8; len];
            let mut changed = old.clone();
            changed[run..].fill(1);
            assert_matches_qemu(&old, &changed, len);
            let mut zero_then_change = old.clone();
            zero_then_change[run] = 1;
            assert_matches_qemu(&old, &zero_then_change, len);
        }
    }

    fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, usize)> {
        // Sizes that are and are not multiples of 8 and of 64; edits that are
        // isolated bytes, short bursts or long ones.
        (
            prop_oneof![Just(4096usize), Just(4096), 1usize..300],
            any::<u64>(),
            prop_oneof![Just(1u32), Just(10), Just(100), Just(500)],
            0u32..6,
        )
            .prop_map(|(len, seed, per_mille, burst_log)| {
                let mut rng = seed | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let old: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let mut new = old.clone();
                let burst = 1usize << burst_log;
                let mut i = 0;
                while i < len {
                    if next() % 1000 < u64::from(per_mille) {
                        for b in new.iter_mut().skip(i).take(burst) {
                            *b ^= (next() as u8) | 1;
                        }
                        i += burst;
                    } else {
                        i += 1;
                    }
                }
                (old, new, len)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_pages_and_rooms_match_qemu(
            (old, new, len) in page_pair(),
            room in 0usize..4200,
        ) {
            assert_matches_qemu(&old, &new, room.min(len + 16));
            assert_matches_qemu(&old, &new, len);
        }
    }
}
