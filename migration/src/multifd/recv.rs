//! The receiving side: one thread per channel applies packets to guest memory; the main
//! stream's flush points wait for every channel's SYNC (see the module doc of
//! [`crate::multifd`]).

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ram::{page_hash, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::compress::Decompressor;
use super::packet::{
    Handshake, Method, PacketHeader, PacketPages, HANDSHAKE_LEN, PACKET_HEADER_LEN,
    PAGES_PER_PACKET,
};
use crate::dest::loader::PageBook;
use crate::error::{MigrationError, Result};
use crate::stall::StallClock;
use crate::stream::frame::read_iov_exact;
use crate::stream::header::{Header, FEATURE_MULTIFD};
use crate::stream::StreamError;
use crate::transport::{Channel, Listener};

/// The destination's own multifd settings (its query-migrate-parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalSettings {
    /// Capability multifd.
    pub enabled: bool,
    /// multifd-channels.
    pub channels: u8,
    /// multifd-compression.
    pub method: Method,
}

/// Checks the stream header's multifd settings against the destination's own.
pub fn check_settings(header: &Header, local: &LocalSettings) -> Result<()> {
    let source_multifd = header.has(FEATURE_MULTIFD) || header.multifd_channels > 0;
    let method = Method::from_code(header.multifd_compression).unwrap_or(Method::None);
    if source_multifd && !local.enabled {
        return Err(StreamError::Mismatch(format!(
            "the source migrates with multifd ({} channels, compression {}) but capability multifd is off on this destination: enable it and set multifd-channels {} and multifd-compression {} here",
            header.multifd_channels,
            method.name(),
            header.multifd_channels,
            method.name()
        ))
        .into());
    }
    if !source_multifd && local.enabled {
        return Err(StreamError::Mismatch(format!(
            "this destination expects multifd ({} channels, compression {}) but the source migrates without it: turn capability multifd on at the source too, or off here",
            local.channels,
            local.method.name()
        ))
        .into());
    }
    if source_multifd
        && (header.multifd_channels != u32::from(local.channels) || method != local.method)
    {
        return Err(StreamError::Mismatch(format!(
            "multifd settings differ: the source uses {} channels with compression {}, this destination {} channels with compression {}; set the same multifd-channels and multifd-compression on both sides",
            header.multifd_channels,
            method.name(),
            local.channels,
            local.method.name()
        ))
        .into());
    }
    Ok(())
}

/// Raw pages read and checked at a time (128 KiB, well within a core's L2 cache).
const RAW_CHUNK_PAGES: usize = 32;

fn chan_err(id: usize, e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Stream(StreamError::Invalid(format!("multifd channel {id}: {e}")))
}

/// Accepts the `channels` connections of a migration on `listener` and reads their
/// handshakes; returns them ordered by id. Fails when they are not all there within
/// `timeout`.
pub fn accept_channels(
    listener: &Listener,
    header: &Header,
    timeout: Duration,
    security: &crate::transport::tls::Security,
) -> Result<Vec<Channel>> {
    let n = header.multifd_channels as usize;
    let method = Method::from_code(header.multifd_compression).unwrap_or(Method::None);
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<Channel>> = (0..n).map(|_| None).collect();
    for got in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        let ch = listener.accept_timeout(left).map_err(|e| {
            MigrationError::Stream(StreamError::Invalid(format!(
                "only {got} of {n} multifd channels connected within {timeout:?}: {e}"
            )))
        })?;
        let mut ch = security
            .secure(ch)
            .map_err(|e| MigrationError::Transport(e.into()))?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        ch.set_timeouts(Some(left), None)
            .map_err(|e| chan_err(got, e))?;
        let mut b = [0u8; HANDSHAKE_LEN];
        ch.read_exact(&mut b).map_err(|e| {
            MigrationError::Stream(StreamError::Invalid(format!(
                "a multifd channel sent no handshake within {timeout:?}: {e}"
            )))
        })?;
        ch.set_timeouts(None, Some(crate::transport::WRITE_TIMEOUT))
            .map_err(|e| chan_err(got, e))?;
        let hs = Handshake::decode(&b)
            .map_err(|e| MigrationError::Stream(StreamError::Invalid(e.to_string())))?;
        let id = usize::from(hs.id);
        if hs.uuid != header.uuid {
            return Err(chan_err(
                id,
                format!(
                    "received UUID {} but the migration's is {}",
                    uuid::Uuid::from_bytes(hs.uuid),
                    uuid::Uuid::from_bytes(header.uuid)
                ),
            ));
        }
        if usize::from(hs.channels) != n || hs.method != method {
            return Err(chan_err(
                id,
                format!(
                    "handshake announces {} channels with {}, the stream header {n} with {}",
                    hs.channels,
                    hs.method.name(),
                    method.name()
                ),
            ));
        }
        match slots.get_mut(id) {
            Some(slot @ None) => *slot = Some(ch),
            _ => return Err(chan_err(id, "connected twice")),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

type Synced = (usize, Result<u64>);

/// The destination's multifd channels: their threads and the sync barrier.
pub struct MultifdReceiver {
    sockets: Vec<Channel>,
    threads: Vec<JoinHandle<()>>,
    releases: Vec<Sender<()>>,
    synced: Receiver<Synced>,
    error: Arc<Mutex<Option<String>>>,
    unsynced: Arc<Vec<AtomicU64>>,
    finishing: Arc<AtomicBool>,
    /// Bytes received on every channel so far.
    progress: Arc<AtomicU64>,
    /// How long [`MultifdReceiver::sync`] waits with nothing arriving (None: forever).
    silence_limit: Option<Duration>,
}

impl MultifdReceiver {
    /// Starts a thread per channel of `channels` (ordered by id). A failing channel records
    /// its error and shuts down reading on `main` (a handle on the main stream), so the
    /// loader stops at once.
    pub fn start(
        channels: Vec<Channel>,
        method: Method,
        ram: Arc<GuestRam>,
        book: Arc<PageBook>,
        main: Option<Channel>,
    ) -> Result<Self> {
        let n = channels.len();
        let (synced_tx, synced) = crossbeam_channel::unbounded();
        let error = Arc::new(Mutex::new(None));
        let unsynced: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let main = main.map(Arc::new);
        let finishing = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let mut me = MultifdReceiver {
            sockets: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            releases: Vec::with_capacity(n),
            synced,
            error: error.clone(),
            unsynced: unsynced.clone(),
            finishing: finishing.clone(),
            progress: progress.clone(),
            silence_limit: None,
        };
        for (id, ch) in channels.into_iter().enumerate() {
            me.sockets
                .push(ch.try_clone().map_err(|e| chan_err(id, e))?);
            let (rel_tx, rel_rx) = bounded(1);
            me.releases.push(rel_tx);
            let ctx = RecvChannel {
                id,
                ch,
                ram: ram.clone(),
                book: book.clone(),
                method,
                decompressor: Decompressor::new(method)
                    .map_err(|e| MigrationError::Vm(e.to_string()))?,
                unsynced: unsynced.clone(),
                progress: progress.clone(),
            };
            let (tx, err, main) = (synced_tx.clone(), error.clone(), main.clone());
            let finishing = finishing.clone();
            let t = std::thread::Builder::new()
                .name(format!("multifd-recv-{id}"))
                .spawn(move || {
                    let result = match ctx.run(&tx, &rel_rx) {
                        Ok(false) => Ok(()),
                        // The source keeps its channels open until the destination has
                        // confirmed the load, so an end before finish() is a failure.
                        Ok(true) if finishing.load(Ordering::Acquire) => Ok(()),
                        Ok(true) => Err(chan_err(
                            id,
                            "the source closed the channel before the end of the migration",
                        )),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        if let Ok(mut slot) = err.lock() {
                            slot.get_or_insert_with(|| e.to_string());
                        }
                        let _ = tx.send((id, Err(e)));
                        if let Some(m) = main {
                            m.shutdown_read();
                        }
                    }
                })
                .map_err(|e| MigrationError::Vm(format!("cannot start a multifd thread: {e}")))?;
            me.threads.push(t);
        }
        Ok(me)
    }

    /// Bytes received on all channels so far (grows while the source sends pages here).
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// The first error a channel reported, if any.
    pub fn error(&self) -> Option<MigrationError> {
        self.error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .map(|e| MigrationError::Stream(StreamError::Channel(e)))
    }

    /// The main stream's flush for pass `pass`: waits until every channel has delivered
    /// its SYNC for that pass, then lets them go on.
    pub fn sync(&mut self, pass: u64) -> Result<()> {
        for _ in 0..self.releases.len() {
            match self.next_synced()? {
                Ok((_, Ok(p))) if p == pass => {}
                Ok((id, Ok(p))) => {
                    return Err(chan_err(
                        id,
                        format!("SYNC for pass {p} where the main stream ends pass {pass}"),
                    ))
                }
                Ok((_, Err(e))) => return Err(e),
                Err(_) => return Err(chan_err(0, "every channel thread ended")),
            }
        }
        for r in &self.releases {
            let _ = r.send(());
        }
        Ok(())
    }

    /// Bounds the wait of [`MultifdReceiver::sync`]: it fails once nothing arrives on any
    /// channel for `limit` (a source that froze between its channels' SYNCs).
    pub fn with_silence_limit(mut self, limit: Duration) -> Self {
        self.silence_limit = Some(limit);
        self
    }

    /// The next channel's SYNC (or error), waiting while bytes keep arriving somewhere.
    fn next_synced(&self) -> Result<std::result::Result<Synced, crossbeam_channel::RecvError>> {
        let Some(limit) = self.silence_limit else {
            return Ok(self.synced.recv());
        };
        let mut clock = StallClock::new(self.progress.load(Ordering::Acquire), limit);
        loop {
            match self
                .synced
                .recv_timeout(limit.min(Duration::from_millis(500)))
            {
                Ok(s) => return Ok(Ok(s)),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Ok(Err(crossbeam_channel::RecvError))
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if clock.stalled(self.progress.load(Ordering::Acquire)) {
                        return Err(MigrationError::Stream(StreamError::Invalid(format!(
                            "nothing arrived from the source for {limit:?} while the destination \
                             waited for every multifd channel's SYNC: the source stopped, or the \
                             link between the hosts is down or stuck"
                        ))));
                    }
                }
            }
        }
    }

    /// The END frame: stops the channels (each must be parked after its last SYNC, with
    /// nothing applied since) and joins them.
    pub fn finish(&mut self) -> Result<()> {
        self.finishing.store(true, Ordering::Release);
        self.releases.clear();
        for s in &self.sockets {
            s.shutdown_read();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(e) = self.error() {
            return Err(e);
        }
        for (id, u) in self.unsynced.iter().enumerate() {
            if u.load(Ordering::Acquire) != 0 {
                return Err(chan_err(id, "pages arrived after the channel's last SYNC"));
            }
        }
        Ok(())
    }
}

impl Drop for MultifdReceiver {
    fn drop(&mut self) {
        self.finishing.store(true, Ordering::Release);
        self.releases.clear();
        for s in &self.sockets {
            s.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct RecvChannel {
    id: usize,
    ch: Channel,
    ram: Arc<GuestRam>,
    book: Arc<PageBook>,
    method: Method,
    decompressor: Decompressor,
    unsynced: Arc<Vec<AtomicU64>>,
    progress: Arc<AtomicU64>,
}

impl RecvChannel {
    fn err(&self, e: impl std::fmt::Display) -> MigrationError {
        chan_err(self.id, e)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.ch.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err("the channel closed in the middle of a packet")
            } else {
                self.err(e)
            }
        })?;
        self.progress.fetch_add(buf.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Reads a packet's fixed header; false when the channel ended cleanly before it.
    fn read_head(&mut self, head: &mut [u8; PACKET_HEADER_LEN]) -> Result<bool> {
        let mut got = 0;
        while got < head.len() {
            match self.ch.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.err("the channel closed in the middle of a packet")),
                Ok(n) => {
                    got += n;
                    self.progress.fetch_add(n as u64, Ordering::Release);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(true)
    }

    /// Applies packets until the channel closes (Ok(true)), the barrier is dropped
    /// (Ok(false)), or something is wrong.
    fn run(mut self, synced: &Sender<Synced>, release: &Receiver<()>) -> Result<bool> {
        let ram_size = self.ram.size();
        let mut head = [0u8; PACKET_HEADER_LEN];
        let mut tail = Vec::with_capacity((PAGES_PER_PACKET * 2 + 1) * 8);
        let mut pages = PacketPages::default();
        let mut cbuf = Vec::new();
        let mut scratch = Vec::new();
        let mut last_num: Option<u64> = None;
        let mut last_pass = 0u64;
        loop {
            if !self.read_head(&mut head)? {
                return Ok(true);
            }
            let h = PacketHeader::decode(&head, self.method).map_err(|e| self.err(e))?;
            tail.resize(h.tail_len(), 0);
            self.read_exact(&mut tail)?;
            pages
                .decode_tail(&head, &h, &tail, ram_size)
                .map_err(|e| self.err(e))?;
            if last_num.is_some_and(|l| h.packet_num <= l) {
                return Err(self.err(format!(
                    "packet number {} after {}",
                    h.packet_num,
                    last_num.unwrap_or(0)
                )));
            }
            if h.pass < last_pass {
                return Err(self.err(format!("packet of pass {} after pass {last_pass}", h.pass)));
            }
            last_num = Some(h.packet_num);
            last_pass = h.pass;
            if h.is_compressed() && !pages.normal.is_empty() {
                self.receive_compressed(&h, &pages, &mut cbuf, &mut scratch)?;
                self.check_pages(&pages.normal, Some(h.packet_num))?;
            } else {
                // A few pages at a time, so each is hashed while it is still in cache.
                for chunk in pages.normal.chunks(RAW_CHUNK_PAGES) {
                    self.receive_raw(chunk)?;
                    self.check_pages(chunk, None)?;
                }
            }
            for &offset in &pages.zero {
                self.book
                    .load_zero(&self.ram, offset >> PAGE_SHIFT)
                    .map_err(|e| self.err(e))?;
            }
            let unsynced = &self.unsynced[self.id];
            if h.is_sync() {
                unsynced.store(0, Ordering::Release);
                if synced.send((self.id, Ok(h.pass))).is_err() || release.recv().is_err() {
                    return Ok(false);
                }
            } else {
                unsynced.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Checks each of `normal` (offset, hash) against its hash. Raw pages may have changed
    /// while they were sent: one that does not match stays suspect until it is sent again.
    /// Pages of compressed packet `compressed` were hashed from the copy that was
    /// compressed, so a mismatch there is damage and fails the channel.
    fn check_pages(&self, normal: &[(u64, u64)], compressed: Option<u64>) -> Result<()> {
        for &(offset, hash) in normal {
            let page = offset >> PAGE_SHIFT;
            let ok = self.ram.page(page).is_some_and(|b| page_hash(b) == hash);
            if let (false, Some(num)) = (ok, compressed) {
                let why = self.decompressor.page_mismatch(offset);
                return Err(self.err(format!("packet {num}: {why}")));
            }
            self.book.mark(page, ok);
        }
        Ok(())
    }

    /// Reads the raw pages `normal` (offset, hash) straight into guest memory.
    fn receive_raw(&mut self, normal: &[(u64, u64)]) -> Result<()> {
        let mut iov = Vec::with_capacity(normal.len());
        for &(offset, _) in normal {
            let p = self
                .ram
                .page_ptr(offset >> PAGE_SHIFT)
                .ok_or_else(|| self.err(format!("page {offset:#x} outside RAM")))?;
            iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: PAGE_SIZE,
            });
        }
        // SAFETY: every iovec is a page of guest RAM (offsets checked against the RAM size
        // when the packet was decoded); the guest does not run during the load, and within
        // one pass no other channel writes the same page (the sync barrier orders passes).
        unsafe { read_iov_exact(&mut self.ch, &mut iov) }.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err("the channel closed in the middle of a packet")
            } else {
                self.err(e)
            }
        })?;
        self.progress
            .fetch_add((iov.len() * PAGE_SIZE) as u64, Ordering::Release);
        Ok(())
    }

    /// Reads compressed data and decompresses it into the pages: straight into guest
    /// memory when the pages are contiguous there, through `scratch` otherwise.
    fn receive_compressed(
        &mut self,
        h: &PacketHeader,
        pages: &PacketPages,
        cbuf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        cbuf.resize(h.next_packet_size as usize, 0);
        self.read_exact(cbuf)?;
        let n = pages.normal.len();
        let first = self
            .ram
            .page_ptr(pages.normal[0].0 >> PAGE_SHIFT)
            .ok_or_else(|| self.err("page outside RAM"))?;
        let contiguous = pages.normal.iter().enumerate().all(|(i, &(o, _))| {
            self.ram.page_ptr(o >> PAGE_SHIFT) == Some(first.wrapping_add(i * PAGE_SIZE))
        });
        let num = h.packet_num;
        if contiguous {
            // SAFETY: `n` consecutive guest pages starting at `first` (checked above, each
            // inside RAM); the guest is not running and no other thread writes these pages
            // in this pass.
            let dst = unsafe { std::slice::from_raw_parts_mut(first, n * PAGE_SIZE) };
            self.decompressor
                .decompress(cbuf, dst)
                .map_err(|e| self.err(format!("packet {num}: {e}")))?;
            return Ok(());
        }
        scratch.resize(n * PAGE_SIZE, 0);
        self.decompressor
            .decompress(cbuf, scratch)
            .map_err(|e| self.err(format!("packet {num}: {e}")))?;
        for (i, &(offset, _)) in pages.normal.iter().enumerate() {
            self.ram
                .write_page(
                    offset >> PAGE_SHIFT,
                    &scratch[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}
