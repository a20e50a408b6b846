//! Real KVM: the test guest boots, prints its banner and makes progress on every vCPU;
//! vCPU counts the machine cannot run are refused before anything starts.

mod kvm_support;

use std::sync::Arc;

use kvm_support::{boot, config, start, wait_each_vcpu_wrote, wait_until, PATIENCE};
use vmm::machine::{Machine, MachineError, NoEvents, RunState};

fn banner_of(m: &Machine) -> String {
    String::from_utf8_lossy(&m.serial_tail()).into_owned()
}

fn boots_and_runs(vcpus: usize) {
    let m = boot(vcpus, 8, 20_000);
    assert_eq!(m.run_state(), RunState::Running);
    let want = format!("Ferry test guest: {vcpus} vCPU(s), working set 8 MiB, 20000 pages/s\r\n");
    assert!(
        wait_until(PATIENCE, || banner_of(&m).contains(&want)),
        "serial banner {want:?} not seen; serial so far: {:?}",
        banner_of(&m)
    );
    let all = (1u64 << vcpus) - 1;
    let c = m.control().expect("control device");
    assert!(
        wait_until(PATIENCE, || c.started_mask() == all),
        "every vCPU must signal Started: mask {:#b}, want {all:#b}",
        c.started_mask()
    );
    wait_each_vcpu_wrote(&m, 50);
    let before = kvm_support::per_vcpu_pages(&m);
    wait_each_vcpu_wrote(&m, before.iter().max().copied().unwrap_or(0) + 50);
    assert!(
        m.vcpus().iter().all(|v| v.stopped().is_none()),
        "no vCPU may stop on its own"
    );
}

#[test]
fn one_vcpu_guest_prints_its_banner_and_writes_pages() {
    let Some(_one) = start("one_vcpu_guest_prints_its_banner_and_writes_pages") else {
        return;
    };
    boots_and_runs(1);
}

#[test]
fn two_vcpu_guest_prints_its_banner_and_both_vcpus_write_pages() {
    let Some(_one) = start("two_vcpu_guest_prints_its_banner_and_both_vcpus_write_pages") else {
        return;
    };
    boots_and_runs(2);
}

fn refused(vcpus: usize) -> String {
    match Machine::boot(config(vcpus, 8, 1000), Arc::new(NoEvents)) {
        Ok(_) => panic!("a machine with {vcpus} vCPUs must be refused"),
        Err(e @ MachineError::Config(_)) => e.to_string(),
        Err(e) => panic!("{vcpus} vCPUs: expected a configuration error, got: {e}"),
    }
}

#[test]
fn zero_vcpus_are_refused_with_the_allowed_range() {
    let Some(_one) = start("zero_vcpus_are_refused_with_the_allowed_range") else {
        return;
    };
    let msg = refused(0);
    assert!(
        msg.contains("--vcpus must be between 1 and"),
        "unclear error: {msg}"
    );
}

#[test]
fn more_vcpus_than_kvm_allows_are_refused_with_the_allowed_range() {
    let Some(_one) = start("more_vcpus_than_kvm_allows_are_refused_with_the_allowed_range") else {
        return;
    };
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let max = kvm.get_max_vcpus();
    let msg = refused(max + 1);
    // Either limit may be the tighter one: the guest layout's or KVM's own.
    let layout = format!(
        "--vcpus must be between 1 and {}",
        vmm::guest::layout::MAX_VCPUS
    );
    let kvm_limit = format!("KVM allows at most {max} vCPUs");
    assert!(
        msg == layout || msg.starts_with(&kvm_limit),
        "unclear error for {} vCPUs (KVM max {max}): {msg}",
        max + 1
    );
}

#[test]
fn more_vcpus_than_the_guest_layout_holds_are_refused() {
    let Some(_one) = start("more_vcpus_than_the_guest_layout_holds_are_refused") else {
        return;
    };
    let n = vmm::guest::layout::MAX_VCPUS + 1;
    let msg = refused(n);
    assert_eq!(
        msg,
        format!(
            "--vcpus must be between 1 and {}",
            vmm::guest::layout::MAX_VCPUS
        )
    );
}
