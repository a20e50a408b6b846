//! Real KVM: vCPU, VM and device state saved from a paused guest and loaded into a second
//! machine (or back into the same one) lets the guest go on exactly where it stopped.

mod kvm_support;

use std::sync::Arc;
use std::time::Duration;

use kvm_support::{boot, config, per_vcpu_pages, start, wait_each_vcpu_wrote};
use vmm::kvm::state::VcpuState;
use vmm::machine::{Machine, NoEvents, RunState};
use vmm::vm_adapter::{load_state, save_state, SavedState, SAVED_STATE_VERSION};

const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

fn copy_ram(from: &Machine, to: &Machine) {
    let (a, b) = (from.ram(), to.ram());
    assert_eq!(a.page_count(), b.page_count());
    for n in 0..a.page_count() {
        let page = a.page(n).expect("source page");
        b.write_page(n, page).expect("destination page");
    }
}

fn assert_runs_and_verifies(m: &Machine, from: &[u64]) {
    let target = from.iter().max().copied().unwrap_or(0) + 50;
    wait_each_vcpu_wrote(m, target);
    assert!(
        m.vcpus().iter().all(|v| v.stopped().is_none()),
        "no vCPU may crash: {:?}",
        m.vcpus().iter().map(|v| v.stopped()).collect::<Vec<_>>()
    );
    let r = m
        .control()
        .expect("control")
        .guest_verify(VERIFY_TIMEOUT)
        .expect("guest verify");
    assert_eq!(r.bad_pages, 0, "{r:?}");
}

#[test]
fn state_loaded_into_a_second_machine_continues_the_guest() {
    let Some(_one) = start("state_loaded_into_a_second_machine_continues_the_guest") else {
        return;
    };
    let cfg = config(2, 8, 20_000);
    let a = kvm_support::boot_with(cfg.clone(), Arc::new(NoEvents));
    wait_each_vcpu_wrote(&a, 1000);
    a.pause(RunState::Paused).expect("pause the source");
    let saved_progress = per_vcpu_pages(&a);
    let state = save_state(&a, true).expect("save state");

    let b = Machine::incoming(cfg, Arc::new(NoEvents)).expect("second machine");
    assert_eq!(b.run_state(), RunState::InMigrate);
    copy_ram(&a, &b);
    drop(a);
    let running = load_state(&b, &state).expect("load state");
    assert!(running, "the state says the guest was running");
    assert_eq!(
        per_vcpu_pages(&b),
        saved_progress,
        "the copy starts from the saved counters"
    );
    let host = b
        .control()
        .expect("control")
        .host_verify()
        .expect("host verify");
    assert_eq!(
        host.bad_pages, 0,
        "the copied memory is consistent: {host:?}"
    );
    b.resume().expect("resume the copy");
    assert_runs_and_verifies(&b, &saved_progress);
}

#[test]
fn state_of_one_vcpu_is_refused_by_a_two_vcpu_machine() {
    let Some(_one) = start("state_of_one_vcpu_is_refused_by_a_two_vcpu_machine") else {
        return;
    };
    let a = boot(1, 4, 20_000);
    wait_each_vcpu_wrote(&a, 1);
    a.pause(RunState::Paused).expect("pause");
    let state = save_state(&a, true).expect("save state");
    drop(a);
    let b = Machine::incoming(config(2, 4, 20_000), Arc::new(NoEvents)).expect("machine");
    let err = load_state(&b, &state).expect_err("a 1-vCPU state cannot fill 2 vCPUs");
    assert!(err.contains("vCPU"), "unclear error: {err}");
}

/// A copy of `s` with the registers the guest loop depends on set to nonsense.
fn scrambled(s: &VcpuState) -> VcpuState {
    let json = serde_json::to_string(s).expect("serialize");
    let mut copy: VcpuState = serde_json::from_str(&json).expect("deserialize");
    copy.regs.rip = 0xdead_b000;
    copy.regs.rsp = 0x10;
    copy.regs.r12 = 0x5555;
    copy.regs.r13 = 0xaaaa_aaaa;
    copy.regs.r15 = 0;
    copy
}

#[test]
fn restoring_saved_state_over_scrambled_registers_continues_the_guest() {
    let Some(_one) = start("restoring_saved_state_over_scrambled_registers_continues_the_guest")
    else {
        return;
    };
    let m = boot(2, 8, 20_000);
    wait_each_vcpu_wrote(&m, 1000);
    m.pause(RunState::Paused).expect("pause");
    let progress = per_vcpu_pages(&m);
    let good = m.save_vcpus().expect("save vCPUs");
    if let Err(e) = m.restore_vcpus(good.iter().map(scrambled).collect()) {
        panic!(
            "restoring vCPU state into vCPUs that have already run must work (loadvm, a \
             failed incoming load, this test), but it failed: {e}. vcpu::restore calls \
             KVM_SET_CPUID2, which KVM refuses with EINVAL once a vCPU has run unless the \
             entries are identical; CPUID is set when the vCPU is created and restore \
             should not set it again"
        );
    }
    let now = m.save_vcpus().expect("save again");
    for (s, g) in now.iter().zip(&good) {
        assert_eq!(
            s.regs.rip, 0xdead_b000,
            "the scrambled state must be in KVM"
        );
        assert_ne!(s.regs.rip, g.regs.rip);
    }
    m.restore_vcpus(good).expect("restore the saved state");
    let back = m.save_vcpus().expect("save after restore");
    assert_eq!(
        per_vcpu_pages(&m),
        progress,
        "nothing ran while the registers were scrambled"
    );
    m.resume().expect("resume");
    assert_runs_and_verifies(&m, &progress);
    assert!(back.iter().all(|s| s.regs.rip != 0xdead_b000));
}

#[test]
fn saved_state_survives_a_serde_round_trip_byte_for_byte() {
    let Some(_one) = start("saved_state_survives_a_serde_round_trip_byte_for_byte") else {
        return;
    };
    let m = boot(2, 4, 20_000);
    wait_each_vcpu_wrote(&m, 1);
    m.pause(RunState::Paused).expect("pause");
    let first = save_state(&m, true).expect("save");
    let parsed: SavedState = serde_json::from_slice(&first).expect("parse");
    assert_eq!(parsed.version, SAVED_STATE_VERSION);
    assert_eq!(parsed.vcpus.len(), 2);
    assert_eq!(parsed.devices.control.layout.ws_pages, 4 << 8);
    let again = serde_json::to_vec(&parsed).expect("serialize");
    assert!(first == again, "every field must survive serde unchanged");
}
