//! Live migration with KVM's dirty ring as the dirty-page source (`--dirty-tracking ring`):
//! the destination's memory equals the source's and the guest verifies every page.

mod migration_support;

use migration_support::{
    assert_completed_and_identical, migrate, set_params, start_dest, start_source, SMALL,
};
use serde_json::json;
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless};

#[test]
fn a_guest_migrates_with_the_dirty_ring_and_every_page_arrives() {
    let _one = one_guest_test_at_a_time();
    let test = "a_guest_migrates_with_the_dirty_ring_and_every_page_arrives";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let probe = std::process::Command::new(tests::ferry_bin())
        .args(["probe", "--json"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let ring_entries = serde_json::from_str::<serde_json::Value>(&probe)
        .ok()
        .and_then(|p| {
            p.pointer("/kvm/dirty-ring-max-entries")
                .and_then(|v| v.as_u64())
        })
        .unwrap_or(0);
    if ring_entries == 0 {
        eprintln!("SKIP {test}: this host's KVM offers no dirty ring (ferry probe: {probe})");
        return;
    }
    let guest = SMALL;
    let mut sopts = guest.source(None);
    sopts
        .extra
        .extend(["--dirty-tracking".into(), "ring".into()]);
    let mut src = start_source("ring-src", &guest, sopts);
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("ring-dst", dopts);
    // Several passes: the guest dirties ~78 MiB/s against 256 MiB/s.
    set_params(&mut src, json!({"max-bandwidth": 256u64 << 20}));
    migrate(&mut src, &uri);
    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    assert!(
        info.pointer("/ram/dirty-sync-count")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
            >= 2,
        "at least one dirty sync through the ring: {info}"
    );
}
