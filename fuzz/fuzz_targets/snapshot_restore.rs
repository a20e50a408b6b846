//! Fuzzes the snapshot file reader: what `ferry run --restore FILE` (an incoming `file:`
//! migration) does with a background snapshot before it touches KVM. The stream header is
//! checked against the VM (RAM size, vCPUs, UUID) and the multifd settings as the
//! destination checks them, the frames load into 4 MiB of real guest RAM, and the STATE
//! frame's document is parsed as the VM's saved state and its device part restored into a
//! fresh UART and guest control device.
//!
//! Input: a control byte (see `ferry_fuzz`: bit 0 clear = reseal checksums), then the
//! file. Checked: no panic, no write outside guest RAM, every failure an error.

#![no_main]

use std::sync::Arc;

use devices::{GuestControl, Serial, SerialOutput};
use ferry_fuzz::{ram, stream_input, CheckedProgress, SliceSource};
use libfuzzer_sys::fuzz_target;
use migration::dest::loader::{check_header, load_stream_until, LoadEnd, RamLoader};
use migration::multifd::packet::Method;
use migration::multifd::recv::{check_settings, LocalSettings};
use migration::stream::frame::FrameReader;
use migration::stream::header::FEATURE_IGNORE_SHARED;
use migration::vm::DestVm;
use ram::GuestRam;
use vmm::vm_adapter::{SavedState, SAVED_STATE_VERSION};

/// The destination as the loader sees it: one vCPU, no UUID of its own.
struct Vm(Arc<GuestRam>);

impl DestVm for Vm {
    fn ram(&self) -> Arc<GuestRam> {
        self.0.clone()
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn uuid(&self) -> [u8; 16] {
        [0; 16]
    }
    fn load_state(&self, _state: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn start(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The device part of a restore without KVM: parse, check the version, restore devices.
fn restore_devices(ram: &Arc<GuestRam>, state: &[u8]) -> Result<(), String> {
    let s: SavedState = serde_json::from_slice(state).map_err(|e| e.to_string())?;
    if s.version != SAVED_STATE_VERSION {
        return Err("version".into());
    }
    let mut serial = Serial::new(&SerialOutput::None).map_err(|e| e.to_string())?;
    serial
        .restore(&s.devices.serial)
        .map_err(|e| e.to_string())?;
    let _ = serial.read(5);
    GuestControl::new(ram.clone(), s.devices.control.layout).map_err(|e| e.to_string())?;
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((header, frames)) = stream_input(data) else {
        return;
    };
    let vm = Vm(ram());
    if check_header(&header, &vm).is_err() || header.has(FEATURE_IGNORE_SHARED) {
        return;
    }
    let local = LocalSettings {
        enabled: false,
        channels: 2,
        method: Method::None,
    };
    if check_settings(&header, &local).is_err() {
        return;
    }
    let ram = vm.ram();
    let mut reader = FrameReader::new(SliceSource(&frames[..]));
    let mut loader = RamLoader::new(&ram, false);
    if let Ok(LoadEnd::Complete(state)) = load_stream_until(
        &mut reader,
        &mut loader,
        &mut CheckedProgress {
            pages: ram.page_count(),
        },
    ) {
        let _ = restore_devices(&ram, &state);
    }
});
