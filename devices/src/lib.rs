//! Ferry's devices.
//!
//! - [`serial`]: a 16550 UART on port 0x3f8 (vm-superio) whose output goes to
//!   the console, a file or nowhere.
//! - [`guest_abi`]: the contract between Ferry and its self-verifying test
//!   guest: ports, the per-vCPU mailbox layout, the page-content function.
//! - [`guest_control`]: the host side of that contract: progress, verify
//!   requests and results.
//! - [`bus`]: routes port I/O exits to the device that owns the port.
//! - [`state`]: device state as saved into a migration stream or snapshot.

pub mod bus;
pub mod guest_abi;
pub mod guest_control;
pub mod serial;
pub mod state;

pub use bus::PortBus;
pub use guest_control::{GuestControl, VerifyReport};
pub use serial::{Serial, SerialOutput};
pub use state::DeviceState;
