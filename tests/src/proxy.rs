//! A small fault-injecting TCP proxy for migration fault tests.
//!
//! [`Proxy::start`] listens on 127.0.0.1 and forwards every connection to a
//! target, both ways. In the client-to-target direction (source to
//! destination) it can, per [`Faults`]:
//! - flip one byte at a given stream offset (XOR with a mask),
//! - close both directions after a given number of bytes (a truncated stream),
//! - delay every chunk,
//! - stall: stop forwarding (and reading) after a given number of bytes, or
//!   from the moment [`Proxy::set_stall`] is called, leaving the connections
//!   open (a peer that stops reading).
//!
//! In both directions it can model a slow, lossy link ([`Faults::latency`],
//! [`Faults::loss_percent`], [`Faults::loss_stall`]): each chunk read (at most
//! 64 KiB) is forwarded `latency` after it arrived, by a writer thread behind a
//! bounded queue (so latency does not cap throughput the way `delay` does), and
//! with probability `loss_percent` a chunk is held back `loss_stall` longer,
//! holding everything behind it, as a TCP retransmission after a lost segment
//! does. This is not packet loss (tc netem is not available here): it models
//! what a lossy path does to one TCP stream, retransmission stalls. The random
//! choices come from a fixed seed, so a run is reproducible.
//!
//! [`Proxy::start_in_netns`] runs the proxy inside a network namespace, so
//! that it sits on one "host" of a [`crate::HostPair`] and its traffic crosses
//! the real veth link.
//!
//! Offsets count bytes of one connection's client-to-target stream from 0.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The faults a proxy injects into the client-to-target direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// XOR the byte at this offset with `flip_mask`.
    pub flip_at: Option<u64>,
    /// The mask for `flip_at` (0 means 0xff).
    pub flip_mask: u8,
    /// Forward exactly this many bytes, then close both directions.
    pub close_after: Option<u64>,
    /// Sleep this long before forwarding each chunk.
    pub delay: Duration,
    /// Forward this many bytes, then stop reading and forwarding (connections stay open).
    pub stall_after: Option<u64>,
    /// Both directions: forward each chunk this long after it arrived (queued, so the
    /// link's throughput is not limited by it).
    pub latency: Duration,
    /// Both directions: the chance (percent) that a chunk is held back `loss_stall`
    /// longer, with everything behind it (a retransmission stall).
    pub loss_percent: u32,
    /// How long a "lost" chunk is held back (0 means 200 ms, Linux's minimum RTO).
    pub loss_stall: Duration,
}

impl Faults {
    /// Whether chunks go through a queue with a writer thread (latency or loss).
    fn queued(&self) -> bool {
        !self.latency.is_zero() || self.loss_percent > 0
    }
}

/// What the proxy has seen.
#[derive(Debug, Default)]
struct Stats {
    forwarded_up: AtomicU64,
    forwarded_down: AtomicU64,
    connections: AtomicU64,
    flipped: AtomicBool,
    closed_early: AtomicBool,
}

struct Shared {
    faults: Faults,
    stats: Stats,
    stall: AtomicBool,
    stop: AtomicBool,
    /// Every socket of every open connection (by connection number), to shut them down on
    /// [`Proxy::cut`] or drop.
    sockets: Mutex<Vec<(u64, TcpStream)>>,
}

/// A running proxy; stops and closes every connection on drop.
pub struct Proxy {
    addr: SocketAddr,
    /// The namespace the proxy listens in (`/run/netns/NAME`), when not the caller's.
    netns: Option<String>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `target` with `faults`.
    pub fn start(target: SocketAddr, faults: Faults) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        if faults.queued() {
            // A slow link buffers little: keep the kernel from taking megabytes on its
            // behalf (accepted sockets inherit the listener's receive buffer).
            set_receive_buffer(&listener, LINK_RCVBUF);
        }
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults,
            stats: Stats::default(),
            stall: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, target, s))?;
        Ok(Proxy {
            addr,
            netns: None,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Like [`Proxy::start`], but inside network namespace `netns` (as named by `ip
    /// netns`): its listener and its connections to `target` belong to that namespace.
    pub fn start_in_netns(netns: &str, target: SocketAddr, faults: Faults) -> io::Result<Proxy> {
        let path = format!("/run/netns/{netns}");
        // A thread's network namespace is its own, and threads it starts inherit it: a
        // helper thread enters the namespace and starts the proxy's threads from there.
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&path)?;
                let mut p = Proxy::start(target, faults)?;
                p.netns = Some(path.clone());
                Ok(p)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the proxy start thread panicked")))
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The migration URI of this proxy (`tcp:127.0.0.1:PORT`).
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    /// Bytes forwarded client-to-target so far (all connections).
    pub fn forwarded_up(&self) -> u64 {
        self.shared.stats.forwarded_up.load(Ordering::Acquire)
    }

    /// Bytes forwarded target-to-client so far (all connections).
    pub fn forwarded_down(&self) -> u64 {
        self.shared.stats.forwarded_down.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.stats.connections.load(Ordering::Acquire)
    }

    /// Whether the byte at `flip_at` went through (flipped).
    pub fn flipped(&self) -> bool {
        self.shared.stats.flipped.load(Ordering::Acquire)
    }

    /// Whether a connection was closed by `close_after`.
    pub fn closed_early(&self) -> bool {
        self.shared.stats.closed_early.load(Ordering::Acquire)
    }

    /// Stops (or resumes) forwarding in both directions, leaving the connections open.
    pub fn set_stall(&self, stall: bool) {
        self.shared.stall.store(stall, Ordering::Release);
    }

    /// Closes every connection now (both directions of both sides).
    pub fn cut(&self) {
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.1.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.cut();
        // Wake the acceptor, from its namespace: its 127.0.0.1 is not ours.
        let wake = |addr: &SocketAddr| {
            let _ = TcpStream::connect_timeout(addr, Duration::from_millis(200));
        };
        match &self.netns {
            None => wake(&self.addr),
            Some(path) => std::thread::scope(|s| {
                s.spawn(|| {
                    if enter_netns(path).is_ok() {
                        wake(&self.addr);
                    }
                });
            }),
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Receive buffer of a queued (slow) direction's listening socket, bytes.
const LINK_RCVBUF: i32 = 256 * 1024;

/// Sets SO_RCVBUF on `listener` (best effort: the default is only a larger buffer).
fn set_receive_buffer(listener: &TcpListener, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`).
fn enter_netns(path: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns on a descriptor we own, for the network namespace type only; it
    // changes nothing but the calling thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let id = shared.stats.connections.fetch_add(1, Ordering::AcqRel);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let clones = (
            client.try_clone(),
            upstream.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
        );
        let (Ok(c2), Ok(u2), Ok(c3), Ok(u3)) = clones else {
            continue;
        };
        shared
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([(id, c3), (id, u3)]);
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (shared.clone(), done.clone());
        let _ = std::thread::Builder::new()
            .name("proxy-up".into())
            .spawn(move || {
                let end = pump(client, upstream, &s, true);
                finish(id, &s, end, &d);
            });
        let (s, d) = (shared.clone(), done);
        let _ = std::thread::Builder::new()
            .name("proxy-down".into())
            .spawn(move || {
                let end = pump(u2, c2, &s, false);
                finish(id, &s, end, &d);
            });
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Its source sent EOF (passed on as a half-close).
    Eof,
    /// A read or write failed: the connection is broken.
    Broken,
    /// `close_after` was reached.
    Closed,
    /// The proxy is stopping.
    Stopped,
}

/// Shuts down and drops every descriptor of connection `id` (the peers see the close).
fn close_connection(shared: &Shared, id: u64) {
    let mut sockets = shared.sockets.lock().unwrap_or_else(|p| p.into_inner());
    for (_, s) in sockets.iter().filter(|(c, _)| *c == id) {
        let _ = s.shutdown(Shutdown::Both);
    }
    sockets.retain(|(c, _)| *c != id);
}

/// Ends one direction. A truncation closes the whole connection at once. A broken
/// direction (its peer went away) first lets the other direction finish forwarding what
/// that peer said before it went (for at most half a second), then closes everything,
/// as does the second of two half-closes.
fn finish(id: u64, shared: &Shared, end: End, done: &AtomicU64) {
    match end {
        End::Stopped => {}
        End::Closed => close_connection(shared, id),
        End::Broken => {
            done.fetch_add(1, Ordering::AcqRel);
            let deadline = std::time::Instant::now() + Duration::from_millis(500);
            while done.load(Ordering::Acquire) < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            close_connection(shared, id);
        }
        End::Eof => {
            if done.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
                close_connection(shared, id);
            }
        }
    }
}

/// A chunk for the queued writer: when to forward it, and its bytes.
type Chunk = (Instant, Vec<u8>);

/// Where a pump sends what it read: straight to the socket, or through a queue to a
/// writer thread that forwards each chunk at its release time (latency and loss).
enum Out {
    Direct(TcpStream),
    Queued {
        tx: SyncSender<Chunk>,
        writer: JoinHandle<bool>,
        rng: u64,
        /// Release time of the previous chunk: a stall delays everything after it.
        last: Instant,
    },
}

/// Chunks in flight in a queued direction (at most 64 KiB each): 1 MiB, a router's
/// buffer rather than a disk's.
const QUEUE_CHUNKS: usize = 16;

impl Out {
    fn new(to: TcpStream, f: &Faults, seed: u64) -> Out {
        if !f.queued() {
            return Out::Direct(to);
        }
        let (tx, rx) = sync_channel(QUEUE_CHUNKS);
        match std::thread::Builder::new()
            .name("proxy-line".into())
            .spawn(move || line_writer(to, rx))
        {
            Ok(writer) => Out::Queued {
                tx,
                writer,
                rng: seed | 1,
                last: Instant::now(),
            },
            // Without a writer thread, the queue would never drain: fail the direction.
            Err(_) => Out::Queued {
                tx,
                writer: std::thread::spawn(|| false),
                rng: seed | 1,
                last: Instant::now(),
            },
        }
    }

    /// Forwards `chunk` (now, or queued with its release time); false when broken.
    fn send(&mut self, chunk: &[u8], f: &Faults) -> bool {
        match self {
            Out::Direct(to) => to.write_all(chunk).is_ok(),
            Out::Queued { tx, rng, last, .. } => {
                // In order: never before the previous chunk, which may have been held back.
                let mut release = (Instant::now() + f.latency).max(*last);
                if f.loss_percent > 0 && next_random(rng) % 100 < u64::from(f.loss_percent) {
                    release += if f.loss_stall.is_zero() {
                        Duration::from_millis(200)
                    } else {
                        f.loss_stall
                    };
                }
                *last = release;
                tx.send((release, chunk.to_vec())).is_ok()
            }
        }
    }

    /// Ends the direction after everything queued went out; `eof` half-closes `to`.
    fn close(self, eof: bool) -> bool {
        match self {
            Out::Direct(to) => {
                if eof {
                    let _ = to.shutdown(Shutdown::Write);
                }
                true
            }
            Out::Queued { tx, writer, .. } => {
                drop(tx);
                // The writer half-closes once the queue is empty (or fails).
                writer.join().unwrap_or(false)
            }
        }
    }
}

/// xorshift64: the proxy's reproducible randomness.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Forwards queued chunks at their release times, in order; half-closes `to` when the
/// queue ends. Returns false if a write failed.
fn line_writer(mut to: TcpStream, rx: Receiver<Chunk>) -> bool {
    for (release, chunk) in rx.iter() {
        let now = Instant::now();
        if release > now {
            std::thread::sleep(release - now);
        }
        if to.write_all(&chunk).is_err() {
            return false;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    true
}

/// Copies `from` to `to`; `up` is the client-to-target direction, where faults apply.
fn pump(mut from: TcpStream, to: TcpStream, shared: &Shared, up: bool) -> End {
    let f = shared.faults;
    let seed = 0x9e37_79b9_7f4a_7c15
        ^ (shared.stats.connections.load(Ordering::Acquire) << 1)
        ^ u64::from(up);
    let mut out = Out::new(to, &f, seed);
    let end = pump_into(&mut from, &mut out, shared, up);
    let flushed = out.close(end == End::Eof);
    if end == End::Eof && !flushed {
        End::Broken
    } else {
        end
    }
}

fn pump_into(from: &mut TcpStream, to: &mut Out, shared: &Shared, up: bool) -> End {
    let f = shared.faults;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let stalled = |offset: u64| {
        shared.stall.load(Ordering::Acquire) || (up && f.stall_after.is_some_and(|n| offset >= n))
    };
    loop {
        while stalled(offset) {
            if shared.stop.load(Ordering::Acquire) {
                return End::Stopped;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut want = buf.len();
        if up {
            // Never read past a point where a fault must happen.
            for limit in [f.close_after, f.stall_after].into_iter().flatten() {
                if limit > offset {
                    want = want.min((limit - offset) as usize);
                }
            }
        }
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => return End::Eof,
            Err(_) => return End::Broken,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if up {
            if let Some(at) = f.flip_at {
                if at >= offset && at < offset + n as u64 {
                    let mask = if f.flip_mask == 0 { 0xff } else { f.flip_mask };
                    chunk[(at - offset) as usize] ^= mask;
                    shared.stats.flipped.store(true, Ordering::Release);
                }
            }
        }
        if !f.delay.is_zero() {
            std::thread::sleep(f.delay);
        }
        if !to.send(chunk, &f) {
            return End::Broken;
        }
        offset += n as u64;
        let counter = if up {
            &shared.stats.forwarded_up
        } else {
            &shared.stats.forwarded_down
        };
        counter.fetch_add(n as u64, Ordering::AcqRel);
        if up && f.close_after.is_some_and(|c| offset >= c) {
            shared.stats.closed_early.store(true, Ordering::Release);
            // `finish` drops every descriptor of this connection (the other direction
            // wakes from the shutdown), so data still coming from the client is answered
            // with a reset, as by a peer that closed its socket.
            return End::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo-less sink that records what it received and answers "ok" once.
    fn sink() -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let _ = s.write_all(b"ok");
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        (addr, t)
    }

    fn send_through(p: &Proxy, data: &[u8]) -> Vec<u8> {
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut reply = [0u8; 2];
        c.read_exact(&mut reply).expect("reply through the proxy");
        assert_eq!(&reply, b"ok");
        let _ = c.write_all(data);
        let _ = c.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        rest
    }

    #[test]
    fn forwards_both_ways_unchanged_without_faults() {
        let (addr, t) = sink();
        let p = Proxy::start(addr, Faults::default()).expect("proxy");
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        send_through(&p, &data);
        assert_eq!(t.join().expect("sink"), data);
        assert_eq!(p.forwarded_up(), data.len() as u64);
        assert_eq!(p.forwarded_down(), 2);
        assert_eq!(p.connections(), 1);
    }

    #[test]
    fn flips_exactly_one_byte_at_the_offset() {
        let (addr, t) = sink();
        let faults = Faults {
            flip_at: Some(100_000),
            flip_mask: 0x01,
            ..Faults::default()
        };
        let p = Proxy::start(addr, faults).expect("proxy");
        let data = vec![0x42u8; 150_000];
        send_through(&p, &data);
        let got = t.join().expect("sink");
        assert_eq!(got.len(), data.len());
        let diffs: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
        assert_eq!(diffs, vec![100_000]);
        assert_eq!(got[100_000], 0x43);
        assert!(p.flipped());
    }

    #[test]
    fn truncates_after_n_bytes() {
        let (addr, t) = sink();
        let faults = Faults {
            close_after: Some(70_001),
            ..Faults::default()
        };
        let p = Proxy::start(addr, faults).expect("proxy");
        send_through(&p, &vec![7u8; 300_000]);
        assert_eq!(t.join().expect("sink").len(), 70_001);
        assert!(p.closed_early());
    }

    #[test]
    fn stalls_after_n_bytes_keeping_the_connection_open() {
        let (addr, t) = sink();
        let faults = Faults {
            stall_after: Some(10_000),
            ..Faults::default()
        };
        let p = Proxy::start(addr, faults).expect("proxy");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut reply = [0u8; 2];
        c.read_exact(&mut reply).expect("reply");
        c.write_all(&[1u8; 50_000]).expect("kernel buffers take it");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(p.forwarded_up(), 10_000);
        drop(c);
        drop(p);
        assert_eq!(t.join().expect("sink").len(), 10_000);
    }

    #[test]
    fn latency_delays_each_direction_without_capping_throughput() {
        let (addr, t) = sink();
        let faults = Faults {
            latency: Duration::from_millis(50),
            ..Faults::default()
        };
        let p = Proxy::start(addr, faults).expect("proxy");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let t0 = Instant::now();
        let mut reply = [0u8; 2];
        c.read_exact(&mut reply).expect("reply through the proxy");
        assert!(
            t0.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t0.elapsed()
        );
        // 8 MiB at one 64 KiB chunk per 50 ms would take 6.4 s; queued, it takes about
        // one latency.
        let data = vec![5u8; 8 << 20];
        let t1 = Instant::now();
        c.write_all(&data).expect("write");
        let _ = c.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert_eq!(t.join().expect("sink").len(), data.len());
        assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
    }

    #[test]
    fn loss_holds_chunks_back_in_order() {
        let (addr, t) = sink();
        let faults = Faults {
            loss_percent: 100,
            loss_stall: Duration::from_millis(100),
            ..Faults::default()
        };
        let p = Proxy::start(addr, faults).expect("proxy");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let t0 = Instant::now();
        send_through(&p, &data);
        assert_eq!(
            t.join().expect("sink"),
            data,
            "bytes arrive complete and in order"
        );
        // The reply and at least the 5 chunks of data were each held back 100 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
}
