//! The reference every throughput figure is a ratio to: plain TCP over the same link, in
//! this process, in the same run.
//!
//! N sender threads each write `bytes / N` from a 1 MiB buffer into their own connection;
//! N receiver threads read into their own pre-faulted 1 MiB buffer and throw the data away.
//! The time runs from the moment every connection is up until the last byte has been
//! read. On a host pair the sender threads enter the first host's network namespace and
//! the receivers the second's (setns), so the reference crosses the same veth link as the
//! migration does. A second, memory-bound reference moves a data-set image mapped as the
//! source guest maps it into fresh or preallocated memory (see [`measure_memory_once`]).

use std::io::{IoSlice, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use migration::stream::frame::{read_iov_exact, write_all_vectored};
use migration::transport::Channel;
use ram::{Backend, GuestRam, HugePages, MemoryConfig, PAGE_SIZE};

use serde::Serialize;

/// Bytes per write and per read.
const BUF: usize = 1 << 20;

/// One reference measurement.
#[derive(Debug, Clone, Serialize)]
pub struct TcpFigure {
    /// Parallel streams.
    pub streams: usize,
    /// Bytes moved (all streams).
    pub bytes: u64,
    /// Best of the runs, GiB/s.
    pub gib_per_s: f64,
    /// Every run, GiB/s.
    pub runs_gib_per_s: Vec<f64>,
}

impl TcpFigure {
    /// The best of `runs` runs of `once` (GiB/s each) with `streams` streams moving `bytes`.
    fn best_of(
        streams: usize,
        bytes: u64,
        runs: usize,
        mut once: impl FnMut() -> std::io::Result<f64>,
    ) -> std::io::Result<TcpFigure> {
        let mut all = Vec::new();
        for _ in 0..runs.max(1) {
            all.push(once()?);
        }
        Ok(TcpFigure {
            streams,
            bytes,
            gib_per_s: all.iter().copied().fold(0.0, f64::max),
            runs_gib_per_s: all,
        })
    }

    /// Every run's figure rounded to two decimals, for text reports.
    pub fn runs_rounded(&self) -> Vec<f64> {
        self.runs_gib_per_s
            .iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect()
    }
}

/// Where the two ends run.
#[derive(Debug, Clone, Default)]
pub struct TcpEnds {
    /// Network namespace of the senders (None: this one).
    pub sender_netns: Option<String>,
    /// Network namespace of the receivers (None: this one).
    pub receiver_netns: Option<String>,
    /// Address the receivers listen on and the senders connect to.
    pub addr: Option<Ipv4Addr>,
}

fn enter_netns(name: &Option<String>) -> std::io::Result<()> {
    let Some(name) = name else { return Ok(()) };
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns with a namespace fd changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `streams` connected pairs (sender end, receiver end) between the two ends.
fn connect(ends: &TcpEnds, streams: usize) -> std::io::Result<Vec<(TcpStream, TcpStream)>> {
    let addr_ip = ends.addr.unwrap_or(Ipv4Addr::LOCALHOST);
    // Listen from inside the receivers' namespace.
    let rx_ns = ends.receiver_netns.clone();
    let listener = std::thread::spawn(move || -> std::io::Result<TcpListener> {
        enter_netns(&rx_ns)?;
        TcpListener::bind(SocketAddr::from((addr_ip, 0)))
    })
    .join()
    .map_err(|_| std::io::Error::other("listener thread panicked"))??;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(streams);
    for _ in 0..streams {
        // The socket is created inside the senders' namespace; once connected it works from
        // any thread. Connecting completes through the listen backlog, before accept.
        let tx_ns = ends.sender_netns.clone();
        let tx = std::thread::spawn(move || -> std::io::Result<TcpStream> {
            enter_netns(&tx_ns)?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .join()
        .map_err(|_| std::io::Error::other("connect thread panicked"))??;
        let (rx, _) = listener.accept()?;
        pairs.push((tx, rx));
    }
    Ok(pairs)
}

/// Moves `bytes` over `streams` parallel connections once; returns GiB/s.
pub fn measure_once(ends: &TcpEnds, streams: usize, bytes: u64) -> std::io::Result<f64> {
    let streams = streams.max(1);
    let per = (bytes / streams as u64).max(BUF as u64);
    let start = Arc::new(Barrier::new(2 * streams + 1));
    let mut handles = Vec::new();
    let mut send_handles = Vec::new();
    for (mut tx, mut rx) in connect(ends, streams)? {
        let b = start.clone();
        handles.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![1u8; BUF];
            b.wait();
            let mut got = 0u64;
            while got < per {
                match rx.read(&mut buf)? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            Ok(got)
        }));
        let b = start.clone();
        send_handles.push(std::thread::spawn(move || -> std::io::Result<()> {
            let buf = vec![0x5au8; BUF];
            b.wait();
            let mut sent = 0u64;
            while sent < per {
                let n = (per - sent).min(BUF as u64) as usize;
                tx.write_all(&buf[..n])?;
                sent += n as u64;
            }
            tx.flush()
        }));
    }
    start.wait();
    let t0 = Instant::now();
    let mut total = 0u64;
    for h in handles {
        total += h
            .join()
            .map_err(|_| std::io::Error::other("receiver thread panicked"))??;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for h in send_handles {
        h.join()
            .map_err(|_| std::io::Error::other("sender thread panicked"))??;
    }
    if total < per * streams as u64 {
        return Err(std::io::Error::other(format!(
            "the reference stream ended early ({total} of {} bytes)",
            per * streams as u64
        )));
    }
    Ok(total as f64 / elapsed.max(1e-9) / (1u64 << 30) as f64)
}

/// Pages per write and per read of [`measure_memory_once`] (a multifd packet's worth).
const MEMORY_CHUNK_PAGES: u64 = 128;

/// The pages `[first, end)` in runs of at most [`MEMORY_CHUNK_PAGES`], in order.
fn memory_chunks(first: u64, end: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
    (first..end)
        .step_by(MEMORY_CHUNK_PAGES as usize)
        .map(move |p| p..(p + MEMORY_CHUNK_PAGES).min(end))
}

/// The memory-bound reference: `streams` connections move `bytes` from the image at `image`
/// mapped MAP_PRIVATE (as a source guest started with `mem-path=IMAGE,share=off` maps it)
/// straight into memfd memory (as the destination's guest memory: fresh, or populated
/// before the clock starts when `prealloc`), each connection a contiguous share of the
/// pages, 128 pages per writev and readv, no headers, no checks. What a migration pays on
/// top of the copy itself, touching every page of the source (and of a fresh destination)
/// for the first time, is in this figure too. Returns GiB/s.
pub fn measure_memory_once(
    ends: &TcpEnds,
    image: &Path,
    bytes: u64,
    streams: usize,
    prealloc: bool,
) -> std::io::Result<f64> {
    let map = |backend, prealloc| {
        GuestRam::new(&MemoryConfig {
            size: bytes,
            backend,
            hugepages: HugePages::None,
            prealloc,
        })
        .map_err(|e| std::io::Error::other(format!("mapping {bytes} bytes: {e}")))
    };
    let source = Arc::new(map(
        Backend::File {
            path: image.to_path_buf(),
            share: false,
        },
        false,
    )?);
    let dest = Arc::new(map(Backend::SharedMemfd, prealloc)?);
    let pages = source.page_count();
    let streams = streams.max(1);
    let share = pages.div_ceil(streams as u64);
    let start = Arc::new(Barrier::new(2 * streams + 1));
    let mut senders = Vec::with_capacity(streams);
    let mut receivers = Vec::with_capacity(streams);
    for (n, (mut tx, rx)) in connect(ends, streams)?.into_iter().enumerate() {
        let (first, end) = (
            (n as u64 * share).min(pages),
            ((n as u64 + 1) * share).min(pages),
        );
        let (b, src) = (start.clone(), source.clone());
        senders.push(std::thread::spawn(move || -> std::io::Result<()> {
            b.wait();
            for chunk in memory_chunks(first, end) {
                let mut iov: Vec<IoSlice<'_>> = chunk
                    .filter_map(|i| src.page(i))
                    .map(IoSlice::new)
                    .collect();
                write_all_vectored(&mut tx, &mut iov)?;
            }
            tx.flush()
        }));
        let (b, dst) = (start.clone(), dest.clone());
        receivers.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut rx = Channel::Tcp(rx);
            b.wait();
            for chunk in memory_chunks(first, end) {
                let mut iov: Vec<libc::iovec> = chunk
                    .filter_map(|i| dst.page_ptr(i))
                    .map(|ptr| libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: PAGE_SIZE,
                    })
                    .collect();
                // SAFETY: every iovec is a page of `dest`, memory this function mapped; this
                // thread is the only one that writes its share of the pages, and nothing
                // reads them until every receiver has been joined.
                unsafe { read_iov_exact(&mut rx, &mut iov) }?;
            }
            Ok(())
        }));
    }
    start.wait();
    let t0 = Instant::now();
    let received: std::io::Result<()> = receivers.into_iter().try_for_each(|h| {
        h.join()
            .map_err(|_| std::io::Error::other("receiver thread panicked"))?
    });
    let elapsed = t0.elapsed().as_secs_f64();
    for h in senders {
        h.join()
            .map_err(|_| std::io::Error::other("sender thread panicked"))??;
    }
    received?;
    // Outside the timing: a sample of the pages arrived intact.
    if let Some(bad) = (0..pages)
        .step_by(61)
        .find(|&i| source.page(i) != dest.page(i))
    {
        return Err(std::io::Error::other(format!(
            "the memory reference moved page {bad} wrongly"
        )));
    }
    Ok((pages * PAGE_SIZE as u64) as f64 / elapsed.max(1e-9) / (1u64 << 30) as f64)
}

/// Best of `runs` runs of [`measure_memory_once`] with `streams` connections.
pub fn measure_memory(
    ends: &TcpEnds,
    image: &Path,
    bytes: u64,
    streams: usize,
    runs: usize,
    prealloc: bool,
) -> std::io::Result<TcpFigure> {
    TcpFigure::best_of(streams.max(1), bytes, runs, || {
        measure_memory_once(ends, image, bytes, streams, prealloc)
    })
}

/// Best of `runs` measurements of `streams` streams moving `bytes` in all.
pub fn measure(
    ends: &TcpEnds,
    streams: usize,
    bytes: u64,
    runs: usize,
) -> std::io::Result<TcpFigure> {
    TcpFigure::best_of(streams, bytes, runs, || measure_once(ends, streams, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_moves_every_byte_on_one_and_several_streams() {
        for streams in [1, 3] {
            let f = measure(&TcpEnds::default(), streams, 24 << 20, 2).unwrap();
            assert_eq!(f.runs_gib_per_s.len(), 2);
            assert!(f.gib_per_s > 0.0 && f.gib_per_s.is_finite(), "{f:?}");
            assert_eq!(f.streams, streams);
        }
    }

    #[test]
    fn the_memory_reference_moves_an_image_into_fresh_memory() {
        let dir = std::env::temp_dir().join(format!("ferry-tcp-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("image");
        let bytes: Vec<u8> = (0..(4u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&image, &bytes).unwrap();
        // One stream, and three (shares of unequal length: 1024 pages in 3), each checked;
        // into fresh and into preallocated memory.
        for (streams, prealloc) in [(1, false), (3, false), (1, true)] {
            let f =
                measure_memory(&TcpEnds::default(), &image, 4 << 20, streams, 2, prealloc).unwrap();
            assert_eq!(f.runs_gib_per_s.len(), 2);
            assert_eq!(f.streams, streams);
            assert!(f.gib_per_s > 0.0 && f.gib_per_s.is_finite(), "{f:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_namespace_is_an_error() {
        let ends = TcpEnds {
            receiver_netns: Some("ferry-no-such-namespace".into()),
            ..TcpEnds::default()
        };
        assert!(measure_once(&ends, 1, 1 << 20).is_err());
    }
}
