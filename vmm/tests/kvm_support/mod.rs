//! Shared helpers of the real-KVM tests (`vmm/tests/kvm_*.rs`): small machines, one at a
//! time, with skips only when `/dev/kvm` cannot be used.

#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::SerialOutput;
use ram::MemoryConfig;
use serde_json::Value;
use vmm::kvm::vm::VmOptions;
use vmm::machine::{EventSink, Machine, MachineConfig, Workload};

/// Guest RAM of every test machine: small, the machine is shared.
pub const RAM_BYTES: u64 = 64 << 20;
/// How long a test waits for something the guest does in well under a second.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Why `/dev/kvm` cannot run guests here, if it cannot.
pub fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable: {e}")),
    }
}

/// Returns true (and prints why) when the test must skip; else takes the one-guest-at-a-time
/// lock, so tests of one binary never run two guests at once on this small machine.
pub fn start(test: &str) -> Option<MutexGuard<'static, ()>> {
    if let Some(why) = kvm_missing() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    static ONE_GUEST: Mutex<()> = Mutex::new(());
    Some(ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A machine configuration: `vcpus` vCPUs, a working set of `ws_mib` MiB written at `rate`
/// pages per second (0 = unpaced), serial output kept in memory only.
pub fn config(vcpus: usize, ws_mib: u64, rate: u64) -> MachineConfig {
    MachineConfig {
        memory: MemoryConfig {
            size: RAM_BYTES,
            ..MemoryConfig::default()
        },
        vcpus,
        workload: Workload {
            working_set: ws_mib << 20,
            rate,
            pattern: devices::guest_abi::Pattern::Full,
        },
        serial: SerialOutput::None,
        vm: VmOptions::default(),
    }
}

/// Boots `config` with `events`; panics with the error if the machine cannot start.
pub fn boot_with(config: MachineConfig, events: Arc<dyn EventSink>) -> Machine {
    match Machine::boot(config, events) {
        Ok(m) => m,
        Err(e) => panic!("the test guest did not boot: {e}"),
    }
}

/// Boots a machine without an event sink.
pub fn boot(vcpus: usize, ws_mib: u64, rate: u64) -> Machine {
    boot_with(
        config(vcpus, ws_mib, rate),
        Arc::new(vmm::machine::NoEvents),
    )
}

/// Per-vCPU pages written since boot.
pub fn per_vcpu_pages(m: &Machine) -> Vec<u64> {
    let c = m.control().expect("a booted machine has a control device");
    c.progress()
        .expect("mailboxes are readable")
        .iter()
        .map(|p| p.pages_written)
        .collect()
}

/// Total pages written since boot.
pub fn pages_written(m: &Machine) -> u64 {
    per_vcpu_pages(m).iter().sum()
}

/// Polls `f` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every vCPU has written at least `pages` pages; panics with the counters if not.
pub fn wait_each_vcpu_wrote(m: &Machine, pages: u64) {
    let ok = wait_until(PATIENCE, || per_vcpu_pages(m).iter().all(|&n| n >= pages));
    assert!(
        ok,
        "every vCPU should have written {pages} pages within {PATIENCE:?}; counters: {:?}, \
         vCPU stops: {:?}",
        per_vcpu_pages(m),
        m.vcpus().iter().map(|v| v.stopped()).collect::<Vec<_>>()
    );
}

/// Pages written per second over `window`.
pub fn page_rate(m: &Machine, window: Duration) -> f64 {
    let a = pages_written(m);
    let t = Instant::now();
    std::thread::sleep(window);
    let b = pages_written(m);
    (b - a) as f64 / t.elapsed().as_secs_f64()
}

/// An event sink that records every event's name, in order.
#[derive(Default)]
pub struct RecordingEvents(Mutex<Vec<String>>);

impl RecordingEvents {
    /// A new, empty recorder.
    pub fn new() -> Arc<RecordingEvents> {
        Arc::new(RecordingEvents::default())
    }

    /// Names of the events so far.
    pub fn names(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl EventSink for RecordingEvents {
    fn emit(&self, name: &str, _data: Value) {
        if let Ok(mut v) = self.0.lock() {
            v.push(name.to_string());
        }
    }
}
