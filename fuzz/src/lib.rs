//! Shared pieces of the fuzz targets: the guest RAM they load into, and "resealing":
//! recomputing the xxh3 checksums a mutated input broke, so that libFuzzer's mutations
//! reach the parsers behind the checksums instead of stopping at them.
//!
//! Every target that reseals reads a control byte first: bit 0 clear means "reseal"
//! (the common case), set means "feed the bytes as they are" (the checksum checks
//! themselves stay fuzzed).

use std::io::{self, Read};
use std::sync::{Arc, OnceLock};

use migration::dest::loader::LoadProgress;
use migration::stream::frame::StreamSource;
use migration::stream::header::Header;
use ram::{Backend, GuestRam, HugePages, MemoryConfig};
use xxhash_rust::xxh3::xxh3_64;

/// Guest RAM size of every target (the seed streams are from 4 MiB guests).
pub const RAM_SIZE: u64 = 4 << 20;

const HEADER_LEN: usize = 64;
const FRAME_HEADER_LEN: usize = 8;
const RAM_FRAME: u8 = 1;
const RAM_ENTRY_LEN: usize = 24;
const MULTIFD_HANDSHAKE_LEN: usize = 64;
const MULTIFD_HEADER_LEN: usize = 48;

/// The guest RAM shared by every run of a target (4 MiB, anonymous, real mapping).
pub fn ram() -> Arc<GuestRam> {
    static RAM: OnceLock<Arc<GuestRam>> = OnceLock::new();
    RAM.get_or_init(|| {
        Arc::new(
            GuestRam::new(&MemoryConfig {
                size: RAM_SIZE,
                backend: Backend::AnonymousPrivate,
                hugepages: HugePages::None,
                prealloc: false,
            })
            .expect("guest RAM"),
        )
    })
    .clone()
}

/// A load's progress callbacks: passes ignored; the DATA_RANGES a destination would populate
/// ahead must be what the populate can take (inside RAM, ascending, disjoint: at most RAM's
/// pages in all, however long the frame) — a panic here is a finding.
pub struct CheckedProgress {
    /// Pages of guest RAM.
    pub pages: u64,
}

impl LoadProgress for CheckedProgress {
    fn pass_end(&mut self, _pass: u64) -> migration::error::Result<()> {
        Ok(())
    }

    fn data_ranges(
        &mut self,
        ranges: &[migration::stream::ranges::PageRange],
    ) -> migration::error::Result<()> {
        let mut next = 0u64;
        for r in ranges {
            assert!(
                r.count > 0 && r.within(self.pages),
                "range {r:?} outside RAM"
            );
            assert!(
                r.first >= next,
                "range {r:?} overlaps or precedes the one before"
            );
            next = r.first + r.count;
        }
        Ok(())
    }
}

/// A stream read from memory that scatters straight into the reader's buffers, as a
/// socket's readv does (the trait's default for `&[u8]` stages every read in a zeroed
/// buffer of up to 1 MiB, which costs more than the parsing being fuzzed).
pub struct SliceSource<'a>(pub &'a [u8]);

impl Read for SliceSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl StreamSource for SliceSource<'_> {
    unsafe fn read_iov(&mut self, iov: &mut [libc::iovec]) -> io::Result<usize> {
        let mut done = 0;
        for v in iov.iter() {
            let k = v.iov_len.min(self.0.len());
            // SAFETY: the caller guarantees `v` describes `iov_len` writable bytes that no
            // reference aliases; `k` is at most that, and at most what is left of the input.
            unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr(), v.iov_base.cast(), k) };
            self.0 = &self.0[k..];
            done += k;
            if k < v.iov_len {
                break;
            }
        }
        Ok(done)
    }
}

/// A migration-stream input: the control byte off, resealed unless it says otherwise, its
/// header parsed. Returns the header and the bytes after it (None: no header there).
pub fn stream_input(data: &[u8]) -> Option<(Header, Vec<u8>)> {
    let (reseal, rest) = control(data)?;
    let mut buf = rest.to_vec();
    if reseal {
        reseal_stream(&mut buf);
    }
    let mut input = &buf[..];
    let header = Header::read_from(&mut input).ok()?;
    let consumed = buf.len() - input.len();
    buf.drain(..consumed);
    Some((header, buf))
}

/// Splits the control byte off an input: `(reseal, rest)`.
pub fn control(data: &[u8]) -> Option<(bool, &[u8])> {
    let (&ctl, rest) = data.split_first()?;
    Some((ctl & 1 == 0, rest))
}

fn u32_at(b: &[u8], o: usize) -> Option<u64> {
    let s = b.get(o..o.checked_add(4)?)?;
    Some(u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
}

/// Writes `xxh3(b[from..to])` at `b[to..to + 8]`; false when `b` is too short.
fn seal(b: &mut [u8], from: usize, to: usize) -> bool {
    let Some(end) = to.checked_add(8) else {
        return false;
    };
    if from > to || end > b.len() {
        return false;
    }
    let sum = xxh3_64(&b[from..to]);
    b[to..end].copy_from_slice(&sum.to_le_bytes());
    true
}

/// Reseals a migration stream: the 64-byte header, then every frame (a RAM frame's
/// checksum covers its header and directory; any other frame's its header and payload).
pub fn reseal_stream(b: &mut [u8]) {
    if !seal(b, 0, HEADER_LEN - 8) {
        return;
    }
    let mut pos = HEADER_LEN;
    while pos + FRAME_HEADER_LEN <= b.len() {
        let Some(len) = u32_at(b, pos + 4) else {
            return;
        };
        let next = if b[pos] == RAM_FRAME {
            let (Some(count), Some(data_len)) = (u32_at(b, pos + 8), u32_at(b, pos + 12)) else {
                return;
            };
            let dir_end = pos as u64 + 16 + count * RAM_ENTRY_LEN as u64;
            let Ok(dir_end) = usize::try_from(dir_end) else {
                return;
            };
            if !seal(b, pos, dir_end) {
                return;
            }
            dir_end as u64 + 8 + data_len
        } else {
            let end = pos as u64 + FRAME_HEADER_LEN as u64 + len;
            let Ok(end) = usize::try_from(end) else {
                return;
            };
            if !seal(b, pos, end) {
                return;
            }
            end as u64 + 8
        };
        match usize::try_from(next) {
            Ok(n) => pos = n,
            Err(_) => return,
        }
    }
}

/// Reseals a multifd channel: the 64-byte handshake, then every packet (the checksum
/// after the offsets and hashes covers the fixed header and them; the data area follows).
pub fn reseal_multifd(b: &mut [u8]) {
    if !seal(b, 0, MULTIFD_HANDSHAKE_LEN - 8) {
        return;
    }
    let mut pos = MULTIFD_HANDSHAKE_LEN;
    while pos + MULTIFD_HEADER_LEN <= b.len() {
        let (Some(normal), Some(size), Some(zero)) = (
            u32_at(b, pos + 16),
            u32_at(b, pos + 20),
            u32_at(b, pos + 32),
        ) else {
            return;
        };
        let sum_at = pos as u64 + MULTIFD_HEADER_LEN as u64 + (normal * 2 + zero) * 8;
        let Ok(sum_at) = usize::try_from(sum_at) else {
            return;
        };
        if !seal(b, pos, sum_at) {
            return;
        }
        match usize::try_from(sum_at as u64 + 8 + size) {
            Ok(n) => pos = n,
            Err(_) => return,
        }
    }
}
