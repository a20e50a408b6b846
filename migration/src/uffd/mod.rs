//! userfaultfd: opening (syscall, then `/dev/userfaultfd`), feature probing,
//! and the two host probes migration needs: write-tracking for
//! `background-snapshot` and postcopy support for `postcopy-ram`.
//!
//! - [`open`]: the fd and its `UFFDIO_API` handshake; returns the `userfaultfd`
//!   crate's `Uffd` for register / write-protect / copy / zeropage / wake / read_events.
//! - [`features`]: every feature and ioctl bit by name; [`UffdFeatures`].
//! - [`write_tracking`]: [`WriteTrackingSupport`] and its real probe over guest RAM.
//! - [`postcopy`]: QEMU's `postcopy_ram_supported_by_host` with its reasons.
//! - [`host`]: [`UffdHostReport`] for `ferry probe`.
//! - [`support`]: [`GuestRamSupport`], the probes as the capability check's `HostSupport`.

use std::io;

use thiserror::Error;

pub mod features;
pub mod host;
pub mod open;
pub mod postcopy;
pub mod support;
pub mod wake;
pub mod write_tracking;

pub use features::UffdFeatures;
pub use host::{probe_host, UffdHostReport};
pub use open::{open, query_features, OpenMethod, OpenedUffd};
pub use postcopy::probe_postcopy;
pub use support::GuestRamSupport;
pub use write_tracking::{
    probe_write_tracking, write_tracking_available, RamArea, WriteTrackingReport,
    WriteTrackingSupport,
};

/// Errors from opening or using a userfaultfd.
#[derive(Debug, Error)]
pub enum UffdError {
    /// Neither the syscall nor the device gave a userfaultfd.
    #[error("userfaultfd is not available: syscall: {syscall}; /dev/userfaultfd: {dev}")]
    Unavailable {
        /// Why `userfaultfd(2)` failed.
        syscall: io::Error,
        /// Why `/dev/userfaultfd` failed.
        dev: io::Error,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API failed: {0}")]
    Api(#[source] io::Error),
    /// Features were asked for that the kernel does not offer.
    #[error("the kernel does not offer userfaultfd features {missing:#x}")]
    MissingFeatures {
        /// The missing feature bits.
        missing: u64,
    },
    /// An operation of the `userfaultfd` crate failed.
    #[error("userfaultfd operation failed: {}", crate_error_text(.0))]
    Op(#[from] userfaultfd::Error),
}

/// The `userfaultfd` crate's message with the errno it carries (its `Display` leaves out
/// the cause of "System error" and "Copy failed").
fn crate_error_text(e: &userfaultfd::Error) -> String {
    match e {
        userfaultfd::Error::SystemError(errno) => format!("{e}: {errno}"),
        userfaultfd::Error::CopyFailed(errno) => format!("{e}: {errno}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_operation_says_which_errno() {
        let opened = match open::open(0) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("SKIP a_failed_operation_says_which_errno: {e}");
                return;
            }
        };
        // An unaligned range: the kernel answers EINVAL.
        let err = opened
            .uffd
            .register(4097usize as *mut libc::c_void, 4096)
            .expect_err("an unaligned range cannot be registered");
        let text = UffdError::from(err).to_string();
        assert!(text.contains("Invalid argument"), "{text}");
    }
}
