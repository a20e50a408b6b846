//! The Ferry VMM: VM lifecycle, vCPU threads, the test guest, QMP server and CLI.

pub mod app;
#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod cli;
pub mod commands;
pub mod dirty;
pub mod guest;
pub mod hostpair;
pub mod incoming_populate;
pub mod kvm;
pub mod machine;
pub mod qmp;
#[cfg(feature = "tools")]
pub mod report;
pub mod snapshot;
pub mod vcpu_thread;
pub mod vm_adapter;
