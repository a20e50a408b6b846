//! Frames: `[type u8][flags u8][reserved u16][len u32] payload [xxh3-64]`.

use std::io::{Read, Write};

use xxhash_rust::xxh3::Xxh3;

use super::{Result, StreamError};

/// Largest payload a frame may carry (a reader refuses bigger lengths).
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;
/// Payload size at which a RAM frame is sent (a batch of pages).
pub const RAM_FRAME_TARGET: usize = 256 << 10;
/// Bytes of frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Bytes of frame trailer (checksum).
pub const FRAME_TRAILER_LEN: usize = 8;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// RAM records.
    Ram = 1,
    /// End of a pass over memory: u64 pass number.
    PassEnd = 2,
    /// vCPU, VM and device state.
    State = 3,
    /// End of the stream: u64 pages received expected, u64 reserved.
    End = 4,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Ram),
            2 => Some(FrameKind::PassEnd),
            3 => Some(FrameKind::State),
            4 => Some(FrameKind::End),
            _ => None,
        }
    }
}

/// Builds frames in a buffer and writes them whole.
pub struct FrameWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
    open: Option<FrameKind>,
    written: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `w`.
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            buf: Vec::with_capacity(RAM_FRAME_TARGET + 2 * 4096 + 64),
            open: None,
            written: 0,
        }
    }

    /// Bytes written to the transport so far (frames only).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Adds `n` to the byte count (for data written around the frames, like the header).
    pub fn count_extra(&mut self, n: u64) {
        self.written += n;
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// The transport, consuming the writer (the open frame, if any, is discarded).
    pub fn into_inner(self) -> W {
        self.w
    }

    fn open(&mut self, kind: FrameKind) -> Result<()> {
        if self.open != Some(kind) {
            self.finish()?;
            self.buf.clear();
            self.buf
                .extend_from_slice(&[kind as u8, 0, 0, 0, 0, 0, 0, 0]);
            self.open = Some(kind);
        }
        Ok(())
    }

    /// Payload bytes in the open frame.
    pub fn pending(&self) -> usize {
        self.buf.len().saturating_sub(FRAME_HEADER_LEN)
    }

    /// Appends raw payload bytes to an open frame of `kind` (opening one if needed).
    pub fn append(&mut self, kind: FrameKind, bytes: &[u8]) -> Result<()> {
        self.open(kind)?;
        if self.pending() + bytes.len() > MAX_FRAME_PAYLOAD {
            return Err(StreamError::Invalid("frame payload too large".into()));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Appends a RAM record word followed by `data`, sending the frame once it is big enough.
    pub fn ram_record(&mut self, word: u64, data: &[&[u8]]) -> Result<()> {
        self.open(FrameKind::Ram)?;
        self.buf.extend_from_slice(&word.to_le_bytes());
        for d in data {
            self.buf.extend_from_slice(d);
        }
        if self.pending() >= RAM_FRAME_TARGET {
            self.finish()?;
        }
        Ok(())
    }

    /// Finishes and sends the open frame, if any.
    pub fn finish(&mut self) -> Result<()> {
        if self.open.take().is_none() {
            return Ok(());
        }
        let len = (self.buf.len() - FRAME_HEADER_LEN) as u32;
        self.buf[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&self.buf);
        self.buf.extend_from_slice(&sum.to_le_bytes());
        self.w.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Sends one whole frame of `kind` with `payload` (finishing any open frame first).
    pub fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        self.finish()?;
        if payload.len() > MAX_FRAME_PAYLOAD {
            return Err(StreamError::Invalid(format!(
                "{kind:?} frame of {} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte limit",
                payload.len()
            )));
        }
        let mut head = [0u8; FRAME_HEADER_LEN];
        head[0] = kind as u8;
        head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = Xxh3::new();
        h.update(&head);
        h.update(payload);
        self.w.write_all(&head)?;
        self.w.write_all(payload)?;
        self.w.write_all(&h.digest().to_le_bytes())?;
        self.written += (FRAME_HEADER_LEN + payload.len() + FRAME_TRAILER_LEN) as u64;
        Ok(())
    }

    /// Finishes the open frame and flushes the transport.
    pub fn flush(&mut self) -> Result<()> {
        self.finish()?;
        self.w.flush()?;
        Ok(())
    }
}

/// Reads frames and checks them.
pub struct FrameReader<R: Read> {
    r: R,
    buf: Vec<u8>,
    read: u64,
}

fn eof_as_truncated(e: std::io::Error, what: &'static str) -> StreamError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StreamError::Truncated(what)
    } else {
        StreamError::Io(e)
    }
}

impl<R: Read> FrameReader<R> {
    /// A reader over `r`.
    pub fn new(r: R) -> Self {
        FrameReader {
            r,
            buf: Vec::new(),
            read: 0,
        }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Bytes of frames read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Reads the next frame; returns its kind and checked payload.
    pub fn next_frame(&mut self) -> Result<(FrameKind, &[u8])> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        self.r
            .read_exact(&mut head)
            .map_err(|e| eof_as_truncated(e, "before the end of the stream"))?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(StreamError::Invalid(format!(
                "frame length {len} exceeds the {MAX_FRAME_PAYLOAD}-byte limit"
            )));
        }
        self.buf.resize(len + FRAME_TRAILER_LEN, 0);
        self.r
            .read_exact(&mut self.buf)
            .map_err(|e| eof_as_truncated(e, "inside a frame"))?;
        let (payload, trailer) = self.buf.split_at(len);
        let mut h = Xxh3::new();
        h.update(&head);
        h.update(payload);
        let mut t = [0u8; 8];
        t.copy_from_slice(trailer);
        if h.digest() != u64::from_le_bytes(t) {
            return Err(StreamError::Checksum("a frame"));
        }
        let kind = FrameKind::from_u8(head[0])
            .ok_or_else(|| StreamError::Invalid(format!("unknown frame type {}", head[0])))?;
        if head[1] != 0 || head[2] != 0 || head[3] != 0 {
            return Err(StreamError::Invalid(
                "reserved frame header bits set".into(),
            ));
        }
        self.read += (FRAME_HEADER_LEN + len + FRAME_TRAILER_LEN) as u64;
        Ok((kind, &self.buf[..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_stream() -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        w.ram_record(0x1000 | 0x8, &[&[0xab; 4096]]).unwrap();
        w.ram_record(0x3000 | 0x2, &[&3u32.to_le_bytes()]).unwrap();
        w.frame(FrameKind::PassEnd, &1u64.to_le_bytes()).unwrap();
        w.frame(FrameKind::State, b"{\"x\":1}").unwrap();
        w.flush().unwrap();
        w.into_inner()
    }

    #[test]
    fn frames_round_trip() {
        let s = sample_stream();
        let mut r = FrameReader::new(&s[..]);
        let (k, p) = r.next_frame().unwrap();
        assert_eq!(k, FrameKind::Ram);
        assert_eq!(p.len(), 8 + 4096 + 8 + 4);
        assert_eq!(r.next_frame().unwrap().0, FrameKind::PassEnd);
        let (k, p) = r.next_frame().unwrap();
        assert_eq!((k, p), (FrameKind::State, &b"{\"x\":1}"[..]));
        assert!(matches!(r.next_frame(), Err(StreamError::Truncated(_))));
        assert_eq!(r.bytes_read(), s.len() as u64);
    }

    #[test]
    fn any_flipped_byte_fails_the_stream() {
        let s = sample_stream();
        for pos in (0..s.len()).step_by(7) {
            let mut bad = s.clone();
            bad[pos] ^= 0x40;
            let mut r = FrameReader::new(&bad[..]);
            let mut failed = false;
            for _ in 0..3 {
                if r.next_frame().is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed, "flip at {pos} went unnoticed");
        }
    }

    #[test]
    fn truncation_anywhere_is_reported() {
        let s = sample_stream();
        for cut in [1, 7, 8, 100, s.len() - 1] {
            let mut r = FrameReader::new(&s[..cut]);
            let res = (0..3).try_for_each(|_| r.next_frame().map(|_| ()));
            assert!(
                matches!(res, Err(StreamError::Truncated(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut s = vec![1u8, 0, 0, 0];
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&s[..]);
        assert!(matches!(r.next_frame(), Err(StreamError::Invalid(_))));
    }
}
