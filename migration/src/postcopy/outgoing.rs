//! The source's side of postcopy: the switch and the commit, then serving page requests
//! while pushing the remaining pages, pausing when the link breaks and resuming over a new
//! connection (see the sequence in [`super`]).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ram::{AtomicBitmap, GuestRam, PAGE_SHIFT, PAGE_SIZE};

use super::urgent::{RpMsg, UrgentContext, UrgentSender};
use super::wire::{encode_hello, Listen, LISTEN_ACK_RECEIVED, LISTEN_PREEMPT};
use super::{PostcopyError, GUEST_LOST};
use crate::error::MigrationError;
use crate::info::{Channel as CounterChannel, MigrationStatus, Phase};
use crate::options::Capability;
use crate::rate_limit::RateLimiter;
use crate::source::ram_sender::RamSender;
use crate::source::spawn_reply_reader;
use crate::source::Shared;
use crate::stream::frame::{FrameKind, FrameWriter, MAX_FRAME_PAYLOAD};
use crate::stream::header::{
    Header, FEATURE_POSTCOPY, FEATURE_POSTCOPY_RESUME, FEATURE_PREEMPT_CHANNEL, HEADER_LEN,
    STREAM_VERSION,
};
use crate::stream::ranges::{encode_ranges, gaps_of, ranges_of, PageRange, RANGE_LEN};
use crate::stream::Reply;
use crate::transport::tls::Security;
use crate::transport::{self, Channel, MigrationUri};
use crate::vm::DirtyTracker;

/// How long the source waits for POSTCOPY_READY or RESUME_READY.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Background pages per RAM frame.
const BATCH: usize = 64;

/// What the precopy thread hands over at the switch.
pub(crate) struct Handover {
    /// The main stream.
    pub out: FrameWriter<Channel>,
    /// The reply queue (the return-path reader feeds it).
    pub rp_rx: Receiver<RpMsg>,
    /// Pages not sent yet or dirtied since (before the last sync).
    pub bitmap: AtomicBitmap,
    /// Dirty tracking, still running.
    pub tracker: Arc<dyn DirtyTracker>,
}

/// The next set bit at or after `from`, wrapping around once.
fn next_set(bm: &AtomicBitmap, from: u64) -> Option<u64> {
    let words = bm.word_count();
    if words == 0 {
        return None;
    }
    let len = bm.len();
    let start = (from.min(len.saturating_sub(1)) / 64) as usize;
    for k in 0..=words {
        let w = (start + k) % words;
        let mut word = bm.word(w);
        if k == 0 {
            word &= u64::MAX << (from % 64);
        }
        if word != 0 {
            let p = w as u64 * 64 + u64::from(word.trailing_zeros());
            if p < len {
                return Some(p);
            }
        }
    }
    None
}

/// The postcopy phase of one outgoing migration.
struct Postcopy<'a> {
    shared: &'a Arc<Shared>,
    security: &'a Security,
    ram: Arc<GuestRam>,
    id: u64,
    preempt: bool,
    release: bool,
    out: FrameWriter<Channel>,
    rx: Receiver<RpMsg>,
    events_tx: Sender<RpMsg>,
    events_rx: Receiver<RpMsg>,
    urgent: Option<UrgentSender>,
    to_send: Arc<AtomicBitmap>,
    acked: Arc<AtomicBitmap>,
    unlimited: RateLimiter,
    never: AtomicBool,
    cursor: u64,
    end_sent: bool,
    done: bool,
    began: Instant,
    accounted: u64,
}

/// From `migrate-start-postcopy` to the end: switch, commit, serve, recover.
///
/// Errors before the commit leave the guest to be resumed by the caller (`stopped_vcpus`);
/// from the commit on, `stopped_vcpus` is cleared: the guest never runs here again.
pub(crate) fn run(
    shared: &Arc<Shared>,
    uri: &MigrationUri,
    security: &Security,
    h: Handover,
    stopped_vcpus: &mut bool,
) -> Result<(), MigrationError> {
    let caps = *shared.caps();
    let ram = shared.vm.ram();
    let pages = ram.page_count();
    let mut out = h.out;
    let stop_at = shared.stop_for_switchover(stopped_vcpus, &mut || {
        crate::source::send_keepalive(&mut out)
    })?;
    shared.set_status(MigrationStatus::PostcopyActive);
    shared
        .options
        .enter_postcopy(|p| shared.limiter.set_limit(p.max_postcopy_bandwidth));
    shared.set_throttle(0);
    shared.limiter.restore();
    h.tracker.sync(&h.bitmap).map_err(MigrationError::Vm)?;
    shared.counters.inc_dirty_sync_count();
    h.tracker.stop();
    let to_send = Arc::new(h.bitmap);
    let before = out.bytes_written();

    // The pages the destination must drop, its state, and the switch itself.
    let discard = ranges_of(&to_send);
    for chunk in discard.chunks(MAX_FRAME_PAYLOAD / RANGE_LEN) {
        let mut b = Vec::with_capacity(chunk.len() * RANGE_LEN);
        encode_ranges(chunk, &mut b);
        out.frame(FrameKind::Discard, &b)?;
    }
    let state = shared.vm.save_state().map_err(MigrationError::Vm)?;
    out.frame(FrameKind::State, &state)?;
    let id = uuid::Uuid::new_v4().as_u64_pair().0;
    let preempt = caps.get(Capability::PostcopyPreempt);
    let release = caps.get(Capability::ReleaseRam);
    let mut flags = 0;
    if preempt {
        flags |= LISTEN_PREEMPT;
    }
    if release {
        flags |= LISTEN_ACK_RECEIVED;
    }
    out.frame(FrameKind::PostcopyListen, &Listen { id, flags }.encode())?;
    out.flush()?;
    let side = if preempt {
        Some(connect_side(
            shared,
            uri,
            security,
            id,
            FEATURE_PREEMPT_CHANNEL,
        )?)
    } else {
        None
    };
    shared.counters.add_sent(
        CounterChannel::Main,
        Phase::Downtime,
        out.bytes_written() - before,
    );
    let (early, _) = wait_ready(shared, &h.rp_rx, &to_send, pages, false)?;

    // The commit: from here on the guest belongs to the destination.
    shared.postcopy.commit();
    *stopped_vcpus = false;
    let sent_run = out
        .frame(FrameKind::PostcopyRun, &[])
        .and_then(|_| out.flush());
    let downtime = stop_at.map_or(0, |t| t.elapsed().as_millis() as u64);
    shared.set_downtime(downtime);
    let acked = Arc::new(AtomicBitmap::new(pages));
    for g in gaps_of(&to_send) {
        acked.set_range(g.first, g.count);
    }
    let accounted = out.bytes_written();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let mut pc = Postcopy {
        shared,
        security,
        ram,
        id,
        preempt,
        release,
        out,
        rx: h.rp_rx,
        events_tx,
        events_rx,
        urgent: None,
        to_send,
        acked,
        unlimited: RateLimiter::with_limit(0),
        never: AtomicBool::new(false),
        cursor: 0,
        end_sent: false,
        done: false,
        began: Instant::now(),
        accounted,
    };
    pc.release_range_list(&ranges_of(&pc.acked));
    let mut first = Some(match sent_run {
        Ok(()) => pc.start_side(side).and_then(|_| pc.serve_requests(&early)),
        Err(e) => Err(PostcopyError::Link(format!("sending POSTCOPY_RUN: {e}"))),
    });
    loop {
        let r = match first.take() {
            Some(Err(e)) => Err(e),
            _ => pc.serve(),
        };
        match r {
            Ok(()) => break,
            Err(PostcopyError::Link(why)) => pc.pause_and_resume(&why),
            Err(e) => {
                pc.stop_urgent();
                return Err(MigrationError::Config(format!("{GUEST_LOST}: {e}")));
            }
        }
    }
    pc.stop_urgent();
    pc.out.get_mut().shutdown();
    shared.postcopy.set_channels(Vec::new());
    Ok(())
}

/// Connects a side connection (preempt channel or recovery stream) and introduces it.
fn connect_side(
    shared: &Shared,
    uri: &MigrationUri,
    security: &Security,
    id: u64,
    feature: u32,
) -> Result<Channel, PostcopyError> {
    let cancel = AtomicBool::new(false);
    let ch = transport::connect_cancellable(uri, CONNECT_TIMEOUT, &cancel)?;
    let ch = security
        .secure(ch)
        .map_err(|e| PostcopyError::Transport(e.into()))?;
    let ram = shared.vm.ram();
    let header = Header {
        version: STREAM_VERSION,
        features: FEATURE_POSTCOPY | feature,
        uuid: shared.vm.uuid(),
        ram_size: ram.size(),
        page_size: PAGE_SIZE as u32,
        vcpus: shared.vm.vcpus(),
        multifd_channels: 0,
        multifd_compression: 0,
    };
    let mut out = FrameWriter::new(ch);
    let sent = header
        .write_to(out.get_mut())
        .and_then(|_| out.frame(FrameKind::PostcopyHello, &encode_hello(id)))
        .and_then(|_| out.flush());
    if let Err(e) = sent {
        return Err(PostcopyError::Link(format!(
            "introducing a connection: {e}"
        )));
    }
    shared.counters.add_sent(
        CounterChannel::Main,
        Phase::Postcopy,
        out.bytes_written() + HEADER_LEN as u64,
    );
    Ok(out.into_inner())
}

/// Waits for the destination's NEED list and POSTCOPY_READY (or, when `resume`,
/// RESUME_READY): adds the needed pages to `to_send`; returns the pages requested
/// meanwhile and whether the guest already runs there.
fn wait_ready(
    shared: &Shared,
    rx: &Receiver<RpMsg>,
    to_send: &AtomicBitmap,
    pages: u64,
    resume: bool,
) -> Result<(Vec<PageRange>, bool), PostcopyError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut early = Vec::new();
    loop {
        if !resume && shared.cancelled() {
            return Err(PostcopyError::Vm("migration was cancelled".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PostcopyError::Link(format!(
                "the destination did not confirm within {READY_TIMEOUT:?}"
            )));
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Ok(Reply::Need(rs))) => {
                for r in rs.iter().filter(|r| r.within(pages)) {
                    to_send.set_range(r.first, r.count);
                }
            }
            Ok(Ok(Reply::PageRequest(rs))) => {
                early.extend(rs.into_iter().filter(|r| r.within(pages)))
            }
            Ok(Ok(Reply::PostcopyReady)) if !resume => return Ok((early, false)),
            Ok(Ok(Reply::ResumeReady { started })) if resume => return Ok((early, started)),
            Ok(Ok(Reply::Failed(why))) => {
                return Err(if resume {
                    PostcopyError::Link(format!("the destination refused to resume: {why}"))
                } else {
                    PostcopyError::Destination(why)
                })
            }
            Ok(Ok(Reply::SwitchoverAck)) => {}
            Ok(Ok(other)) => {
                return Err(PostcopyError::Protocol(format!(
                    "unexpected {other:?} while switching to postcopy"
                )))
            }
            Ok(Err(why)) => return Err(PostcopyError::Link(why)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PostcopyError::Link("the return path closed".into()))
            }
        }
    }
}

impl Postcopy<'_> {
    /// Starts the urgent thread on a preempt channel (none without preempt).
    fn start_side(&mut self, side: Option<Channel>) -> Result<(), PostcopyError> {
        let mut chans = Vec::new();
        if let Ok(c) = self.out.get_mut().try_clone() {
            chans.push(c);
        }
        if let Some(ch) = side {
            if let Ok(c) = ch.try_clone() {
                chans.push(c);
            }
            let ctx = UrgentContext {
                ram: self.ram.clone(),
                to_send: self.to_send.clone(),
                acked: self.acked.clone(),
                shared: self.shared.clone(),
                events: self.events_tx.clone(),
            };
            self.urgent = Some(UrgentSender::spawn(ch, ctx).map_err(|e| {
                PostcopyError::Vm(format!("cannot start the urgent-page thread: {e}"))
            })?);
        }
        self.shared.postcopy.set_channels(chans);
        Ok(())
    }

    fn stop_urgent(&mut self) {
        if let Some(u) = self.urgent.take() {
            u.stop();
        }
    }

    /// Charges bytes written on the main stream since the last call to the rate limit.
    fn charge(&mut self) {
        let now = self.out.bytes_written();
        self.shared
            .limiter
            .account(now.saturating_sub(self.accounted));
        self.accounted = now;
    }

    /// Frees the source's copy of pages the destination has (release-ram).
    fn release_range_list(&self, ranges: &[PageRange]) {
        if !self.release {
            return;
        }
        let mut n = 0;
        for r in ranges {
            match self
                .ram
                .discard(r.first << PAGE_SHIFT, r.count << PAGE_SHIFT)
            {
                Ok(()) => n += r.count,
                Err(e) => eprintln!("ferry: release-ram: {e}"),
            }
        }
        self.shared.postcopy.add_released(n);
    }

    /// Sends requested pages on the main stream at once (without postcopy-preempt).
    fn serve_requests(&mut self, ranges: &[PageRange]) -> Result<(), PostcopyError> {
        if ranges.is_empty() {
            return Ok(());
        }
        let pages = self.ram.page_count();
        let mut n = 0;
        {
            let mut sender = RamSender::new(
                &self.ram,
                &mut self.out,
                &self.shared.counters,
                &self.unlimited,
                &self.never,
                Phase::Postcopy,
            );
            for r in ranges {
                for p in r.pages().filter(|&p| p < pages) {
                    if self.acked.get(p) {
                        continue;
                    }
                    self.to_send.test_and_clear(p);
                    sender.send_page(p).map_err(link_error)?;
                    n += 1;
                    // The background stream goes on from there: guests touch neighbours.
                    self.cursor = p + 1;
                }
            }
            sender.finish().map_err(link_error)?;
        }
        self.out
            .flush()
            .map_err(|e| PostcopyError::Link(e.to_string()))?;
        self.charge();
        self.shared
            .counters
            .add_postcopy_requests(ranges.len() as u64);
        self.shared.postcopy.add_urgent(n);
        Ok(())
    }

    /// Sends up to [`BATCH`] background pages; returns how many (0 when all are sent).
    fn push_batch(&mut self) -> Result<usize, PostcopyError> {
        let mut n = 0;
        {
            let mut sender = RamSender::new(
                &self.ram,
                &mut self.out,
                &self.shared.counters,
                &self.unlimited,
                &self.never,
                Phase::Postcopy,
            );
            while n < BATCH {
                let Some(p) = next_set(&self.to_send, self.cursor) else {
                    break;
                };
                self.cursor = p + 1;
                if self.to_send.test_and_clear(p) && !self.acked.get(p) {
                    sender.send_page(p).map_err(link_error)?;
                    n += 1;
                }
            }
            sender.finish().map_err(link_error)?;
        }
        self.charge();
        Ok(n)
    }

    fn handle(&mut self, m: RpMsg) -> Result<(), PostcopyError> {
        let pages = self.ram.page_count();
        match m {
            Ok(Reply::PageRequest(rs)) => {
                let rs: Vec<PageRange> = rs.into_iter().filter(|r| r.within(pages)).collect();
                self.serve_requests(&rs)
            }
            Ok(Reply::Received(rs)) => {
                let rs: Vec<PageRange> = rs.into_iter().filter(|r| r.within(pages)).collect();
                for r in &rs {
                    self.acked.set_range(r.first, r.count);
                }
                self.release_range_list(&rs);
                Ok(())
            }
            Ok(Reply::PostcopyDone) => {
                self.done = true;
                Ok(())
            }
            Ok(Reply::Failed(why)) => Err(PostcopyError::Destination(why)),
            Ok(Reply::Need(_) | Reply::SwitchoverAck) => Ok(()),
            Ok(other) => Err(PostcopyError::Protocol(format!(
                "unexpected {other:?} during postcopy"
            ))),
            // Once the destination has every page it may close the connection at once.
            Err(_) if self.done => Ok(()),
            Err(why) => Err(PostcopyError::Link(why)),
        }
    }

    fn publish(&self) {
        let remaining = self.to_send.count_ones() * PAGE_SIZE as u64;
        let secs = self.began.elapsed().as_secs_f64().max(1e-3);
        let bytes = self.shared.counters.phase_bytes(Phase::Postcopy);
        let pps = (self.shared.counters.total_pages() as f64 / secs) as u64;
        self.shared
            .publish(0, bytes as f64 * 8.0 / 1e6 / secs, pps, remaining);
    }

    /// Serves requests and pushes pages until the destination has every page.
    fn serve(&mut self) -> Result<(), PostcopyError> {
        match self.serve_until_done() {
            Err(PostcopyError::Link(why)) => {
                // The destination closes its end once it has every page: a POSTCOPY_DONE
                // may wait in the queue behind the failed write.
                let deadline = Instant::now() + Duration::from_millis(300);
                while let Ok(m) = self
                    .rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if matches!(m, Ok(Reply::PostcopyDone)) {
                        self.done = true;
                        return Ok(());
                    }
                }
                Err(PostcopyError::Link(why))
            }
            other => other,
        }
    }

    fn serve_until_done(&mut self) -> Result<(), PostcopyError> {
        let mut last_publish = Instant::now();
        loop {
            let pushing = !self.end_sent;
            let budget = self.shared.limiter.has_budget();
            let wait = match (pushing, budget) {
                (true, true) => Duration::ZERO,
                (true, false) => Duration::from_millis(2),
                (false, _) => Duration::from_millis(50),
            };
            // The urgent thread's news first (a broken preempt channel), then replies.
            let first = if let Ok(m) = self.events_rx.try_recv() {
                Some(m)
            } else if wait.is_zero() {
                self.rx.try_recv().ok()
            } else {
                match self.rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) if !self.done => {
                        return Err(PostcopyError::Link("the return path closed".into()))
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            };
            if let Some(m) = first {
                self.handle(m)?;
                while let Ok(m) = self.rx.try_recv() {
                    self.handle(m)?;
                }
            }
            if self.done {
                self.publish();
                return Ok(());
            }
            if pushing && budget && self.push_batch()? == 0 {
                let mut end = Vec::with_capacity(16);
                end.extend_from_slice(&self.shared.counters.total_pages().to_le_bytes());
                end.extend_from_slice(&0u64.to_le_bytes());
                self.out
                    .frame(FrameKind::End, &end)
                    .and_then(|_| self.out.flush())
                    .map_err(|e| PostcopyError::Link(e.to_string()))?;
                self.charge();
                self.end_sent = true;
            }
            if last_publish.elapsed() >= Duration::from_millis(100) {
                self.publish();
                last_publish = Instant::now();
            }
        }
    }

    /// Waits in postcopy-paused for `migrate {"resume": true}` and reconnects; returns once
    /// postcopy runs again.
    fn pause_and_resume(&mut self, why: &str) {
        eprintln!(
            "ferry: postcopy paused: {why}; the guest runs on the destination and waits for its missing pages: run migrate-recover there, then migrate with \"resume\": true here"
        );
        self.shared
            .set_error_text(&format!("postcopy paused: {why}"));
        self.shared.set_status(MigrationStatus::PostcopyPaused);
        self.out.get_mut().shutdown();
        self.stop_urgent();
        self.shared.postcopy.set_channels(Vec::new());
        self.publish();
        loop {
            let Some(uri) = self.shared.postcopy.wait_resume(Duration::from_millis(500)) else {
                continue;
            };
            self.shared.set_status(MigrationStatus::PostcopyRecover);
            match self.reconnect(uri) {
                Ok(()) => {
                    self.shared.clear_error();
                    self.shared.set_status(MigrationStatus::PostcopyActive);
                    return;
                }
                Err(e) => {
                    eprintln!("ferry: resuming postcopy failed: {e}");
                    self.shared
                        .set_error_text(&format!("resuming postcopy failed: {e}"));
                    self.shared.set_status(MigrationStatus::PostcopyPaused);
                }
            }
        }
    }

    /// The recovery handshake over a new connection to `uri`.
    fn reconnect(&mut self, uri: MigrationUri) -> Result<(), PostcopyError> {
        let pages = self.ram.page_count();
        let ch = connect_side(
            self.shared,
            &uri,
            self.security,
            self.id,
            FEATURE_POSTCOPY_RESUME,
        )?;
        let rx = spawn_reply_reader(&ch).map_err(PostcopyError::Vm)?;
        let side = if self.preempt {
            match connect_side(
                self.shared,
                &uri,
                self.security,
                self.id,
                FEATURE_PREEMPT_CHANNEL,
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    ch.shutdown();
                    return Err(e);
                }
            }
        } else {
            None
        };
        let need = AtomicBitmap::new(pages);
        let ready = wait_ready(self.shared, &rx, &need, pages, true);
        let (early, started) = match ready {
            Ok(r) => r,
            Err(e) => {
                ch.shutdown();
                if let Some(s) = side {
                    s.shutdown();
                }
                return Err(e);
            }
        };
        // The destination's list is the truth: exactly those pages are still to send.
        self.to_send.clear_all();
        self.acked.set_all();
        for r in ranges_of(&need) {
            self.to_send.set_range(r.first, r.count);
            self.acked.clear_range(r.first, r.count);
        }
        self.release_range_list(&gaps_of(&need));
        self.out = FrameWriter::new(ch);
        self.accounted = self.out.bytes_written();
        self.rx = rx;
        while self.events_rx.try_recv().is_ok() {}
        self.cursor = 0;
        self.end_sent = false;
        self.done = false;
        if !started {
            self.out
                .frame(FrameKind::PostcopyRun, &[])
                .and_then(|_| self.out.flush())
                .map_err(|e| PostcopyError::Link(format!("sending POSTCOPY_RUN: {e}")))?;
        }
        self.start_side(side)?;
        self.serve_requests(&early)
    }
}

/// A failed write of pages: the link broke.
fn link_error(e: MigrationError) -> PostcopyError {
    match e {
        MigrationError::Stream(s) => PostcopyError::Link(s.to_string()),
        other => PostcopyError::Link(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_scans_forward_and_wraps_once() {
        let bm = AtomicBitmap::new(200);
        assert_eq!(next_set(&bm, 0), None);
        bm.set(5);
        bm.set(130);
        assert_eq!(next_set(&bm, 0), Some(5));
        assert_eq!(next_set(&bm, 6), Some(130));
        assert_eq!(next_set(&bm, 131), Some(5), "wraps around");
        assert_eq!(next_set(&bm, 500), Some(5));
        bm.clear_range(0, 200);
        bm.set(199);
        assert_eq!(next_set(&bm, 199), Some(199));
    }
}
