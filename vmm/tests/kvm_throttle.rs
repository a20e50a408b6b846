//! Real KVM: the auto-converge throttle takes a share of the vCPUs' time away from an
//! unpaced guest, and gives it back when turned off.

mod kvm_support;

use std::time::Duration;

use kvm_support::{boot, page_rate, start, wait_each_vcpu_wrote};

const WINDOW: Duration = Duration::from_millis(400);

/// The best page rate of three windows: other load on the host can only lower a window's
/// rate, so the best one is the least disturbed.
fn best_rate(m: &vmm::machine::Machine) -> f64 {
    (0..3).map(|_| page_rate(m, WINDOW)).fold(0.0, f64::max)
}

#[test]
fn throttle_50_roughly_halves_an_unpaced_guest() {
    let Some(_one) = start("throttle_50_roughly_halves_an_unpaced_guest") else {
        return;
    };
    let m = boot(1, 8, 0);
    wait_each_vcpu_wrote(&m, 1000);
    let full = best_rate(&m);
    assert!(
        full > 1000.0,
        "an unpaced guest writes fast: {full:.0} pages/s"
    );
    m.set_throttle(50);
    assert_eq!(m.throttle(), 50);
    std::thread::sleep(Duration::from_millis(100));
    let throttled = best_rate(&m);
    let ratio = throttled / full;
    eprintln!(
        "unpaced {full:.0} pages/s, throttled 50%: {throttled:.0} pages/s (ratio {ratio:.2})"
    );
    assert!(
        (0.2..=0.8).contains(&ratio),
        "throttle 50% should roughly halve the page rate: {full:.0} -> {throttled:.0} pages/s \
         (ratio {ratio:.2})"
    );
    m.set_throttle(0);
    std::thread::sleep(Duration::from_millis(100));
    let again = best_rate(&m);
    assert!(
        again > throttled * 1.25,
        "throttle 0 gives the time back: {throttled:.0} -> {again:.0} pages/s"
    );
}

#[test]
fn throttle_is_capped_at_99_percent() {
    let Some(_one) = start("throttle_is_capped_at_99_percent") else {
        return;
    };
    let m = boot(1, 4, 1000);
    m.set_throttle(250);
    assert_eq!(m.throttle(), 99);
}
