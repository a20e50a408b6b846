//! Port I/O routing: which device owns which port.

use std::sync::{Arc, Mutex, OnceLock};

use crate::guest_abi::{CONTROL_PORT, CONTROL_PORT_COUNT, SERIAL_PORT_BASE, SERIAL_PORT_COUNT};
use crate::guest_control::GuestControl;
use crate::serial::Serial;

/// What a port access hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortTarget {
    /// COM1 register `offset`.
    Serial(u8),
    /// The control device.
    Control,
    /// Nothing: writes are ignored, reads return all ones.
    Unassigned,
}

/// Routes port I/O exits.
pub struct PortBus {
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// The test guest's control device (set once the guest's layout is known: at boot, or
    /// when an incoming migration delivers it).
    pub control: Arc<OnceLock<Arc<GuestControl>>>,
}

/// Which device owns `port`.
pub fn route(port: u16) -> PortTarget {
    if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_COUNT).contains(&port) {
        PortTarget::Serial((port - SERIAL_PORT_BASE) as u8)
    } else if (CONTROL_PORT..CONTROL_PORT + CONTROL_PORT_COUNT).contains(&port) {
        PortTarget::Control
    } else {
        PortTarget::Unassigned
    }
}

impl PortBus {
    /// A guest `out` of `data` to `port` from vCPU `vcpu`; returns false for an unassigned port.
    pub fn write(&self, vcpu: usize, port: u16, data: &[u8]) -> bool {
        match route(port) {
            PortTarget::Serial(off) => {
                if let Ok(mut s) = self.serial.lock() {
                    for b in data {
                        s.write(off, *b);
                    }
                }
                true
            }
            PortTarget::Control => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                if let Some(c) = self.control.get() {
                    c.port_write(vcpu, u32::from_le_bytes(v));
                }
                true
            }
            PortTarget::Unassigned => false,
        }
    }

    /// A guest `in` from `port` into `data`; returns false for an unassigned port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match route(port) {
            PortTarget::Serial(off) => {
                if let Ok(mut s) = self.serial.lock() {
                    for b in data.iter_mut() {
                        *b = s.read(off);
                    }
                }
                true
            }
            PortTarget::Control => {
                data.fill(0);
                true
            }
            PortTarget::Unassigned => {
                data.fill(0xff);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_ports() {
        assert_eq!(route(0x3f8), PortTarget::Serial(0));
        assert_eq!(route(0x3ff), PortTarget::Serial(7));
        assert_eq!(route(0x510), PortTarget::Control);
        assert_eq!(route(0x51f), PortTarget::Control);
        assert_eq!(route(0x520), PortTarget::Unassigned);
        assert_eq!(route(0x80), PortTarget::Unassigned);
    }
}
