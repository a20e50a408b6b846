//! [`SnapshotSource`]: the machine as a background snapshot sees it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use migration::vm::{DirtyTracker, SourceVm};
use ram::GuestRam;

use crate::machine::{Machine, RunState};
use crate::vm_adapter::save_state;

/// A running machine being snapshotted: stopped in `save-vm` for the setup only (QEMU
/// stops the VM the same way in `bg_migration_thread`), then running again.
pub struct SnapshotSource {
    machine: Arc<Machine>,
    uuid: [u8; 16],
    store_global_state: bool,
    was_running: AtomicBool,
}

impl SnapshotSource {
    /// Wraps `machine`; without `store_global_state` the restored guest starts regardless
    /// of whether this one was running (as for a migration).
    pub fn new(machine: Arc<Machine>, uuid: [u8; 16], store_global_state: bool) -> Self {
        SnapshotSource {
            machine,
            uuid,
            store_global_state,
            was_running: AtomicBool::new(false),
        }
    }
}

impl SourceVm for SnapshotSource {
    fn ram(&self) -> Arc<GuestRam> {
        self.machine.ram().clone()
    }
    fn vcpus(&self) -> u32 {
        self.machine.vcpus().len() as u32
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn dirty_tracker(&self) -> Arc<dyn DirtyTracker> {
        self.machine.dirty_tracker()
    }
    fn is_running(&self) -> bool {
        self.machine.is_running()
    }
    fn stop_vcpus(&self) -> Result<(), String> {
        self.was_running
            .store(self.machine.is_running(), Ordering::Release);
        self.machine
            .pause(RunState::SaveVm)
            .map_err(|e| e.to_string())
    }
    fn resume_vcpus(&self) -> Result<(), String> {
        if self.was_running.load(Ordering::Acquire) {
            self.machine.resume().map_err(|e| e.to_string())
        } else {
            Ok(())
        }
    }
    fn set_throttle(&self, _pct: u8) {}
    fn save_state(&self) -> Result<Vec<u8>, String> {
        let running = self.was_running.load(Ordering::Acquire) || !self.store_global_state;
        save_state(&self.machine, running)
    }
    fn migrated_away(&self) {}
}
