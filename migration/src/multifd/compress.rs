//! Per-channel compression contexts: one zlib or zstd context per channel, kept across
//! packets; each packet's data is compressed on its own (so a packet that does not shrink
//! can be sent raw without desynchronising the peer).

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use thiserror::Error;

use super::packet::Method;

/// A compression or decompression failure.
#[derive(Debug, Error)]
pub enum CompressError {
    /// The library could not set up a context.
    #[error("cannot create a {method} context: {source}")]
    Setup {
        /// The method.
        method: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Compressed data that does not decode to exactly the expected pages.
    #[error("corrupt {method} data: {why}")]
    Corrupt {
        /// The method.
        method: &'static str,
        /// What was wrong.
        why: String,
    },
}

enum Ctx {
    None,
    Zlib(Box<Compress>),
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

/// A channel's compressor.
pub struct Compressor {
    ctx: Ctx,
    level: u8,
}

impl Compressor {
    /// A compressor for `method` at `level` (zlib 0-9, zstd 0-20 where 0 is zstd's default).
    pub fn new(method: Method, level: u8) -> Result<Self, CompressError> {
        let ctx = match method {
            Method::None => Ctx::None,
            Method::Zlib => Ctx::Zlib(Box::new(Compress::new(
                Compression::new(u32::from(level.min(9))),
                true,
            ))),
            Method::Zstd => {
                let setup = |source| CompressError::Setup {
                    method: "zstd",
                    source,
                };
                // No content checksum: it would cost 6-9 % of zstd-1's speed and check what
                // the per-page hashes check already (the destination verifies every page it
                // decompresses against the hash of the copy that was compressed).
                let c = zstd::bulk::Compressor::new(i32::from(level)).map_err(setup)?;
                Ctx::Zstd(Box::new(c))
            }
        };
        Ok(Compressor { ctx, level })
    }

    /// Compresses `input` into the start of `out` and returns the compressed length, or
    /// None when the result would not be smaller than `input` (send it raw then). `out` is
    /// grown as needed and never shrunk, so a channel's buffer is zero-filled only once.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        // Room for one byte less than the input: anything that does not fit did not shrink.
        self.compress_within(input, out, input.len().saturating_sub(1))
    }

    /// As [`Compressor::compress`], but accepts any result of at most `room` bytes (legacy
    /// `compress` at level 0 stores pages, which makes them a few bytes larger).
    pub fn compress_within(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        room: usize,
    ) -> Option<usize> {
        if out.len() < room {
            out.resize(room, 0);
        }
        let dst = &mut out[..room];
        match &mut self.ctx {
            Ctx::None => None,
            Ctx::Zlib(c) => {
                c.reset();
                match c.compress(input, dst, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => Some(c.total_out() as usize),
                    _ => {
                        // The stream did not fit. zlib-rs (0.6) keeps output pending across
                        // reset(), which would corrupt the next packet's stream: start over
                        // with a new context (the common, fitting case keeps its context).
                        **c = Compress::new(Compression::new(u32::from(self.level.min(9))), true);
                        None
                    }
                }
            }
            // zstd fails with "destination too small" as soon as the output reaches `room`.
            Ctx::Zstd(c) => match c.compress_to_buffer(input, dst) {
                Ok(n) if n <= room => Some(n),
                _ => None,
            },
        }
    }
}

enum DCtx {
    None,
    Zlib(Box<Decompress>),
    Zstd(Box<zstd::bulk::Decompressor<'static>>),
}

/// A channel's decompressor.
pub struct Decompressor {
    ctx: DCtx,
    method: Method,
}

impl Decompressor {
    /// A decompressor for `method`.
    pub fn new(method: Method) -> Result<Self, CompressError> {
        let ctx = match method {
            Method::None => DCtx::None,
            Method::Zlib => DCtx::Zlib(Box::new(Decompress::new(true))),
            Method::Zstd => DCtx::Zstd(Box::new(zstd::bulk::Decompressor::new().map_err(
                |source| CompressError::Setup {
                    method: "zstd",
                    source,
                },
            )?)),
        };
        Ok(Decompressor { ctx, method })
    }

    fn corrupt(&self, why: impl Into<String>) -> CompressError {
        CompressError::Corrupt {
            method: self.method.name(),
            why: why.into(),
        }
    }

    /// The error for a decompressed page whose bytes do not match the hash the source sent
    /// with it: the data was damaged on the way (the source hashes the copy it compresses).
    pub fn page_mismatch(&self, offset: u64) -> CompressError {
        self.corrupt(format!("the page at {offset:#x} does not match its hash"))
    }

    /// Decompresses `input`, which must decode to exactly `out.len()` bytes, into `out`.
    pub fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), CompressError> {
        let want = out.len();
        match &mut self.ctx {
            DCtx::None => {
                if input.len() != want {
                    return Err(self.corrupt("length mismatch"));
                }
                out.copy_from_slice(input);
                Ok(())
            }
            DCtx::Zlib(d) => {
                d.reset(true);
                let r = d.decompress(input, out, FlushDecompress::Finish);
                let (tin, tout) = (d.total_in(), d.total_out());
                match r {
                    Ok(Status::StreamEnd) if tout == want as u64 && tin == input.len() as u64 => {
                        Ok(())
                    }
                    Ok(Status::StreamEnd) => Err(self.corrupt(format!(
                        "decoded {tout} bytes from {tin} of {} (expected {want})",
                        input.len()
                    ))),
                    Ok(_) => Err(self.corrupt(format!(
                        "the data ends early or decodes to more than {want} bytes"
                    ))),
                    Err(e) => Err(self.corrupt(e.to_string())),
                }
            }
            DCtx::Zstd(d) => match d.decompress_to_buffer(input, out) {
                Ok(n) if n == want => Ok(()),
                Ok(n) => Err(self.corrupt(format!("decoded {n} bytes, expected {want}"))),
                Err(e) => Err(self.corrupt(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text_pages(n: usize) -> Vec<u8> {
        let line = b"the quick brown fox jumps over the lazy dog 0123456789\n";
        line.iter().copied().cycle().take(n * 4096).collect()
    }

    fn random_pages(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n * 4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_data_round_trips_with_each_method() {
        for m in [Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(m, 1).unwrap();
            let mut d = Decompressor::new(m).unwrap();
            let mut out = Vec::new();
            for round in 0..3 {
                let input = text_pages(3 + round);
                let n = c.compress(&input, &mut out).unwrap();
                assert!(n < input.len() / 4, "{m:?}");
                let mut back = vec![0u8; input.len()];
                d.decompress(&out[..n], &mut back).unwrap();
                assert_eq!(back, input);
            }
        }
    }

    #[test]
    fn incompressible_data_is_reported_as_not_shrinking() {
        for m in [Method::None, Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(m, 1).unwrap();
            let mut out = Vec::new();
            assert_eq!(c.compress(&random_pages(4), &mut out), None, "{m:?}");
            // The context still works afterwards.
            if m != Method::None {
                let n = c.compress(&text_pages(1), &mut out).unwrap();
                let mut back = vec![0u8; 4096];
                Decompressor::new(m)
                    .unwrap()
                    .decompress(&out[..n], &mut back)
                    .unwrap();
                assert_eq!(back, text_pages(1));
            }
        }
    }

    #[test]
    fn corrupt_or_wrong_sized_data_is_an_error() {
        for m in [Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(m, 1).unwrap();
            let mut d = Decompressor::new(m).unwrap();
            let input = text_pages(2);
            let mut out = Vec::new();
            let n = c.compress(&input, &mut out).unwrap();
            out.truncate(n);
            let mut back = vec![0u8; input.len()];
            // Too small and too large destinations.
            assert!(d.decompress(&out, &mut back[..4096]).is_err(), "{m:?}");
            let mut big = vec![0u8; input.len() + 4096];
            assert!(d.decompress(&out, &mut big).is_err(), "{m:?}");
            // Truncated and garbage input.
            assert!(d.decompress(&out[..out.len() / 2], &mut back).is_err());
            assert!(d.decompress(&[0xff; 64], &mut back).is_err());
            // Still usable after errors.
            d.decompress(&out, &mut back).unwrap();
            assert_eq!(back, input);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod reuse_tests {
    use super::*;

    /// Pages from real files (compressible, varied): what exposed lost zlib state.
    fn file_pages(skip: usize, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/usr/lib/x86_64-linux-gnu")
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(b) = std::fs::read(entry.path()) {
                out.extend_from_slice(&b);
            }
            if out.len() > (skip + n + 1) * 4096 * 4 {
                break;
            }
        }
        out.resize((skip + n) * 4096 * 4, 7);
        out[skip * 4096..(skip + n) * 4096].to_vec()
    }

    /// A packet that does not fit (sent raw) must not leave anything behind in the context:
    /// zlib-rs keeps pending output across reset(), which corrupted the next packet.
    #[test]
    fn a_packet_after_one_that_did_not_fit_is_still_correct() {
        for method in [Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(method, 1).unwrap();
            let mut buf = Vec::new();
            let mut x = 0x1234_5678_9abc_def0u64;
            for round in 0..20 {
                // Random: deflate gets to the end of its room before the stream ends.
                let a: Vec<u8> = (0..(61 + round % 3) * 4096)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                assert_eq!(c.compress(&a, &mut buf), None, "random data cannot shrink");
                let b = file_pages(round * 11, 60);
                let n = c.compress(&b, &mut buf).expect("file pages shrink");
                let mut back = vec![0u8; b.len()];
                Decompressor::new(method)
                    .unwrap()
                    .decompress(&buf[..n], &mut back)
                    .unwrap_or_else(|e| panic!("{method:?} round {round}: {e}"));
                assert!(back == b, "{method:?} round {round}: wrong bytes");
            }
        }
    }

    #[test]
    fn one_context_compresses_many_different_packets_correctly() {
        for method in [Method::Zlib, Method::Zstd] {
            let mut c = Compressor::new(method, 1).unwrap();
            let mut d = Decompressor::new(method).unwrap();
            let mut buf = Vec::new();
            for i in 0..40 {
                let input = file_pages(i * 37, 1 + (i % 128));
                let mut back = vec![0u8; input.len()];
                // A packet that does not fit is sent raw; the next must still be right.
                if let Some(n) = c.compress(&input, &mut buf) {
                    assert!(n < input.len());
                    d.decompress(&buf[..n], &mut back)
                        .unwrap_or_else(|e| panic!("{method:?} packet {i}: {e}"));
                    assert!(back == input, "{method:?} packet {i} differs");
                }
            }
        }
    }
}
