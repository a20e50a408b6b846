//! Dirty-page trackers the VMM offers migration: KVM's dirty log (with manual protect
//! when available) and KVM's dirty ring.

pub mod kvm_log;
pub mod kvm_ring;

pub use kvm_log::KvmDirtyLog;
pub use kvm_ring::KvmDirtyRing;
