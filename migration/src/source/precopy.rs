//! The migration thread: setup, iterations, switchover, completion — and cleanup on failure.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ram::{AtomicBitmap, PAGE_SIZE};
use serde_json::json;

use super::ram_sender::{RamSender, XbzrleStage};
use super::Shared;
use crate::auto_converge::{AutoConverge, ThrottleParams};
use crate::convergence::{
    after_sync, AfterSync, BandwidthEstimator, DirtyPeriodTracker, Progress, SwitchoverLimits,
    SyncReport,
};
use crate::error::{MigrationError, Result};
use crate::info::{MigrationStatus, Phase};
use crate::multifd::{Method, MultifdSender, SendConfig, SendEnv};
use crate::options::Capability;
use crate::stall::StallClock;
use crate::stream::frame::{FrameKind, FrameWriter};
use crate::stream::header::{
    Header, FEATURE_COMPRESS, FEATURE_MULTIFD, FEATURE_SWITCHOVER_ACK, FEATURE_VALIDATE_UUID,
    FEATURE_XBZRLE, HEADER_LEN, STREAM_VERSION,
};
use crate::stream::Reply;
use crate::timeline::SampleKind;
use crate::transport::{self, Channel, MigrationUri};
use crate::xbzrle::XbzrleEncoder;

/// How long connecting may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Passes under the downtime threshold before Ferry switches over even if still shrinking.
const MAX_EXTRA_PASSES: u32 = 4;
/// Expected downtime below which Ferry switches over at once.
const SHORT_DOWNTIME_MS: u64 = 20;

/// Entry point of the migration thread.
pub(super) fn run(shared: Arc<Shared>, uri: MigrationUri) {
    let mut stopped_vcpus = false;
    let result = migrate(&shared, &uri, &mut stopped_vcpus);
    // Whatever happened, tracking and throttling end with the migration.
    shared.vm.dirty_tracker().stop();
    shared.set_throttle(0);
    shared.options.clear_hooks();
    let status = match result {
        Ok(()) => {
            shared.vm.migrated_away();
            MigrationStatus::Completed
        }
        Err(e) => {
            if stopped_vcpus {
                if let Err(r) = shared.vm.resume_vcpus() {
                    eprintln!("ferry: could not resume the guest after a failed migration: {r}");
                }
            }
            if shared.postcopy.committed() {
                // The guest was handed over: it never runs here again (see crate::postcopy).
                shared.vm.migrated_away();
            }
            if shared.cancelled() {
                MigrationStatus::Cancelled
            } else {
                eprintln!("ferry: migration failed: {e}");
                shared.set_error(&e);
                MigrationStatus::Failed
            }
        }
    };
    if let Some(ch) = shared
        .channel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        ch.shutdown();
    }
    // Settings are free again before the final state is announced, as QEMU derives "a
    // migration is running" from the state: a client that reacts to the event at once may
    // change capabilities.
    shared.options.set_in_postcopy(false);
    shared.options.set_running(false);
    shared.set_status(status);
}

/// Reads the destination's replies on a second handle of the channel, in a thread, until
/// the connection ends or the destination reports a failure (which also shuts the channel
/// down); the error says what could not be set up.
pub(crate) fn spawn_reply_reader(
    ch: &Channel,
) -> std::result::Result<Receiver<std::result::Result<Reply, String>>, String> {
    let mut reader = ch
        .try_clone()
        .map_err(|e| format!("cannot clone the migration socket: {e}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("migration-rp".into())
        .spawn(move || loop {
            match Reply::read_from(&mut reader) {
                Ok(Reply::Failed(why)) => {
                    let _ = tx.send(Ok(Reply::Failed(why)));
                    // The migration is over: wake a sender blocked writing to a destination
                    // that no longer reads (its write fails now, and the failure is
                    // explained with the destination's words) instead of leaving it
                    // blocked until the io timeout.
                    reader.shutdown();
                    return;
                }
                Ok(r) => {
                    if tx.send(Ok(r)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the return-path thread: {e}"))?;
    Ok(rx)
}

/// What the source has heard from the destination so far.
pub(super) struct ReplyState {
    pub(super) rx: Option<Receiver<std::result::Result<Reply, String>>>,
    pub(super) switchover_acked: bool,
    pub(super) closed: Option<String>,
}

impl ReplyState {
    /// Drains pending replies; a FAILED reply becomes an error.
    pub(super) fn poll(&mut self) -> Result<()> {
        let Some(rx) = self.rx.clone() else {
            return Ok(());
        };
        while let Ok(r) = rx.try_recv() {
            self.handle(r)?;
        }
        Ok(())
    }

    pub(super) fn handle(&mut self, r: std::result::Result<Reply, String>) -> Result<()> {
        match r {
            Ok(Reply::Failed(why)) => Err(MigrationError::Destination(why)),
            Ok(Reply::SwitchoverAck) => {
                self.switchover_acked = true;
                Ok(())
            }
            Ok(other) => Err(MigrationError::DestinationLost(format!(
                "unexpected {other:?} from the destination"
            ))),
            Err(e) => {
                self.closed = Some(e);
                Ok(())
            }
        }
    }

    /// Turns a write error into the destination's own reason when it sent one, and a
    /// timed-out write into words a user can act on.
    pub(super) fn explain(&mut self, e: MigrationError) -> MigrationError {
        if let Some(rx) = &self.rx {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(Reply::Failed(why))) => return MigrationError::Destination(why),
                // The return path died first (its reason is the real one: a timed-out or
                // reset connection), and then the write broke.
                Ok(Err(why)) => self.closed = Some(why),
                _ => {}
            }
        }
        match e {
            MigrationError::Stream(crate::stream::StreamError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                MigrationError::DestinationLost(format!(
                    "no progress sending for {:?}: the destination stopped reading or the link is down ({io})",
                    crate::transport::io_timeout()
                ))
            }
            MigrationError::Stream(crate::stream::StreamError::Io(io))
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                match &self.closed {
                    Some(why) => MigrationError::DestinationLost(why.clone()),
                    None => MigrationError::DestinationLost(format!("the connection broke ({io})")),
                }
            }
            other => other,
        }
    }

    /// Waits for LOADED. The destination reads what is still in flight on `main` before it
    /// confirms: the wait fails once `main`'s unacknowledged bytes stop shrinking for
    /// [`crate::transport::io_timeout`] (a destination that froze or a link that died at
    /// switchover), however long a slow link takes to deliver them.
    pub(super) fn wait_loaded(&mut self, cancel: &AtomicBool, main: &Channel) -> Result<()> {
        let Some(rx) = &self.rx else { return Ok(()) };
        let limit = crate::transport::io_timeout();
        let mut unacked = StallClock::new(main.unacknowledged_bytes(), limit);
        loop {
            if cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Cancelled);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(Reply::Loaded)) => return Ok(()),
                Ok(Ok(Reply::SwitchoverAck)) => {}
                Ok(Ok(Reply::Failed(why))) => return Err(MigrationError::Destination(why)),
                Ok(Ok(other)) => {
                    return Err(MigrationError::DestinationLost(format!(
                        "unexpected {other:?} from the destination"
                    )))
                }
                Ok(Err(e)) => return Err(MigrationError::DestinationLost(e)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::DestinationLost(
                        self.closed
                            .clone()
                            .unwrap_or_else(|| "connection closed".into()),
                    ))
                }
                Err(RecvTimeoutError::Timeout) => {
                    if unacked.stalled(main.unacknowledged_bytes()) {
                        return Err(MigrationError::DestinationLost(format!(
                            "the destination did not confirm loading the guest within {limit:?} \
                             of its last progress ({} bytes unacknowledged)",
                            unacked.last().unwrap_or(0)
                        )));
                    }
                }
            }
        }
    }
}

/// Between batches of a pass: looks for destination replies, updates the bandwidth
/// estimate, and publishes live figures, with `remaining` shrinking as pages go out
/// (QEMU reports the dirty pages not sent yet).
fn live_tick(
    shared: &Shared,
    estimator: &mut BandwidthEstimator,
    replies: &mut ReplyState,
    pending_at_sync: u64,
    pages_before: u64,
) -> Result<()> {
    replies.poll()?;
    let sent = shared.counters.total_pages().saturating_sub(pages_before) * PAGE_SIZE as u64;
    let remaining = pending_at_sync.saturating_sub(sent);
    estimator.update(&progress(shared, pending_at_sync), &limits(shared));
    shared.publish(
        estimator.expected_downtime_ms(),
        estimator.mbps(),
        estimator.pages_per_second(),
        remaining,
    );
    Ok(())
}

/// What the migration loop knows now, for the bandwidth estimator.
fn progress(shared: &Shared, dirty_bytes: u64) -> Progress {
    Progress {
        now_ns: now_ns(shared.start),
        transferred_bytes: shared.counters.transferred(),
        transferred_pages: shared.counters.total_pages(),
        dirty_bytes_last_sync: dirty_bytes,
        dirty_pages_rate: shared.counters.dirty_pages_rate(),
    }
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

fn throttle_params(shared: &Shared) -> ThrottleParams {
    let p = shared.options.params();
    ThrottleParams {
        auto_converge: shared.caps().get(Capability::AutoConverge),
        throttle_trigger_threshold: p.throttle_trigger_threshold,
        cpu_throttle_initial: p.cpu_throttle_initial,
        cpu_throttle_increment: p.cpu_throttle_increment,
        cpu_throttle_tailslow: p.cpu_throttle_tailslow,
        max_cpu_throttle: p.max_cpu_throttle,
    }
}

fn limits(shared: &Shared) -> SwitchoverLimits {
    SwitchoverLimits {
        downtime_limit_ms: shared.options.params().downtime_limit,
        switchover_bandwidth: 0,
    }
}

/// The multifd settings of this migration, when the capability is on.
fn multifd_config(shared: &Shared, uri: &MigrationUri) -> Result<Option<SendConfig>> {
    if !shared.caps().get(Capability::Multifd) {
        return Ok(None);
    }
    if let MigrationUri::File { .. } = uri {
        return Err(MigrationError::Config(
            "multifd is not supported for file: migrations; use a tcp: or unix: URI, or turn the multifd capability off".into(),
        ));
    }
    let p = shared.options.params();
    let method = Method::from(p.multifd_compression);
    Ok(Some(SendConfig {
        channels: p.multifd_channels,
        method,
        level: match method {
            Method::None => 0,
            Method::Zlib => p.multifd_zlib_level,
            Method::Zstd => p.multifd_zstd_level,
        },
        zero_copy: shared.caps().get(Capability::ZeroCopySend),
        uuid: shared.vm.uuid(),
    }))
}

fn migrate(shared: &Arc<Shared>, uri: &MigrationUri, stopped_vcpus: &mut bool) -> Result<()> {
    let t0 = shared.start;
    let caps = *shared.caps();
    if caps.get(Capability::XIgnoreShared) {
        // Guest memory is shared with the destination: only state travels.
        return super::local::migrate(shared, uri, stopped_vcpus);
    }
    let ram = shared.vm.ram();
    let multifd = multifd_config(shared, uri)?;
    let security = transport::tls::Security::source(&shared.options.params(), uri)
        .map_err(transport::TransportError::from)?;
    let ch = transport::connect_cancellable(uri, CONNECT_TIMEOUT, &shared.cancel).map_err(|e| {
        if shared.cancelled() {
            MigrationError::Cancelled
        } else {
            e.into()
        }
    })?;
    let ch = security
        .secure(ch)
        .map_err(transport::TransportError::from)?;
    if shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    shared.set_channel(Some(ch.try_clone().map_err(|e| {
        MigrationError::Vm(format!("cannot clone the migration channel: {e}"))
    })?));
    let mut replies = ReplyState {
        rx: if ch.is_bidirectional() {
            Some(spawn_reply_reader(&ch).map_err(MigrationError::Vm)?)
        } else {
            None
        },
        switchover_acked: false,
        closed: None,
    };
    let want_ack = caps.get(Capability::SwitchoverAck) && ch.is_bidirectional();
    let bidirectional = ch.is_bidirectional();
    let mut features = 0;
    if caps.get(Capability::ValidateUuid) {
        features |= FEATURE_VALIDATE_UUID;
    }
    if want_ack {
        features |= FEATURE_SWITCHOVER_ACK;
    }
    if multifd.is_some() {
        features |= FEATURE_MULTIFD;
    }
    // Postcopy may follow (migrate-start-postcopy): it needs the return path.
    let postcopy = caps.get(Capability::PostcopyRam) && bidirectional && multifd.is_none();
    if postcopy {
        features |= crate::stream::header::FEATURE_POSTCOPY;
    }
    // As QEMU: with multifd, pages go through the channels and XBZRLE is not used.
    let mut xbzrle = if caps.get(Capability::Xbzrle) && multifd.is_none() {
        features |= FEATURE_XBZRLE;
        Some(
            XbzrleEncoder::new(shared.options.params().xbzrle_cache_size)
                .map_err(|e| MigrationError::Config(format!("XBZRLE cache: {e}")))?,
        )
    } else {
        None
    };
    let mut compress = super::compress::start_pool(shared, multifd.is_some())?;
    if compress.is_some() {
        features |= FEATURE_COMPRESS;
    }
    let header = Header {
        version: STREAM_VERSION,
        features,
        uuid: shared.vm.uuid(),
        ram_size: ram.size(),
        page_size: PAGE_SIZE as u32,
        vcpus: shared.vm.vcpus(),
        multifd_channels: multifd.map_or(0, |m| u32::from(m.channels)),
        multifd_compression: multifd.map_or(0, |m| u32::from(m.method.code())),
    };
    let mut out = FrameWriter::new(ch);
    out.get_mut()
        .write_all(&header.encode())
        .map_err(|e| replies.explain(crate::stream::StreamError::from(e).into()))?;
    out.count_extra(HEADER_LEN as u64);
    shared.counters.add_sent(
        crate::info::Channel::Main,
        Phase::Precopy,
        HEADER_LEN as u64,
    );

    let mut channels = match &multifd {
        Some(cfg) => {
            let env: Arc<dyn SendEnv> = shared.clone();
            let m = MultifdSender::open(uri, cfg, ram.clone(), env, CONNECT_TIMEOUT, &security)
                .map_err(|e| replies.explain(e))?;
            shared.set_multifd_stats(m.stats());
            Some(m)
        }
        None => None,
    };

    let tracker = shared.vm.dirty_tracker();
    tracker.start().map_err(MigrationError::Vm)?;
    let bitmap = AtomicBitmap::new(ram.page_count());
    bitmap.set_all();
    shared.set_setup_time(t0.elapsed().as_millis() as u64);
    shared.set_status(MigrationStatus::Active);

    let mut estimator = BandwidthEstimator::new(&progress(shared, ram.size()), &limits(shared));
    let mut periods = DirtyPeriodTracker::new(PAGE_SIZE as u64);
    periods.reset(
        t0.elapsed().as_millis() as u64,
        shared.counters.transferred(),
    );
    let mut auto = AutoConverge::new();
    let mut pending_bytes = ram.size();
    let mut prev_pending = u64::MAX;
    let mut passes_under = 0u32;
    let mut pass = 0u64;

    loop {
        pass += 1;
        if let (Some(enc), Some(size)) = (xbzrle.as_mut(), shared.take_xbzrle_resize()) {
            enc.resize_cache(size)
                .map_err(|e| MigrationError::Config(format!("resizing the XBZRLE cache: {e}")))?;
        }
        let pages_before = shared.counters.total_pages();
        let mut xbzrle_pages = 0;
        if let Some(mfd) = channels.as_mut() {
            if pass == 1 {
                // Never-touched pages as zero runs on the main stream (see below).
                let mut sender = RamSender::new(
                    &ram,
                    &mut out,
                    &shared.counters,
                    &shared.limiter,
                    &shared.cancel,
                    Phase::Precopy,
                )
                .with_tracker(tracker.as_ref());
                sender
                    .send_holes(&bitmap, || ram.data_ranges())
                    .and_then(|_| sender.finish())
                    .map_err(|e| replies.explain(e))?;
            }
            let cur_pending = pending_bytes;
            mfd.send_bitmap(
                &bitmap,
                Some(tracker.as_ref()),
                Phase::Precopy,
                pass,
                || {
                    live_tick(
                        shared,
                        &mut estimator,
                        &mut replies,
                        cur_pending,
                        pages_before,
                    )
                },
            )
            .and_then(|_| mfd.sync(pass, Phase::Precopy, || replies.poll()))
            .map_err(|e| replies.explain(e))?;
        } else {
            {
                // QEMU starts XBZRLE after the first pass (xbzrle_started).
                let stage = match xbzrle.as_mut() {
                    Some(encoder) if pass > 1 => Some(XbzrleStage {
                        encoder,
                        generation: shared.counters.dirty_sync_count(),
                    }),
                    _ => None,
                };
                // As QEMU: no compression once XBZRLE has started.
                let compress_now = stage.is_none();
                let mut sender = RamSender::new(
                    &ram,
                    &mut out,
                    &shared.counters,
                    &shared.limiter,
                    &shared.cancel,
                    Phase::Precopy,
                )
                .with_tracker(tracker.as_ref())
                .with_xbzrle(stage)
                .with_stop(postcopy.then(|| shared.postcopy.flag()))
                .with_compress(compress.as_mut().filter(|_| compress_now));
                let cur_pending = pending_bytes;
                if pass == 1 {
                    // Pages never touched read as zero: send them as zero runs without reading
                    // (or, for shared memory, allocating) them.
                    sender
                        .send_holes(&bitmap, || ram.data_ranges())
                        .map_err(|e| replies.explain(e))?;
                }
                sender
                    .send_bitmap(&bitmap, |_| {
                        live_tick(
                            shared,
                            &mut estimator,
                            &mut replies,
                            cur_pending,
                            pages_before,
                        )
                    })
                    .map_err(|e| replies.explain(e))?;
                xbzrle_pages = sender.xbzrle_pages;
            }
        }
        if let Some(enc) = xbzrle.as_mut() {
            enc.update_rates(shared.counters.total_pages() - pages_before + xbzrle_pages);
            shared.publish_xbzrle(enc.stats());
        }
        if let Some(c) = &compress {
            c.counters()
                .update_rates(shared.counters.total_pages() - pages_before);
        }
        out.frame(FrameKind::PassEnd, &pass.to_le_bytes())
            .map_err(|e| replies.explain(e.into()))?;
        replies.poll()?;

        // Exact dirty-log sync.
        let sync_start = t0.elapsed().as_millis() as u64;
        let newly = tracker.sync(&bitmap).map_err(MigrationError::Vm)?;
        let sync_count = shared.counters.inc_dirty_sync_count();
        let pending_pages = bitmap.count_ones();
        pending_bytes = pending_pages * PAGE_SIZE as u64;
        shared.counters.set_dirty_bytes_last_sync(pending_bytes);
        let report = SyncReport {
            started_ms: sync_start,
            finished_ms: t0.elapsed().as_millis() as u64,
            newly_dirty_pages: newly,
            transferred_bytes: shared.counters.transferred(),
        };
        if let Some(period) = periods.on_sync(&report) {
            shared
                .counters
                .set_dirty_pages_rate(period.dirty_pages_rate);
            if let Some(pct) = auto.on_period(&period, &throttle_params(shared), shared.throttle())
            {
                shared.set_throttle(pct);
            }
        }
        shared.emit("MIGRATION_PASS", json!({ "pass": sync_count }));
        // The tail of the pass may still sit in socket buffers: it delays the destination's
        // start as much as dirty pages do.
        let queued = queued_bytes(&out, channels.as_ref());
        estimator.update(
            &progress(shared, pending_bytes.saturating_add(queued)),
            &limits(shared),
        );
        shared.publish(
            estimator.expected_downtime_ms(),
            estimator.mbps(),
            estimator.pages_per_second(),
            pending_bytes,
        );
        shared.record_sample(SampleKind::Sync, Some(pending_bytes));
        if shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if postcopy && shared.postcopy.requested() {
            break;
        }

        let can_switchover = !want_ack || replies.switchover_acked;
        let threshold = estimator.threshold_bytes();
        match after_sync(pending_bytes, queued, threshold, can_switchover) {
            AfterSync::Complete
                if ferry_switchover_now(
                    pending_bytes,
                    queued,
                    prev_pending,
                    threshold,
                    shared.options.params().downtime_limit,
                    passes_under,
                ) =>
            {
                break
            }
            AfterSync::Complete => passes_under += 1,
            AfterSync::DrainFirst => wait_for_queues(
                shared,
                &out,
                channels.as_ref(),
                threshold.saturating_sub(pending_bytes),
                estimator.bandwidth(),
            ),
            AfterSync::Iterate => {}
        }
        prev_pending = pending_bytes;
    }

    if postcopy && shared.postcopy.requested() {
        let rp_rx = replies.rx.take().ok_or_else(|| {
            MigrationError::Config("postcopy needs a return path from the destination".into())
        })?;
        return crate::postcopy::outgoing::run(
            shared,
            uri,
            &security,
            crate::postcopy::outgoing::Handover {
                out,
                rp_rx,
                bitmap,
                tracker,
            },
            stopped_vcpus,
        );
    }

    // Switchover: the guest stops first (QEMU's finish-migrate), then pre-switchover waits
    // for migrate-continue with the guest held stopped.
    let stop_at = Instant::now();
    shared.stop_for_switchover(stopped_vcpus, &mut || {
        super::send_keepalive(&mut out).map_err(|e| replies.explain(e))
    })?;
    shared.set_status(MigrationStatus::Device);
    shared.limiter.lift();
    tracker.sync(&bitmap).map_err(MigrationError::Vm)?;
    shared.counters.inc_dirty_sync_count();
    shared.record_sample(
        SampleKind::Sync,
        Some(bitmap.count_ones() * PAGE_SIZE as u64),
    );
    if let Some(mfd) = channels.as_mut() {
        // The vCPUs are stopped: nothing needs re-arming. The last pass ends like the others.
        let last = pass + 1;
        mfd.send_bitmap(&bitmap, None, Phase::Downtime, last, || replies.poll())
            .and_then(|_| mfd.sync(last, Phase::Downtime, || replies.poll()))
            .map_err(|e| replies.explain(e))?;
        out.frame(FrameKind::PassEnd, &last.to_le_bytes())
            .map_err(|e| replies.explain(e.into()))?;
    } else {
        let compress_now = xbzrle.is_none();
        let mut sender = RamSender::new(
            &ram,
            &mut out,
            &shared.counters,
            &shared.limiter,
            &shared.cancel,
            Phase::Downtime,
        )
        .with_compress(compress.as_mut().filter(|_| compress_now))
        .with_xbzrle(xbzrle.as_mut().map(|encoder| {
            encoder.set_last_stage(true);
            XbzrleStage {
                encoder,
                generation: shared.counters.dirty_sync_count(),
            }
        }));
        // The vCPUs are stopped: nothing needs re-arming before these last pages go.
        sender
            .send_bitmap(&bitmap, |_| Ok(()))
            .map_err(|e| replies.explain(e))?;
    }
    tracker.stop();
    if let Some(enc) = &xbzrle {
        shared.publish_xbzrle(enc.stats());
    }
    let state = shared.vm.save_state().map_err(MigrationError::Vm)?;
    let before = out.bytes_written();
    out.frame(FrameKind::State, &state)
        .and_then(|_| {
            let mut end = Vec::with_capacity(16);
            end.extend_from_slice(&shared.counters.total_pages().to_le_bytes());
            end.extend_from_slice(&0u64.to_le_bytes());
            out.frame(FrameKind::End, &end)
        })
        .and_then(|_| out.flush())
        .map_err(|e| replies.explain(e.into()))?;
    shared.counters.add_sent(
        crate::info::Channel::Main,
        Phase::Downtime,
        out.bytes_written() - before,
    );
    if bidirectional {
        replies.wait_loaded(&shared.cancel, out.get_mut())?;
        Reply::Commit
            .write_to(out.get_mut())
            .map_err(|e| MigrationError::DestinationLost(format!("sending COMMIT: {e}")))?;
        // Channels stay open until the destination confirmed: it treats an earlier end
        // of a channel as a failure.
        if let Some(mfd) = channels.take() {
            mfd.finish()?;
        }
    } else if let Channel::File(f) = out.get_mut() {
        f.sync_data()
            .map_err(|e| MigrationError::Vm(format!("syncing the migration file: {e}")))?;
    }
    shared.set_downtime(stop_at.elapsed().as_millis() as u64);
    Ok(())
}

/// Bytes written on the main stream and the multifd channels that the destination has not
/// acknowledged yet.
fn queued_bytes(out: &FrameWriter<Channel>, channels: Option<&MultifdSender>) -> u64 {
    let main = out.get_ref().unacknowledged_bytes().unwrap_or(0);
    main.saturating_add(channels.map_or(0, MultifdSender::unacknowledged_bytes))
}

/// Longest wait for the socket queues to drain before the next pass (the guest runs, and the
/// pages it dirties meanwhile go in that pass).
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(1);

/// Waits, the guest running, until the sockets hold at most `target` unacknowledged bytes:
/// at most twice the time `bandwidth` (bytes/s, 0 when unknown) needs for what they hold,
/// within [10 ms, [`MAX_DRAIN_WAIT`]], or until the migration is cancelled.
fn wait_for_queues(
    shared: &Shared,
    out: &FrameWriter<Channel>,
    channels: Option<&MultifdSender>,
    target: u64,
    bandwidth: f64,
) {
    let queued = queued_bytes(out, channels);
    let expected = if bandwidth > 0.0 {
        Duration::from_secs_f64((2.0 * queued as f64 / bandwidth).min(MAX_DRAIN_WAIT.as_secs_f64()))
    } else {
        Duration::from_millis(100)
    };
    let deadline = Instant::now() + expected.clamp(Duration::from_millis(10), MAX_DRAIN_WAIT);
    while queued_bytes(out, channels) > target && Instant::now() < deadline && !shared.cancelled() {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Ferry's refinement of QEMU's switchover rule, applied once QEMU's rule says "complete":
/// keep iterating while each pass still shrinks the dirty bytes by a quarter, because a
/// smaller final set means a shorter downtime than the limit allows — but never more than
/// a few extra passes. The expected downtime counts `queued` (bytes still on the sockets).
fn ferry_switchover_now(
    dirty: u64,
    queued: u64,
    prev_dirty: u64,
    threshold: u64,
    downtime_limit_ms: u64,
    passes_under: u32,
) -> bool {
    if dirty == 0 || passes_under >= MAX_EXTRA_PASSES {
        return true;
    }
    // threshold = bandwidth * downtime_limit, so expected downtime = pending / threshold * limit.
    let pending = dirty.saturating_add(queued);
    let expected_ms = if threshold == 0 {
        u64::MAX
    } else {
        (pending as u128 * downtime_limit_ms as u128 / threshold as u128) as u64
    };
    if expected_ms <= SHORT_DOWNTIME_MS {
        return true;
    }
    dirty.saturating_mul(4) > prev_dirty.saturating_mul(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_at_once_when_nothing_is_left_or_downtime_is_tiny() {
        assert!(ferry_switchover_now(0, 0, 100, 1000, 300, 0));
        // 10 bytes of 1000-byte threshold at 300 ms: 3 ms expected.
        assert!(ferry_switchover_now(10, 0, 1000, 1000, 300, 0));
    }

    #[test]
    fn keeps_iterating_while_shrinking_fast() {
        // 500 of 1000 (150 ms expected), previous pass 1000: shrank by half -> iterate.
        assert!(!ferry_switchover_now(500, 0, 1000, 1000, 300, 0));
        // shrank only 10%: switch.
        assert!(ferry_switchover_now(900, 0, 1000, 1000, 300, 0));
        // too many extra passes: switch.
        assert!(ferry_switchover_now(
            500,
            0,
            1000,
            1000,
            300,
            MAX_EXTRA_PASSES
        ));
    }

    #[test]
    fn queued_bytes_count_in_the_expected_downtime_not_in_the_shrinking() {
        // 10 dirty bytes alone: 3 ms expected, switch; with 90 queued: 30 ms, and the dirty
        // bytes shrank from 1000 to 10: another pass.
        assert!(!ferry_switchover_now(10, 90, 1000, 1000, 300, 0));
        // Queued bytes do not make a shrinking dirty set look as if it grew.
        assert!(!ferry_switchover_now(500, 400, 1000, 1000, 300, 0));
    }
}
