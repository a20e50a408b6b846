//! Ferry's self-verifying test guest: its memory layout, page tables and program.
//!
//! The guest is generated here, in Rust, with iced-x86's code assembler. It
//! runs entirely at CPL3 (on this project's nested KVM, CPL0 code is emulated
//! at ~1.4 M instructions/s while CPL3 code runs natively): the VMM itself puts
//! each vCPU in 64-bit mode at CPL3 with KVM_SET_SREGS, so no guest code ever
//! runs at CPL0. See `devices::guest_abi` for the contract with the host.

pub mod boot;
pub mod layout;
pub mod program;

pub use boot::{load_guest, BootError, GuestConfig};
pub use layout::GuestLayout;
