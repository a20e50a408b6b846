//! Real KVM: pause freezes the guest, resume lets it go on, and both are announced as
//! STOP/RESUME events.

mod kvm_support;

use std::time::Duration;

use kvm_support::{
    boot, boot_with, config, pages_written, per_vcpu_pages, start, wait_each_vcpu_wrote,
    wait_until, RecordingEvents, PATIENCE,
};
use vmm::machine::RunState;

#[test]
fn pause_freezes_progress_and_resume_restarts_it() {
    let Some(_one) = start("pause_freezes_progress_and_resume_restarts_it") else {
        return;
    };
    let m = boot(2, 8, 20_000);
    wait_each_vcpu_wrote(&m, 20);
    m.pause(RunState::Paused).expect("pause");
    assert_eq!(m.run_state(), RunState::Paused);
    assert!(
        m.vcpus().iter().all(|v| v.is_paused()),
        "every vCPU thread must report paused"
    );
    let frozen = per_vcpu_pages(&m);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        per_vcpu_pages(&m),
        frozen,
        "a paused guest must not write pages"
    );
    m.resume().expect("resume");
    assert_eq!(m.run_state(), RunState::Running);
    let target = frozen.iter().max().copied().unwrap_or(0) + 20;
    wait_each_vcpu_wrote(&m, target);
}

#[test]
fn pause_and_resume_reach_the_event_sink_as_stop_then_resume() {
    let Some(_one) = start("pause_and_resume_reach_the_event_sink_as_stop_then_resume") else {
        return;
    };
    let events = RecordingEvents::new();
    let m = boot_with(config(1, 8, 20_000), events.clone());
    assert!(
        events.names().is_empty(),
        "boot emits no STOP/RESUME: {:?}",
        events.names()
    );
    m.pause(RunState::Paused).expect("pause");
    assert_eq!(events.names(), ["STOP"]);
    m.resume().expect("resume");
    assert_eq!(events.names(), ["STOP", "RESUME"]);
}

#[test]
fn pausing_a_paused_guest_or_resuming_a_running_one_emits_nothing() {
    let Some(_one) = start("pausing_a_paused_guest_or_resuming_a_running_one_emits_nothing") else {
        return;
    };
    let events = RecordingEvents::new();
    let m = boot_with(config(1, 8, 20_000), events.clone());
    m.resume().expect("resume while running");
    assert!(events.names().is_empty(), "{:?}", events.names());
    m.pause(RunState::Paused).expect("pause");
    m.pause(RunState::Paused).expect("pause again");
    assert_eq!(events.names(), ["STOP"], "one STOP for two pauses");
}

#[test]
fn a_guest_paused_and_resumed_many_times_keeps_running() {
    let Some(_one) = start("a_guest_paused_and_resumed_many_times_keeps_running") else {
        return;
    };
    let m = boot(2, 8, 0);
    wait_each_vcpu_wrote(&m, 1);
    for round in 0..50 {
        m.pause(RunState::Paused)
            .unwrap_or_else(|e| panic!("pause {round}: {e}"));
        m.resume().unwrap_or_else(|e| panic!("resume {round}: {e}"));
    }
    let before = pages_written(&m);
    assert!(
        wait_until(PATIENCE, || pages_written(&m) > before + 1000),
        "the guest must keep writing after 50 pause/resume rounds"
    );
    assert!(m.vcpus().iter().all(|v| v.stopped().is_none()));
}
