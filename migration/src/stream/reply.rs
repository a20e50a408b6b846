//! Messages from the destination back to the source (and the source's COMMIT).

use std::io::{Read, Write};

use super::{Result, StreamError};

const MAX_REPLY: usize = 64 << 10;

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
}

const K_LOADED: u8 = 0x4c;
const K_FAILED: u8 = 0xa3;
const K_SWITCHOVER_ACK: u8 = 0x35;
const K_COMMIT: u8 = 0xca;

impl Reply {
    /// Encodes the message: `[kind][0;3][len u32] payload [xxh3-64]`.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, &[u8]) = match self {
            Reply::Loaded => (K_LOADED, &[]),
            Reply::Failed(why) => (K_FAILED, why.as_bytes()),
            Reply::SwitchoverAck => (K_SWITCHOVER_ACK, &[]),
            Reply::Commit => (K_COMMIT, &[]),
        };
        let payload = &payload[..payload.len().min(MAX_REPLY)];
        let mut b = vec![kind, 0, 0, 0];
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        let sum = xxhash_rust::xxh3::xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
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
}
