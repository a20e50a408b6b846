//! A running Ferry machine: guest memory, the KVM VM, vCPU threads, devices, the test guest.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::guest_control::WorkloadLayout;
use devices::{DeviceState, GuestControl, PortBus, Serial, SerialOutput};
use migration::vm::DirtyTracker;
use ram::{GuestRam, MemoryConfig};
use serde_json::Value;
use thiserror::Error;

use crate::dirty::{KvmDirtyLog, KvmDirtyRing};
use crate::guest::layout::{GuestLayout, CODE_GPA};
use crate::guest::{self, BootError, GuestConfig};
use crate::kvm::state::{VcpuState, VmState};
use crate::kvm::vm::{DirtyMode, Vm, VmOptions};
use crate::kvm::{cpuid, vcpu, IoctlContext, KvmError};
use crate::vcpu_thread::{
    RingFullHandler, VcpuContext, VcpuError, VcpuHandle, VcpuStop, VcpuTicker, THROTTLE_TIMESLICE,
};

/// Something that publishes machine events (QMP events such as STOP and RESUME).
pub trait EventSink: Send + Sync {
    /// Publishes event `name` with `data`.
    fn emit(&self, name: &str, data: Value);
}

/// An event sink that drops everything.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _name: &str, _data: Value) {}
}

/// The workload the test guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Working set in bytes.
    pub working_set: u64,
    /// Pages written per second by the whole guest (0 = as fast as possible).
    pub rate: u64,
    /// How pages are rewritten (full pages, or one word after the first write).
    pub pattern: devices::guest_abi::Pattern,
}

/// Everything needed to build a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Guest memory.
    pub memory: MemoryConfig,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// The test guest's workload.
    pub workload: Workload,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// KVM VM options.
    pub vm: VmOptions,
}

/// Why a machine whose memory went to another process refuses to run or change it.
pub const MEMORY_HANDED_OVER: &str = "this guest's memory belongs to another Ferry process since a local migration (x-ignore-shared) completed: the guest runs there now, so it cannot run, be migrated or be changed here";

/// Errors building or steering a machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// Guest memory.
    #[error("guest memory: {0}")]
    Ram(#[from] ram::RamError),
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Loading the test guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The serial console could not be opened.
    #[error("serial console: {0}")]
    Serial(#[source] std::io::Error),
    /// Thread creation failed.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A configuration Ferry cannot run.
    #[error("{0}")]
    Config(String),
    /// Saved state that does not fit this machine.
    #[error("{0}")]
    State(String),
}

/// Run state as QMP's query-status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// Stopped by the user (`stop`).
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Stopped after migrating away.
    PostMigrate,
    /// Stopped by a migration's switchover.
    FinishMigrate,
    /// The guest crashed (a vCPU stopped on its own).
    InternalError,
    /// Stopped for a background snapshot's setup (`save-vm`).
    SaveVm,
    /// Restoring state.
    RestoreVm,
}

impl RunState {
    /// QMP's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::InternalError => "internal-error",
            RunState::SaveVm => "save-vm",
            RunState::RestoreVm => "restore-vm",
        }
    }
}

/// A machine.
pub struct Machine {
    config: MachineConfig,
    ram: Arc<GuestRam>,
    vm: Arc<Vm>,
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<Serial>>,
    control: Arc<OnceLock<Arc<GuestControl>>>,
    state: Mutex<RunState>,
    events: Arc<dyn EventSink>,
    tsc_khz: u64,
    throttle: Arc<Throttle>,
    throttle_thread: Option<JoinHandle<()>>,
    dirty: Arc<dyn DirtyTracker>,
    /// Set when a local migration gave this guest's memory to another process.
    memory_handed_over: AtomicBool,
}

/// Shared throttle state: the percentage and the ticker's stop flag.
struct Throttle {
    pct: AtomicU8,
    stop: AtomicBool,
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Machine {
    fn build(
        config: MachineConfig,
        events: Arc<dyn EventSink>,
        incoming: bool,
    ) -> Result<Self, MachineError> {
        if config.vcpus == 0 || config.vcpus > crate::guest::layout::MAX_VCPUS {
            return Err(MachineError::Config(format!(
                "--vcpus must be between 1 and {}",
                crate::guest::layout::MAX_VCPUS
            )));
        }
        let ram = Arc::new(GuestRam::new(&config.memory)?);
        let vm = Arc::new(Vm::new(ram.clone(), config.vm)?);
        let max_vcpus = vm.kvm().get_max_vcpus();
        if config.vcpus > max_vcpus {
            return Err(MachineError::Config(format!(
                "KVM allows at most {max_vcpus} vCPUs, {} requested",
                config.vcpus
            )));
        }
        // More vCPU threads than the host recommends (KVM_CAP_NR_VCPUS, its CPU count)
        // only compete for the same cores and make every timing meaningless.
        let recommended = vm.kvm().get_nr_vcpus();
        if config.vcpus > recommended {
            return Err(MachineError::Config(format!(
                "--vcpus {} exceeds the {recommended} vCPUs this host's KVM recommends \
                 (KVM_CAP_NR_VCPUS)",
                config.vcpus
            )));
        }
        let serial = Arc::new(Mutex::new(
            Serial::open(&config.serial, incoming).map_err(MachineError::Serial)?,
        ));
        let control: Arc<OnceLock<Arc<GuestControl>>> = Arc::new(OnceLock::new());
        let template = cpuid::supported(vm.kvm())?;
        let msr_list = vcpu::saved_msr_list(vm.kvm())?;
        let mut fds = Vec::new();
        for i in 0..config.vcpus {
            fds.push(vm.create_vcpu(i as u64)?);
        }
        let ring = match config.vm.dirty {
            DirtyMode::Ring(_) => {
                let raw: Vec<_> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                Some(Arc::new(KvmDirtyRing::new(vm.clone(), &raw)?))
            }
            DirtyMode::Bitmap => None,
        };
        let dirty: Arc<dyn DirtyTracker> = match &ring {
            Some(r) => r.clone(),
            None => Arc::new(KvmDirtyLog::new(vm.clone(), config.vm.clear_shift)),
        };
        let tsc_khz = fds
            .first()
            .and_then(|fd| fd.get_tsc_khz().ok())
            .map_or(1_000_000, u64::from);

        if !incoming {
            let ws_pages = config.workload.working_set / 4096;
            let gcfg = GuestConfig {
                vcpus: config.vcpus,
                ws_pages,
                rate: config.workload.rate,
                tsc_khz,
                banner: format!(
                    "Ferry test guest: {} vCPU(s), working set {} MiB, {} pages/s\r\n",
                    config.vcpus,
                    (ws_pages * 4096) >> 20,
                    config.workload.rate
                ),
                pattern: config.workload.pattern,
            };
            let c = guest::load_guest(&ram, &gcfg)?;
            let _ = control.set(Arc::new(c));
        }
        let bus = Arc::new(PortBus {
            serial: serial.clone(),
            control: control.clone(),
        });
        let throttle = Arc::new(Throttle {
            pct: AtomicU8::new(0),
            stop: AtomicBool::new(false),
        });
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let cpuid = cpuid::for_vcpu(&template, i as u32, config.vcpus as u32);
            if !incoming {
                vcpu::setup_boot(
                    &fd,
                    &cpuid,
                    CODE_GPA,
                    GuestLayout::stack_top(i),
                    GuestLayout::mailbox_gpa(i),
                )?;
            } else {
                fd.set_cpuid2(&cpuid).ctx("KVM_SET_CPUID2")?;
            }
            let ev = events.clone();
            let ctx = Arc::new(VcpuContext {
                bus: bus.clone(),
                msr_list: msr_list.clone(),
                irqchip: vm.has_irqchip(),
                tsc_khz,
                on_ring_full: ring
                    .clone()
                    .map(|r| Box::new(move |vcpu: usize| r.on_ring_full(vcpu)) as RingFullHandler),
                on_stop: Box::new(move |why: &VcpuStop| {
                    eprintln!("ferry: {why}");
                    ev.emit(
                        "GUEST_PANICKED",
                        serde_json::json!({"action": "pause", "reason": why.to_string()}),
                    );
                }),
            });
            vcpus.push(VcpuHandle::spawn(i, fd, ctx, true).map_err(MachineError::Thread)?);
        }
        let mut m = Machine {
            config,
            ram,
            vm,
            vcpus,
            serial,
            control,
            state: Mutex::new(if incoming {
                RunState::InMigrate
            } else {
                RunState::Paused
            }),
            events,
            tsc_khz,
            throttle,
            throttle_thread: None,
            dirty,
            memory_handed_over: AtomicBool::new(false),
        };
        m.start_throttle_ticker()?;
        Ok(m)
    }

    /// Builds a machine, loads the test guest and starts it.
    pub fn boot(config: MachineConfig, events: Arc<dyn EventSink>) -> Result<Self, MachineError> {
        let m = Self::boot_paused(config, events)?;
        m.resume_vcpus();
        m.set_state(RunState::Running);
        Ok(m)
    }

    /// Builds a machine and loads the test guest, leaving its vCPUs stopped (state paused)
    /// until [`Machine::resume`].
    pub fn boot_paused(
        config: MachineConfig,
        events: Arc<dyn EventSink>,
    ) -> Result<Self, MachineError> {
        Self::build(config, events, false)
    }

    /// Builds a machine that waits, paused, for its state to arrive (incoming migration).
    pub fn incoming(
        config: MachineConfig,
        events: Arc<dyn EventSink>,
    ) -> Result<Self, MachineError> {
        Self::build(config, events, true)
    }

    fn start_throttle_ticker(&mut self) -> Result<(), MachineError> {
        let throttle = self.throttle.clone();
        let targets: Vec<VcpuTicker> = self.vcpus.iter().map(|v| v.ticker()).collect();
        let t = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || throttle_ticker(&throttle, &targets))
            .map_err(MachineError::Thread)?;
        self.throttle_thread = Some(t);
        Ok(())
    }

    fn set_state(&self, s: RunState) {
        if let Ok(mut st) = self.state.lock() {
            *st = s;
        }
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        self.state
            .lock()
            .map(|s| *s)
            .unwrap_or(RunState::InternalError)
    }

    /// Whether the vCPUs are running.
    pub fn is_running(&self) -> bool {
        self.run_state() == RunState::Running
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// Guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// The test guest's control device, once known.
    pub fn control(&self) -> Option<Arc<GuestControl>> {
        self.control.get().cloned()
    }

    /// Recent serial output.
    pub fn serial_tail(&self) -> Vec<u8> {
        self.serial
            .lock()
            .map(|s| s.output_tail())
            .unwrap_or_default()
    }

    /// The dirty-page tracker migrations use (KVM's dirty log or ring).
    pub fn dirty_tracker(&self) -> Arc<dyn DirtyTracker> {
        self.dirty.clone()
    }

    /// The vCPU handles.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    fn pause_vcpus(&self) -> Result<(), MachineError> {
        for v in &self.vcpus {
            v.request_pause();
        }
        for v in &self.vcpus {
            v.wait_paused(PAUSE_TIMEOUT)?;
        }
        Ok(())
    }

    fn resume_vcpus(&self) {
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Stops the vCPUs and enters `state` (QMP `stop` uses Paused); emits STOP if they ran.
    pub fn pause(&self, state: RunState) -> Result<(), MachineError> {
        let was = self.run_state();
        self.pause_vcpus()?;
        self.set_state(state);
        if was == RunState::Running {
            self.events.emit("STOP", Value::Object(Default::default()));
        }
        Ok(())
    }

    /// Lets the vCPUs run again; emits RESUME if they were stopped.
    pub fn resume(&self) -> Result<(), MachineError> {
        if self.memory_handed_over() {
            return Err(MachineError::State(MEMORY_HANDED_OVER.into()));
        }
        if let Some(stop) = self.vcpus.iter().find_map(|v| v.stopped()) {
            return Err(MachineError::State(format!("cannot resume: {stop}")));
        }
        let was = self.run_state();
        self.resume_vcpus();
        self.set_state(RunState::Running);
        if was != RunState::Running {
            self.events
                .emit("RESUME", Value::Object(Default::default()));
        }
        Ok(())
    }

    /// Sets the auto-converge throttle (0 = off, 1..=99 percent).
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        self.throttle.pct.store(pct, Ordering::Release);
        for v in &self.vcpus {
            v.set_throttle(pct);
        }
        if let Some(t) = &self.throttle_thread {
            t.thread().unpark();
        }
    }

    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.throttle.pct.load(Ordering::Acquire)
    }

    /// Saves every vCPU's state (vCPUs must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, MachineError> {
        self.vcpus
            .iter()
            .map(|v| v.save_state().map_err(MachineError::from))
            .collect()
    }

    /// Restores every vCPU's state (vCPUs must be paused).
    pub fn restore_vcpus(&self, states: Vec<VcpuState>) -> Result<(), MachineError> {
        if states.len() != self.vcpus.len() {
            return Err(MachineError::State(format!(
                "state has {} vCPUs, this machine {}",
                states.len(),
                self.vcpus.len()
            )));
        }
        for (v, s) in self.vcpus.iter().zip(states) {
            if s.id as usize != v.id() {
                return Err(MachineError::State(format!(
                    "vCPU state {} out of order",
                    s.id
                )));
            }
            v.restore_state(s)?;
        }
        Ok(())
    }

    /// VM-wide KVM state.
    pub fn save_vm(&self) -> Result<VmState, MachineError> {
        Ok(self.vm.save_state()?)
    }

    /// Restores VM-wide KVM state.
    pub fn restore_vm(&self, state: &VmState) -> Result<(), MachineError> {
        Ok(self.vm.restore_state(state)?)
    }

    /// Device state.
    pub fn save_devices(&self) -> Result<DeviceState, MachineError> {
        let serial = self
            .serial
            .lock()
            .map_err(|_| MachineError::State("serial lock poisoned".into()))?
            .save();
        let control = self
            .control()
            .ok_or_else(|| MachineError::State("the guest has no control device yet".into()))?
            .save();
        Ok(DeviceState { serial, control })
    }

    /// Restores device state (incoming side).
    pub fn restore_devices(&self, state: &DeviceState) -> Result<(), MachineError> {
        self.serial
            .lock()
            .map_err(|_| MachineError::State("serial lock poisoned".into()))?
            .restore(&state.serial)
            .map_err(|e| MachineError::State(e.to_string()))?;
        let layout: WorkloadLayout = state.control.layout.clone();
        if layout.slices.len() != self.vcpus.len() {
            return Err(MachineError::State(format!(
                "device state is for {} vCPUs, this machine has {}",
                layout.slices.len(),
                self.vcpus.len()
            )));
        }
        let c = GuestControl::new(self.ram.clone(), layout)
            .map_err(|e| MachineError::State(e.to_string()))?;
        let _ = self.control.set(Arc::new(c));
        Ok(())
    }

    /// A local migration (x-ignore-shared) completed: another process runs this guest in
    /// the same memory now. This machine never runs or writes guest memory again.
    pub fn hand_over_memory(&self) {
        self.memory_handed_over.store(true, Ordering::Release);
    }

    /// Whether [`Machine::hand_over_memory`] happened.
    pub fn memory_handed_over(&self) -> bool {
        self.memory_handed_over.load(Ordering::Acquire)
    }

    /// Sets the run state after an incoming migration or restore (then `resume`).
    pub fn mark(&self, s: RunState) {
        self.set_state(s);
    }
}

/// QEMU's cpu-throttle timer: every `10 ms / (1 - pct)` each vCPU is told to sleep its share
/// (`pct / (1 - pct) * 10 ms`), so it runs `1 - pct` of the time.
fn throttle_ticker(throttle: &Throttle, targets: &[VcpuTicker]) {
    while !throttle.stop.load(Ordering::Acquire) {
        let pct = u32::from(throttle.pct.load(Ordering::Acquire).min(99));
        if pct == 0 {
            std::thread::park_timeout(Duration::from_millis(50));
            continue;
        }
        std::thread::sleep(THROTTLE_TIMESLICE * 100 / (100 - pct));
        for t in targets {
            t.throttle_tick();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.throttle.stop.store(true, Ordering::Release);
        if let Some(t) = self.throttle_thread.take() {
            let _ = t.join();
        }
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}

impl Workload {
    /// Parses `working-set=SIZE,rate=PAGES_PER_SEC` (either part optional) over `defaults`.
    pub fn parse(text: &str, defaults: Workload) -> Result<Workload, String> {
        let mut w = defaults;
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("workload option '{part}' needs a value (NAME=VALUE)"))?;
            match k {
                "working-set" | "ws" => {
                    w.working_set = ram::parse_size(v).map_err(|e| format!("working-set: {e}"))?;
                }
                "rate" => {
                    w.rate = v
                        .parse()
                        .map_err(|_| format!("rate: '{v}' is not a number of pages per second"))?;
                }
                "pattern" => {
                    w.pattern = match v {
                        "full" => devices::guest_abi::Pattern::Full,
                        "sparse" => devices::guest_abi::Pattern::Sparse,
                        _ => return Err(format!("pattern: '{v}' is not full or sparse")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown workload option '{k}' (known: working-set, rate, pattern)"
                    ))
                }
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_parses_and_rejects() {
        let d = Workload {
            working_set: 1,
            rate: 2,
            pattern: devices::guest_abi::Pattern::Full,
        };
        assert_eq!(
            Workload::parse("working-set=256M,rate=20000", d).unwrap(),
            Workload {
                working_set: 256 << 20,
                rate: 20000,
                pattern: devices::guest_abi::Pattern::Full,
            }
        );
        assert_eq!(
            Workload::parse("pattern=sparse", d).unwrap().pattern,
            devices::guest_abi::Pattern::Sparse
        );
        assert!(Workload::parse("pattern=odd", d).is_err());
        assert_eq!(Workload::parse("rate=5", d).unwrap().working_set, 1);
        assert!(Workload::parse("rate=fast", d).is_err());
        assert!(Workload::parse("speed=1", d).is_err());
        assert!(Workload::parse("rate", d).is_err());
    }
}
