//! Messages from the destination back to the source (and the source's COMMIT).
//!
//! Postcopy adds page traffic in this direction: PAGE_REQUEST (pages a vCPU or device
//! faulted on), RECEIVED (pages placed, for `release-ram`), NEED (pages the destination
//! still lacks: its suspect pages at the switch, everything missing on recovery),
//! POSTCOPY_READY, RESUME_READY and POSTCOPY_DONE (see [`crate::postcopy`]). Range lists
//! use [`super::ranges`]' encoding; one message carries at most [`MAX_RANGES`] ranges.

use std::io::{Read, Write};

use super::ranges::{decode_ranges, encode_ranges, PageRange, RANGE_LEN};
use super::{Result, StreamError};

const MAX_REPLY: usize = 64 << 10;
/// Most page ranges one message carries (longer lists go in several messages).
pub const MAX_RANGES: usize = (MAX_REPLY / RANGE_LEN) - 1;

/// A message on the reply channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The destination loaded everything and waits for COMMIT.
    Loaded,
    /// The destination failed; the reason follows.
    Failed(String),
    /// The destination is ready for switchover (switchover-ack).
    SwitchoverAck,
    /// Source to destination: start the guest.
    Commit,
    /// Postcopy: send these pages first (a thread is blocked on them).
    PageRequest(Vec<PageRange>),
    /// Postcopy: these pages are in place (the source may release them).
    Received(Vec<PageRange>),
    /// Postcopy: the destination still lacks these pages (add them to what is to be sent).
    Need(Vec<PageRange>),
    /// Postcopy: memory registered and state loaded; the source may commit (RUN).
    PostcopyReady,
    /// Postcopy recovery: the NEED list is complete; `started` says whether the guest
    /// already runs here (RUN arrived before the link broke).
    ResumeReady {
        /// Whether RUN had arrived.
        started: bool,
    },
    /// Postcopy: every page is in place; the migration is complete.
    PostcopyDone,
}

const K_LOADED: u8 = 0x4c;
const K_FAILED: u8 = 0xa3;
const K_SWITCHOVER_ACK: u8 = 0x35;
const K_COMMIT: u8 = 0xca;
const K_PAGE_REQUEST: u8 = 0x52;
const K_RECEIVED: u8 = 0x41;
const K_NEED: u8 = 0x4e;
const K_POSTCOPY_READY: u8 = 0x50;
const K_RESUME_READY: u8 = 0x55;
const K_POSTCOPY_DONE: u8 = 0x44;

impl Reply {
    /// Encodes the message: `[kind][0;3][len u32] payload [xxh3-64]`.
    pub fn encode(&self) -> Vec<u8> {
        let ranges = |rs: &[PageRange]| {
            let mut b = Vec::new();
            encode_ranges(&rs[..rs.len().min(MAX_RANGES)], &mut b);
            b
        };
        let (kind, payload): (u8, Vec<u8>) = match self {
            Reply::Loaded => (K_LOADED, Vec::new()),
            Reply::Failed(why) => (K_FAILED, why.as_bytes().to_vec()),
            Reply::SwitchoverAck => (K_SWITCHOVER_ACK, Vec::new()),
            Reply::Commit => (K_COMMIT, Vec::new()),
            Reply::PageRequest(rs) => (K_PAGE_REQUEST, ranges(rs)),
            Reply::Received(rs) => (K_RECEIVED, ranges(rs)),
            Reply::Need(rs) => (K_NEED, ranges(rs)),
            Reply::PostcopyReady => (K_POSTCOPY_READY, Vec::new()),
            Reply::ResumeReady { started } => (K_RESUME_READY, vec![u8::from(*started)]),
            Reply::PostcopyDone => (K_POSTCOPY_DONE, Vec::new()),
        };
        let payload = &payload[..payload.len().min(MAX_REPLY)];
        let mut b = vec![kind, 0, 0, 0];
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Splits a long range list into messages of at most [`MAX_RANGES`] ranges each, made
    /// by `make` (e.g. `Reply::Need`); an empty list gives no message.
    pub fn chunked(ranges: &[PageRange], make: fn(Vec<PageRange>) -> Reply) -> Vec<Reply> {
        ranges
            .chunks(MAX_RANGES)
            .map(|c| make(c.to_vec()))
            .collect()
    }

    /// Writes the message and flushes.
    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        w.write_all(&self.encode())?;
        w.flush()?;
        Ok(())
    }

    /// Reads one message.
    pub fn read_from(r: &mut impl Read) -> Result<Reply> {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StreamError::Truncated("the peer closed the connection")
            } else {
                StreamError::Io(e)
            }
        })?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_REPLY || head[1..4] != [0, 0, 0] {
            return Err(StreamError::Invalid("malformed reply message".into()));
        }
        let mut rest = vec![0u8; len + 8];
        r.read_exact(&mut rest)
            .map_err(|_| StreamError::Truncated("inside a reply message"))?;
        let (payload, sum) = rest.split_at(len);
        let mut all = head.to_vec();
        all.extend_from_slice(payload);
        let mut s = [0u8; 8];
        s.copy_from_slice(sum);
        if xxhash_rust::xxh3::xxh3_64(&all) != u64::from_le_bytes(s) {
            return Err(StreamError::Checksum("a reply message"));
        }
        match head[0] {
            K_LOADED if len == 0 => Ok(Reply::Loaded),
            K_FAILED => Ok(Reply::Failed(String::from_utf8_lossy(payload).into_owned())),
            K_SWITCHOVER_ACK if len == 0 => Ok(Reply::SwitchoverAck),
            K_COMMIT if len == 0 => Ok(Reply::Commit),
            K_PAGE_REQUEST => Ok(Reply::PageRequest(decode_ranges(payload, u64::MAX)?)),
            K_RECEIVED => Ok(Reply::Received(decode_ranges(payload, u64::MAX)?)),
            K_NEED => Ok(Reply::Need(decode_ranges(payload, u64::MAX)?)),
            K_POSTCOPY_READY if len == 0 => Ok(Reply::PostcopyReady),
            K_RESUME_READY if len == 1 && payload[0] <= 1 => Ok(Reply::ResumeReady {
                started: payload[0] == 1,
            }),
            K_POSTCOPY_DONE if len == 0 => Ok(Reply::PostcopyDone),
            k => Err(StreamError::Invalid(format!(
                "unknown reply message {k:#x}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for m in [
            Reply::Loaded,
            Reply::Failed("no room".into()),
            Reply::SwitchoverAck,
            Reply::Commit,
            Reply::PageRequest(vec![PageRange { first: 3, count: 2 }]),
            Reply::Received(vec![
                PageRange { first: 0, count: 1 },
                PageRange { first: 9, count: 4 },
            ]),
            Reply::Need(Vec::new()),
            Reply::PostcopyReady,
            Reply::ResumeReady { started: true },
            Reply::ResumeReady { started: false },
            Reply::PostcopyDone,
        ] {
            let b = m.encode();
            assert_eq!(Reply::read_from(&mut &b[..]).unwrap(), m);
        }
    }

    #[test]
    fn corruption_and_truncation_are_errors() {
        let b = Reply::Loaded.encode();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(Reply::read_from(&mut &c[..]).is_err(), "flip at {i}");
        }
        assert!(Reply::read_from(&mut &b[..5]).is_err());
    }

    #[test]
    fn long_range_lists_are_split_and_never_exceed_a_message() {
        let rs: Vec<PageRange> = (0..10_000u64)
            .map(|i| PageRange {
                first: i * 2,
                count: 1,
            })
            .collect();
        let msgs = Reply::chunked(&rs, Reply::Need);
        assert_eq!(msgs.len(), 10_000usize.div_ceil(MAX_RANGES));
        let mut back = Vec::new();
        for m in &msgs {
            let b = m.encode();
            assert!(b.len() <= MAX_REPLY + 16);
            match Reply::read_from(&mut &b[..]).unwrap() {
                Reply::Need(r) => back.extend(r),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, rs);
        assert!(Reply::chunked(&[], Reply::Need).is_empty());
    }
}
