//! The sending side: N channel threads fed page batches by the migration thread.
//!
//! The migration thread walks the dirty bitmap, re-arms dirty tracking per clear chunk
//! before a page is queued, and hands batches of up to [`PAGES_PER_PACKET`] page numbers to
//! the channels through bounded queues (one per channel, so a SYNC queued behind a
//! channel's pages leaves after them). A full queue blocks the migration thread:
//! backpressure. Each channel thread owns its socket, its buffers and its compression
//! context; it finds zero pages itself, hashes and compresses the rest, sends one packet
//! per batch, and accounts the bytes to its own counter and to the shared rate limiter.

use std::io::{IoSlice, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Select, Sender, TrySendError};
use ram::{is_zero_page, page_hash, AtomicBitmap, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::compress::Compressor;
use super::packet::{
    Handshake, Method, PacketHeader, PacketPages, FLAG_RAW, FLAG_SYNC, PAGES_PER_PACKET,
};
use super::zerocopy::ZeroCopySender;
use super::{ChannelStats, MultifdStats};
use crate::error::{MigrationError, Result};
use crate::info::{Channel as Counted, MigrationCounters, Phase};
use crate::rate_limit::RateLimiter;
use crate::stream::frame::write_all_vectored;
use crate::transport::{self, Channel, MigrationUri};
use crate::vm::DirtyTracker;

/// Batches a channel's queue holds before the migration thread waits.
const QUEUE_DEPTH: usize = 2;
/// How often a waiting migration thread looks at cancellation.
const POLL: Duration = Duration::from_millis(100);

/// What channel threads need from the migration they belong to.
pub trait SendEnv: Send + Sync + 'static {
    /// The migration's counters.
    fn counters(&self) -> &MigrationCounters;
    /// The rate limiter shared by every channel.
    fn limiter(&self) -> &RateLimiter;
    /// Whether the migration was cancelled.
    fn cancelled(&self) -> bool;
}

/// The settings of one multifd migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendConfig {
    /// Channels to open (multifd-channels).
    pub channels: u8,
    /// Compression method (multifd-compression).
    pub method: Method,
    /// Level for that method (multifd-zlib-level or multifd-zstd-level).
    pub level: u8,
    /// Send pages with MSG_ZEROCOPY (zero-copy-send).
    pub zero_copy: bool,
    /// The source VM's UUID.
    pub uuid: [u8; 16],
}

enum Job {
    Pages {
        pages: Vec<u64>,
        phase: Phase,
        pass: u64,
    },
    Sync {
        pass: u64,
        phase: Phase,
    },
}

type Ack = (usize, Result<()>);

/// The sending side of a multifd migration.
pub struct MultifdSender {
    queues: Vec<Sender<Job>>,
    acks: Receiver<Ack>,
    threads: Vec<JoinHandle<()>>,
    sockets: Vec<Channel>,
    env: Arc<dyn SendEnv>,
    stats: Arc<MultifdStats>,
    next: usize,
    batch: Vec<u64>,
}

fn channel_err(id: usize, e: impl std::fmt::Display) -> MigrationError {
    MigrationError::DestinationLost(format!("multifd channel {id}: {e}"))
}

impl MultifdSender {
    /// Opens `cfg.channels` connections to `uri` (each with its handshake) and starts a
    /// thread per channel.
    pub fn open(
        uri: &MigrationUri,
        cfg: &SendConfig,
        ram: Arc<GuestRam>,
        env: Arc<dyn SendEnv>,
        connect_timeout: Duration,
        security: &transport::tls::Security,
    ) -> Result<Self> {
        if let MigrationUri::File { .. } = uri {
            return Err(MigrationError::Config(
                "multifd is not supported for file: migrations; use a tcp: or unix: URI, or turn the multifd capability off".into(),
            ));
        }
        if cfg.zero_copy && !matches!(uri, MigrationUri::Tcp { .. }) {
            return Err(MigrationError::Config(
                "zero-copy-send needs a tcp: migration URI (MSG_ZEROCOPY is a TCP feature)".into(),
            ));
        }
        if cfg.channels == 0 {
            return Err(MigrationError::Config(
                "multifd-channels must be at least 1".into(),
            ));
        }
        let n = usize::from(cfg.channels);
        let stats = Arc::new(MultifdStats::new(n, cfg.method));
        let mut sockets = Vec::with_capacity(n);
        let mut writers = Vec::with_capacity(n);
        for id in 0..n {
            let ch = transport::connect(uri, connect_timeout).map_err(|e| {
                MigrationError::DestinationLost(format!(
                    "multifd channel {id} could not connect: {e}"
                ))
            })?;
            let mut ch = security.secure(ch).map_err(|e| {
                MigrationError::DestinationLost(format!("multifd channel {id}: {e}"))
            })?;
            let hs = Handshake {
                uuid: cfg.uuid,
                id: id as u8,
                channels: cfg.channels,
                method: cfg.method,
            };
            ch.write_all(&hs.encode()).map_err(|e| channel_err(id, e))?;
            let zc = if cfg.zero_copy {
                Some(
                    ZeroCopySender::new(ch.raw_fd(), transport::WRITE_TIMEOUT).map_err(|e| {
                        MigrationError::Config(format!(
                            "zero-copy-send: this host's kernel refuses SO_ZEROCOPY: {e}"
                        ))
                    })?,
                )
            } else {
                None
            };
            sockets.push(ch.try_clone().map_err(|e| channel_err(id, e))?);
            writers.push((ch, zc));
            env.counters().add_sent(
                Counted::Multifd(id),
                Phase::Precopy,
                super::packet::HANDSHAKE_LEN as u64,
            );
            // The report's per-channel bytes are everything written on the channel, as
            // multifd-bytes counts them.
            stats.channels[id]
                .bytes
                .fetch_add(super::packet::HANDSHAKE_LEN as u64, Ordering::Relaxed);
        }
        let (ack_tx, acks) = crossbeam_channel::unbounded();
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (id, (ch, zc)) in writers.into_iter().enumerate() {
            let (tx, rx) = bounded(QUEUE_DEPTH);
            let worker = Worker {
                id,
                ch,
                zc,
                ram: ram.clone(),
                env: env.clone(),
                stats: stats.clone(),
                method: cfg.method,
                builder: PacketBuilder::new(cfg.method, cfg.level)
                    .map_err(|e| MigrationError::Config(e.to_string()))?,
            };
            let ack = ack_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("multifd-send-{id}"))
                .spawn(move || worker.run(rx, ack))
                .map_err(|e| MigrationError::Vm(format!("cannot start a multifd thread: {e}")))?;
            queues.push(tx);
            threads.push(t);
        }
        Ok(MultifdSender {
            queues,
            acks,
            threads,
            sockets,
            env,
            stats,
            next: 0,
            batch: Vec::with_capacity(PAGES_PER_PACKET),
        })
    }

    /// Bytes written on the channels that their peers have not acknowledged yet (SIOCOUTQ,
    /// summed; a channel that cannot tell counts 0).
    pub fn unacknowledged_bytes(&self) -> u64 {
        self.sockets
            .iter()
            .filter_map(Channel::unacknowledged_bytes)
            .sum()
    }

    /// The live per-channel statistics.
    pub fn stats(&self) -> Arc<MultifdStats> {
        self.stats.clone()
    }

    /// The error a channel thread reported (it has ended), or a generic one.
    fn channel_failure(&self, id: usize) -> MigrationError {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while let Ok((who, r)) = self
            .acks
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            if let Err(e) = r {
                let _ = who;
                return e;
            }
        }
        channel_err(id, "the channel thread ended")
    }

    fn check_cancel(&self) -> Result<()> {
        if self.env.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Hands the current batch to a channel with room, waiting when every queue is full
    /// (running `watch` every 100 ms meanwhile: it may end the wait with an error).
    fn dispatch(
        &mut self,
        phase: Phase,
        pass: u64,
        watch: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(PAGES_PER_PACKET));
        let mut job = Job::Pages { pages, phase, pass };
        let n = self.queues.len();
        for i in 0..n {
            let q = (self.next + i) % n;
            match self.queues[q].try_send(job) {
                Ok(()) => {
                    self.next = (q + 1) % n;
                    return Ok(());
                }
                Err(TrySendError::Full(j)) => job = j,
                Err(TrySendError::Disconnected(_)) => return Err(self.channel_failure(q)),
            }
        }
        loop {
            self.check_cancel()?;
            let mut sel = Select::new();
            for q in &self.queues {
                sel.send(q);
            }
            let Ok(op) = sel.select_timeout(POLL) else {
                watch()?;
                continue;
            };
            let i = op.index();
            return match op.send(&self.queues[i], job) {
                Ok(()) => {
                    self.next = (i + 1) % n;
                    Ok(())
                }
                Err(_) => Err(self.channel_failure(i)),
            };
        }
    }

    /// Queues every page whose bit is set in `bitmap` (clearing the bits); `tracker`, when
    /// given, re-arms each clear chunk before its first page is queued. `between` runs
    /// after every 1024 pages and every 100 ms while the channels are all busy. Returns the
    /// pages queued.
    pub fn send_bitmap(
        &mut self,
        bitmap: &AtomicBitmap,
        tracker: Option<&dyn DirtyTracker>,
        phase: Phase,
        pass: u64,
        mut between: impl FnMut() -> Result<()>,
    ) -> Result<u64> {
        let chunk = tracker.and_then(|t| t.clear_chunk_pages().map(|c| c.max(64)));
        let mut current = u64::MAX;
        let mut sent = 0u64;
        for w in 0..bitmap.word_count() {
            let mut bits = bitmap.take_word(w);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let page = w as u64 * 64 + u64::from(b);
                let step = (|| {
                    if let (Some(t), Some(size)) = (tracker, chunk) {
                        if page / size != current {
                            current = page / size;
                            t.prepare_send(current * size, size)
                                .map_err(MigrationError::Vm)?;
                        }
                    }
                    self.batch.push(page);
                    if self.batch.len() == PAGES_PER_PACKET {
                        self.dispatch(phase, pass, &mut between)?;
                    }
                    Ok(())
                })();
                if let Err(e) = step {
                    // Put back what was not sent, so nothing is lost if this is retried.
                    bitmap.or_word(w, bits);
                    for &p in &self.batch {
                        bitmap.set(p);
                    }
                    self.batch.clear();
                    return Err(e);
                }
                sent += 1;
                if sent.is_multiple_of(1024) {
                    between()?;
                }
            }
        }
        self.dispatch(phase, pass, &mut between)?;
        Ok(sent)
    }

    /// Ends pass `pass`: every channel sends a SYNC packet after its queued pages; returns
    /// once all have (their earlier packets are then written to the sockets). `watch` runs
    /// every 100 ms while waiting and may end the wait with an error (the destination
    /// reported a failure, say).
    pub fn sync(
        &mut self,
        pass: u64,
        phase: Phase,
        mut watch: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.dispatch(phase, pass, &mut watch)?;
        for id in 0..self.queues.len() {
            let mut job = Job::Sync { pass, phase };
            loop {
                self.check_cancel()?;
                match self.queues[id].send_timeout(job, POLL) {
                    Ok(()) => break,
                    Err(crossbeam_channel::SendTimeoutError::Timeout(j)) => {
                        watch()?;
                        job = j
                    }
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                        return Err(self.channel_failure(id))
                    }
                }
            }
        }
        let mut done = 0;
        while done < self.queues.len() {
            self.check_cancel()?;
            match self.acks.recv_timeout(POLL) {
                Ok((_, Ok(()))) => done += 1,
                Ok((_, Err(e))) => return Err(e),
                Err(RecvTimeoutError::Timeout) => watch()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(channel_err(0, "every channel thread ended"))
                }
            }
        }
        Ok(())
    }

    /// Closes the queues and waits for the channel threads (after the last sync).
    pub fn finish(mut self) -> Result<()> {
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        while let Ok((_, r)) = self.acks.try_recv() {
            r?;
        }
        Ok(())
    }
}

impl Drop for MultifdSender {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        // A failed or cancelled migration: wake any thread blocked on its socket.
        for s in &self.sockets {
            s.shutdown();
        }
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Turns a batch of pages into a packet: finds zero pages, hashes the others and, with
/// compression, copies them into a staging buffer and compresses them (raw when that does
/// not shrink them). Its buffers and compression context are reused from packet to packet.
pub struct PacketBuilder {
    method: Method,
    compressor: Compressor,
    pages: PacketPages,
    head: Vec<u8>,
    staging: Vec<u8>,
    out: Vec<u8>,
    data: DataKind,
    data_len: usize,
    normal_mask: Vec<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DataKind {
    /// The normal pages themselves (no compression).
    Pages,
    /// The staging copy (compression did not shrink it).
    Staging,
    /// The compressed bytes.
    Compressed,
}

impl PacketBuilder {
    /// A builder for `method` at `level`.
    pub fn new(
        method: Method,
        level: u8,
    ) -> std::result::Result<Self, super::compress::CompressError> {
        Ok(PacketBuilder {
            method,
            compressor: Compressor::new(method, level)?,
            pages: PacketPages::default(),
            head: Vec::with_capacity(64 + PAGES_PER_PACKET * 24),
            staging: Vec::new(),
            out: Vec::new(),
            data: DataKind::Pages,
            data_len: 0,
            normal_mask: Vec::with_capacity(PAGES_PER_PACKET),
        })
    }

    /// Prepares packet `packet_num` of pass `pass` for `pages` (RAM offset, bytes); at most
    /// [`PAGES_PER_PACKET`] of them.
    pub fn build(&mut self, pages: &[(u64, &[u8])], packet_num: u64, pass: u64) {
        self.pages.clear();
        self.normal_mask.clear();
        let pages = &pages[..pages.len().min(PAGES_PER_PACKET)];
        for &(offset, bytes) in pages {
            let normal = !is_zero_page(bytes);
            self.normal_mask.push(normal);
            if normal {
                self.pages.normal.push((offset, 0));
            } else {
                self.pages.zero.push(offset);
            }
        }
        let raw_len = self.pages.normal.len() * PAGE_SIZE;
        let mut flags = self.method.flag();
        let mask = &self.normal_mask;
        let normal_bytes = pages
            .iter()
            .zip(mask.iter())
            .filter(|(_, &n)| n)
            .map(|(p, _)| p.1);
        if self.method == Method::None {
            // Hashed here and sent straight from guest memory (see stream::ram for why a
            // page that changes in flight is harmless).
            for ((_, hash), bytes) in self.pages.normal.iter_mut().zip(normal_bytes) {
                *hash = page_hash(bytes);
            }
            self.data = DataKind::Pages;
            self.data_len = raw_len;
        } else {
            // Compressors get a stable copy: deflate may emit a broken stream when its input
            // changes under it (QEMU copies for zlib for that reason).
            if self.staging.len() < raw_len {
                self.staging.resize(raw_len, 0);
            }
            for (i, ((_, hash), src)) in self.pages.normal.iter_mut().zip(normal_bytes).enumerate()
            {
                let dst = &mut self.staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                if src.len() == PAGE_SIZE {
                    dst.copy_from_slice(src);
                }
                *hash = page_hash(dst);
            }
            match self
                .compressor
                .compress(&self.staging[..raw_len], &mut self.out)
            {
                Some(n) => {
                    self.data = DataKind::Compressed;
                    self.data_len = n;
                }
                None => {
                    flags |= FLAG_RAW;
                    self.data = DataKind::Staging;
                    self.data_len = raw_len;
                }
            }
        }
        if self.pages.normal.is_empty() {
            flags = self.method.flag();
            self.data = DataKind::Pages;
            self.data_len = 0;
        }
        let header = PacketHeader {
            flags,
            pages_alloc: PAGES_PER_PACKET as u32,
            normal_pages: self.pages.normal.len() as u32,
            next_packet_size: self.data_len as u32,
            packet_num,
            zero_pages: self.pages.zero.len() as u32,
            pass,
        };
        self.pages.encode(&header, &mut self.head);
    }

    /// The packet up to its data (header, offsets, hashes, checksum).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The data area when the builder holds it (compressed, or staged raw); None when the
    /// data is the normal pages themselves, sent from where they are.
    pub fn data(&self) -> Option<&[u8]> {
        match self.data {
            DataKind::Pages => None,
            DataKind::Staging => Some(&self.staging[..self.data_len]),
            DataKind::Compressed => Some(&self.out[..self.data_len]),
        }
    }

    /// Bytes of the data area.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Pages with data in the packet.
    pub fn normal_pages(&self) -> usize {
        self.pages.normal.len()
    }

    /// Zero pages in the packet.
    pub fn zero_pages(&self) -> usize {
        self.pages.zero.len()
    }

    /// Whether the `i`th page given to [`PacketBuilder::build`] went in as a normal page.
    pub fn is_normal(&self, i: usize) -> bool {
        self.normal_mask.get(i).copied().unwrap_or(false)
    }
}

/// One channel's thread state: socket, buffers, compression context.
struct Worker {
    id: usize,
    ch: Channel,
    zc: Option<ZeroCopySender>,
    ram: Arc<GuestRam>,
    env: Arc<dyn SendEnv>,
    stats: Arc<MultifdStats>,
    method: Method,
    builder: PacketBuilder,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>, acks: Sender<Ack>) {
        for job in rx {
            let (r, sync) = match job {
                Job::Pages { pages, phase, pass } => (self.send_pages(&pages, phase, pass), false),
                Job::Sync { pass, phase } => (self.send_sync(pass, phase), true),
            };
            match r {
                Ok(()) if sync => {
                    if acks.send((self.id, Ok(()))).is_err() {
                        return;
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    let _ = acks.send((self.id, Err(e)));
                    return;
                }
            }
        }
    }

    fn stats(&self) -> &ChannelStats {
        &self.stats.channels[self.id]
    }

    fn io_err(&self, e: std::io::Error) -> MigrationError {
        if self.env.cancelled() {
            return MigrationError::Cancelled;
        }
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return channel_err(
                self.id,
                format!(
                    "no progress sending for {:?}: the destination stopped reading or the link is down ({e})",
                    transport::WRITE_TIMEOUT
                ),
            );
        }
        channel_err(self.id, e)
    }

    fn account(&self, bytes: u64, phase: Phase) -> Result<()> {
        self.env
            .counters()
            .add_sent(Counted::Multifd(self.id), phase, bytes);
        self.stats().bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.env.limiter().acquire(bytes).is_err() || self.env.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    fn next_packet_num(&self) -> u64 {
        self.stats.packet_num.fetch_add(1, Ordering::Relaxed)
    }

    fn send_pages(&mut self, pages: &[u64], phase: Phase, pass: u64) -> Result<()> {
        let ram = self.ram.clone();
        let mut list = Vec::with_capacity(pages.len());
        for &p in pages {
            let bytes = ram
                .page(p)
                .ok_or_else(|| MigrationError::Vm(format!("page {p} is outside guest RAM")))?;
            list.push((p << PAGE_SHIFT, bytes));
        }
        let num = self.next_packet_num();
        let b = &mut self.builder;
        b.build(&list, num, pass);
        let (normal, zero) = (b.normal_pages(), b.zero_pages());
        let (raw_len, data_len) = (normal * PAGE_SIZE, b.data_len());
        let head_len = b.head().len();
        {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(normal + 1);
            slices.push(IoSlice::new(b.head()));
            match b.data() {
                Some(d) => slices.push(IoSlice::new(d)),
                None => {
                    for (i, &(_, bytes)) in list.iter().enumerate() {
                        if b.is_normal(i) {
                            slices.push(IoSlice::new(bytes));
                        }
                    }
                }
            }
            let r = match self.zc.as_mut() {
                Some(zc) if self.method == Method::None && normal > 0 => self
                    .ch
                    .write_all(&slices[0])
                    .and_then(|_| zc.send_all(&mut slices[1..])),
                _ => write_all_vectored(&mut self.ch, &mut slices),
            };
            if let Err(e) = r {
                return Err(self.io_err(e));
            }
        }
        let s = self.stats();
        s.packets.fetch_add(1, Ordering::Relaxed);
        s.normal_pages.fetch_add(normal as u64, Ordering::Relaxed);
        s.zero_pages.fetch_add(zero as u64, Ordering::Relaxed);
        s.raw_bytes.fetch_add(raw_len as u64, Ordering::Relaxed);
        s.data_bytes.fetch_add(data_len as u64, Ordering::Relaxed);
        let c = self.env.counters();
        c.add_normal_pages(normal as u64);
        c.add_zero_pages(zero as u64);
        self.account((head_len + data_len) as u64, phase)
    }

    fn send_sync(&mut self, pass: u64, phase: Phase) -> Result<()> {
        if let Some(zc) = self.zc.as_mut() {
            match zc.flush() {
                Ok(true) => self.env.counters().inc_dirty_sync_missed_zero_copy(),
                Ok(false) => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        let header = PacketHeader {
            flags: FLAG_SYNC | self.method.flag(),
            pages_alloc: PAGES_PER_PACKET as u32,
            normal_pages: 0,
            next_packet_size: 0,
            packet_num: self.next_packet_num(),
            zero_pages: 0,
            pass,
        };
        let mut head = Vec::with_capacity(64);
        PacketPages::default().encode(&header, &mut head);
        if let Err(e) = self.ch.write_all(&head).and_then(|_| self.ch.flush()) {
            return Err(self.io_err(e));
        }
        self.stats().packets.fetch_add(1, Ordering::Relaxed);
        self.account(head.len() as u64, phase)
    }
}
