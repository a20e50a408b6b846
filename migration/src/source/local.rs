//! Local migration (`x-ignore-shared`): the guest's memory stays where it is.
//!
//! The destination is another Ferry process on the same host. The source passes the memfd
//! (or shared file) behind guest RAM over the unix socket (SCM_RIGHTS) right after the
//! header; the destination maps it over its own RAM and acknowledges; then the guest stops,
//! vCPU and device state go through the stream as in any migration, and the usual
//! LOADED/COMMIT handshake decides which process runs the guest. No page is copied, so
//! the total time does not depend on the guest's size and the downtime is the state's.
//!
//! Because both processes map the same pages from the acknowledgement on, the rules are:
//! the destination never writes guest memory before COMMIT (it has no running guest and
//! refuses RAM records in such a stream), and once COMMIT went out the source never touches
//! guest memory again ([`crate::vm::SourceVm::memory_handed_over`]). A migration that fails
//! before COMMIT leaves the destination exiting without having written a byte, so the
//! source is the memory's only user again.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use ram::{GuestRam, PAGE_SIZE};

use super::precopy::{spawn_reply_reader, ReplyState, CONNECT_TIMEOUT};
use super::Shared;
use crate::error::{MigrationError, Result};
use crate::info::{MigrationStatus, Phase};
use crate::options::{Capabilities, Capability, Parameters};
use crate::stream::frame::{FrameKind, FrameWriter};
use crate::stream::header::{
    Header, FEATURE_IGNORE_SHARED, FEATURE_SWITCHOVER_ACK, FEATURE_VALIDATE_UUID, HEADER_LEN,
    STREAM_VERSION,
};
use crate::stream::Reply;
use crate::timeline::SampleKind;
use crate::transport::{self, fd_passing, MigrationUri};

/// Bytes sent with the memory's descriptor: the RAM size, little-endian.
pub const SHARED_RAM_PAYLOAD_LEN: usize = 8;

/// Checks that a migration with `x-ignore-shared` can run: a unix: URI (the descriptor
/// travels over it), guest memory shared with a memfd or file, no TLS. Run before the
/// migration starts, so `migrate` itself reports the error.
pub fn check(
    caps: &Capabilities,
    params: &Parameters,
    uri: &MigrationUri,
    ram: &GuestRam,
) -> Result<()> {
    if !caps.get(Capability::XIgnoreShared) {
        return Ok(());
    }
    if !matches!(uri, MigrationUri::Unix(_)) {
        return Err(MigrationError::Config(format!(
            "x-ignore-shared passes the guest memory's file descriptor to a process on this host: it needs a unix: URI, not '{uri}'"
        )));
    }
    if !ram.is_shared() || ram.backing_file().is_none() {
        return Err(MigrationError::Config(
            "x-ignore-shared needs guest memory shared with a memfd or file, but this guest's memory is anonymous private (backend=anon): start it with the memfd or a shared file backend, or turn x-ignore-shared off".into(),
        ));
    }
    if !params.tls_creds.is_empty() {
        return Err(MigrationError::Config(
            "x-ignore-shared passes guest memory over a local unix socket; TLS cannot carry the file descriptor: clear tls-creds or turn x-ignore-shared off".into(),
        ));
    }
    Ok(())
}

/// The migration thread's work for a local migration.
pub(super) fn migrate(
    shared: &Arc<Shared>,
    uri: &MigrationUri,
    stopped_vcpus: &mut bool,
) -> Result<()> {
    let t0 = shared.start;
    let caps = *shared.caps();
    let ram = shared.vm.ram();
    check(&caps, &shared.options.params(), uri, &ram)?;
    let memory = ram
        .backing_file()
        .ok_or_else(|| MigrationError::Config("guest memory has no file behind it".into()))?;
    let ch = transport::connect_cancellable(uri, CONNECT_TIMEOUT, &shared.cancel).map_err(|e| {
        if shared.cancelled() {
            MigrationError::Cancelled
        } else {
            e.into()
        }
    })?;
    shared.set_channel(Some(ch.try_clone().map_err(|e| {
        MigrationError::Vm(format!("cannot clone the migration channel: {e}"))
    })?));
    let mut replies = ReplyState {
        rx: Some(spawn_reply_reader(&ch).map_err(MigrationError::Vm)?),
        switchover_acked: false,
        closed: None,
    };
    let mut features = FEATURE_IGNORE_SHARED | FEATURE_SWITCHOVER_ACK;
    if caps.get(Capability::ValidateUuid) {
        features |= FEATURE_VALIDATE_UUID;
    }
    let header = Header {
        version: STREAM_VERSION,
        features,
        uuid: shared.vm.uuid(),
        ram_size: ram.size(),
        page_size: PAGE_SIZE as u32,
        vcpus: shared.vm.vcpus(),
        multifd_channels: 0,
        multifd_compression: 0,
    };
    let mut out = FrameWriter::new(ch);
    let sock = out
        .get_mut()
        .as_unix()
        .ok_or_else(|| MigrationError::Config("x-ignore-shared needs a unix socket".into()))?;
    let mut w: &std::os::unix::net::UnixStream = sock;
    w.write_all(&header.encode())
        .and_then(|_| fd_passing::send_fd(sock, &ram.size().to_le_bytes(), memory.as_fd()))
        .map_err(|e| replies.explain(crate::stream::StreamError::from(e).into()))?;
    let setup_bytes = (HEADER_LEN + SHARED_RAM_PAYLOAD_LEN) as u64;
    out.count_extra(setup_bytes);
    shared
        .counters
        .add_sent(crate::info::Channel::Main, Phase::Precopy, setup_bytes);
    // One (empty) pass: the destination acknowledges it once it mapped the memory.
    out.frame(FrameKind::PassEnd, &1u64.to_le_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| replies.explain(e.into()))?;
    shared.set_setup_time(t0.elapsed().as_millis() as u64);
    shared.set_status(MigrationStatus::Active);
    wait_mapped(shared, &mut replies)?;
    shared.counters.inc_dirty_sync_count();
    shared.publish(0, 0.0, 0, 0);
    shared.record_sample(SampleKind::Sync, Some(0));

    // Switchover: only vCPU and device state are left to move.
    let stop_at = Instant::now();
    shared.stop_for_switchover(stopped_vcpus, &mut || {
        super::send_keepalive(&mut out).map_err(|e| replies.explain(e))
    })?;
    shared.set_status(MigrationStatus::Device);
    let state = shared.vm.save_state().map_err(MigrationError::Vm)?;
    let before = out.bytes_written();
    out.frame(FrameKind::State, &state)
        .and_then(|_| out.frame(FrameKind::End, &[0u8; 16]))
        .and_then(|_| out.flush())
        .map_err(|e| replies.explain(e.into()))?;
    shared.counters.add_sent(
        crate::info::Channel::Main,
        Phase::Downtime,
        out.bytes_written() - before,
    );
    replies.wait_loaded(&shared.cancel, out.get_mut())?;
    Reply::Commit
        .write_to(out.get_mut())
        .map_err(|e| MigrationError::DestinationLost(format!("sending COMMIT: {e}")))?;
    // From here on the destination runs the guest in these very pages.
    shared.vm.memory_handed_over();
    shared.set_downtime_exact(stop_at.elapsed());
    Ok(())
}

/// Waits for the destination's acknowledgement that it mapped the guest's memory.
fn wait_mapped(shared: &Shared, replies: &mut ReplyState) -> Result<()> {
    let Some(rx) = replies.rx.clone() else {
        return Ok(());
    };
    let limit = crate::transport::io_timeout();
    let deadline = Instant::now() + limit;
    while !replies.switchover_acked {
        if shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => replies.handle(r)?,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::DestinationLost(
                    replies
                        .closed
                        .clone()
                        .unwrap_or_else(|| "connection closed".into()),
                ))
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                return Err(MigrationError::DestinationLost(format!(
                    "the destination did not map the guest's memory within {limit:?}"
                )))
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Some(why) = &replies.closed {
            return Err(MigrationError::DestinationLost(why.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::{Backend, HugePages, MemoryConfig};

    fn ram(backend: Backend) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend,
            hugepages: HugePages::None,
            prealloc: false,
        })
        .unwrap()
    }

    fn text(r: Result<()>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn only_shared_memory_over_a_plain_unix_socket_can_be_handed_over() {
        let on = Capabilities::default().with(Capability::XIgnoreShared, true);
        let params = Parameters::default();
        let memfd = ram(Backend::SharedMemfd);
        let unix: MigrationUri = "unix:/tmp/x.sock".parse().unwrap();
        assert!(check(&on, &params, &unix, &memfd).is_ok());
        for uri in ["tcp:127.0.0.1:4444", "file:/tmp/x"] {
            let uri: MigrationUri = uri.parse().unwrap();
            assert!(text(check(&on, &params, &uri, &memfd)).contains("needs a unix: URI"));
        }
        let anon = ram(Backend::AnonymousPrivate);
        assert!(text(check(&on, &params, &unix, &anon)).contains("anonymous private"));
        let tls = Parameters {
            tls_creds: "tls0".into(),
            ..Parameters::default()
        };
        assert!(text(check(&on, &tls, &unix, &memfd)).contains("tls-creds"));
        // Without the capability nothing is checked here.
        let off = Capabilities::default();
        let tcp: MigrationUri = "tcp:127.0.0.1:4444".parse().unwrap();
        assert!(check(&off, &params, &tcp, &anon).is_ok());
    }
}
