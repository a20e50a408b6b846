//! RAM records inside RAM frames: `u64 ram_offset | flags`, then data.

use super::{Result, StreamError};

/// A run of zero pages: followed by a u32 page count.
pub const FLAG_ZERO: u64 = 0x002;
/// A whole page: followed by 4096 bytes.
pub const FLAG_PAGE: u64 = 0x008;
/// An XBZRLE delta: followed by u8 encoding (0x01), be16 length and the encoded bytes.
pub const FLAG_XBZRLE: u64 = 0x040;
/// A zlib-compressed page (legacy `compress`): followed by u32 length and the data.
pub const FLAG_COMPRESS: u64 = 0x100;
/// QEMU's ENCODING_FLAG_XBZRLE.
pub const XBZRLE_ENCODING: u8 = 0x01;
const FLAG_MASK: u64 = 0xfff;
const PAGE: usize = 4096;

/// One decoded RAM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamRecord<'a> {
    /// `count` zero pages from `offset`.
    Zero {
        /// RAM offset of the first page.
        offset: u64,
        /// Number of pages.
        count: u32,
    },
    /// A whole page.
    Page {
        /// RAM offset.
        offset: u64,
        /// 4096 bytes.
        data: &'a [u8],
    },
    /// An XBZRLE delta against the destination's current copy of the page.
    Xbzrle {
        /// RAM offset.
        offset: u64,
        /// The encoded delta.
        data: &'a [u8],
    },
    /// A zlib-compressed page.
    Compressed {
        /// RAM offset.
        offset: u64,
        /// zlib stream.
        data: &'a [u8],
    },
}

/// Encodes the header word of a record.
pub fn word(offset: u64, flag: u64) -> u64 {
    debug_assert_eq!(offset & FLAG_MASK, 0);
    offset | flag
}

/// Iterates the records of a RAM frame payload, checking each against the RAM size.
pub struct RamRecordReader<'a> {
    buf: &'a [u8],
    pos: usize,
    ram_size: u64,
}

impl<'a> RamRecordReader<'a> {
    /// A reader over `payload` for a guest with `ram_size` bytes of RAM.
    pub fn new(payload: &'a [u8], ram_size: u64) -> Self {
        RamRecordReader {
            buf: payload,
            pos: 0,
            ram_size,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(StreamError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn check_range(&self, offset: u64, pages: u64) -> Result<()> {
        let end = pages
            .checked_mul(PAGE as u64)
            .and_then(|b| offset.checked_add(b))
            .ok_or_else(|| StreamError::Invalid(format!("page range at {offset:#x} overflows")))?;
        if end > self.ram_size {
            return Err(StreamError::Invalid(format!(
                "page {offset:#x} (+{pages} pages) lies beyond guest RAM ({:#x} bytes)",
                self.ram_size
            )));
        }
        Ok(())
    }

    fn next_record(&mut self) -> Result<RamRecord<'a>> {
        let w = self.take(8, "in a RAM record header")?;
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let word = u64::from_le_bytes(b);
        let offset = word & !FLAG_MASK;
        let flags = word & FLAG_MASK;
        match flags {
            FLAG_ZERO => {
                let c = self.take(4, "in a zero-page record")?;
                let count = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if count == 0 {
                    return Err(StreamError::Invalid("zero-page run of 0 pages".into()));
                }
                self.check_range(offset, u64::from(count))?;
                Ok(RamRecord::Zero { offset, count })
            }
            FLAG_PAGE => {
                self.check_range(offset, 1)?;
                let data = self.take(PAGE, "in a page")?;
                Ok(RamRecord::Page { offset, data })
            }
            FLAG_XBZRLE => {
                self.check_range(offset, 1)?;
                let h = self.take(3, "in an XBZRLE record")?;
                if h[0] != XBZRLE_ENCODING {
                    return Err(StreamError::Invalid(format!(
                        "XBZRLE encoding flag {:#x}",
                        h[0]
                    )));
                }
                let len = usize::from(u16::from_be_bytes([h[1], h[2]]));
                if len == 0 || len > PAGE {
                    return Err(StreamError::Invalid(format!("XBZRLE length {len}")));
                }
                let data = self.take(len, "in an XBZRLE delta")?;
                Ok(RamRecord::Xbzrle { offset, data })
            }
            FLAG_COMPRESS => {
                self.check_range(offset, 1)?;
                let c = self.take(4, "in a compressed-page record")?;
                let len = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                if len == 0 || len > 2 * PAGE {
                    return Err(StreamError::Invalid(format!(
                        "compressed page length {len}"
                    )));
                }
                let data = self.take(len, "in a compressed page")?;
                Ok(RamRecord::Compressed { offset, data })
            }
            other => Err(StreamError::Invalid(format!("RAM record flags {other:#x}"))),
        }
    }
}

impl<'a> Iterator for RamRecordReader<'a> {
    type Item = Result<RamRecord<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.pos = self.buf.len();
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&word(0x2000, FLAG_PAGE).to_le_bytes());
        p.extend_from_slice(&[5u8; 4096]);
        p.extend_from_slice(&word(0x5000, FLAG_ZERO).to_le_bytes());
        p.extend_from_slice(&4u32.to_le_bytes());
        p.extend_from_slice(&word(0x3000, FLAG_XBZRLE).to_le_bytes());
        p.extend_from_slice(&[XBZRLE_ENCODING, 0, 4, 0xff, 0x1f, 1, 1]);
        p
    }

    #[test]
    fn decodes_every_kind() {
        let p = payload();
        let recs: Vec<_> = RamRecordReader::new(&p, 1 << 20)
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(recs.len(), 3);
        assert!(matches!(recs[0], RamRecord::Page { offset: 0x2000, data } if data.len() == 4096));
        assert_eq!(
            recs[1],
            RamRecord::Zero {
                offset: 0x5000,
                count: 4
            }
        );
        assert_eq!(
            recs[2],
            RamRecord::Xbzrle {
                offset: 0x3000,
                data: &[0xff, 0x1f, 1, 1]
            }
        );
    }

    #[test]
    fn rejects_out_of_bounds_pages() {
        let p = payload();
        // RAM of 0x6000 bytes: the zero run 0x5000 + 4 pages overflows it.
        let res: Result<Vec<_>> = RamRecordReader::new(&p, 0x6000).collect();
        assert!(matches!(res, Err(StreamError::Invalid(_))));
        let mut q = Vec::new();
        q.extend_from_slice(&word(!0xfff, FLAG_ZERO).to_le_bytes());
        q.extend_from_slice(&u32::MAX.to_le_bytes());
        let res: Result<Vec<_>> = RamRecordReader::new(&q, 1 << 20).collect();
        assert!(res.is_err());
    }

    #[test]
    fn rejects_malformed_records() {
        for bad in [
            word(0x1000, 0x3).to_le_bytes().to_vec(), // two flags
            word(0x1000, FLAG_PAGE).to_le_bytes()[..5].to_vec(), // short word
            [word(0x1000, FLAG_PAGE).to_le_bytes().to_vec(), vec![0; 100]].concat(), // short page
            [word(0x1000, FLAG_ZERO).to_le_bytes().to_vec(), vec![0; 4]].concat(), // zero count
            [
                word(0x1000, FLAG_XBZRLE).to_le_bytes().to_vec(),
                vec![2, 0, 1, 9],
            ]
            .concat(), // bad encoding
            [
                word(0x1000, FLAG_XBZRLE).to_le_bytes().to_vec(),
                vec![1, 0x20, 0, 9],
            ]
            .concat(), // too long
        ] {
            let res: Result<Vec<_>> = RamRecordReader::new(&bad, 1 << 20).collect();
            assert!(res.is_err(), "{bad:?} accepted");
        }
    }
}
