//! ULEB128 run lengths, as XBZRLE writes them.
//!
//! Seven bits per byte, least significant group first, the high bit set on
//! every byte but the last. QEMU's `uleb128_encode_small` writes lengths up
//! to 0x3fff in one or two bytes; Ferry writes the same bytes for those and
//! a third byte for longer runs (pages larger than 16 KiB).

/// Most bytes one length may take.
pub const MAX_LEN_BYTES: usize = 3;

/// Largest length that fits in [`MAX_LEN_BYTES`] bytes.
pub const MAX_VALUE: u32 = (1 << (7 * MAX_LEN_BYTES)) - 1;

/// Why a length could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UlebError {
    /// The input ended before the length's last byte.
    Truncated,
    /// The length has more than [`MAX_LEN_BYTES`] bytes.
    TooLong,
}

/// Number of bytes [`encode`] writes for `n`.
#[inline(always)]
pub const fn encoded_len(n: u32) -> usize {
    if n < 0x80 {
        1
    } else if n < 0x4000 {
        2
    } else {
        3
    }
}

/// Writes `n` at the start of `out` and returns the number of bytes written.
///
/// # Panics
///
/// If `n` exceeds [`MAX_VALUE`] or `out` is shorter than [`encoded_len`]`(n)`
/// (both are the caller's bugs: run lengths are bounded by the page size).
#[inline(always)]
pub fn encode(n: u32, out: &mut [u8]) -> usize {
    assert!(n <= MAX_VALUE, "run length {n:#x} exceeds {MAX_VALUE:#x}");
    if n < 0x80 {
        out[0] = n as u8;
        1
    } else if n < 0x4000 {
        out[..2].copy_from_slice(&[(n as u8) | 0x80, (n >> 7) as u8]);
        2
    } else {
        out[..3].copy_from_slice(&[(n as u8) | 0x80, ((n >> 7) as u8) | 0x80, (n >> 14) as u8]);
        3
    }
}

/// Reads a length from the start of `src`: the value and the bytes it took.
///
/// Accepts exactly QEMU's one- and two-byte forms, including the
/// non-minimal `80 00` style ones QEMU accepts (`81 00` is 1). A third byte
/// is accepted only when it is needed (non-zero): a length below 0x4000
/// spread over three bytes is [`UlebError::TooLong`], so for pages QEMU can
/// encode this decoder accepts exactly what QEMU's does.
#[inline]
pub fn decode(src: &[u8]) -> Result<(u32, usize), UlebError> {
    let mut value = 0u32;
    for i in 0..MAX_LEN_BYTES {
        let Some(&byte) = src.get(i) else {
            return Err(UlebError::Truncated);
        };
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if i == MAX_LEN_BYTES - 1 && byte == 0 {
                return Err(UlebError::TooLong);
            }
            return Ok((value, i + 1));
        }
    }
    // The last allowed byte still had its continuation bit set.
    Err(UlebError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_round_trip_like_qemu_test_uleb() {
        let mut buf = [0u8; MAX_LEN_BYTES];
        for n in 0..=0x3fff_u32 {
            let written = encode(n, &mut buf);
            assert_eq!(written, encoded_len(n));
            assert_eq!(written, if n < 0x80 { 1 } else { 2 });
            assert_eq!(decode(&buf[..written]), Ok((n, written)));
        }
    }

    #[test]
    fn boundaries_take_one_two_and_three_bytes() {
        let mut buf = [0u8; MAX_LEN_BYTES];
        assert_eq!(encode(0x7f, &mut buf), 1);
        assert_eq!(buf[0], 0x7f);
        assert_eq!(encode(0x80, &mut buf), 2);
        assert_eq!(buf[..2], [0x80, 0x01]);
        assert_eq!(encode(0x3fff, &mut buf), 2);
        assert_eq!(buf[..2], [0xff, 0x7f]);
        assert_eq!(encode(0x4000, &mut buf), 3);
        assert_eq!(buf, [0x80, 0x80, 0x01]);
        assert_eq!(encode(MAX_VALUE, &mut buf), 3);
        assert_eq!(buf, [0xff, 0xff, 0x7f]);
        assert_eq!(decode(&buf), Ok((MAX_VALUE, 3)));
    }

    #[test]
    fn qemu_invalid_two_byte_value_is_rejected() {
        // QEMU's test_uleb: 80 80 does not end within two bytes.
        assert_eq!(decode(&[0x80, 0x80]), Err(UlebError::Truncated));
        assert_eq!(decode(&[0x80, 0x80, 0x80]), Err(UlebError::TooLong));
        assert_eq!(decode(&[0x80, 0x80, 0x80, 0x00]), Err(UlebError::TooLong));
    }

    #[test]
    fn truncated_values_are_rejected() {
        assert_eq!(decode(&[]), Err(UlebError::Truncated));
        assert_eq!(decode(&[0xff]), Err(UlebError::Truncated));
        assert_eq!(decode(&[0xff, 0xff]), Err(UlebError::Truncated));
    }

    #[test]
    fn non_minimal_forms_decode_like_qemu() {
        assert_eq!(decode(&[0x81, 0x00]), Ok((1, 2)));
    }

    #[test]
    fn needless_third_byte_is_too_long() {
        assert_eq!(decode(&[0x80, 0x80, 0x00]), Err(UlebError::TooLong));
        assert_eq!(decode(&[0xff, 0xff, 0x00]), Err(UlebError::TooLong));
        assert_eq!(decode(&[0x80, 0x80, 0x01]), Ok((0x4000, 3)));
    }
}
