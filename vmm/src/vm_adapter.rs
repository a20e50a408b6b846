//! The machine as migration sees it: `migration::vm::{SourceVm, DestVm}` for [`Machine`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::DeviceState;
use migration::vm::{DestVm, DirtyTracker, SourceVm};
use ram::GuestRam;
use serde::{Deserialize, Serialize};

use crate::incoming_populate::IncomingPopulate;
use crate::kvm::state::{VcpuState, VmState};
use crate::machine::{Machine, RunState};

/// Everything but RAM that a migration or snapshot carries, as one serde document.
#[derive(Serialize, Deserialize)]
pub struct SavedState {
    /// Format version of this document.
    pub version: u32,
    /// Whether the guest was running when saved (the destination starts it only then).
    pub running: bool,
    /// Guest TSC frequency on the source.
    pub tsc_khz: u64,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Devices.
    pub devices: DeviceState,
}

/// Version of [`SavedState`] this Ferry writes.
pub const SAVED_STATE_VERSION: u32 = 1;

/// Serializes the machine's non-RAM state (vCPUs must be stopped).
pub fn save_state(m: &Machine, running: bool) -> Result<Vec<u8>, String> {
    let s = SavedState {
        version: SAVED_STATE_VERSION,
        running,
        tsc_khz: m.tsc_khz(),
        vcpus: m.save_vcpus().map_err(|e| e.to_string())?,
        vm: m.save_vm().map_err(|e| e.to_string())?,
        devices: m.save_devices().map_err(|e| e.to_string())?,
    };
    serde_json::to_vec(&s).map_err(|e| format!("cannot serialize the VM state: {e}"))
}

/// Restores state saved by [`save_state`]; returns whether the guest was running.
pub fn load_state(m: &Machine, bytes: &[u8]) -> Result<bool, String> {
    let s: SavedState = serde_json::from_slice(bytes)
        .map_err(|e| format!("invalid VM state in the stream: {e}"))?;
    if s.version != SAVED_STATE_VERSION {
        return Err(format!("VM state version {} is not supported", s.version));
    }
    m.restore_vm(&s.vm).map_err(|e| e.to_string())?;
    m.restore_vcpus(s.vcpus).map_err(|e| e.to_string())?;
    m.restore_devices(&s.devices).map_err(|e| e.to_string())?;
    Ok(s.running)
}

/// The outgoing side: a running machine.
pub struct MachineSource {
    machine: Arc<Machine>,
    uuid: [u8; 16],
    store_global_state: bool,
    was_running: AtomicBool,
    dirty: Option<Arc<dyn DirtyTracker>>,
}

impl MachineSource {
    /// Wraps `machine`; without `store_global_state` (QEMU's property of that name) the
    /// destination is not told the source's run state and starts the guest regardless.
    pub fn new(machine: Arc<Machine>, uuid: [u8; 16], store_global_state: bool) -> Self {
        MachineSource {
            machine,
            uuid,
            store_global_state,
            was_running: AtomicBool::new(false),
            dirty: None,
        }
    }

    /// Tracks dirty pages with `tracker` instead of the machine's (KVM's log or ring).
    pub fn with_dirty_tracker(mut self, tracker: Option<Arc<dyn DirtyTracker>>) -> Self {
        self.dirty = tracker;
        self
    }
}

impl SourceVm for MachineSource {
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
        match &self.dirty {
            Some(t) => t.clone(),
            None => self.machine.dirty_tracker(),
        }
    }
    fn is_running(&self) -> bool {
        self.machine.is_running()
    }
    fn stop_vcpus(&self) -> Result<(), String> {
        self.was_running
            .store(self.machine.is_running(), Ordering::Release);
        self.machine
            .pause(RunState::FinishMigrate)
            .map_err(|e| e.to_string())
    }
    fn resume_vcpus(&self) -> Result<(), String> {
        if self.was_running.load(Ordering::Acquire) {
            self.machine.resume().map_err(|e| e.to_string())
        } else {
            self.machine.mark(RunState::Paused);
            Ok(())
        }
    }
    fn set_throttle(&self, pct: u8) {
        let pct = if pct == 0 {
            0
        } else {
            migration::auto_converge::clamp_throttle(pct)
        };
        self.machine.set_throttle(pct);
    }
    fn save_state(&self) -> Result<Vec<u8>, String> {
        let running = self.was_running.load(Ordering::Acquire) || !self.store_global_state;
        save_state(&self.machine, running)
    }
    fn migrated_away(&self) {
        self.machine.mark(RunState::PostMigrate);
    }
    fn memory_handed_over(&self) {
        self.machine.hand_over_memory();
    }
}

/// The incoming side: a machine waiting for its state.
pub struct MachineDest {
    machine: Arc<Machine>,
    uuid: [u8; 16],
    autostart: bool,
    source_running: AtomicBool,
    populate: Option<Arc<IncomingPopulate>>,
    decompress_error_check: bool,
}

impl migration::postcopy::DestHooks for MachineDest {
    fn before_postcopy(&self) {
        // A populate thread would refill discarded pages with zeros no fault replaces.
        if let Some(p) = &self.populate {
            p.stop();
        }
    }

    fn vcpu_thread_ids(&self) -> Vec<i32> {
        vcpu_thread_ids(self.machine.vcpus().len())
    }
}

/// Linux thread ids of this process's vCPU threads (named `vcpu0`, `vcpu1`, ...) in vCPU
/// order; 0 for a vCPU whose thread was not found.
pub fn vcpu_thread_ids(vcpus: usize) -> Vec<i32> {
    let mut ids = vec![0; vcpus];
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return ids;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(i) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if let Some(slot) = ids.get_mut(i) {
                *slot = tid;
            }
        }
    }
    ids
}

impl MachineDest {
    /// Wraps `machine`; `autostart` false keeps the guest paused after the migration (`-S`).
    pub fn new(machine: Arc<Machine>, uuid: [u8; 16], autostart: bool) -> Self {
        MachineDest {
            machine,
            uuid,
            autostart,
            source_running: AtomicBool::new(true),
            populate: None,
            decompress_error_check: true,
        }
    }

    /// QEMU's `decompress-error-check` property (see [`DestVm::decompress_error_check`]).
    pub fn with_decompress_error_check(mut self, on: bool) -> Self {
        self.decompress_error_check = on;
        self
    }

    /// Populates memory ahead of the receiver with `populate` (which the source's data
    /// ranges steer, and postcopy or a local migration stop).
    pub fn with_populate(mut self, populate: Option<Arc<IncomingPopulate>>) -> Self {
        self.populate = populate;
        self
    }
}

impl DestVm for MachineDest {
    fn decompress_error_check(&self) -> bool {
        self.decompress_error_check
    }
    fn ram(&self) -> Arc<GuestRam> {
        self.machine.ram().clone()
    }
    fn vcpus(&self) -> u32 {
        self.machine.vcpus().len() as u32
    }
    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    fn load_state(&self, state: &[u8]) -> Result<(), String> {
        let running = load_state(&self.machine, state)?;
        self.source_running.store(running, Ordering::Release);
        Ok(())
    }
    fn adopt_shared_ram(&self, memory: std::fs::File) -> Result<(), String> {
        // Populating our own memory is pointless now, and must not run while it is replaced.
        if let Some(p) = &self.populate {
            p.stop();
        }
        self.machine
            .ram()
            .adopt_shared(memory)
            .map_err(|e| e.to_string())
    }
    fn populate_ahead(&self, ranges: &[migration::stream::ranges::PageRange]) {
        if let Some(p) = &self.populate {
            let ranges: Vec<(u64, u64)> = ranges
                .iter()
                .map(|r| (r.first, r.first.saturating_add(r.count)))
                .collect();
            p.data_ranges(&ranges);
        }
    }
    fn start(&self) -> Result<(), String> {
        if self.autostart && self.source_running.load(Ordering::Acquire) {
            self.machine.resume().map_err(|e| e.to_string())
        } else {
            self.machine.mark(RunState::Paused);
            Ok(())
        }
    }
}
