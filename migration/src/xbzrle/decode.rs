//! The XBZRLE decoder: applies a delta onto the previous copy of a page.
//!
//! It accepts what QEMU's `xbzrle_decode_buffer` accepts (plus three-byte
//! lengths for pages over 16 KiB) and rejects the rest with an
//! [`XbzrleError`]: a zero run of length 0 after the first pair, a
//! non-zero run of length 0, a run past the end of the page, a truncated or
//! over-long length, a run cut short, bytes after the page is complete.
//!
//! Unlike QEMU, which writes runs as it parses them, the whole delta is
//! checked before the first byte of the page is written: a malformed delta
//! leaves the page untouched.

use super::uleb128::{self, UlebError};
use super::XbzrleError;

/// Applies the delta `src` onto `page` (the previous copy) in place.
///
/// Returns the offset just past the last changed byte (QEMU's return value;
/// 0 for an empty delta). On error the page is left unchanged.
pub fn decode(src: &[u8], page: &mut [u8]) -> Result<usize, XbzrleError> {
    let end = walk(src, page.len(), |_, _| {})?;
    walk(src, page.len(), |offset, bytes| {
        if let Some(dst) = page.get_mut(offset..offset + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    })?;
    Ok(end)
}

/// Destination side: applies the received `encoded` delta onto `page`, the
/// destination's copy of the page (same as [`decode`], arguments in the
/// order the destination thinks of them).
pub fn apply_delta(page: &mut [u8], encoded: &[u8]) -> Result<usize, XbzrleError> {
    decode(encoded, page)
}

/// Parses `src` for a page of `page_len` bytes, calling `run(offset, bytes)`
/// for each non-zero run once it has been checked.
fn walk(
    src: &[u8],
    page_len: usize,
    mut run: impl FnMut(usize, &[u8]),
) -> Result<usize, XbzrleError> {
    let mut i = 0;
    let mut d = 0;
    while i < src.len() {
        if i > 0 && d == page_len {
            return Err(XbzrleError::TrailingBytes {
                offset: i,
                count: src.len() - i,
            });
        }

        let zrun_at = i;
        let (zrun, used) = length(src, i)?;
        if zrun == 0 && i > 0 {
            return Err(XbzrleError::EmptyZeroRun { offset: i });
        }
        i += used;
        d += zrun;
        if d > page_len {
            return Err(XbzrleError::RunPastPage {
                offset: zrun_at,
                end: d,
                page_len,
            });
        }

        if i == src.len() {
            return Err(XbzrleError::MissingNonZeroRun { offset: zrun_at });
        }
        let nzrun_at = i;
        let (nzrun, used) = length(src, i)?;
        if nzrun == 0 {
            return Err(XbzrleError::EmptyNonZeroRun { offset: i });
        }
        i += used;
        if d + nzrun > page_len {
            return Err(XbzrleError::RunPastPage {
                offset: nzrun_at,
                end: d + nzrun,
                page_len,
            });
        }
        let Some(bytes) = src.get(i..i + nzrun) else {
            return Err(XbzrleError::TruncatedRun {
                offset: i,
                needed: nzrun,
                available: src.len() - i,
            });
        };
        run(d, bytes);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Reads the length at `src[i..]`.
#[inline]
fn length(src: &[u8], i: usize) -> Result<(usize, usize), XbzrleError> {
    match uleb128::decode(src.get(i..).unwrap_or_default()) {
        Ok((value, used)) => Ok((value as usize, used)),
        Err(UlebError::Truncated) => Err(XbzrleError::TruncatedLength { offset: i }),
        Err(UlebError::TooLong) => Err(XbzrleError::LengthTooLong { offset: i }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_last_byte_delta_sets_the_last_byte() {
        let mut page = vec![0u8; 4096];
        assert_eq!(decode(&[0xff, 0x1f, 0x01, 0x01], &mut page), Ok(4096));
        assert_eq!(page[4095], 1);
        assert!(page[..4095].iter().all(|&b| b == 0));
    }

    #[test]
    fn empty_delta_changes_nothing() {
        let mut page = vec![3u8; 64];
        assert_eq!(decode(&[], &mut page), Ok(0));
        assert!(page.iter().all(|&b| b == 3));
    }

    #[test]
    fn rejected_delta_leaves_the_page_untouched() {
        let mut page = vec![0u8; 16];
        // A valid first pair, then a run past the end.
        let delta = [0, 2, 9, 9, 20, 1, 1];
        assert!(matches!(
            decode(&delta, &mut page),
            Err(XbzrleError::RunPastPage { .. })
        ));
        assert!(page.iter().all(|&b| b == 0));
    }
}
