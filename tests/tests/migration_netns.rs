//! Live migration between two "hosts" (network namespaces joined by a veth pair) while
//! the guest dirties memory: nothing lost, vCPU state continues.

mod migration_support;

use migration_support::{
    assert_completed_and_identical, migrate, start_dest, start_source, Guest, SMALL,
};
use tests::{host_pair_or_skip, kvm_missing, one_guest_test_at_a_time, skip_unless};

fn live_migration_between_namespaces(test: &str, guest: Guest) {
    let _one = one_guest_test_at_a_time();
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let Some(hosts) = host_pair_or_skip(test) else {
        return;
    };
    let mut src = start_source("ns-src", &guest, guest.source(hosts.a().netns.as_deref()));
    let mut dopts = guest.dest(
        &format!("tcp:{}:4444", hosts.b().addr),
        hosts.b().netns.as_deref(),
    );
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("ns-dst", dopts);
    assert_eq!(dst.status(), "inmigrate");
    let before = src.pages_written();
    migrate(&mut src, &uri);
    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    assert!(
        src.pages_written() > before,
        "the guest was running during the migration"
    );
    eprintln!(
        "{test}: total-time {} ms, downtime {} ms, {} bytes, {} passes",
        info["total-time"],
        info["downtime"],
        info["ram"]["transferred"],
        info["ram"]["dirty-sync-count"]
    );
}

#[test]
fn live_migration_between_namespaces_with_one_vcpu_keeps_every_page() {
    live_migration_between_namespaces(
        "live_migration_between_namespaces_with_one_vcpu_keeps_every_page",
        SMALL,
    );
}

#[test]
fn live_migration_between_namespaces_with_two_vcpus_keeps_every_page() {
    live_migration_between_namespaces(
        "live_migration_between_namespaces_with_two_vcpus_keeps_every_page",
        Guest {
            vcpus: 2,
            working_set: "64M",
            ..SMALL
        },
    );
}
