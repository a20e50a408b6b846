//! QEMU's `tests/unit/test-xbzrle.c`, case by case, written against Ferry's
//! encoder and decoder.

// Helpers outside #[test] functions unwrap too: these are tests.
#![allow(clippy::unwrap_used)]

use migration::xbzrle::{decode, encode, uleb128};

const PAGE: usize = 4096;

/// g_test_rand_int_range stand-in: a seeded xorshift, so runs repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}

#[test]
fn uleb_round_trips_every_small_value_and_rejects_an_unterminated_one() {
    // test_uleb
    let mut buf = [0u8; uleb128::MAX_LEN_BYTES];
    for n in 0..=0x3fff_u32 {
        let written = uleb128::encode(n, &mut buf);
        let (value, read) = uleb128::decode(&buf[..written]).unwrap();
        assert_eq!((value, read), (n, written));
    }
    // 80 80: the value does not end within the bytes given.
    assert!(uleb128::decode(&[0x80, 0x80]).is_err());
    assert!(uleb128::decode(&[0x80]).is_err());
}

#[test]
fn page_against_itself_encodes_to_nothing() {
    // test_encode_decode_zero and test_encode_decode_unchanged
    let mut rng = Rng(0x7e57);
    for add in [0u8, 4] {
        let mut page = vec![0u8; PAGE];
        let diff_len = rng.range(0, PAGE - 1006);
        for i in (1..=diff_len).rev() {
            page[1000 + i] = (i as u8).wrapping_add(add);
        }
        page[1000 + diff_len + 3] = 103 + add;
        page[1000 + diff_len + 5] = 105 + add;
        let mut dst = vec![0u8; PAGE];
        assert_eq!(encode(&page, &page, &mut dst), Some(0));
    }
}

#[test]
fn only_the_last_byte_changed_encodes_to_ff_1f_01_01() {
    // test_encode_decode_1_byte
    let mut buffer = vec![0u8; PAGE];
    let mut test = vec![0u8; PAGE];
    test[PAGE - 1] = 1;
    let mut compressed = vec![0u8; PAGE];
    let dlen = encode(&buffer, &test, &mut compressed).unwrap();
    assert_eq!(&compressed[..dlen], &[0xff, 0x1f, 0x01, 0x01]);
    assert_eq!(dlen, uleb128::encoded_len(4095) + 2);

    let rc = decode(&compressed[..dlen], &mut buffer).unwrap();
    assert_eq!(rc, PAGE);
    assert_eq!(buffer, test);
}

#[test]
fn every_other_byte_changed_overflows() {
    // test_encode_decode_overflow
    let buffer = vec![0u8; PAGE];
    let mut test = vec![0u8; PAGE];
    for i in 0..PAGE / 2 - 1 {
        test[i * 2] = 1;
    }
    let mut compressed = vec![0u8; PAGE];
    assert_eq!(encode(&buffer, &test, &mut compressed), None);
}

/// encode_decode_range: a run of changed bytes at a random length, then
/// two single changed bytes.
fn encode_decode_range(rng: &mut Rng) {
    let mut buffer = vec![0u8; PAGE];
    let mut test = vec![0u8; PAGE];
    let diff_len = rng.range(0, PAGE - 1006);
    for i in (1..=diff_len).rev() {
        buffer[1000 + i] = i as u8;
        test[1000 + i] = (i as u8).wrapping_add(4);
    }
    buffer[1000 + diff_len + 3] = 103;
    test[1000 + diff_len + 3] = 107;
    buffer[1000 + diff_len + 5] = 105;
    test[1000 + diff_len + 5] = 109;

    let mut compressed = vec![0u8; PAGE];
    let dlen = encode(&test, &buffer, &mut compressed).unwrap();
    let rc = decode(&compressed[..dlen], &mut test).unwrap();
    assert!(rc < PAGE);
    assert_eq!(test, buffer);
}

#[test]
fn ten_thousand_random_ranges_round_trip() {
    // test_encode_decode
    let mut rng = Rng(0xc0ffee);
    for _ in 0..10_000 {
        encode_decode_range(&mut rng);
    }
}

#[test]
fn ten_thousand_random_edits_round_trip() {
    // QEMU's later test_encode_decode_random: changes at random offsets.
    let mut rng = Rng(0xfeed);
    for round in 0..10_000 {
        let old: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
        let mut new = old.clone();
        let edits = rng.range(1, 64);
        for _ in 0..edits {
            let at = rng.range(0, PAGE);
            new[at] = new[at].wrapping_add(1 + (rng.next() % 255) as u8);
        }
        let mut compressed = vec![0u8; PAGE];
        let mut page = old.clone();
        match encode(&old, &new, &mut compressed) {
            Some(n) => {
                decode(&compressed[..n], &mut page).unwrap();
                assert_eq!(page, new, "round {round}");
            }
            None => panic!("round {round}: {edits} edits overflowed a page"),
        }
    }
}
