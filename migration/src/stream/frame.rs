//! Frames: `[type u8][flags u8][reserved u16][len u32] payload [xxh3-64]`, except RAM
//! frames, whose checksum covers their directory only (see [`super::ram`]).

use std::io::{self, IoSlice, Read, Write};

use xxhash_rust::xxh3::Xxh3;

use super::ram::{RamDirectory, RamEntry, ENTRY_LEN, MAX_DATA, MAX_ENTRIES};
use super::{Result, StreamError};

/// Largest payload a frame may carry (a reader refuses bigger lengths).
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;
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
    /// Postcopy: pages the destination must drop and fetch again (page ranges, see
    /// [`super::ranges`]): never sent, or dirtied since they were sent.
    Discard = 5,
    /// Postcopy: switch to postcopy (u64 migration id, u32 flags, u32 reserved); the
    /// destination registers its memory and answers POSTCOPY_READY.
    PostcopyListen = 6,
    /// Postcopy: the source committed; the destination starts the guest (empty).
    PostcopyRun = 7,
    /// Postcopy: first frame of a preempt channel or of a recovery connection (u64 id).
    PostcopyHello = 8,
    /// Nothing (empty): the source is alive but has nothing to send (it waits for
    /// migrate-continue in pre-switchover); readers skip it.
    Keepalive = 9,
    /// Before the first pass: the page ranges that may hold data (see [`super::ranges`]);
    /// every other page reads as zero, so the destination need not allocate it.
    DataRanges = 10,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Ram),
            2 => Some(FrameKind::PassEnd),
            3 => Some(FrameKind::State),
            4 => Some(FrameKind::End),
            5 => Some(FrameKind::Discard),
            6 => Some(FrameKind::PostcopyListen),
            7 => Some(FrameKind::PostcopyRun),
            8 => Some(FrameKind::PostcopyHello),
            9 => Some(FrameKind::Keepalive),
            10 => Some(FrameKind::DataRanges),
            _ => None,
        }
    }
}

/// Writes frames.
pub struct FrameWriter<W: Write> {
    w: W,
    dir: Vec<u8>,
    written: u64,
}

/// Writes every byte of `bufs` with as few syscalls as the transport allows.
pub fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `w`.
    pub fn new(w: W) -> Self {
        FrameWriter {
            w,
            dir: Vec::with_capacity(16 + MAX_ENTRIES * ENTRY_LEN + 8),
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

    /// The transport, to look at.
    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// The transport, consuming the writer.
    pub fn into_inner(self) -> W {
        self.w
    }

    /// Sends a RAM frame: `entries` and the data area `data` (in entry order).
    pub fn ram_frame(&mut self, entries: &[RamEntry], data: &[&[u8]]) -> Result<()> {
        let data_len: usize = data.iter().map(|d| d.len()).sum();
        if entries.len() > MAX_ENTRIES || data_len > MAX_DATA || data.len() >= 1023 {
            return Err(StreamError::Invalid("RAM frame too large".into()));
        }
        let len = 8 + entries.len() * ENTRY_LEN + FRAME_TRAILER_LEN + data_len;
        self.dir.clear();
        self.dir.extend_from_slice(&[FrameKind::Ram as u8, 0, 0, 0]);
        self.dir.extend_from_slice(&(len as u32).to_le_bytes());
        self.dir
            .extend_from_slice(&(entries.len() as u32).to_le_bytes());
        self.dir.extend_from_slice(&(data_len as u32).to_le_bytes());
        for e in entries {
            e.encode(&mut self.dir);
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&self.dir);
        self.dir.extend_from_slice(&sum.to_le_bytes());
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(data.len() + 1);
        slices.push(IoSlice::new(&self.dir));
        slices.extend(data.iter().map(|d| IoSlice::new(d)));
        write_all_vectored(&mut self.w, &mut slices)?;
        self.written += (FRAME_HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Sends one whole frame of `kind` with `payload`.
    pub fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
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
        let sum = h.digest().to_le_bytes();
        write_all_vectored(
            &mut self.w,
            &mut [
                IoSlice::new(&head),
                IoSlice::new(payload),
                IoSlice::new(&sum),
            ],
        )?;
        self.written += (FRAME_HEADER_LEN + payload.len() + FRAME_TRAILER_LEN) as u64;
        Ok(())
    }

    /// Flushes the transport.
    pub fn flush(&mut self) -> Result<()> {
        self.w.flush()?;
        Ok(())
    }
}

/// A byte source that can scatter into guest memory directly.
pub trait StreamSource: Read {
    /// Reads into the buffers described by `iov` (raw pointers), like readv(2); returns
    /// the bytes read (0 at end of stream).
    ///
    /// # Safety
    /// Every `iov` entry must describe writable memory that no Rust reference aliases
    /// while this call runs.
    unsafe fn read_iov(&mut self, iov: &mut [libc::iovec]) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut tmp = vec![0u8; total.min(1 << 20)];
        let n = self.read(&mut tmp)?;
        let mut done = 0;
        for v in iov.iter() {
            if done == n {
                break;
            }
            let k = v.iov_len.min(n - done);
            // SAFETY: the caller guarantees `v` describes `iov_len` writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(tmp[done..].as_ptr(), v.iov_base.cast(), k) };
            done += k;
        }
        Ok(n)
    }
}

impl StreamSource for &[u8] {}

/// Reads all of the buffers `iov` describes (looping over short reads).
///
/// # Safety
/// As [`StreamSource::read_iov`].
pub unsafe fn read_iov_exact<R: StreamSource>(
    r: &mut R,
    mut iov: &mut [libc::iovec],
) -> io::Result<()> {
    while !iov.is_empty() {
        // SAFETY: forwarded from the caller.
        let n = match unsafe { r.read_iov(iov) } {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            let first = &mut iov[0];
            if left >= first.iov_len {
                left -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing within the same buffer by fewer than iov_len bytes.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left).cast() };
                first.iov_len -= left;
                left = 0;
            }
        }
        while iov.first().is_some_and(|v| v.iov_len == 0) {
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

/// A frame as read: RAM frames give their checked directory (the data follows in the
/// stream, see [`FrameReader::read_ram_data`]); other frames their checked payload.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A RAM frame's directory.
    Ram(RamDirectory),
    /// Any other frame.
    Other(FrameKind, &'a [u8]),
}

/// Reads frames and checks them.
pub struct FrameReader<R: StreamSource> {
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

/// Checks that `trailer` is the xxh3-64 of `parts` in order; `what` names the frame part.
fn check_trailer(parts: &[&[u8]], trailer: &[u8], what: &'static str) -> Result<()> {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(p);
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(trailer);
    if h.digest() != u64::from_le_bytes(t) {
        return Err(StreamError::Checksum(what));
    }
    Ok(())
}

impl<R: StreamSource> FrameReader<R> {
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

    /// The same reader over `f(transport)` (frames read so far stay counted).
    pub fn map_source<S: StreamSource>(self, f: impl FnOnce(R) -> S) -> FrameReader<S> {
        FrameReader {
            r: f(self.r),
            buf: self.buf,
            read: self.read,
        }
    }

    /// Bytes of frames read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    fn read_exact(&mut self, n: usize, what: &'static str) -> Result<()> {
        self.buf.resize(n, 0);
        self.r
            .read_exact(&mut self.buf)
            .map_err(|e| eof_as_truncated(e, what))?;
        Ok(())
    }

    /// Reads the next frame (a RAM frame's data must then be read with
    /// [`FrameReader::read_ram_data`] before the next call); keepalive frames are checked
    /// and skipped.
    pub fn next(&mut self, ram_size: u64) -> Result<Frame<'_>> {
        let (head, kind, len) = loop {
            let (head, kind, len) = self.read_head()?;
            if kind != FrameKind::Keepalive {
                break (head, kind, len);
            }
            self.read_payload(&head, len)?;
        };
        if kind == FrameKind::Ram {
            return self.read_ram_directory(&head, len, ram_size);
        }
        self.read_payload(&head, len)?;
        Ok(Frame::Other(kind, &self.buf[..len]))
    }

    /// Reads and checks a frame header: the header, the frame's kind and its length.
    fn read_head(&mut self) -> Result<([u8; FRAME_HEADER_LEN], FrameKind, usize)> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        self.r
            .read_exact(&mut head)
            .map_err(|e| eof_as_truncated(e, "before the end of the stream"))?;
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let kind = FrameKind::from_u8(head[0])
            .ok_or_else(|| StreamError::Invalid(format!("unknown frame type {}", head[0])))?;
        if head[1] != 0 || head[2] != 0 || head[3] != 0 {
            return Err(StreamError::Invalid(
                "reserved frame header bits set".into(),
            ));
        }
        Ok((head, kind, len))
    }

    /// Reads the `len`-byte payload of a frame other than RAM into `self.buf[..len]` and
    /// checks its trailer.
    fn read_payload(&mut self, head: &[u8; FRAME_HEADER_LEN], len: usize) -> Result<()> {
        if len > MAX_FRAME_PAYLOAD {
            return Err(StreamError::Invalid(format!(
                "frame length {len} exceeds the {MAX_FRAME_PAYLOAD}-byte limit"
            )));
        }
        self.read_exact(len + FRAME_TRAILER_LEN, "inside a frame")?;
        let (payload, trailer) = self.buf.split_at(len);
        check_trailer(&[head, payload], trailer, "a frame")?;
        self.read += (FRAME_HEADER_LEN + len + FRAME_TRAILER_LEN) as u64;
        Ok(())
    }

    /// Reads and checks a RAM frame's counts and directory (its data follows).
    fn read_ram_directory(
        &mut self,
        head: &[u8; FRAME_HEADER_LEN],
        len: usize,
        ram_size: u64,
    ) -> Result<Frame<'_>> {
        self.read_exact(8, "in a RAM frame")?;
        let mut counts = [0u8; 8];
        counts.copy_from_slice(&self.buf[..8]);
        let count = u32::from_le_bytes([counts[0], counts[1], counts[2], counts[3]]) as usize;
        let data_len = u32::from_le_bytes([counts[4], counts[5], counts[6], counts[7]]) as usize;
        if count > MAX_ENTRIES || data_len > MAX_DATA {
            return Err(StreamError::Invalid(format!(
                "RAM frame of {count} entries and {data_len} data bytes exceeds the limits"
            )));
        }
        if len != 8 + count * ENTRY_LEN + FRAME_TRAILER_LEN + data_len {
            return Err(StreamError::Invalid(
                "RAM frame length does not match its counts".into(),
            ));
        }
        self.read_exact(count * ENTRY_LEN + FRAME_TRAILER_LEN, "in a RAM directory")?;
        let (entries, trailer) = self.buf.split_at(count * ENTRY_LEN);
        check_trailer(&[head, &counts, entries], trailer, "a RAM frame directory")?;
        let dir = RamDirectory::decode(entries, count, data_len, ram_size)?;
        self.read += (FRAME_HEADER_LEN + len - data_len) as u64;
        Ok(Frame::Ram(dir))
    }

    /// Reads a RAM frame's data area into the buffers `iov` describes (their lengths
    /// must add up to the directory's `data_len`).
    ///
    /// # Safety
    /// Every `iov` entry must describe writable memory that no Rust reference aliases.
    pub unsafe fn read_ram_data(&mut self, iov: &mut [libc::iovec]) -> Result<()> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: forwarded from the caller.
        unsafe { read_iov_exact(&mut self.r, iov) }
            .map_err(|e| eof_as_truncated(e, "inside RAM data"))?;
        self.read += total as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::ram::RamRecord;

    fn page_hash(p: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(p)
    }

    fn sample_stream() -> Vec<u8> {
        let page = [0xabu8; 4096];
        let mut w = FrameWriter::new(Vec::new());
        let entries = [
            RamRecord::Page {
                offset: 0x1000,
                hash: page_hash(&page),
            }
            .entry(),
            RamRecord::Zero {
                offset: 0x3000,
                count: 3,
            }
            .entry(),
        ];
        w.ram_frame(&entries, &[&page]).unwrap();
        w.frame(FrameKind::PassEnd, &1u64.to_le_bytes()).unwrap();
        w.frame(FrameKind::State, b"{\"x\":1}").unwrap();
        w.flush().unwrap();
        w.into_inner()
    }

    /// Reads the whole sample, placing RAM data in `mem`; returns the frames' kinds.
    fn read_all(s: &[u8], mem: &mut [u8]) -> Result<Vec<FrameKind>> {
        let mut r = FrameReader::new(s);
        let mut kinds = Vec::new();
        loop {
            match r.next(1 << 20)? {
                Frame::Ram(dir) => {
                    kinds.push(FrameKind::Ram);
                    let mut iov: Vec<libc::iovec> = dir
                        .records
                        .iter()
                        .filter_map(|rec| match rec {
                            RamRecord::Page { offset, .. } => Some(libc::iovec {
                                iov_base: mem[*offset as usize..].as_mut_ptr().cast(),
                                iov_len: 4096,
                            }),
                            _ => None,
                        })
                        .collect();
                    // SAFETY: the iovecs point into `mem`, which nothing else borrows here.
                    unsafe { r.read_ram_data(&mut iov)? };
                }
                Frame::Other(k, _) => {
                    kinds.push(k);
                    if k == FrameKind::State {
                        return Ok(kinds);
                    }
                }
            }
        }
    }

    #[test]
    fn frames_round_trip_and_ram_data_lands_in_place() {
        let s = sample_stream();
        let mut mem = vec![0u8; 1 << 16];
        let kinds = read_all(&s, &mut mem).unwrap();
        assert_eq!(
            kinds,
            [FrameKind::Ram, FrameKind::PassEnd, FrameKind::State]
        );
        assert!(mem[0x1000..0x2000].iter().all(|&b| b == 0xab));
        assert!(mem[..0x1000].iter().all(|&b| b == 0));
    }

    #[test]
    fn any_flipped_byte_outside_page_data_fails_the_stream() {
        let s = sample_stream();
        // The RAM frame: 8 header + 8 counts + 2 entries + 8 checksum, then 4096 page bytes.
        let data_start = 8 + 8 + 2 * ENTRY_LEN + 8;
        let data_end = data_start + 4096;
        for pos in (0..s.len()).filter(|p| !(data_start..data_end).contains(p)) {
            let mut bad = s.clone();
            bad[pos] ^= 0x40;
            let mut mem = vec![0u8; 1 << 16];
            assert!(
                read_all(&bad, &mut mem).is_err(),
                "flip at {pos} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_anywhere_is_reported() {
        let s = sample_stream();
        for cut in [1, 7, 8, 20, 100, s.len() / 2, s.len() - 1] {
            let mut mem = vec![0u8; 1 << 16];
            let res = read_all(&s[..cut], &mut mem);
            assert!(
                matches!(res, Err(StreamError::Truncated(_))),
                "cut at {cut}: {res:?}"
            );
        }
    }

    #[test]
    fn oversized_lengths_are_refused_without_allocating() {
        let mut s = vec![3u8, 0, 0, 0];
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&s[..]);
        assert!(matches!(r.next(1 << 20), Err(StreamError::Invalid(_))));
        let mut s = vec![1u8, 0, 0, 0];
        s.extend_from_slice(&100u32.to_le_bytes());
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        s.extend_from_slice(&0u32.to_le_bytes());
        let mut r = FrameReader::new(&s[..]);
        assert!(matches!(r.next(1 << 20), Err(StreamError::Invalid(_))));
    }
}
