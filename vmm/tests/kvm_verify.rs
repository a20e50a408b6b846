//! Real KVM: the guest's own memory check and the host's agree, find nothing on a healthy
//! guest, and find exactly the one page the host corrupted.

mod kvm_support;

use std::time::Duration;

use devices::guest_abi::mailbox;
use devices::guest_control::ControlError;
use kvm_support::{boot, start, wait_each_vcpu_wrote, wait_until, PATIENCE};
use vmm::machine::{Machine, RunState};

const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

fn wait_passes(m: &Machine, passes: u64) {
    let c = m.control().expect("control device");
    let ok = wait_until(PATIENCE, || {
        c.progress()
            .map(|p| p.iter().all(|v| v.passes >= passes))
            .unwrap_or(false)
    });
    assert!(
        ok,
        "every vCPU should complete {passes} passes: {:?}",
        c.progress()
    );
}

#[test]
fn guest_verify_of_a_healthy_guest_finds_no_bad_pages() {
    let Some(_one) = start("guest_verify_of_a_healthy_guest_finds_no_bad_pages") else {
        return;
    };
    let m = boot(2, 4, 20_000);
    // Two passes: pages before and after the index then hold two different generations.
    wait_passes(&m, 2);
    let c = m.control().expect("control device");
    let r = c.guest_verify(VERIFY_TIMEOUT).expect("guest verify");
    assert_eq!(r.bad_pages, 0, "{r:?}");
    assert_eq!(r.pages_checked, 4 << 8, "every working-set page is checked");
}

#[test]
fn host_verify_of_a_healthy_paused_guest_finds_no_bad_pages() {
    let Some(_one) = start("host_verify_of_a_healthy_paused_guest_finds_no_bad_pages") else {
        return;
    };
    let m = boot(2, 4, 20_000);
    wait_passes(&m, 2);
    m.pause(RunState::Paused).expect("pause");
    let r = m
        .control()
        .expect("control")
        .host_verify()
        .expect("host verify");
    assert_eq!(r.bad_pages, 0, "{r:?}");
    // The page at each vCPU's index may be half written, so the host skips it.
    assert_eq!(r.pages_checked, (4 << 8) - 2);
}

#[test]
fn guest_verify_of_a_paused_guest_times_out() {
    let Some(_one) = start("guest_verify_of_a_paused_guest_times_out") else {
        return;
    };
    let m = boot(1, 4, 20_000);
    wait_each_vcpu_wrote(&m, 1);
    m.pause(RunState::Paused).expect("pause");
    let r = m
        .control()
        .expect("control")
        .guest_verify(Duration::from_millis(200));
    assert!(
        matches!(r, Err(ControlError::Timeout(_))),
        "a paused guest cannot answer: {r:?}"
    );
}

/// Corrupts one word of a page vCPU `vcpu` wrote two pages ago (it will not rewrite it for
/// almost a full pass); returns that page's index in the vCPU's slice.
fn corrupt_recent_page(m: &Machine, vcpu: usize) -> u64 {
    let c = m.control().expect("control");
    let layout = c.layout().clone();
    let slice = layout.slices[vcpu];
    let written = c.progress().expect("progress")[vcpu].pages_written;
    assert!(written >= 2, "vCPU {vcpu} must have written two pages");
    let index = written % slice.pages;
    let victim = (index + slice.pages - 2) % slice.pages;
    let ram_page = layout.ram_page(slice.first_page + victim);
    let mut bytes = m.ram().page(ram_page).expect("page in RAM").to_vec();
    bytes[8 * 100] ^= 0x40;
    m.ram()
        .write_page(ram_page, &bytes)
        .expect("host write into guest RAM");
    victim
}

#[test]
fn one_corrupted_page_is_found_by_guest_and_host_verify() {
    let Some(_one) = start("one_corrupted_page_is_found_by_guest_and_host_verify") else {
        return;
    };
    // 1000 pages/s over two 2048-page slices: a page is rewritten only every ~4 s.
    let m = boot(2, 16, 1000);
    wait_each_vcpu_wrote(&m, 20);
    let c = m.control().expect("control");
    let clean = c.guest_verify(VERIFY_TIMEOUT).expect("guest verify");
    assert_eq!(clean.bad_pages, 0, "before the corruption: {clean:?}");

    m.pause(RunState::Paused).expect("pause");
    let victim = corrupt_recent_page(&m, 1);
    let host = c.host_verify().expect("host verify");
    assert_eq!(
        host.bad_pages, 1,
        "host verify must see exactly the corrupted page: {host:?}"
    );

    m.resume().expect("resume");
    let guest = c.guest_verify(VERIFY_TIMEOUT).expect("guest verify");
    assert_eq!(
        guest.bad_pages, 1,
        "guest verify must see exactly the corrupted page: {guest:?}"
    );
    assert_eq!(guest.pages_checked, 16 << 8);
    let mb1 = c.layout().slices[1].mailbox_gpa;
    let first_bad = m
        .ram()
        .read_u64(mb1 + mailbox::VERIFY_FIRST_BAD)
        .expect("mailbox");
    assert_eq!(first_bad, victim, "vCPU 1 names the corrupted page");
    let mb0 = c.layout().slices[0].mailbox_gpa;
    let vcpu0_bad = m
        .ram()
        .read_u64(mb0 + mailbox::VERIFY_BAD)
        .expect("mailbox");
    assert_eq!(vcpu0_bad, 0, "vCPU 0's slice was not touched");
}
