//! Thin, well-named wrappers over KVM: the VM, its vCPUs, their state.

pub mod cpuid;
pub mod kick;
pub mod regs;
pub mod state;
pub mod vcpu;
pub mod vm;

use thiserror::Error;

/// Errors from KVM.
#[derive(Debug, Error)]
pub enum KvmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A capability Ferry needs is missing.
    #[error("KVM lacks {0}")]
    MissingCap(&'static str),
    /// Saved state that does not fit this VM.
    #[error("bad vCPU state: {0}")]
    BadState(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, KvmError>;

/// Adds ioctl context to a kvm-ioctls result.
pub(crate) trait IoctlContext<T> {
    fn ctx(self, what: &'static str) -> Result<T>;
}

impl<T> IoctlContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn ctx(self, what: &'static str) -> Result<T> {
        self.map_err(|source| KvmError::Ioctl { what, source })
    }
}
