//! Ferry's migration stream: a versioned, checksummed binary format.
//!
//! The same format carries a live migration over a socket, a migration to a
//! file (`file:PATH`) and a background snapshot. Everything is little-endian.
//!
//! ```text
//!  source                                                   destination
//!    |-- Header (64 bytes) -------------------------------------->|  magic "FERRYMIG", version,
//!    |                                                            |  VM UUID, RAM size, page size,
//!    |                                                            |  vCPUs, features; checked first
//!    |-- Frame DATA_RANGES [page ranges] ------------------------>|  what may hold data: the rest
//!    |                                                            |  is zero and is not allocated
//!    |-- Frame RAM [record...] ---------------------------------->|  pages of the first pass
//!    |-- Frame RAM ...                                            |
//!    |-- Frame PASS_END {pass} ---------------------------------->|  end of a pass over memory
//!    |-- Frame RAM ... (pages dirtied since)                      |  (multifd: the destination
//!    |-- Frame PASS_END ...                                       |   waits for every channel's SYNC)
//!    |          ... iterations until the rest fits the downtime budget ...
//!    |   [source pauses the vCPUs: the downtime starts]           |
//!    |-- Frame RAM ... (the last dirty pages)                     |
//!    |-- Frame STATE {vCPUs, VM, devices} ----------------------->|
//!    |-- Frame END {pages sent, digest} ------------------------->|  destination has everything
//!    |<------------------------------------ Reply LOADED / FAILED-|  (socket transports only)
//!    |-- Reply COMMIT -------------------------------------------->|  destination resumes the guest;
//!    |   [source stays paused: postmigrate]                       |  the downtime ends
//! ```
//!
//! A *frame* is `[type u8][flags u8][reserved u16][len u32] payload[len] [xxh3-64 u64]`; the
//! checksum covers the 8-byte frame header and the payload, so a flipped bit anywhere in a
//! frame is detected. Payloads are at most [`MAX_FRAME_PAYLOAD`] bytes. An empty KEEPALIVE
//! frame says the source is alive with nothing to send (in `pre-switchover`); readers skip
//! it, and a destination that hears nothing for its io timeout gives up.
//!
//! RAM frames differ (see [`ram`] for the layout and the reasoning): a directory of
//! 24-byte entries `(ram_offset | flag, arg, hash)` with its own checksum, then the data
//! area (pages, XBZRLE deltas, compressed pages) that the source sends straight from guest
//! memory and the destination reads straight into guest memory. Each page carries its own
//! hash; a page whose bytes do not match (the guest changed it while it was being sent, or
//! the network corrupted it) stays *suspect* on the destination until sent again, and a
//! page still suspect at END fails the migration.
//!
//! The *reply channel* (destination to source on the same connection) carries small
//! messages: `[kind u8][reserved u8 x3][len u32] payload[len]` (LOADED, FAILED with a UTF-8
//! reason, SWITCHOVER_ACK); the source answers LOADED with COMMIT. No guest runs on the
//! destination before COMMIT, and the source never resumes its guest after sending COMMIT,
//! so a lost message leaves at most one copy of the guest running, never two.
//!
//! *Postcopy* (header feature `FEATURE_POSTCOPY`, after `migrate-start-postcopy`) replaces
//! the END/LOADED/COMMIT ending: the source sends DISCARD frames (page ranges, see
//! [`ranges`]), STATE and POSTCOPY_LISTEN; the destination answers NEED ranges and
//! POSTCOPY_READY; the source commits with POSTCOPY_RUN, then sends the remaining pages as
//! ordinary RAM frames while the destination asks for faulted pages with PAGE_REQUEST
//! (acknowledging placed pages with RECEIVED for `release-ram`) and ends with
//! POSTCOPY_DONE. A preempt channel or a recovery connection starts with the same header
//! (feature `FEATURE_PREEMPT_CHANNEL` / `FEATURE_POSTCOPY_RESUME`) and a POSTCOPY_HELLO
//! frame naming the migration. The sequence and its guarantees are drawn in
//! [`crate::postcopy`].

pub mod frame;
pub mod header;
pub mod ram;
pub mod ranges;
pub mod reply;

pub use frame::{Frame, FrameKind, FrameReader, FrameWriter, StreamSource, MAX_FRAME_PAYLOAD};
pub use header::{Header, HEADER_LEN, STREAM_MAGIC, STREAM_VERSION};
pub use ram::{RamDirectory, RamEntry, RamRecord};
pub use reply::Reply;

use thiserror::Error;

/// Errors reading or writing a migration stream.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The transport failed.
    #[error("migration stream I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended in the middle of something.
    #[error("migration stream truncated: {0}")]
    Truncated(&'static str),
    /// Not a Ferry stream.
    #[error("not a Ferry migration stream (bad magic)")]
    BadMagic,
    /// A version this Ferry cannot read.
    #[error(
        "unsupported migration stream version {0} (this Ferry reads version {STREAM_VERSION})"
    )]
    BadVersion(u32),
    /// A checksum did not match: the data was corrupted.
    #[error("migration stream corrupted: checksum mismatch in {0}")]
    Checksum(&'static str),
    /// A field outside its allowed range.
    #[error("invalid migration stream: {0}")]
    Invalid(String),
    /// The source's VM does not match this one.
    #[error("{0}")]
    Mismatch(String),
    /// An error a multifd channel thread reported, in its own words.
    #[error("{0}")]
    Channel(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, StreamError>;
