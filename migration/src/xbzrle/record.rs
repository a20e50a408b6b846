//! The header of QEMU's `RAM_SAVE_FLAG_XBZRLE` page record: after the page
//! header, one byte `ENCODING_FLAG_XBZRLE` (0x01), a big-endian 16-bit delta
//! length, then the delta (see `save_xbzrle_page` / `load_xbzrle` in QEMU's
//! `migration/ram.c`).

use super::XbzrleError;

/// The only encoding byte QEMU defines for XBZRLE records.
pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;

/// Bytes of the record header (flag byte and be16 length).
pub const HEADER_LEN: usize = 3;

/// The record header for a delta of `encoded_len` bytes.
///
/// Returns `None` when the length does not fit in 16 bits (it cannot
/// happen for deltas of pages up to 64 KiB, which never exceed the page).
pub fn header(encoded_len: usize) -> Option<[u8; HEADER_LEN]> {
    let len = u16::try_from(encoded_len).ok()?;
    let [hi, lo] = len.to_be_bytes();
    Some([ENCODING_FLAG_XBZRLE, hi, lo])
}

/// Checks a received record header and returns the delta length that
/// follows it. Errors carry QEMU's `load_xbzrle` messages.
pub fn parse_header(bytes: [u8; HEADER_LEN], page_len: usize) -> Result<usize, XbzrleError> {
    let [flag, hi, lo] = bytes;
    if flag != ENCODING_FLAG_XBZRLE {
        return Err(XbzrleError::WrongEncoding { flag });
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > page_len {
        return Err(XbzrleError::LengthOverflow { len, page_len });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_flag_then_big_endian_length() {
        assert_eq!(header(4), Some([0x01, 0x00, 0x04]));
        assert_eq!(header(0x0123), Some([0x01, 0x01, 0x23]));
        assert_eq!(header(0x1_0000), None);
    }

    #[test]
    fn parse_accepts_what_header_writes() {
        let h = header(4000).unwrap();
        assert_eq!(parse_header(h, 4096), Ok(4000));
    }

    #[test]
    fn parse_rejects_wrong_flag_with_qemu_message() {
        let err = parse_header([0x02, 0, 4], 4096).unwrap_err();
        assert_eq!(err, XbzrleError::WrongEncoding { flag: 2 });
        assert_eq!(
            err.to_string(),
            "Failed to load XBZRLE page - wrong compression!"
        );
    }

    #[test]
    fn parse_rejects_length_over_page_with_qemu_message() {
        let err = parse_header([0x01, 0x10, 0x01], 4096).unwrap_err();
        assert_eq!(
            err,
            XbzrleError::LengthOverflow {
                len: 4097,
                page_len: 4096
            }
        );
        assert_eq!(
            err.to_string(),
            "Failed to load XBZRLE page - len overflow!"
        );
    }
}
