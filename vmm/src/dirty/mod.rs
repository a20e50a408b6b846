//! Dirty-page trackers the VMM offers migration: KVM's dirty log (with manual protect
//! when available) and, later, KVM's dirty ring.

pub mod kvm_log;

pub use kvm_log::KvmDirtyLog;
