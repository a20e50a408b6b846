//! Device state as it travels in a migration stream or snapshot.

use serde::{Deserialize, Serialize};

use crate::guest_control::ControlState;
use crate::serial::SerialRegisters;

/// All device state of a Ferry VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1 registers.
    pub serial: SerialRegisters,
    /// The test guest's control device.
    pub control: ControlState,
}
