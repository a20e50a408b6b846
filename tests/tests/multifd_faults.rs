//! Multifd faults through a channel-aware proxy: a corrupt compressed packet, a channel
//! that closes mid-way, a channel that never connects. Each ends with a clear error on
//! the source, the source guest running and intact, and the destination exiting with 1.

mod multifd_support;

use std::time::{Duration, Instant};

use multifd_support::{
    assert_destination_exits_1, assert_failed_and_source_intact, enable_multifd, start_pair,
    ChannelFault, MultifdProxy,
};
use serde_json::json;
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless};

fn run_fault(
    test: &str,
    compression: &str,
    fault: ChannelFault,
    want: &[&str],
) -> Option<Duration> {
    if skip_unless(test, kvm_missing()) {
        return None;
    }
    let (mut src, mut dst, port) = start_pair(test);
    enable_multifd(&mut src, 2, compression);
    enable_multifd(&mut dst, 2, compression);
    let proxy = MultifdProxy::start(port, fault);
    // Let the guest write its working set, so every channel has packets to carry.
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    src.cmd("migrate", json!({"uri": proxy.uri()}));
    let desc = assert_failed_and_source_intact(&mut src, want);
    let took = t.elapsed();
    assert!(
        proxy.injected.load(std::sync::atomic::Ordering::Acquire) > 0,
        "the fault was injected"
    );
    eprintln!(
        "{test}: failed after {took:?}: {desc}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    assert_destination_exits_1(&mut dst, Duration::from_secs(20));
    Some(took)
}

#[test]
fn a_corrupt_compressed_packet_fails_the_migration_clearly() {
    let _one = one_guest_test_at_a_time();
    run_fault(
        "multifd-corrupt",
        "zstd",
        ChannelFault::CorruptCompressed { nth: 0 },
        &["corrupt zstd data"],
    );
}

#[test]
fn a_corrupt_zlib_packet_fails_the_migration_clearly() {
    let _one = one_guest_test_at_a_time();
    run_fault(
        "multifd-corrupt-zlib",
        "zlib",
        ChannelFault::CorruptCompressed { nth: 0 },
        &["corrupt zlib data"],
    );
}

#[test]
fn a_channel_closing_midway_fails_the_migration_clearly() {
    let _one = one_guest_test_at_a_time();
    run_fault(
        "multifd-close",
        "none",
        ChannelFault::CloseAfter {
            channel: 1,
            packets: 20,
        },
        &["multifd channel 1"],
    );
}

#[test]
fn a_channel_that_never_connects_fails_within_bounded_time() {
    let _one = one_guest_test_at_a_time();
    if let Some(took) = run_fault(
        "multifd-never",
        "none",
        ChannelFault::NeverConnect { channel: 1 },
        &["only 1 of 2 multifd channels connected"],
    ) {
        assert!(took < Duration::from_secs(30), "{took:?}");
    }
}
