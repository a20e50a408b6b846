//! RAM frames: a checksummed directory of page records, then the pages themselves.
//!
//! ```text
//! [kind=RAM u8][flags u8][reserved u16][len u32]        frame header (len: all that follows)
//! [entries u32][data_len u32]
//! entries x [word u64][arg u64][hash u64]               the directory
//! [xxh3-64 of everything above]                          directory checksum
//! data area: data_len bytes                              pages, deltas, compressed pages
//! ```
//!
//! `word` is `ram_offset | flag` (offsets are page aligned; flags in the low 12 bits, as
//! QEMU does). Per flag:
//!
//! | flag | arg | hash | data |
//! |---|---|---|---|
//! | ZERO 0x002 | page count | 0 | none |
//! | PAGE 0x008 | 0 | xxh3-64 of the page | 4096 bytes |
//! | XBZRLE 0x040 | encoded length | xxh3-64 of the page after decoding | the encoded delta (QEMU's encoding) |
//! | COMPRESS 0x100 | compressed length | xxh3-64 of the page | zlib data |
//!
//! Why the data area is outside the frame checksum: the source sends guest pages straight
//! from guest memory (no copy) while the guest keeps running, so a page may change between
//! the moment its hash is taken and the moment the kernel copies it. Such a page is
//! necessarily dirty again and is sent again later. The destination therefore checks every
//! page against its own hash and keeps a page that does not match as *suspect* until a later
//! record rewrites it; a page still suspect at the end of the stream was corrupted in
//! transit and fails the migration. The directory (offsets, lengths, hashes) is covered by
//! its checksum and is verified before any data is read, so a corrupted offset can never
//! steer data to the wrong place.

use super::{Result, StreamError};

/// A run of zero pages.
pub const FLAG_ZERO: u64 = 0x002;
/// A whole page.
pub const FLAG_PAGE: u64 = 0x008;
/// An XBZRLE delta.
pub const FLAG_XBZRLE: u64 = 0x040;
/// A zlib-compressed page (legacy `compress`).
pub const FLAG_COMPRESS: u64 = 0x100;
/// QEMU's ENCODING_FLAG_XBZRLE (kept for QEMU's on-wire XBZRLE record shape).
pub const XBZRLE_ENCODING: u8 = 0x01;
/// Bytes of one directory entry.
pub const ENTRY_LEN: usize = 24;
/// Most entries in one RAM frame.
pub const MAX_ENTRIES: usize = 1024;
/// Most data in one RAM frame.
pub const MAX_DATA: usize = 4 << 20;
const FLAG_MASK: u64 = 0xfff;
const PAGE: u64 = 4096;

/// One directory entry as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamEntry {
    /// `ram_offset | flag`.
    pub word: u64,
    /// Flag-specific argument (count or length).
    pub arg: u64,
    /// Hash of the page's resulting contents (0 for zero runs).
    pub hash: u64,
}

/// A decoded, bounds-checked record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamRecord {
    /// `count` zero pages from `offset`.
    Zero {
        /// RAM offset of the first page.
        offset: u64,
        /// Pages.
        count: u64,
    },
    /// A whole page (4096 bytes of data).
    Page {
        /// RAM offset.
        offset: u64,
        /// Hash of the page.
        hash: u64,
    },
    /// An XBZRLE delta of `len` bytes.
    Xbzrle {
        /// RAM offset.
        offset: u64,
        /// Encoded length.
        len: usize,
        /// Hash of the page after decoding.
        hash: u64,
    },
    /// A zlib-compressed page of `len` bytes.
    Compressed {
        /// RAM offset.
        offset: u64,
        /// Compressed length.
        len: usize,
        /// Hash of the page.
        hash: u64,
    },
}

impl RamRecord {
    /// Bytes this record occupies in the data area.
    pub fn data_len(&self) -> usize {
        match self {
            RamRecord::Zero { .. } => 0,
            RamRecord::Page { .. } => PAGE as usize,
            RamRecord::Xbzrle { len, .. } | RamRecord::Compressed { len, .. } => *len,
        }
    }

    /// The directory entry for this record.
    pub fn entry(&self) -> RamEntry {
        match *self {
            RamRecord::Zero { offset, count } => RamEntry {
                word: offset | FLAG_ZERO,
                arg: count,
                hash: 0,
            },
            RamRecord::Page { offset, hash } => RamEntry {
                word: offset | FLAG_PAGE,
                arg: 0,
                hash,
            },
            RamRecord::Xbzrle { offset, len, hash } => RamEntry {
                word: offset | FLAG_XBZRLE,
                arg: len as u64,
                hash,
            },
            RamRecord::Compressed { offset, len, hash } => RamEntry {
                word: offset | FLAG_COMPRESS,
                arg: len as u64,
                hash,
            },
        }
    }
}

impl RamEntry {
    /// Encodes the entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.word.to_le_bytes());
        out.extend_from_slice(&self.arg.to_le_bytes());
        out.extend_from_slice(&self.hash.to_le_bytes());
    }

    /// Decodes an entry from 24 bytes.
    pub fn decode(b: &[u8]) -> Result<RamEntry> {
        if b.len() < ENTRY_LEN {
            return Err(StreamError::Truncated("in a RAM directory entry"));
        }
        let u = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        Ok(RamEntry {
            word: u(0),
            arg: u(8),
            hash: u(16),
        })
    }

    /// Checks the entry against RAM of `ram_size` bytes and decodes it.
    pub fn record(&self, ram_size: u64) -> Result<RamRecord> {
        let offset = self.word & !FLAG_MASK;
        let in_ram = |pages: u64| -> Result<()> {
            let end = pages
                .checked_mul(PAGE)
                .and_then(|b| offset.checked_add(b))
                .ok_or_else(|| {
                    StreamError::Invalid(format!("page range at {offset:#x} overflows"))
                })?;
            if end > ram_size {
                return Err(StreamError::Invalid(format!(
                    "page {offset:#x} (+{pages} pages) lies beyond guest RAM ({ram_size:#x} bytes)"
                )));
            }
            Ok(())
        };
        match self.word & FLAG_MASK {
            FLAG_ZERO => {
                if self.arg == 0 {
                    return Err(StreamError::Invalid("zero-page run of 0 pages".into()));
                }
                in_ram(self.arg)?;
                Ok(RamRecord::Zero {
                    offset,
                    count: self.arg,
                })
            }
            FLAG_PAGE => {
                in_ram(1)?;
                if self.arg != 0 {
                    return Err(StreamError::Invalid(
                        "page record with a non-zero argument".into(),
                    ));
                }
                Ok(RamRecord::Page {
                    offset,
                    hash: self.hash,
                })
            }
            FLAG_XBZRLE => {
                in_ram(1)?;
                if self.arg == 0 || self.arg > PAGE {
                    return Err(StreamError::Invalid(format!("XBZRLE length {}", self.arg)));
                }
                Ok(RamRecord::Xbzrle {
                    offset,
                    len: self.arg as usize,
                    hash: self.hash,
                })
            }
            FLAG_COMPRESS => {
                in_ram(1)?;
                if self.arg == 0 || self.arg > 2 * PAGE {
                    return Err(StreamError::Invalid(format!(
                        "compressed page length {}",
                        self.arg
                    )));
                }
                Ok(RamRecord::Compressed {
                    offset,
                    len: self.arg as usize,
                    hash: self.hash,
                })
            }
            other => Err(StreamError::Invalid(format!("RAM record flags {other:#x}"))),
        }
    }
}

/// The checked directory of a RAM frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamDirectory {
    /// Records in data-area order.
    pub records: Vec<RamRecord>,
    /// Bytes of the data area.
    pub data_len: usize,
}

impl RamDirectory {
    /// Decodes and checks a directory body (`entries` entries after the two counts).
    pub fn decode(entries: &[u8], count: usize, data_len: usize, ram_size: u64) -> Result<Self> {
        let mut records = Vec::with_capacity(count);
        let mut total = 0usize;
        for i in 0..count {
            let e = RamEntry::decode(&entries[i * ENTRY_LEN..])?;
            let r = e.record(ram_size)?;
            total += r.data_len();
            records.push(r);
        }
        if total != data_len {
            return Err(StreamError::Invalid(format!(
                "RAM frame announces {data_len} data bytes, its records need {total}"
            )));
        }
        Ok(RamDirectory { records, data_len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        for r in [
            RamRecord::Zero {
                offset: 0x5000,
                count: 4,
            },
            RamRecord::Page {
                offset: 0x2000,
                hash: 9,
            },
            RamRecord::Xbzrle {
                offset: 0x3000,
                len: 4,
                hash: 7,
            },
            RamRecord::Compressed {
                offset: 0x1000,
                len: 100,
                hash: 1,
            },
        ] {
            let mut b = Vec::new();
            r.entry().encode(&mut b);
            assert_eq!(b.len(), ENTRY_LEN);
            assert_eq!(RamEntry::decode(&b).unwrap().record(1 << 20).unwrap(), r);
        }
    }

    #[test]
    fn rejects_out_of_bounds_and_malformed_entries() {
        let bad = [
            RamEntry {
                word: 0x5000 | FLAG_ZERO,
                arg: 4,
                hash: 0,
            }, // past 0x6000
            RamEntry {
                word: !0xfff | FLAG_ZERO,
                arg: u64::MAX,
                hash: 0,
            }, // overflow
            RamEntry {
                word: 0x1000 | 0x3,
                arg: 0,
                hash: 0,
            }, // two flags
            RamEntry {
                word: 0x1000 | FLAG_ZERO,
                arg: 0,
                hash: 0,
            }, // empty run
            RamEntry {
                word: 0x1000 | FLAG_XBZRLE,
                arg: 4097,
                hash: 0,
            }, // too long
            RamEntry {
                word: 0x1000 | FLAG_XBZRLE,
                arg: 0,
                hash: 0,
            }, // empty
            RamEntry {
                word: 0x1000 | FLAG_PAGE,
                arg: 1,
                hash: 0,
            }, // stray arg
            RamEntry {
                word: 0x6000 | FLAG_PAGE,
                arg: 0,
                hash: 0,
            }, // at the end
        ];
        for e in bad {
            assert!(e.record(0x6000).is_err(), "{e:?} accepted");
        }
    }

    #[test]
    fn directory_checks_data_length() {
        let mut b = Vec::new();
        RamRecord::Page { offset: 0, hash: 1 }
            .entry()
            .encode(&mut b);
        RamRecord::Zero {
            offset: 0x1000,
            count: 2,
        }
        .entry()
        .encode(&mut b);
        assert!(RamDirectory::decode(&b, 2, 4096, 1 << 20).is_ok());
        assert!(RamDirectory::decode(&b, 2, 4095, 1 << 20).is_err());
        assert!(RamDirectory::decode(&b[..30], 2, 4096, 1 << 20).is_err());
    }
}
