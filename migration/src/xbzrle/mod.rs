//! XBZRLE: QEMU's XOR-based zero-run-length delta encoding of dirty pages,
//! and the page cache it encodes against.
//!
//! A page that was sent before is kept in a cache on the source. When it is
//! dirtied again, the source XORs the new contents with the cached copy and
//! sends only the runs of bytes that changed; the destination applies them
//! onto its copy of the page, which equals the source's cached copy.
//!
//! # Encoding (byte-for-byte QEMU's `xbzrle_encode_buffer`)
//!
//! ```text
//! delta  = pair*                   (empty when the page is unchanged)
//! pair   = zrun nzrun byte{nzrun}  one run of equal bytes, one of changed bytes
//! zrun   = ULEB128                 bytes equal in old and new (XOR is zero);
//!                                  0 only in the first pair
//! nzrun  = ULEB128                 bytes that differ (XOR is non-zero), >= 1,
//!                                  followed by that many bytes of the new page
//! ```
//!
//! Runs are maximal (a zero run ends at the first changed byte and a non-zero
//! run at the first equal one) and the trailing zero run is omitted. Lengths
//! are ULEB128: 7 bits per byte, low group first, high bit set on every byte
//! but the last. QEMU writes at most two bytes (lengths up to 0x3fff, enough
//! for 4 KiB pages); Ferry accepts a third so pages up to
//! [`MAX_PAGE_SIZE`] can be encoded, and its output for pages QEMU can
//! encode is identical to QEMU's, overflow decisions included.
//!
//! # On the wire (QEMU's `RAM_SAVE_FLAG_XBZRLE` record, see [`record`])
//!
//! ```text
//! page header (be64 offset | RAM_SAVE_FLAG_XBZRLE, block name if new block)
//! u8   ENCODING_FLAG_XBZRLE = 0x01
//! be16 length of the delta (<= page size)
//! u8   delta[length]
//! ```
//!
//! # Pieces
//!
//! - [`encode`]: the encoder, with SIMD kernels chosen at run time.
//! - [`decode`]: the decoder; rejects malformed input before writing a byte.
//! - [`uleb128`]: run lengths.
//! - [`cache`]: the page cache, indexed by RAM offset and stamped with the
//!   dirty-sync generation; resizing keeps the entries that still fit.
//! - [`stats`]: the `xbzrle-cache` member of `query-migrate`.
//! - [`sender`]: [`XbzrleEncoder`], the per-migration state the migration
//!   thread calls for each dirty page, and [`apply_delta`] for the
//!   destination.
//! - [`record`]: the record header above.

pub mod cache;
pub mod decode;
pub mod encode;
mod kernel;
pub mod record;
pub mod sender;
pub mod stats;
pub mod uleb128;

pub use cache::{CacheError, PageCache};
pub use decode::{apply_delta, decode};
pub use encode::{encode, encode_with, xbzrle_encode_buffer, Kernel};
pub use sender::{Outcome, XbzrleEncoder};
pub use stats::XbzrleCacheStats;

/// Largest page XBZRLE encodes: every run length then fits in three ULEB128
/// bytes.
pub const MAX_PAGE_SIZE: usize = 1 << 20;

/// Errors of the XBZRLE module: malformed deltas and records, cache set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XbzrleError {
    /// A length ended before its last byte.
    #[error("XBZRLE delta truncated inside a run length at byte {offset}")]
    TruncatedLength {
        /// Offset of the length in the delta.
        offset: usize,
    },
    /// A length took more bytes than [`uleb128::MAX_LEN_BYTES`].
    #[error(
        "XBZRLE run length at byte {offset} is longer than {} bytes",
        uleb128::MAX_LEN_BYTES
    )]
    LengthTooLong {
        /// Offset of the length in the delta.
        offset: usize,
    },
    /// A zero run of length 0 somewhere other than the start.
    #[error("XBZRLE zero run of length 0 at byte {offset} (only the first run may be empty)")]
    EmptyZeroRun {
        /// Offset of the length in the delta.
        offset: usize,
    },
    /// A zero run that is not followed by a non-zero run.
    #[error("XBZRLE delta ends after the zero run at byte {offset}, with no changed bytes")]
    MissingNonZeroRun {
        /// Offset of the zero run's length in the delta.
        offset: usize,
    },
    /// A non-zero run of length 0.
    #[error("XBZRLE non-zero run of length 0 at byte {offset}")]
    EmptyNonZeroRun {
        /// Offset of the length in the delta.
        offset: usize,
    },
    /// A run ends past the end of the page.
    #[error("XBZRLE run at byte {offset} ends at page byte {end}, past the {page_len}-byte page")]
    RunPastPage {
        /// Offset of the run's length in the delta.
        offset: usize,
        /// Page offset where the run would end.
        end: usize,
        /// Size of the page.
        page_len: usize,
    },
    /// A non-zero run announces more bytes than the delta holds.
    #[error(
        "XBZRLE non-zero run at byte {offset} needs {needed} bytes but only {available} follow"
    )]
    TruncatedRun {
        /// Offset of the run's bytes in the delta.
        offset: usize,
        /// Bytes the run announces.
        needed: usize,
        /// Bytes left in the delta.
        available: usize,
    },
    /// Bytes follow a delta that already covers the whole page.
    #[error(
        "XBZRLE delta has {count} trailing bytes at byte {offset}, after the page is complete"
    )]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// Number of extra bytes.
        count: usize,
    },
    /// The record's encoding byte is not `ENCODING_FLAG_XBZRLE`.
    #[error("Failed to load XBZRLE page - wrong compression!")]
    WrongEncoding {
        /// The byte found.
        flag: u8,
    },
    /// The record's length exceeds the page size.
    #[error("Failed to load XBZRLE page - len overflow!")]
    LengthOverflow {
        /// The length found.
        len: usize,
        /// The page size.
        page_len: usize,
    },
    /// The page cache could not be set up or resized.
    #[error(transparent)]
    Cache(#[from] CacheError),
}
