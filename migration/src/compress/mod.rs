//! Legacy page compression (capability `compress`), as QEMU's compress threads do it:
//! `compress-threads` source workers compress single dirty pages with zlib at
//! `compress-level` (0 stores them) and the main stream carries them as COMPRESSED records;
//! `decompress-threads` destination workers inflate them into guest memory.
//!
//! The zlib engine is multifd's ([`crate::multifd::compress`]), one context per worker.
//!
//! Ordering: within a pass every page is sent at most once (its dirty bit is taken), so the
//! order of pages inside a pass does not matter. The source collects every worker's result
//! before it ends a pass ([`CompressPool::next_pending`] until empty) and the destination
//! waits for every decompression before it handles a PASS_END or END frame
//! ([`DecompressPool::settle`]), so an older copy of a page can never overtake a newer one.
//!
//! With XBZRLE too, QEMU (ram.c `save_page_use_compression`) stops compressing once XBZRLE
//! starts (from the second pass): Ferry does the same.

mod decompress;
mod pool;
mod stats;

pub use decompress::DecompressPool;
pub use pool::{CompressPool, Done, Submitted};
pub use stats::{CompressCounters, CompressionStats};

use thiserror::Error;

/// Why a compression or decompression pool failed.
#[derive(Debug, Error)]
pub enum CompressPoolError {
    /// A worker thread could not be started.
    #[error("cannot start a {what} thread: {source}")]
    Spawn {
        /// Which kind of worker.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The zlib engine could not set up a context.
    #[error(transparent)]
    Engine(#[from] crate::multifd::compress::CompressError),
    /// Every worker stopped (a worker panicked or the pool was shut down).
    #[error("the {0} threads stopped unexpectedly")]
    WorkersGone(&'static str),
    /// A compressed page did not decode to a page (corrupt data).
    #[error("compressed page at RAM offset {offset:#x}: {why}")]
    Corrupt {
        /// RAM offset of the page.
        offset: u64,
        /// What the decoder said.
        why: String,
    },
    /// A page outside guest RAM.
    #[error("compressed page at RAM offset {0:#x} lies outside guest RAM")]
    OutOfRange(u64),
}

impl From<CompressPoolError> for crate::error::MigrationError {
    fn from(e: CompressPoolError) -> Self {
        match e {
            CompressPoolError::Corrupt { .. } | CompressPoolError::OutOfRange(_) => {
                crate::stream::StreamError::Invalid(e.to_string()).into()
            }
            other => crate::error::MigrationError::Vm(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
