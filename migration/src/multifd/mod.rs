//! Multifd: RAM pages over N extra connections, in parallel, optionally compressed.
//!
//! ```text
//!  source                                                   destination
//!    |-- main stream: Header {multifd_channels N, compression} -->|  settings checked against
//!    |                                                            |  the destination's own
//!    |== channel i (i = 0..N): Handshake {magic, version,       ==>|  accepted, matched by id
//!    |       VM UUID, id, N, compression}                         |  (bounded wait)
//!    |== channel i: Packet {pages of pass p} ...                ==>|  applied by channel threads
//!    |== channel i: Packet SYNC {pass p}                        ==>|  thread parks until released
//!    |-- main stream: Frame PASS_END {p} ------------------------>|  waits for every channel's
//!    |                                                            |  SYNC p, then releases them
//!    |          ... passes; the final one (vCPUs stopped) ends the same way ...
//!    |-- main stream: STATE, END -------------------------------->|
//! ```
//!
//! A page is sent at most once per pass, and pass p+1's packets are applied only after
//! every channel has delivered pass p's: an older copy of a page can never overwrite a
//! newer one, whichever channels carried them. Every page carries its hash; the
//! destination's suspect bookkeeping ([`crate::dest::loader::PageBook`]) is shared by the
//! main stream and every channel, so a page is judged by its last copy.
//!
//! - [`packet`]: the handshake and packet format.
//! - [`compress`]: per-channel zlib/zstd contexts.
//! - [`send`]: the migration thread's dispatcher and the channel threads.
//! - [`recv`]: the destination's channel threads and the sync barrier.
//! - [`zerocopy`]: MSG_ZEROCOPY sends with completions reaped from the error queue.

pub mod compress;
pub mod packet;
pub mod recv;
pub mod send;
pub mod zerocopy;

#[cfg(test)]
mod tests;

pub use packet::Method;
pub use recv::MultifdReceiver;
pub use send::{MultifdSender, PacketBuilder, SendConfig, SendEnv};

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live figures of one channel.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Packets sent (SYNC included).
    pub packets: AtomicU64,
    /// Pages sent with data.
    pub normal_pages: AtomicU64,
    /// Zero pages sent as offsets only.
    pub zero_pages: AtomicU64,
    /// Bytes written to the socket.
    pub bytes: AtomicU64,
    /// Bytes of page data before compression.
    pub raw_bytes: AtomicU64,
    /// Bytes of page data after compression.
    pub data_bytes: AtomicU64,
}

/// Live figures of a multifd migration (one [`ChannelStats`] per channel).
#[derive(Debug)]
pub struct MultifdStats {
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// The compression method.
    pub method: Method,
    /// The next packet number (global over all channels, as QEMU numbers them).
    pub packet_num: AtomicU64,
}

/// One channel in a [`MultifdReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChannelReport {
    /// Channel id.
    pub id: usize,
    /// Bytes written to the socket.
    pub bytes: u64,
    /// Packets sent.
    pub packets: u64,
    /// Pages sent with data.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
}

/// What query-migrate can show about multifd (Ferry's extension to QEMU's `multifd-bytes`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MultifdReport {
    /// `multifd-compression`.
    pub compression: &'static str,
    /// Page bytes before compression divided by page bytes sent (1.0 without compression).
    pub compression_ratio: f64,
    /// Per channel.
    pub channels: Vec<ChannelReport>,
}

impl MultifdStats {
    /// Zeroed figures for `n` channels.
    pub fn new(n: usize, method: Method) -> Self {
        MultifdStats {
            channels: (0..n).map(|_| ChannelStats::default()).collect(),
            method,
            packet_num: AtomicU64::new(0),
        }
    }

    /// Page bytes before compression divided by page bytes sent.
    pub fn compression_ratio(&self) -> f64 {
        let (raw, data) = self.channels.iter().fold((0u64, 0u64), |(r, d), c| {
            (
                r + c.raw_bytes.load(Ordering::Relaxed),
                d + c.data_bytes.load(Ordering::Relaxed),
            )
        });
        if data == 0 {
            1.0
        } else {
            raw as f64 / data as f64
        }
    }

    /// A snapshot for query-migrate.
    pub fn report(&self) -> MultifdReport {
        MultifdReport {
            compression: self.method.name(),
            compression_ratio: self.compression_ratio(),
            channels: self
                .channels
                .iter()
                .enumerate()
                .map(|(id, c)| ChannelReport {
                    id,
                    bytes: c.bytes.load(Ordering::Relaxed),
                    packets: c.packets.load(Ordering::Relaxed),
                    normal_pages: c.normal_pages.load(Ordering::Relaxed),
                    zero_pages: c.zero_pages.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}
