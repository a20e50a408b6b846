//! The incoming side of a local migration (`x-ignore-shared`): map the source's guest
//! memory instead of receiving it (see `source::local` for the protocol and its rules).

use std::fs::File;

use super::loader::{load_stream, RamLoader};
use super::silence_watch::SilenceWatch;
use super::{finish, AckAfterFirstPass};
use crate::error::{MigrationError, Result};
use crate::options::{Capability, MigrationOptions};
use crate::source::local::SHARED_RAM_PAYLOAD_LEN;
use crate::stream::frame::FrameReader;
use crate::stream::StreamError;
use crate::transport::{fd_passing, Channel};
use crate::vm::DestVm;

/// Receives the memory's descriptor, maps it as guest RAM, acknowledges, then loads the
/// state like any migration. The guest memory is shared with the running source from the
/// moment it is mapped: nothing here writes it, and a stream carrying pages is refused.
pub(super) fn load(
    mut reader: FrameReader<SilenceWatch>,
    options: &MigrationOptions,
    mut reply_ch: Option<&mut Channel>,
    vm: &dyn DestVm,
) -> Result<()> {
    if !options.caps().get(Capability::XIgnoreShared) {
        return Err(StreamError::Mismatch(
            "the source shares its guest memory (x-ignore-shared) but this destination's x-ignore-shared capability is off: set it with migrate-set-capabilities before the migration".into(),
        )
        .into());
    }
    let watch = reader.get_mut();
    if watch.get_ref().as_unix().is_none() {
        return Err(StreamError::Invalid(
            "a shared-memory (x-ignore-shared) stream arrived on a channel that cannot pass file descriptors (only a plain unix: socket can)".into(),
        )
        .into());
    }
    let mut payload = [0u8; SHARED_RAM_PAYLOAD_LEN];
    let fd = watch
        .with_whole_limit(|ch| match ch.as_unix() {
            Some(sock) => fd_passing::recv_fd(sock, &mut payload),
            None => Err(std::io::Error::other("not a unix socket")),
        })
        .and_then(|r| r)
        .map_err(|e| {
            MigrationError::Stream(StreamError::Invalid(format!(
                "receiving the guest memory's file descriptor: {e}"
            )))
        })?;
    let size = u64::from_le_bytes(payload);
    let ram = vm.ram();
    if size != ram.size() {
        return Err(StreamError::Mismatch(format!(
            "the shared guest memory is {size} bytes, this VM's {}",
            ram.size()
        ))
        .into());
    }
    vm.adopt_shared_ram(File::from(fd))
        .map_err(|e| MigrationError::Vm(format!("mapping the source's guest memory: {e}")))?;
    let mut loader = RamLoader::new(&ram, false).refusing_pages();
    // The acknowledgement after the (empty) first pass tells the source the memory is mapped.
    let mut progress = AckAfterFirstPass {
        want: true,
        sent: false,
        ch: reply_ch.as_deref_mut(),
        multifd: None,
        vm: None,
    };
    let state = load_stream(&mut reader, &mut loader, &mut progress)?;
    finish(&mut reader, &state, reply_ch, vm)
}
