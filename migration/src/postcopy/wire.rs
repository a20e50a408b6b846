//! Payloads of postcopy's frames: POSTCOPY_LISTEN and POSTCOPY_HELLO (DISCARD carries page
//! ranges, POSTCOPY_RUN nothing).

use crate::stream::StreamError;

/// LISTEN flag: urgent pages travel on a second connection (postcopy-preempt).
pub const LISTEN_PREEMPT: u32 = 1 << 0;
/// LISTEN flag: the source wants RECEIVED acknowledgements (release-ram).
pub const LISTEN_ACK_RECEIVED: u32 = 1 << 1;
const LISTEN_KNOWN: u32 = LISTEN_PREEMPT | LISTEN_ACK_RECEIVED;

/// POSTCOPY_LISTEN: switch to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// This migration's id: a recovery connection and a preempt channel must name it.
    pub id: u64,
    /// `LISTEN_*` bits.
    pub flags: u32,
}

impl Listen {
    /// Bytes of the payload.
    pub const LEN: usize = 16;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// Decodes and checks the payload.
    pub fn decode(b: &[u8]) -> Result<Listen, StreamError> {
        if b.len() != Self::LEN {
            return Err(StreamError::Invalid(format!(
                "POSTCOPY_LISTEN frame of {} bytes",
                b.len()
            )));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        let flags = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if flags & !LISTEN_KNOWN != 0 || b[12..] != [0, 0, 0, 0] {
            return Err(StreamError::Invalid(format!(
                "POSTCOPY_LISTEN with unknown flags {flags:#x}"
            )));
        }
        Ok(Listen {
            id: u64::from_le_bytes(id),
            flags,
        })
    }

    /// Whether urgent pages use a preempt channel.
    pub fn preempt(&self) -> bool {
        self.flags & LISTEN_PREEMPT != 0
    }

    /// Whether the source wants RECEIVED acknowledgements.
    pub fn ack_received(&self) -> bool {
        self.flags & LISTEN_ACK_RECEIVED != 0
    }
}

/// Encodes a POSTCOPY_HELLO payload.
pub fn encode_hello(id: u64) -> [u8; 8] {
    id.to_le_bytes()
}

/// Decodes a POSTCOPY_HELLO payload.
pub fn decode_hello(b: &[u8]) -> Result<u64, StreamError> {
    let b: [u8; 8] = b
        .try_into()
        .map_err(|_| StreamError::Invalid(format!("POSTCOPY_HELLO frame of {} bytes", b.len())))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_round_trips_and_refuses_unknown_bits() {
        let l = Listen {
            id: 0x1122_3344_5566_7788,
            flags: LISTEN_PREEMPT,
        };
        let b = l.encode();
        assert_eq!(Listen::decode(&b).unwrap(), l);
        assert!(Listen::decode(&b).unwrap().preempt());
        assert!(!Listen::decode(&b).unwrap().ack_received());
        let mut bad = b;
        bad[8] = 0x80;
        assert!(Listen::decode(&bad).is_err());
        assert!(Listen::decode(&b[..15]).is_err());
    }

    #[test]
    fn hello_round_trips() {
        assert_eq!(decode_hello(&encode_hello(42)).unwrap(), 42);
        assert!(decode_hello(&[1, 2, 3]).is_err());
    }
}
