//! The Ferry VMM: VM lifecycle, vCPU threads, the test guest, QMP server and CLI.

pub mod guest;
pub mod kvm;
pub mod machine;
pub mod qmp;
pub mod vcpu_thread;
