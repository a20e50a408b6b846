//! The stream header: what the destination checks before accepting any data.

use std::io::{Read, Write};

use super::{Result, StreamError};

/// Magic bytes that open every Ferry stream.
pub const STREAM_MAGIC: [u8; 8] = *b"FERRYMIG";
/// Stream format version written by this Ferry.
pub const STREAM_VERSION: u32 = 1;
/// Size of the encoded header.
pub const HEADER_LEN: usize = 64;

/// Header feature bit: RAM pages are sent as XBZRLE deltas from the second pass on.
pub const FEATURE_XBZRLE: u32 = 1 << 0;
/// Header feature bit: the stream is accompanied by multifd channels.
pub const FEATURE_MULTIFD: u32 = 1 << 1;
/// Header feature bit: the source asks the destination to check the UUID (validate-uuid).
pub const FEATURE_VALIDATE_UUID: u32 = 1 << 2;
/// Header feature bit: the source expects a switchover acknowledgement (switchover-ack).
pub const FEATURE_SWITCHOVER_ACK: u32 = 1 << 3;
/// Header feature bit: guest RAM is shared with the destination (x-ignore-shared); no pages follow.
pub const FEATURE_IGNORE_SHARED: u32 = 1 << 4;
/// Header feature bit: a background snapshot (memory as of the start instant).
pub const FEATURE_SNAPSHOT: u32 = 1 << 5;
/// Header feature bit: legacy page compression (`compress`).
pub const FEATURE_COMPRESS: u32 = 1 << 6;
/// Header feature bit: postcopy may follow.
pub const FEATURE_POSTCOPY: u32 = 1 << 7;
/// Header feature bit: this connection resumes a paused postcopy migration (a
/// POSTCOPY_HELLO frame with the migration's id follows the header).
pub const FEATURE_POSTCOPY_RESUME: u32 = 1 << 8;
/// Header feature bit: this connection is a postcopy-preempt channel (urgent pages only;
/// a POSTCOPY_HELLO frame with the migration's id follows the header).
pub const FEATURE_PREEMPT_CHANNEL: u32 = 1 << 9;

/// The fixed-size stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// FEATURE_* bits.
    pub features: u32,
    /// The source VM's UUID.
    pub uuid: [u8; 16],
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// Page size (4096).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Number of multifd channels (0 without multifd).
    pub multifd_channels: u32,
    /// Multifd compression: 0 none, 1 zlib, 2 zstd.
    pub multifd_compression: u32,
}

impl Header {
    /// Encodes the header (with its checksum).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&STREAM_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.features.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..40].copy_from_slice(&self.ram_size.to_le_bytes());
        b[40..44].copy_from_slice(&self.page_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.vcpus.to_le_bytes());
        b[48..52].copy_from_slice(&self.multifd_channels.to_le_bytes());
        b[52..56].copy_from_slice(&self.multifd_compression.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        if b[0..8] != STREAM_MAGIC {
            return Err(StreamError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let version = u32_at(8);
        if version != STREAM_VERSION {
            return Err(StreamError::BadVersion(version));
        }
        if u64_at(56) != xxhash_rust::xxh3::xxh3_64(&b[..56]) {
            return Err(StreamError::Checksum("the stream header"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let h = Header {
            version,
            features: u32_at(12),
            uuid,
            ram_size: u64_at(32),
            page_size: u32_at(40),
            vcpus: u32_at(44),
            multifd_channels: u32_at(48),
            multifd_compression: u32_at(52),
        };
        if h.page_size != 4096 {
            return Err(StreamError::Invalid(format!(
                "page size {} (expected 4096)",
                h.page_size
            )));
        }
        if h.ram_size == 0 || !h.ram_size.is_multiple_of(4096) {
            return Err(StreamError::Invalid(format!("RAM size {}", h.ram_size)));
        }
        if h.vcpus == 0 || h.vcpus > 1024 {
            return Err(StreamError::Invalid(format!("{} vCPUs", h.vcpus)));
        }
        if h.multifd_channels > 255 || h.multifd_compression > 2 {
            return Err(StreamError::Invalid("multifd settings".into()));
        }
        Ok(h)
    }

    /// Writes the header.
    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        w.write_all(&self.encode())?;
        Ok(())
    }

    /// Reads and checks a header.
    pub fn read_from(r: &mut impl Read) -> Result<Header> {
        let mut b = [0u8; HEADER_LEN];
        r.read_exact(&mut b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StreamError::Truncated("in the stream header")
            } else {
                StreamError::Io(e)
            }
        })?;
        Header::decode(&b)
    }

    /// Whether a feature bit is set.
    pub fn has(&self, feature: u32) -> bool {
        self.features & feature != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: STREAM_VERSION,
            features: FEATURE_XBZRLE | FEATURE_VALIDATE_UUID,
            uuid: [7; 16],
            ram_size: 512 << 20,
            page_size: 4096,
            vcpus: 2,
            multifd_channels: 0,
            multifd_compression: 0,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let good = sample().encode();
        for byte in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut b = good;
                b[byte] ^= 1 << bit;
                assert!(
                    Header::decode(&b).is_err(),
                    "byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_fields_with_clear_errors() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(StreamError::BadMagic)));
        let mut h = sample();
        h.version = 9;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(StreamError::BadVersion(9))
        ));
        let mut h = sample();
        h.page_size = 8192;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(StreamError::Invalid(_))
        ));
        let mut h = sample();
        h.vcpus = 0;
        assert!(Header::decode(&h.encode()).is_err());
    }

    #[test]
    fn truncated_header_is_reported() {
        let b = sample().encode();
        let mut r = &b[..30];
        assert!(matches!(
            Header::read_from(&mut r),
            Err(StreamError::Truncated(_))
        ));
    }
}
