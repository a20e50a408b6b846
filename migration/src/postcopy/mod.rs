//! Postcopy live migration: the guest moves first, its memory follows on demand.
//!
//! `migrate` starts in precopy; `migrate-start-postcopy` switches (QEMU's
//! `postcopy_start`). The source stops the guest and tells the destination which pages it
//! must drop (never sent, or dirtied since they were sent: QEMU's discard bitmap); the
//! destination registers guest memory with userfaultfd in MISSING mode, discards those
//! pages, and — once the source commits — runs the guest. A vCPU (or any VMM thread)
//! touching a missing page blocks in the kernel; the fault thread asks the source for the
//! page, which sends it ahead of the background stream; the page is placed atomically
//! with `UFFDIO_COPY` and the waiter wakes. Meanwhile the source pushes every remaining page
//! (limited by `max-postcopy-bandwidth`).
//!
//! ```text
//!  source                                                  destination
//!    |   ... precopy passes ...                                |
//!    |   migrate-start-postcopy: stop vCPUs, last dirty sync    |
//!    |-- DISCARD [page ranges] ... --------------------------->|  collected
//!    |-- STATE {vCPUs, VM, devices} -------------------------->|
//!    |-- POSTCOPY_LISTEN {id, flags} ------------------------->|  stop populating, load state,
//!    |   (postcopy-preempt: connect the second channel:        |  register RAM (MISSING),
//!    |    header with PREEMPT_CHANNEL, POSTCOPY_HELLO {id})    |  discard the pages, fault thread
//!    |<------------------- NEED [suspect pages]... POSTCOPY_READY
//!    |-- POSTCOPY_RUN ---------------------------------------->|  vCPUs run: downtime ends
//!    |   [committed: the source never runs this guest again]   |
//!    |<-------------------------------- PAGE_REQUEST [pages] --|  a vCPU faulted (with preempt:
//!    |-- RAM (the requested pages, first) ------------------->|   both on the second channel)
//!    |-- RAM (background pages, max-postcopy-bandwidth) ----->|  UFFDIO_COPY / ZEROPAGE, wake
//!    |<---------------- RECEIVED [pages] (release-ram only) ---|  source frees those pages
//!    |-- END ------------------------------------------------->|  every page sent
//!    |<------------------------------------- POSTCOPY_DONE ----|  every page placed: unregister
//!    |   completed (postmigrate)                               |  completed
//! ```
//!
//! # Never two running copies, nothing lost
//!
//! The destination answers POSTCOPY_READY only when it can run the guest (state loaded,
//! memory registered); until the source sends POSTCOPY_RUN it may still give up and resume
//! its own guest (a failure before the commit is an ordinary failed migration: the source
//! runs on, the destination exits). From the moment it *tries* to send POSTCOPY_RUN the
//! source is committed: whatever happens next, its guest never runs again (`cont` and
//! `migrate_cancel` are refused, as QEMU refuses the cancel). The destination runs the guest
//! only after POSTCOPY_RUN. So at most one copy ever runs.
//!
//! From then on the guest's memory is split between the hosts: **if either process dies
//! during postcopy, the guest is lost** (QEMU's known property). A broken *link* is not
//! fatal: both sides enter `postcopy-paused` (the destination's vCPUs keep running and block
//! on missing pages), and `migrate-recover {"uri"}` on the destination plus
//! `migrate {"uri", "resume": true}` on the source reconnect (`postcopy-recover`): the
//! destination sends the pages it still lacks (QEMU's received bitmap, as NEED ranges) and
//! whether the guest already runs; the source re-sends POSTCOPY_RUN if needed and pushes
//! exactly the missing pages. Nothing is lost because the destination only ever counts a
//! page as received once it is placed, and a page is released on the source
//! (`release-ram`) only after the destination acknowledged it (RECEIVED) — so, unlike QEMU,
//! Ferry can recover a postcopy migration that uses `release-ram`.
//!
//! Every page sent in postcopy is final (the source is stopped), so each must match its
//! hash; a corrupted one is asked for again rather than placed.
//!
//! Modules: [`wire`] (frame payloads), [`registration`] (userfaultfd MISSING mode),
//! [`pages`] (the destination's page bookkeeping), [`blocktime`], [`fault`] (the fault
//! thread), [`receive`] (placing pages), [`link`] (replies and acknowledgements),
//! [`control`] (what QMP reaches), `incoming` and `outgoing` (the two sides' sequences),
//! `urgent` (the source's preempt channel).

pub mod blocktime;
pub mod control;
pub mod fault;
pub(crate) mod incoming;
pub mod link;
pub(crate) mod outgoing;
pub mod pages;
pub mod receive;
pub mod registration;
mod urgent;
pub mod wire;

use thiserror::Error;

pub use blocktime::{Blocktime, BlocktimeReport};
pub use control::{DestControl, DestHooks, NoHooks, SourceControl};
pub use pages::{PageTracker, PostcopyDestStats};
pub use registration::MissingRegistration;

use crate::error::MigrationError;
use crate::stream::StreamError;
use crate::transport::TransportError;
use crate::uffd::UffdError;

/// Why postcopy could not start or go on.
#[derive(Debug, Error)]
pub enum PostcopyError {
    /// This host or this memory cannot do postcopy.
    #[error("Postcopy is not supported: {0}")]
    Unsupported(String),
    /// No usable userfaultfd.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A userfaultfd ioctl failed.
    #[error("{what} failed: {errno}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error number's C text.
        errno: String,
    },
    /// The connection broke (recoverable: both sides pause).
    #[error("the connection broke: {0}")]
    Link(String),
    /// The stream is malformed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The peer broke the protocol.
    #[error("invalid postcopy stream: {0}")]
    Protocol(String),
    /// The VM refused an operation.
    #[error("{0}")]
    Vm(String),
    /// A connection could not be made.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The destination reported a failure.
    #[error("the destination failed: {0}")]
    Destination(String),
}

impl From<PostcopyError> for MigrationError {
    fn from(e: PostcopyError) -> Self {
        match e {
            PostcopyError::Stream(s) => MigrationError::Stream(s),
            PostcopyError::Transport(t) => MigrationError::Transport(t),
            PostcopyError::Destination(d) => MigrationError::Destination(d),
            PostcopyError::Link(why) => MigrationError::DestinationLost(why),
            PostcopyError::Vm(v) => MigrationError::Vm(v),
            other => MigrationError::Config(other.to_string()),
        }
    }
}

/// The words of every error once the guest runs on the destination and cannot come back.
pub const GUEST_LOST: &str =
    "postcopy failed after the guest started on the destination: its memory is split between the two hosts and the guest is lost";
