//! Ferry's migration core.
//!
//! - [`options`]: QEMU's migration capabilities and parameters, their
//!   compatibility rules, range checks and error texts, and the hooks through
//!   which a changed setting reaches a running migration.
//! - [`qapi`]: QAPI input-visitor semantics for QMP arguments, with QEMU's error texts.
//! - [`uffd`]: userfaultfd access and the write-tracking probe.
//! - [`xbzrle`]: QEMU's XBZRLE delta encoding and its page cache.

pub mod auto_converge;
pub mod convergence;
pub mod info;
pub mod options;
pub mod qapi;
pub mod rate_limit;
pub mod uffd;
pub mod xbzrle;
