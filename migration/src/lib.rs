//! Ferry's migration core.
//!
//! - [`multifd`]: parallel RAM channels with compression, zero-page detection and zero-copy send.
//! - [`options`]: QEMU's migration capabilities and parameters, their
//!   compatibility rules, range checks and error texts, and the hooks through
//!   which a changed setting reaches a running migration.
//! - [`postcopy`]: postcopy live migration over userfaultfd (switch, page requests, preempt
//!   channel, blocktime, pause and recovery).
//! - [`qapi`]: QAPI input-visitor semantics for QMP arguments, with QEMU's error texts.
//! - [`stream`]: the migration stream format (header, frames, RAM records, replies).
//! - [`transport`]: migration URIs, connecting and listening.
//! - [`uffd`]: userfaultfd access and the write-tracking probe.
//! - [`vm`]: the traits through which migration reaches the VM (dirty tracking, vCPUs, state).
//! - [`xbzrle`]: QEMU's XBZRLE delta encoding and its page cache.

pub mod auto_converge;
pub mod compress;
pub mod convergence;
pub mod dest;
pub mod error;
pub mod events;
pub mod info;
pub mod multifd;
pub mod options;
pub mod postcopy;
pub mod qapi;
pub mod rate_limit;
pub mod snapshot;
pub mod source;
pub mod stall;
pub mod stream;
#[cfg(test)]
mod test_pages;
pub mod timeline;
pub mod transport;
pub mod uffd;
pub mod vm;
pub mod xbzrle;
