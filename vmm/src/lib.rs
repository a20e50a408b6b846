//! The Ferry VMM: VM lifecycle, vCPU threads, the test guest, QMP server and CLI.

pub mod qmp;
