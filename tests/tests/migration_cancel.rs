//! `migrate_cancel` in every state Ferry can be caught in (none, setup, active,
//! pre-switchover, cancelled, completed), and migrating again afterwards.

mod migration_support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use migration_support::{
    assert_completed_and_identical, assert_destination_refused, assert_source_intact, migrate,
    set_caps, set_params, start_dest, start_source, wait_status, wait_transferred, Guest, SMALL,
};
use serde_json::json;
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, TempDir};

const MIB: u64 = 1 << 20;

/// 32 MiB of data at 16 MiB/s: the first pass lasts about two seconds.
fn slow_migration(src: &mut Ferry) {
    set_params(src, json!({"max-bandwidth": 16 * MIB}));
}

fn cancel_and_wait(src: &mut Ferry) -> serde_json::Value {
    src.cmd("migrate_cancel", json!({}));
    wait_status(
        src,
        &["cancelled", "failed", "completed"],
        Duration::from_secs(10),
    )
}

#[test]
fn cancel_while_active_stops_the_migration_and_a_new_one_to_a_fresh_destination_completes() {
    let _one = one_guest_test_at_a_time();
    let test =
        "cancel_while_active_stops_the_migration_and_a_new_one_to_a_fresh_destination_completes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("cancel-src", &guest, guest.source(None));
    // Cancel with no migration: nothing happens.
    src.cmd("migrate_cancel", json!({}));
    let none = src.cmd("query-migrate", json!({}));
    assert!(
        none.get("status").is_none() || none["status"] == "none",
        "{none}"
    );
    let (mut dst1, uri1) = start_dest("cancel-dst1", guest.dest("tcp:127.0.0.1:0", None));
    slow_migration(&mut src);
    migrate(&mut src, &uri1);
    let mid = wait_transferred(&mut src, 4 * MIB, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    let info = cancel_and_wait(&mut src);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert!(
        info.get("error-desc").is_none(),
        "a cancel is not an error: {info}"
    );
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst1, Duration::from_secs(10));
    // Cancelling a cancelled migration changes nothing.
    src.cmd("migrate_cancel", json!({}));
    assert_eq!(src.cmd("query-migrate", json!({}))["status"], "cancelled");

    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.extra.push("-S".into());
    let (mut dst2, uri2) = start_dest("cancel-dst2", dopts);
    set_params(&mut src, json!({"max-bandwidth": 128 * MIB}));
    migrate(&mut src, &uri2);
    assert_completed_and_identical(&mut src, &mut dst2, &guest);
}

#[test]
fn cancel_in_pre_switchover_ends_cancelled_with_the_guest_running_on_the_source() {
    let _one = one_guest_test_at_a_time();
    let test = "cancel_in_pre_switchover_ends_cancelled_with_the_guest_running_on_the_source";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("presw-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("presw-dst", guest.dest("tcp:127.0.0.1:0", None));
    set_caps(&mut src, &["pause-before-switchover"]);
    migrate(&mut src, &uri);
    let info = wait_status(
        &mut src,
        &["pre-switchover", "completed", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(info["status"], "pre-switchover", "{info}");
    // It stays there until told otherwise.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        src.cmd("query-migrate", json!({}))["status"],
        "pre-switchover"
    );
    assert_eq!(
        dst.status(),
        "inmigrate",
        "no guest runs on the destination yet"
    );
    let info = cancel_and_wait(&mut src);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst, Duration::from_secs(10));
    let err = src.cmd_err("migrate-continue", json!({"state": "pre-switchover"}));
    assert!(
        err.contains("Migration not in expected state: cancelled"),
        "{err}"
    );
}

#[test]
fn cancel_after_completed_changes_nothing() {
    let _one = one_guest_test_at_a_time();
    let test = "cancel_after_completed_changes_nothing";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("done-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("done-dst", guest.dest("tcp:127.0.0.1:0", None));
    migrate(&mut src, &uri);
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "completed", "{info}");
    src.cmd("migrate_cancel", json!({}));
    let after = src.cmd("query-migrate", json!({}));
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(after["downtime"], info["downtime"]);
    assert_eq!(src.status(), "postmigrate");
    let deadline = Instant::now() + Duration::from_secs(5);
    while dst.status() != "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (checked, bad) = dst.guest_verify();
    assert_eq!((checked, bad), (guest.ws_pages(), 0));
}

/// A unix socket that listens with a backlog of 0 and never accepts; once one connection
/// waits in the backlog, further connects block (a destination that hangs in setup).
fn listener_that_never_accepts(path: &Path) -> (OwnedFd, UnixStream) {
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: bind/listen on our socket with a valid, initialized sockaddr_un of `len` bytes.
    let ok = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        ) == 0
            && libc::listen(fd.as_raw_fd(), 0) == 0
    };
    assert!(ok, "bind/listen: {}", std::io::Error::last_os_error());
    let filler = UnixStream::connect(path).expect("the first connection fits in the backlog");
    (fd, filler)
}

#[test]
fn cancel_during_setup_ends_cancelled_promptly_and_a_new_migration_completes() {
    let _one = one_guest_test_at_a_time();
    let test = "cancel_during_setup_ends_cancelled_promptly_and_a_new_migration_completes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let dir = TempDir::new("setup-cancel");
    let hung = dir.join("hung.sock");
    let (_listener, _filler) = listener_that_never_accepts(&hung);
    let mut src = start_source("setup-src", &guest, guest.source(None));
    migrate(&mut src, &format!("unix:{}", hung.display()));
    std::thread::sleep(Duration::from_millis(300));
    let info = src.cmd("query-migrate", json!({}));
    assert_eq!(
        info["status"], "setup",
        "connecting to a destination that does not accept: {info}"
    );
    assert_eq!(src.status(), "running", "the guest runs during setup");
    src.cmd("migrate_cancel", json!({}));
    let t0 = Instant::now();
    let mut last = info;
    while t0.elapsed() < Duration::from_secs(3) {
        last = src.cmd("query-migrate", json!({}));
        if last["status"] == "cancelled" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        last["status"],
        "cancelled",
        "migrate_cancel during setup must end the migration (QEMU: cancelled) within 3 s, \
         but the migration thread is still blocked connecting to {} (the transport's connect \
         has no timeout for unix sockets and cannot be interrupted by a cancel): {last}",
        hung.display()
    );
    assert_source_intact(&mut src, &guest);
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("setup-dst", dopts);
    migrate(&mut src, &uri);
    assert_completed_and_identical(&mut src, &mut dst, &guest);
}

/// Same as above with TCP: the destination's host is unreachable (its end of the cable is
/// down), so the SYNs go nowhere and connect() hangs.
#[test]
fn cancel_while_connecting_over_a_cut_link_ends_cancelled_promptly() {
    let _one = one_guest_test_at_a_time();
    let test = "cancel_while_connecting_over_a_cut_link_ends_cancelled_promptly";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let Some(hosts) = tests::host_pair_or_skip(test) else {
        return;
    };
    let guest: Guest = SMALL;
    let mut src = start_source(
        "cut-setup-src",
        &guest,
        guest.source(hosts.a().netns.as_deref()),
    );
    hosts.link_down().expect("link down");
    migrate(&mut src, &format!("tcp:{}:4444", hosts.b().addr));
    std::thread::sleep(Duration::from_millis(300));
    let info = src.cmd("query-migrate", json!({}));
    assert_eq!(info["status"], "setup", "{info}");
    src.cmd("migrate_cancel", json!({}));
    let t0 = Instant::now();
    let mut last = info;
    while t0.elapsed() < Duration::from_secs(3) && last["status"] != "cancelled" {
        std::thread::sleep(Duration::from_millis(50));
        last = src.cmd("query-migrate", json!({}));
    }
    assert_eq!(
        last["status"], "cancelled",
        "migrate_cancel while connecting must end the migration within 3 s, but the \
         migration thread waits for the TCP connect timeout (10 s) before it notices: {last}"
    );
    assert_source_intact(&mut src, &guest);
}
