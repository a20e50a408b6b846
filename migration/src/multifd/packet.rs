//! Multifd wire format: the per-channel handshake and the packets that carry pages.
//!
//! Everything is little-endian, like the rest of Ferry's stream (QEMU writes these
//! structures big-endian; the shapes are QEMU's `MultiFDInit_t` and `MultiFDPacket_t`).
//!
//! ```text
//! handshake (64 bytes, once per channel, source -> destination):
//!   [magic u32 = 0x11223344][version u32][VM UUID 16][channel id u8][channels u8]
//!   [compression u8][reserved 5][reserved u64 x3][xxh3-64 of the 56 bytes before]
//!
//! packet:
//!   [magic u32][version u32][flags u32][pages_alloc u32]            fixed header, 48 bytes
//!   [normal_pages u32][next_packet_size u32][packet_num u64]
//!   [zero_pages u32][reserved u32][pass u64]
//!   offsets: (normal_pages + zero_pages) x u64                      normal pages, then zero pages
//!   hashes:  normal_pages x u64                                     xxh3-64 of each normal page
//!   [xxh3-64 of everything above]                                   header checksum
//!   data: next_packet_size bytes                                    the normal pages, raw or compressed
//! ```
//!
//! `flags`: bit 0 SYNC (the last packet of a pass on this channel: no pages), bits 1-3 the
//! compression method (QEMU's values: 0 none, 1 zlib, 2 zstd), bit 4 RAW (Ferry: compression
//! is on but this packet's data did not shrink, so it is sent as is). The data area is not
//! covered by the checksum for the reason given in [`crate::stream::ram`]: uncompressed pages
//! go straight from guest memory to the socket, so each page carries its own hash and the
//! destination keeps a page whose bytes do not match as suspect until it is sent again.
//! Compressed data is made from a stable copy of the pages and hashed from that copy, so a
//! decompressed page that does not match is damage and fails the channel (zstd frames carry
//! no checksum of their own: the page hashes are the check).

use thiserror::Error;

/// Magic number opening every handshake and packet (QEMU's MULTIFD_MAGIC).
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// Version of this format (QEMU's MULTIFD_VERSION).
pub const MULTIFD_VERSION: u32 = 1;
/// Most pages in one packet.
pub const PAGES_PER_PACKET: usize = 128;
/// Bytes of the handshake.
pub const HANDSHAKE_LEN: usize = 64;
/// Bytes of a packet's fixed header.
pub const PACKET_HEADER_LEN: usize = 48;
/// Flag: the last packet of a pass on this channel.
pub const FLAG_SYNC: u32 = 1 << 0;
/// Flag bits holding the compression method.
pub const FLAG_COMPRESSION_MASK: u32 = 7 << 1;
/// Flag: compression method none.
pub const FLAG_NOCOMP: u32 = 0;
/// Flag: compression method zlib.
pub const FLAG_ZLIB: u32 = 1 << 1;
/// Flag: compression method zstd.
pub const FLAG_ZSTD: u32 = 2 << 1;
/// Flag: compression is on, but this packet's data is raw pages.
pub const FLAG_RAW: u32 = 1 << 4;
const KNOWN_FLAGS: u32 = FLAG_SYNC | FLAG_COMPRESSION_MASK | FLAG_RAW;
const PAGE: u64 = 4096;

/// How a channel compresses page data (the stream header's `multifd_compression` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Pages as they are.
    None,
    /// zlib (deflate with a zlib header).
    Zlib,
    /// zstd.
    Zstd,
}

impl Method {
    /// The code used in the stream header and the handshake (QEMU's enum order).
    pub fn code(self) -> u8 {
        match self {
            Method::None => 0,
            Method::Zlib => 1,
            Method::Zstd => 2,
        }
    }

    /// The method of a header/handshake code.
    pub fn from_code(code: u32) -> Option<Method> {
        match code {
            0 => Some(Method::None),
            1 => Some(Method::Zlib),
            2 => Some(Method::Zstd),
            _ => None,
        }
    }

    /// The packet flag bits of this method.
    pub fn flag(self) -> u32 {
        u32::from(self.code()) << 1
    }

    /// QEMU's name (`multifd-compression`).
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Zlib => "zlib",
            Method::Zstd => "zstd",
        }
    }
}

impl From<crate::options::MultiFdCompression> for Method {
    fn from(c: crate::options::MultiFdCompression) -> Self {
        match c {
            crate::options::MultiFdCompression::None => Method::None,
            crate::options::MultiFdCompression::Zlib => Method::Zlib,
            crate::options::MultiFdCompression::Zstd => Method::Zstd,
        }
    }
}

/// A malformed handshake or packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PacketError {
    /// The magic number is wrong.
    #[error("bad multifd magic {0:#x} (expected {MULTIFD_MAGIC:#x})")]
    Magic(u32),
    /// A version this Ferry cannot read.
    #[error("multifd version {0} not supported (this Ferry reads version {MULTIFD_VERSION})")]
    Version(u32),
    /// The checksum does not match: the header was corrupted.
    #[error("multifd {0} corrupted: checksum mismatch")]
    Checksum(&'static str),
    /// Unknown flag bits.
    #[error("multifd packet flags {0:#x} carry unknown bits")]
    UnknownFlags(u32),
    /// The packet's compression differs from the channel's.
    #[error("multifd packet compressed with method {got}, the channel uses {want}")]
    Compression {
        /// The packet's method code.
        got: u32,
        /// The channel's method.
        want: &'static str,
    },
    /// RAW on a channel without compression.
    #[error("multifd packet flagged raw on a channel without compression")]
    RawWithoutCompression,
    /// pages_alloc out of range.
    #[error("multifd packet with {0} pages allocated (expected 1 to {PAGES_PER_PACKET})")]
    PagesAlloc(u32),
    /// More pages than allocated.
    #[error("multifd packet with {normal} normal and {zero} zero pages exceeds its {alloc} pages")]
    TooManyPages {
        /// Normal pages.
        normal: u32,
        /// Zero pages.
        zero: u32,
        /// Pages allocated.
        alloc: u32,
    },
    /// A SYNC packet that carries pages.
    #[error("multifd SYNC packet carries pages")]
    SyncWithPages,
    /// The data size does not fit the pages.
    #[error("multifd packet announces {size} data bytes for {normal} pages{how}")]
    DataSize {
        /// next_packet_size.
        size: u32,
        /// Normal pages.
        normal: u32,
        /// What the size should have been.
        how: &'static str,
    },
    /// A reserved field is not zero.
    #[error("multifd {0}: reserved field not zero")]
    Reserved(&'static str),
    /// A page offset that is not page aligned or lies outside guest RAM.
    #[error("multifd page offset {offset:#x} is {why} (guest RAM is {ram_size:#x} bytes)")]
    Offset {
        /// The offset.
        offset: u64,
        /// Misaligned or out of RAM.
        why: &'static str,
        /// RAM size.
        ram_size: u64,
    },
    /// The handshake names an impossible channel.
    #[error("multifd channel id {id} out of range for {channels} channels")]
    ChannelId {
        /// The id.
        id: u8,
        /// Channels announced.
        channels: u8,
    },
    /// Too few bytes.
    #[error("multifd {0} truncated")]
    Truncated(&'static str),
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// The first message on every multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// The source VM's UUID (the same as in the main stream's header).
    pub uuid: [u8; 16],
    /// This channel's id, 0-based.
    pub id: u8,
    /// Channels of the migration.
    pub channels: u8,
    /// Compression of the migration.
    pub method: Method,
}

impl Handshake {
    /// Encodes the handshake.
    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut b = [0u8; HANDSHAKE_LEN];
        b[0..4].copy_from_slice(&MULTIFD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&MULTIFD_VERSION.to_le_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.id;
        b[25] = self.channels;
        b[26] = self.method.code();
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and checks a handshake.
    pub fn decode(b: &[u8; HANDSHAKE_LEN]) -> Result<Handshake, PacketError> {
        let magic = u32_at(b, 0);
        if magic != MULTIFD_MAGIC {
            return Err(PacketError::Magic(magic));
        }
        let version = u32_at(b, 4);
        if version != MULTIFD_VERSION {
            return Err(PacketError::Version(version));
        }
        if u64_at(b, 56) != xxhash_rust::xxh3::xxh3_64(&b[..56]) {
            return Err(PacketError::Checksum("handshake"));
        }
        if b[27..56].iter().any(|&x| x != 0) {
            return Err(PacketError::Reserved("handshake"));
        }
        let method = Method::from_code(u32::from(b[26])).ok_or(PacketError::Compression {
            got: u32::from(b[26]),
            want: "none, zlib or zstd",
        })?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        let h = Handshake {
            uuid,
            id: b[24],
            channels: b[25],
            method,
        };
        if h.id >= h.channels {
            return Err(PacketError::ChannelId {
                id: h.id,
                channels: h.channels,
            });
        }
        Ok(h)
    }
}

/// The fixed header of a packet, checked on its own (before the variable part is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// FLAG_* bits.
    pub flags: u32,
    /// Pages the sender allocates per packet.
    pub pages_alloc: u32,
    /// Pages with data.
    pub normal_pages: u32,
    /// Bytes of data after the header.
    pub next_packet_size: u32,
    /// Global packet number (over all channels).
    pub packet_num: u64,
    /// Zero pages (offsets only).
    pub zero_pages: u32,
    /// The pass over memory this packet belongs to.
    pub pass: u64,
}

impl PacketHeader {
    /// Bytes of the variable part that follows the fixed header (offsets, hashes, checksum).
    pub fn tail_len(&self) -> usize {
        (self.normal_pages as usize * 2 + self.zero_pages as usize + 1) * 8
    }

    /// Whether this is a SYNC packet.
    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }

    /// Whether the data area is compressed (as opposed to raw pages).
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSION_MASK != 0 && self.flags & FLAG_RAW == 0
    }

    /// Writes the 48 bytes of the fixed header.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MULTIFD_MAGIC.to_le_bytes());
        out.extend_from_slice(&MULTIFD_VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.pages_alloc.to_le_bytes());
        out.extend_from_slice(&self.normal_pages.to_le_bytes());
        out.extend_from_slice(&self.next_packet_size.to_le_bytes());
        out.extend_from_slice(&self.packet_num.to_le_bytes());
        out.extend_from_slice(&self.zero_pages.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.pass.to_le_bytes());
    }

    /// Decodes and checks the fixed header for a channel compressing with `method`.
    pub fn decode(b: &[u8; PACKET_HEADER_LEN], method: Method) -> Result<Self, PacketError> {
        let magic = u32_at(b, 0);
        if magic != MULTIFD_MAGIC {
            return Err(PacketError::Magic(magic));
        }
        let version = u32_at(b, 4);
        if version != MULTIFD_VERSION {
            return Err(PacketError::Version(version));
        }
        let h = PacketHeader {
            flags: u32_at(b, 8),
            pages_alloc: u32_at(b, 12),
            normal_pages: u32_at(b, 16),
            next_packet_size: u32_at(b, 20),
            packet_num: u64_at(b, 24),
            zero_pages: u32_at(b, 32),
            pass: u64_at(b, 40),
        };
        if u32_at(b, 36) != 0 {
            return Err(PacketError::Reserved("packet header"));
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(PacketError::UnknownFlags(h.flags));
        }
        if h.flags & FLAG_COMPRESSION_MASK != method.flag() {
            return Err(PacketError::Compression {
                got: (h.flags & FLAG_COMPRESSION_MASK) >> 1,
                want: method.name(),
            });
        }
        if h.flags & FLAG_RAW != 0 && method == Method::None {
            return Err(PacketError::RawWithoutCompression);
        }
        if h.pages_alloc == 0 || h.pages_alloc as usize > PAGES_PER_PACKET {
            return Err(PacketError::PagesAlloc(h.pages_alloc));
        }
        let used = u64::from(h.normal_pages) + u64::from(h.zero_pages);
        if used > u64::from(h.pages_alloc) {
            return Err(PacketError::TooManyPages {
                normal: h.normal_pages,
                zero: h.zero_pages,
                alloc: h.pages_alloc,
            });
        }
        if h.is_sync() && used != 0 {
            return Err(PacketError::SyncWithPages);
        }
        let raw = u64::from(h.normal_pages) * PAGE;
        let size = u64::from(h.next_packet_size);
        let bad = |how| PacketError::DataSize {
            size: h.next_packet_size,
            normal: h.normal_pages,
            how,
        };
        if h.normal_pages == 0 {
            if size != 0 {
                return Err(bad(" (expected none)"));
            }
        } else if h.is_compressed() {
            if size == 0 || size >= raw {
                return Err(bad(" (compressed data must be smaller than the pages)"));
            }
        } else if size != raw {
            return Err(bad(" (expected 4096 per page)"));
        }
        Ok(h)
    }
}

/// A packet's pages: offsets of normal pages with their hashes, then zero pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketPages {
    /// `(ram_offset, xxh3-64)` of each page whose data follows, in data order.
    pub normal: Vec<(u64, u64)>,
    /// RAM offsets of zero pages.
    pub zero: Vec<u64>,
}

impl PacketPages {
    /// Empties the lists (keeping their capacity).
    pub fn clear(&mut self) {
        self.normal.clear();
        self.zero.clear();
    }

    /// Encodes header and pages (the whole packet before its data) into `out` (cleared).
    pub fn encode(&self, header: &PacketHeader, out: &mut Vec<u8>) {
        out.clear();
        header.encode_into(out);
        for &(o, _) in &self.normal {
            out.extend_from_slice(&o.to_le_bytes());
        }
        for &o in &self.zero {
            out.extend_from_slice(&o.to_le_bytes());
        }
        for &(_, h) in &self.normal {
            out.extend_from_slice(&h.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(out);
        out.extend_from_slice(&sum.to_le_bytes());
    }

    /// Checks the variable part `tail` (offsets, hashes, checksum) of a packet whose fixed
    /// header `head` was already decoded as `header`, and fills `self` from it.
    pub fn decode_tail(
        &mut self,
        head: &[u8; PACKET_HEADER_LEN],
        header: &PacketHeader,
        tail: &[u8],
        ram_size: u64,
    ) -> Result<(), PacketError> {
        if tail.len() != header.tail_len() {
            return Err(PacketError::Truncated("packet page list"));
        }
        let body = tail.len() - 8;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(head);
        h.update(&tail[..body]);
        if h.digest() != u64_at(tail, body) {
            return Err(PacketError::Checksum("packet header"));
        }
        self.clear();
        let normal = header.normal_pages as usize;
        let zero = header.zero_pages as usize;
        let check = |offset: u64| -> Result<u64, PacketError> {
            let why = if !offset.is_multiple_of(PAGE) {
                "not page aligned"
            } else if offset >= ram_size {
                "beyond guest RAM"
            } else {
                return Ok(offset);
            };
            Err(PacketError::Offset {
                offset,
                why,
                ram_size,
            })
        };
        for i in 0..normal {
            let offset = check(u64_at(tail, i * 8))?;
            let hash = u64_at(tail, (normal + zero + i) * 8);
            self.normal.push((offset, hash));
        }
        for i in 0..zero {
            self.zero.push(check(u64_at(tail, (normal + i) * 8))?);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: u64 = 1 << 30;

    fn sample() -> (PacketHeader, PacketPages) {
        let pages = PacketPages {
            normal: vec![(0x1000, 11), (0x5000, 22), (0x2_0000, 33)],
            zero: vec![0x3000, 0x4000],
        };
        let header = PacketHeader {
            flags: FLAG_ZSTD,
            pages_alloc: PAGES_PER_PACKET as u32,
            normal_pages: 3,
            next_packet_size: 1000,
            packet_num: 77,
            zero_pages: 2,
            pass: 3,
        };
        (header, pages)
    }

    fn encoded() -> Vec<u8> {
        let (h, p) = sample();
        let mut out = Vec::new();
        p.encode(&h, &mut out);
        out
    }

    fn decode_all(b: &[u8], method: Method) -> Result<(PacketHeader, PacketPages), PacketError> {
        let head: &[u8; PACKET_HEADER_LEN] = b
            .get(..PACKET_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(PacketError::Truncated("packet header"))?;
        let h = PacketHeader::decode(head, method)?;
        let tail = b
            .get(PACKET_HEADER_LEN..PACKET_HEADER_LEN + h.tail_len())
            .ok_or(PacketError::Truncated("packet page list"))?;
        let mut pages = PacketPages::default();
        pages.decode_tail(head, &h, tail, RAM)?;
        Ok((h, pages))
    }

    #[test]
    fn packet_round_trips() {
        let b = encoded();
        assert_eq!(b.len(), PACKET_HEADER_LEN + (3 * 2 + 2 + 1) * 8);
        let (h, p) = decode_all(&b, Method::Zstd).unwrap();
        assert_eq!((h, p), sample());
    }

    #[test]
    fn sync_and_raw_packets_round_trip() {
        for (flags, normal, size) in [
            (FLAG_SYNC | FLAG_ZLIB, 0, 0),
            (FLAG_RAW | FLAG_ZLIB, 2, 8192),
            (FLAG_NOCOMP, 2, 8192),
        ] {
            let h = PacketHeader {
                flags,
                pages_alloc: 128,
                normal_pages: normal,
                next_packet_size: size,
                packet_num: 1,
                zero_pages: 0,
                pass: 9,
            };
            let p = PacketPages {
                normal: (0..normal as u64).map(|i| (i * 4096, i)).collect(),
                zero: vec![],
            };
            let mut b = Vec::new();
            p.encode(&h, &mut b);
            let method = Method::from_code((flags & FLAG_COMPRESSION_MASK) >> 1).unwrap();
            assert_eq!(decode_all(&b, method).unwrap(), (h, p));
        }
    }

    #[test]
    fn handshake_round_trips_and_checks_fields() {
        let h = Handshake {
            uuid: [5; 16],
            id: 3,
            channels: 4,
            method: Method::Zlib,
        };
        assert_eq!(Handshake::decode(&h.encode()).unwrap(), h);
        let good = h.encode();
        for byte in 0..HANDSHAKE_LEN {
            let mut b = good;
            b[byte] ^= 0x10;
            assert!(
                Handshake::decode(&b).is_err(),
                "flip in byte {byte} accepted"
            );
        }
        let bad_id = Handshake { id: 4, ..h }.encode();
        assert_eq!(
            Handshake::decode(&bad_id),
            Err(PacketError::ChannelId { id: 4, channels: 4 })
        );
        let mut bad_method = h.encode();
        bad_method[26] = 3;
        let sum = xxhash_rust::xxh3::xxh3_64(&bad_method[..56]);
        bad_method[56..].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            Handshake::decode(&bad_method),
            Err(PacketError::Compression { got: 3, .. })
        ));
    }

    /// Re-encodes `h` with a valid checksum so that only the field under test is wrong.
    fn with_header(h: PacketHeader) -> Vec<u8> {
        let mut b = Vec::new();
        PacketPages {
            normal: (0..h.normal_pages.min(200) as u64)
                .map(|i| (i * 4096, 0))
                .collect(),
            zero: (0..h.zero_pages.min(200) as u64)
                .map(|i| RAM - 4096 - i * 4096)
                .collect(),
        }
        .encode(&h, &mut b);
        b
    }

    #[test]
    fn every_malformed_header_field_is_rejected() {
        let (good, _) = sample();
        let mut b = encoded();
        b[0] ^= 1;
        assert!(matches!(
            decode_all(&b, Method::Zstd),
            Err(PacketError::Magic(_))
        ));
        let mut b = encoded();
        b[4] = 2;
        assert_eq!(decode_all(&b, Method::Zstd), Err(PacketError::Version(2)));
        let cases: Vec<(PacketHeader, Method, &str)> = vec![
            (
                PacketHeader {
                    flags: good.flags | 1 << 9,
                    ..good
                },
                Method::Zstd,
                "unknown flag",
            ),
            (good, Method::Zlib, "other compression"),
            (good, Method::None, "compressed on a plain channel"),
            (
                PacketHeader {
                    flags: FLAG_RAW,
                    next_packet_size: 3 * 4096,
                    ..good
                },
                Method::None,
                "raw without compression",
            ),
            (
                PacketHeader {
                    pages_alloc: 0,
                    ..good
                },
                Method::Zstd,
                "no pages allocated",
            ),
            (
                PacketHeader {
                    pages_alloc: 129,
                    ..good
                },
                Method::Zstd,
                "too many allocated",
            ),
            (
                PacketHeader {
                    pages_alloc: 4,
                    ..good
                },
                Method::Zstd,
                "more pages than allocated",
            ),
            (
                PacketHeader {
                    normal_pages: u32::MAX,
                    ..good
                },
                Method::Zstd,
                "huge normal count",
            ),
            (
                PacketHeader {
                    zero_pages: u32::MAX,
                    ..good
                },
                Method::Zstd,
                "huge zero count",
            ),
            (
                PacketHeader {
                    flags: FLAG_SYNC | FLAG_ZSTD,
                    ..good
                },
                Method::Zstd,
                "sync with pages",
            ),
            (
                PacketHeader {
                    next_packet_size: 0,
                    ..good
                },
                Method::Zstd,
                "empty compressed data",
            ),
            (
                PacketHeader {
                    next_packet_size: 3 * 4096,
                    ..good
                },
                Method::Zstd,
                "compressed data not smaller",
            ),
            (
                PacketHeader {
                    flags: FLAG_NOCOMP,
                    next_packet_size: 3 * 4096 - 1,
                    ..good
                },
                Method::None,
                "raw data of the wrong size",
            ),
            (
                PacketHeader {
                    normal_pages: 0,
                    next_packet_size: 10,
                    ..good
                },
                Method::Zstd,
                "data without pages",
            ),
        ];
        for (h, method, what) in cases {
            let b = with_header(h);
            assert!(decode_all(&b, method).is_err(), "{what} accepted");
        }
        // The reserved word.
        let mut b = encoded();
        b[36] = 1;
        assert_eq!(
            decode_all(&b, Method::Zstd),
            Err(PacketError::Reserved("packet header"))
        );
    }

    #[test]
    fn offsets_and_checksum_are_checked() {
        let (h, _) = sample();
        for (offset, why) in [(0x1001, "not page aligned"), (RAM, "beyond guest RAM")] {
            let mut b = Vec::new();
            PacketPages {
                normal: vec![(0, 1), (offset, 2), (0x2000, 3)],
                zero: vec![0x3000, 0x4000],
            }
            .encode(&h, &mut b);
            assert!(
                matches!(decode_all(&b, Method::Zstd), Err(PacketError::Offset { why: w, .. }) if w == why)
            );
        }
        let good = encoded();
        for pos in 0..good.len() {
            let mut b = good.clone();
            b[pos] ^= 0x01;
            assert!(
                decode_all(&b, Method::Zstd).is_err(),
                "flip at {pos} accepted"
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            for m in [Method::None, Method::Zlib, Method::Zstd] {
                let _ = decode_all(&bytes, m);
            }
            if let Ok(b) = <[u8; HANDSHAKE_LEN]>::try_from(&bytes[..bytes.len().min(HANDSHAKE_LEN)]) {
                let _ = Handshake::decode(&b);
            }
        }

        #[test]
        fn mutated_headers_never_panic(pos in 0usize..PACKET_HEADER_LEN, val in any::<u8>(), method in 0u32..3) {
            let mut b = encoded();
            b[pos] = val;
            let _ = decode_all(&b, Method::from_code(method).unwrap_or(Method::None));
        }

        #[test]
        fn valid_packets_round_trip(
            normal in proptest::collection::vec((0u64..(RAM / 4096), any::<u64>()), 0..64),
            zero in proptest::collection::vec(0u64..(RAM / 4096), 0..64),
            num in any::<u64>(), pass in any::<u64>(),
        ) {
            let h = PacketHeader {
                flags: FLAG_NOCOMP,
                pages_alloc: 128,
                normal_pages: normal.len() as u32,
                next_packet_size: normal.len() as u32 * 4096,
                packet_num: num,
                zero_pages: zero.len() as u32,
                pass,
            };
            let p = PacketPages {
                normal: normal.iter().map(|&(pg, hash)| (pg * 4096, hash)).collect(),
                zero: zero.iter().map(|&pg| pg * 4096).collect(),
            };
            let mut b = Vec::new();
            p.encode(&h, &mut b);
            prop_assert_eq!(decode_all(&b, Method::None).unwrap(), (h, p));
        }
    }
}
