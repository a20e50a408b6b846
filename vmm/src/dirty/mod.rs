//! Dirty-page trackers the VMM offers migration: KVM's dirty log (with manual protect
//! when available), KVM's dirty ring, and userfaultfd's asynchronous write protection.

pub mod kvm_log;
pub mod kvm_ring;
pub mod uffd_async;

pub use kvm_log::KvmDirtyLog;
pub use kvm_ring::KvmDirtyRing;
pub use uffd_async::UffdAsyncTracker;
