//! The destination's side of postcopy: from POSTCOPY_LISTEN to the last page, with
//! pauses and recoveries (see the sequence in [`super`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ram::{AtomicBitmap, PAGE_SHIFT, PAGE_SIZE};

use super::control::DestHooks;
use super::fault::{FaultContext, FaultThread};
use super::link::{Acker, ReplyLink};
use super::pages::PageTracker;
use super::receive::{stream_failure, Event, Placer};
use super::registration::MissingRegistration;
use super::wire::{decode_hello, Listen};
use super::{PostcopyError, GUEST_LOST};
use crate::dest::loader::check_header;
use crate::dest::DestShared;
use crate::error::MigrationError;
use crate::info::MigrationStatus;
use crate::options::Capability;
use crate::stream::frame::{Frame, FrameKind, FrameReader};
use crate::stream::header::{Header, FEATURE_POSTCOPY_RESUME, FEATURE_PREEMPT_CHANNEL};
use crate::stream::ranges::{ranges_of, PageRange};
use crate::stream::Reply;
use crate::transport::tls::Security;
use crate::transport::{Channel, Listener};
use crate::vm::DestVm;

/// How long a side connection (preempt channel, recovery stream) may take to introduce itself.
const SIDE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination waits for the source to close the connections after DONE.
const DONE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the loader collected up to POSTCOPY_LISTEN.
pub(crate) struct Switch {
    /// The STATE frame.
    pub state: Vec<u8>,
    /// The DISCARD ranges.
    pub discard: Vec<PageRange>,
    /// The LISTEN frame.
    pub listen: Listen,
    /// Pages whose last precopy copy did not match its hash.
    pub suspect: Vec<PageRange>,
}

/// The incoming migration this postcopy belongs to.
pub(crate) struct Ctx<'a> {
    /// Status and controls.
    pub shared: &'a DestShared,
    /// Where the preempt channel connects.
    pub listener: &'a Listener,
    /// TLS for new connections.
    pub security: &'a Security,
    /// The VM.
    pub vm: &'a dyn DestVm,
    /// The VMM's postcopy hooks.
    pub hooks: &'a dyn DestHooks,
}

/// One postcopy migration on the destination.
struct Session<'a> {
    ctx: &'a Ctx<'a>,
    reg: Arc<MissingRegistration>,
    tracker: Arc<PageTracker>,
    main: Arc<ReplyLink>,
    requests: Arc<ReplyLink>,
    acker: Arc<Acker>,
    fault: Option<FaultThread>,
    listen: Listen,
    started: bool,
}

/// Runs postcopy from POSTCOPY_LISTEN to the last page; Ok once every page is in place.
pub(crate) fn run(
    ctx: &Ctx<'_>,
    mut reader: FrameReader<Channel>,
    reply: Channel,
    sw: Switch,
) -> Result<(), MigrationError> {
    let ram = ctx.vm.ram();
    let pages = ram.page_count();
    ctx.hooks.before_postcopy();
    // State first: nothing may touch registered memory before the source serves requests.
    ctx.vm.load_state(&sw.state).map_err(MigrationError::Vm)?;
    let reg = MissingRegistration::new(&ram)?;
    let needed_bm = AtomicBitmap::new(pages);
    for r in sw.discard.iter().chain(&sw.suspect) {
        needed_bm.set_range(r.first, r.count);
    }
    let needed = ranges_of(&needed_bm);
    for r in &needed {
        ram.discard(r.first << PAGE_SHIFT, r.count << PAGE_SHIFT)
            .map_err(|e| MigrationError::Vm(format!("discarding stale pages: {e}")))?;
    }
    let tids = if ctx.shared.options.caps().get(Capability::PostcopyBlocktime) {
        let tids = ctx.hooks.vcpu_thread_ids();
        if !reg.has_thread_ids() || tids.is_empty() {
            eprintln!(
                "ferry: postcopy-blocktime: this kernel or VMM does not name faulting threads; not measured"
            );
            None
        } else {
            Some(tids)
        }
    } else {
        None
    };
    let tracker = Arc::new(PageTracker::new(pages, &needed, tids));
    ctx.shared.postcopy.set_tracker(tracker.clone());
    ctx.shared.set_status(MigrationStatus::PostcopyActive);
    let reg = Arc::new(reg);
    ctx.shared.postcopy.set_registration(Some(reg.clone()));
    let main = Arc::new(ReplyLink::new());
    main.attach(reply);
    let requests = if sw.listen.preempt() {
        Arc::new(ReplyLink::new())
    } else {
        main.clone()
    };
    let side = if sw.listen.preempt() {
        let s = accept_side(ctx, sw.listen.id, FEATURE_PREEMPT_CHANNEL, None)?;
        requests.attach(s.reply);
        Some(s.reader)
    } else {
        None
    };
    let acker = Arc::new(Acker::new(sw.listen.ack_received()));
    let fault = FaultThread::spawn(FaultContext {
        reg: reg.clone(),
        tracker: tracker.clone(),
        requests: requests.clone(),
        main: main.clone(),
        acker: acker.clone(),
    })
    .map_err(|e| MigrationError::Vm(format!("cannot start the postcopy fault thread: {e}")))?;
    if !(main.send_all(&Reply::chunked(&sw.suspect, Reply::Need))
        && main.send(&Reply::PostcopyReady))
    {
        return Err(MigrationError::DestinationLost(format!(
            "the source went away before postcopy started: {}",
            main.why().unwrap_or_default()
        )));
    }
    let mut s = Session {
        ctx,
        reg,
        tracker,
        main,
        requests,
        acker,
        fault: Some(fault),
        listen: sw.listen,
        started: false,
    };
    let mut side = side;
    loop {
        match s.serve(&mut reader, side.take()) {
            Ok(()) => break,
            Err(PostcopyError::Link(why)) => {
                let (r, sd) = s.pause_and_recover(&why);
                reader = r;
                side = sd;
            }
            Err(e) => {
                s.finish();
                return Err(if s.started {
                    MigrationError::Config(format!("{GUEST_LOST}: {e}"))
                } else {
                    e.into()
                });
            }
        }
    }
    s.finish();
    Ok(())
}

/// A side connection after its introduction.
struct Side {
    reader: FrameReader<Channel>,
    reply: Channel,
}

/// Accepts the next connection on `listener` (the incoming one unless given) and checks
/// that it introduces itself as `feature` of migration `id`.
fn accept_side(
    ctx: &Ctx<'_>,
    id: u64,
    feature: u32,
    listener: Option<&Listener>,
) -> Result<Side, PostcopyError> {
    let listener = listener.unwrap_or(ctx.listener);
    let ch = listener.accept_timeout(SIDE_TIMEOUT)?;
    introduce(ctx, ch, id, feature)
}

/// Reads and checks a side connection's header and POSTCOPY_HELLO.
fn introduce(ctx: &Ctx<'_>, ch: Channel, id: u64, feature: u32) -> Result<Side, PostcopyError> {
    let mut ch = ctx
        .security
        .secure(ch)
        .map_err(|e| PostcopyError::Transport(e.into()))?;
    let _ = ch.set_timeouts(Some(SIDE_TIMEOUT), Some(crate::transport::io_timeout()));
    let header = Header::read_from(&mut ch).map_err(stream_failure)?;
    if !header.has(feature) {
        return Err(PostcopyError::Protocol(format!(
            "a connection with stream features {:#x} where a postcopy {} was expected",
            header.features,
            if feature == FEATURE_PREEMPT_CHANNEL {
                "preempt channel"
            } else {
                "recovery"
            }
        )));
    }
    check_header(&header, ctx.vm).map_err(|e| PostcopyError::Protocol(e.to_string()))?;
    let mut reader = FrameReader::new(ch);
    let ram_size = ctx.vm.ram().size();
    let got = match reader.next(ram_size).map_err(stream_failure)? {
        Frame::Other(FrameKind::PostcopyHello, b) => decode_hello(b)?,
        _ => {
            return Err(PostcopyError::Protocol(
                "a postcopy connection that does not say POSTCOPY_HELLO".into(),
            ))
        }
    };
    if got != id {
        return Err(PostcopyError::Protocol(format!(
            "a connection for postcopy migration {got:#x}, not this one ({id:#x})"
        )));
    }
    let _ = reader
        .get_mut()
        .set_timeouts(None, Some(crate::transport::io_timeout()));
    let reply = reader
        .get_mut()
        .try_clone()
        .map_err(|e| PostcopyError::Vm(format!("cannot clone a socket: {e}")))?;
    Ok(Side { reader, reply })
}

impl Session<'_> {
    fn placer(&self) -> Placer {
        Placer::new(
            self.reg.clone(),
            self.tracker.clone(),
            self.acker.clone(),
            self.main.clone(),
            self.requests.clone(),
        )
    }

    /// Receives pages on the main stream (and the preempt channel) until every page is in
    /// place and POSTCOPY_DONE went out, or a connection fails.
    fn serve(
        &mut self,
        reader: &mut FrameReader<Channel>,
        side: Option<FrameReader<Channel>>,
    ) -> Result<(), PostcopyError> {
        let clone = |c: &Channel| {
            c.try_clone()
                .map_err(|e| PostcopyError::Vm(format!("cannot clone a socket: {e}")))
        };
        let main_ch = clone(reader.get_mut())?;
        let mut chans = vec![clone(&main_ch)?];
        let stop = Arc::new(AtomicBool::new(false));
        let side_error: Arc<Mutex<Option<PostcopyError>>> = Arc::new(Mutex::new(None));
        let mut side_ch = None;
        let side_thread = match side {
            Some(mut r) => {
                let sc = clone(r.get_mut())?;
                chans.push(clone(&sc)?);
                side_ch = Some(sc);
                let (mut placer, err, wake, stop) = (
                    self.placer(),
                    side_error.clone(),
                    clone(&main_ch)?,
                    stop.clone(),
                );
                Some(
                    std::thread::Builder::new()
                        .name("postcopy-preempt".into())
                        .spawn(move || {
                            let e = match placer.next(&mut r) {
                                Ok(ev) => PostcopyError::Protocol(format!(
                                    "{ev:?} on the preempt channel"
                                )),
                                Err(e) => e,
                            };
                            if !stop.load(Ordering::Acquire) {
                                *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                                wake.shutdown();
                            }
                        })
                        .map_err(|e| PostcopyError::Vm(format!("cannot start a thread: {e}")))?,
                )
            }
            None => None,
        };
        self.ctx.shared.postcopy.set_channels(chans);

        // Every page in place: say so, and wake the readers.
        let completed = Arc::new(AtomicBool::new(false));
        let completer = {
            let (tracker, acker, main, stop, completed) = (
                self.tracker.clone(),
                self.acker.clone(),
                self.main.clone(),
                stop.clone(),
                completed.clone(),
            );
            let wake_main = clone(&main_ch)?;
            let wake_side = match &side_ch {
                Some(c) => Some(clone(c)?),
                None => None,
            };
            std::thread::Builder::new()
                .name("postcopy-done".into())
                .spawn(move || loop {
                    if tracker
                        .wait_complete(Duration::from_millis(100), || stop.load(Ordering::Acquire))
                    {
                        acker.flush(&main, true);
                        if main.send(&Reply::PostcopyDone) {
                            completed.store(true, Ordering::Release);
                        }
                        // The source closes the connections when it reads DONE; wake the
                        // readers here only if it does not.
                        let deadline = std::time::Instant::now() + DONE_CLOSE_TIMEOUT;
                        while !stop.load(Ordering::Acquire) && std::time::Instant::now() < deadline
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        if !stop.load(Ordering::Acquire) {
                            wake_main.shutdown();
                            if let Some(s) = &wake_side {
                                s.shutdown();
                            }
                        }
                        return;
                    }
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                })
                .map_err(|e| PostcopyError::Vm(format!("cannot start a thread: {e}")))?
        };

        let mut placer = self.placer();
        let result = loop {
            match placer.next(reader) {
                Ok(Event::Run) => {
                    if !self.started {
                        if let Err(e) = self.ctx.vm.start() {
                            break Err(PostcopyError::Vm(e));
                        }
                        self.started = true;
                    }
                }
                // The background stream is complete; requested pages may still follow.
                Ok(Event::End) => {}
                Err(e) => break Err(e),
            }
            if let Some(e) = self.fault.as_ref().and_then(FaultThread::error) {
                break Err(PostcopyError::Vm(format!("the fault thread failed: {e}")));
            }
        };
        stop.store(true, Ordering::Release);
        let _ = completer.join();
        if let Some(c) = &side_ch {
            c.shutdown();
        }
        if let Some(t) = side_thread {
            let _ = t.join();
        }
        if completed.load(Ordering::Acquire) {
            return Ok(());
        }
        let side_err = side_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (side_err, result) {
            // The preempt channel failed first and woke the main reader: its error is the cause.
            (Some(e), Err(PostcopyError::Link(_))) => Err(e),
            (_, Err(e)) => Err(e),
            (Some(e), Ok(())) => Err(e),
            (None, Ok(())) => Err(PostcopyError::Link("the stream ended".into())),
        }
    }

    /// Waits in postcopy-paused for `migrate-recover` and a recovery connection; returns
    /// the new main stream (and preempt channel) once postcopy runs again.
    fn pause_and_recover(
        &mut self,
        why: &str,
    ) -> (FrameReader<Channel>, Option<FrameReader<Channel>>) {
        eprintln!(
            "ferry: postcopy paused: {why}; vCPUs wait for missing pages: run migrate-recover here, then migrate with \"resume\": true on the source"
        );
        self.ctx.shared.set_status(MigrationStatus::PostcopyPaused);
        self.main.detach();
        self.requests.detach();
        self.ctx.shared.postcopy.set_channels(Vec::new());
        let mut listener: Option<Listener> = None;
        loop {
            let wait = if listener.is_some() {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
            };
            if let Some(l) = self.ctx.shared.postcopy.wait_recover(wait) {
                listener = Some(l);
            }
            let Some(l) = &listener else { continue };
            let Ok(ch) = l.accept_timeout(Duration::from_millis(200)) else {
                continue;
            };
            self.ctx.shared.set_status(MigrationStatus::PostcopyRecover);
            match self.resume(l, ch) {
                Ok(r) => {
                    self.ctx.shared.set_status(MigrationStatus::PostcopyActive);
                    return r;
                }
                Err(e) => {
                    eprintln!("ferry: postcopy recovery failed: {e}");
                    self.main.detach();
                    self.requests.detach();
                    self.ctx.shared.set_status(MigrationStatus::PostcopyPaused);
                }
            }
        }
    }

    /// The recovery handshake on a new connection `ch`.
    fn resume(
        &mut self,
        listener: &Listener,
        ch: Channel,
    ) -> Result<(FrameReader<Channel>, Option<FrameReader<Channel>>), PostcopyError> {
        let main = introduce(self.ctx, ch, self.listen.id, FEATURE_POSTCOPY_RESUME)?;
        self.main.attach(main.reply);
        let side = if self.listen.preempt() {
            match accept_side(
                self.ctx,
                self.listen.id,
                FEATURE_PREEMPT_CHANNEL,
                Some(listener),
            ) {
                Ok(s) => {
                    self.requests.attach(s.reply);
                    Some(s.reader)
                }
                Err(e) => {
                    self.main.send(&Reply::Failed(e.to_string()));
                    return Err(e);
                }
            }
        } else {
            None
        };
        let need = self.tracker.needed_ranges();
        let ok = self.main.send_all(&Reply::chunked(&need, Reply::Need))
            && self.main.send(&Reply::ResumeReady {
                started: self.started,
            });
        if !ok {
            return Err(PostcopyError::Link(
                self.main
                    .why()
                    .unwrap_or_else(|| "the source went away".into()),
            ));
        }
        let again = self.tracker.outstanding_requests();
        if !again.is_empty() {
            self.requests.send_all(&Reply::chunked(
                &crate::stream::ranges::ranges_of_pages(again),
                Reply::PageRequest,
            ));
        }
        Ok((main.reader, side))
    }

    /// Stops the fault thread and unregisters guest memory.
    fn finish(&mut self) {
        if let Some(f) = self.fault.take() {
            f.stop();
        }
        self.main.detach();
        self.requests.detach();
        self.ctx.shared.postcopy.set_channels(Vec::new());
        self.ctx.shared.postcopy.set_registration(None);
        self.reg.unregister();
        let pages = self.tracker.remaining();
        if pages > 0 {
            eprintln!(
                "ferry: postcopy ended with {pages} page(s) ({} KiB) never received",
                pages * PAGE_SIZE as u64 / 1024
            );
        }
    }
}
