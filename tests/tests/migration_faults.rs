//! Faults mid-way through a live migration. Each must end with a clear error in the
//! source's query-migrate `error-desc`, the source guest running and verifying every
//! page, and the destination refusing to start a guest (it exits non-zero, as QEMU does).

mod migration_support;

use std::time::Duration;

use migration_support::{
    assert_destination_refused, assert_failed_with, assert_source_intact, migrate, set_caps,
    set_params, start_dest, start_source, wait_status, wait_transferred, Guest, SMALL,
};
use serde_json::json;
use tests::{
    host_pair_or_skip, kvm_missing, one_guest_test_at_a_time, skip_unless, Faults, Ferry, Proxy,
};

const MIB: u64 = 1 << 20;

fn loopback_pair(tag: &str, guest: &Guest) -> (Ferry, Ferry, String) {
    let src = start_source(&format!("{tag}-src"), guest, guest.source(None));
    let (dst, uri) = start_dest(&format!("{tag}-dst"), guest.dest("tcp:127.0.0.1:0", None));
    (src, dst, uri)
}

/// A proxy in front of `uri` (`tcp:127.0.0.1:PORT`).
fn proxy_to(uri: &str, faults: Faults) -> Proxy {
    let target = uri
        .strip_prefix("tcp:")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a loopback tcp URI: {uri}"));
    Proxy::start(target, faults).expect("start the proxy")
}

#[test]
fn destination_killed_mid_way_fails_the_migration_and_the_source_runs_on() {
    let _one = one_guest_test_at_a_time();
    let test = "destination_killed_mid_way_fails_the_migration_and_the_source_runs_on";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let (mut src, mut dst, uri) = loopback_pair("killdst", &guest);
    set_params(&mut src, json!({"max-bandwidth": 16 * MIB}));
    migrate(&mut src, &uri);
    let mid = wait_transferred(&mut src, 4 * MIB, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    dst.kill();
    let err = assert_failed_with(
        &mut src,
        Duration::from_secs(10),
        &["destination", "connection", "reset", "broken pipe"],
    );
    eprintln!("{test}: {err}");
    assert_source_intact(&mut src, &guest);
}

#[test]
fn link_cut_mid_way_fails_the_migration_instead_of_hanging() {
    let _one = one_guest_test_at_a_time();
    let test = "link_cut_mid_way_fails_the_migration_instead_of_hanging";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let Some(hosts) = host_pair_or_skip(test) else {
        return;
    };
    let guest = SMALL;
    let mut src = start_source("cut-src", &guest, guest.source(hosts.a().netns.as_deref()));
    let (mut dst, uri) = start_dest(
        "cut-dst",
        guest.dest(
            &format!("tcp:{}:4444", hosts.b().addr),
            hosts.b().netns.as_deref(),
        ),
    );
    set_params(&mut src, json!({"max-bandwidth": 8 * MIB}));
    migrate(&mut src, &uri);
    let mid = wait_transferred(&mut src, 2 * MIB, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    hosts.link_down().expect("cut the link");
    let t0 = std::time::Instant::now();
    // Ferry's dead-peer detection gives up on unacknowledged data after 30 s.
    let err = assert_failed_with(&mut src, Duration::from_secs(45), &[""]);
    eprintln!("{test}: failed after {:?}: {err}", t0.elapsed());
    assert_source_intact(&mut src, &guest);
    // The destination notices the silence too (keepalive) and gives up.
    assert_destination_refused(&mut dst, Duration::from_secs(20));
    // Nobody closed anything: the error must say the destination stopped answering.
    let lower = err.to_lowercase();
    assert!(
        lower.contains("timed out") || lower.contains("timeout"),
        "error-desc after a cut link should say the destination stopped answering (timed \
         out), not what the last write saw: {err}"
    );
}

#[test]
fn a_flipped_byte_in_the_stream_header_is_refused() {
    let _one = one_guest_test_at_a_time();
    let test = "a_flipped_byte_in_the_stream_header_is_refused";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let (mut src, mut dst, uri) = loopback_pair("fliphdr", &guest);
    // Byte 20 is inside the VM UUID: only the header checksum can tell.
    let proxy = proxy_to(
        &uri,
        Faults {
            flip_at: Some(20),
            flip_mask: 0x01,
            ..Faults::default()
        },
    );
    migrate(&mut src, &proxy.uri());
    let err = assert_failed_with(&mut src, Duration::from_secs(20), &["checksum", "corrupt"]);
    eprintln!("{test}: {err}");
    assert!(proxy.flipped());
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst, Duration::from_secs(10));
}

#[test]
fn a_flipped_byte_in_a_page_that_is_not_sent_again_fails_the_migration() {
    let _one = one_guest_test_at_a_time();
    let test = "a_flipped_byte_in_a_page_that_is_not_sent_again_fails_the_migration";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let (mut src, mut dst, uri) = loopback_pair("flippage", &guest);
    // A stopped guest dirties nothing: every page is sent once, so a corrupted page can
    // only be caught by its checksum.
    src.cmd("stop", json!({}));
    // 1 MiB in: inside the first RAM frame's data (or its directory).
    let proxy = proxy_to(
        &uri,
        Faults {
            flip_at: Some(MIB),
            flip_mask: 0x40,
            ..Faults::default()
        },
    );
    migrate(&mut src, &proxy.uri());
    let err = assert_failed_with(&mut src, Duration::from_secs(20), &["checksum", "corrupt"]);
    eprintln!("{test}: {err}");
    assert!(proxy.flipped());
    assert_destination_refused(&mut dst, Duration::from_secs(10));
    assert_eq!(src.status(), "paused", "a stopped guest stays stopped");
    src.cmd("cont", json!({}));
    assert_source_intact(&mut src, &guest);
}

#[test]
fn a_truncated_stream_fails_the_migration() {
    let _one = one_guest_test_at_a_time();
    let test = "a_truncated_stream_fails_the_migration";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let (mut src, mut dst, uri) = loopback_pair("trunc", &guest);
    let proxy = proxy_to(
        &uri,
        Faults {
            close_after: Some(3 * MIB + 123),
            ..Faults::default()
        },
    );
    migrate(&mut src, &proxy.uri());
    let err = assert_failed_with(
        &mut src,
        Duration::from_secs(20),
        &[
            "destination",
            "connection",
            "reset",
            "broken pipe",
            "truncated",
        ],
    );
    eprintln!("{test}: {err}");
    assert!(proxy.closed_early());
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst, Duration::from_secs(10));
    assert!(
        dst.log().contains("truncated"),
        "the destination says the stream was cut short:\n{}",
        dst.log()
    );
}

fn mismatched_destination(tag: &str, dest_memory: &str, dest_vcpus: usize, words: &[&str]) {
    let guest = SMALL;
    let mut src = start_source(&format!("{tag}-src"), &guest, guest.source(None));
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.memory = dest_memory.into();
    dopts.vcpus = dest_vcpus;
    let (mut dst, uri) = start_dest(&format!("{tag}-dst"), dopts);
    migrate(&mut src, &uri);
    let err = assert_failed_with(&mut src, Duration::from_secs(20), words);
    eprintln!("{tag}: {err}");
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst, Duration::from_secs(10));
}

#[test]
fn a_destination_with_a_different_memory_size_refuses_the_stream() {
    let _one = one_guest_test_at_a_time();
    let test = "a_destination_with_a_different_memory_size_refuses_the_stream";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    mismatched_destination("memsize", "128M", 1, &["--memory 256M"]);
}

#[test]
fn a_destination_with_a_different_vcpu_count_refuses_the_stream() {
    let _one = one_guest_test_at_a_time();
    let test = "a_destination_with_a_different_vcpu_count_refuses_the_stream";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    mismatched_destination("vcpus", "256M", 2, &["--vcpus 1"]);
}

const UUID_A: &str = "6a1b4c4e-1f0e-4a57-9c55-3f8f5f0b7a01";
const UUID_B: &str = "6a1b4c4e-1f0e-4a57-9c55-3f8f5f0b7a02";

/// Migrates a tiny guest with the given UUIDs and validate-uuid settings; returns the
/// source's final query-migrate and the two processes.
fn uuid_migration(
    tag: &str,
    src_uuid: Option<&str>,
    dst_uuid: Option<&str>,
    validate_on_source: bool,
    validate_on_dest: bool,
) -> (serde_json::Value, Ferry, Ferry, Guest) {
    let guest = Guest {
        working_set: "8M",
        ..SMALL
    };
    let mut sopts = guest.source(None);
    if let Some(u) = src_uuid {
        sopts.extra.extend(["--uuid".into(), u.into()]);
    }
    let mut src = start_source(&format!("{tag}-src"), &guest, sopts);
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    if let Some(u) = dst_uuid {
        dopts.extra.extend(["--uuid".into(), u.into()]);
    }
    let (mut dst, uri) = start_dest(&format!("{tag}-dst"), dopts);
    if validate_on_source {
        set_caps(&mut src, &["validate-uuid"]);
    }
    if validate_on_dest {
        set_caps(&mut dst, &["validate-uuid"]);
    }
    migrate(&mut src, &uri);
    let info = src.wait_migration_end(Duration::from_secs(30));
    (info, src, dst, guest)
}

fn assert_completed_and_verified(info: &serde_json::Value, dst: &mut Ferry, guest: &Guest) {
    assert_eq!(info["status"], "completed", "{info}");
    let d = wait_status(dst, &["completed", "failed"], Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
    let (checked, bad) = dst.guest_verify();
    assert_eq!((checked, bad), (guest.ws_pages(), 0));
}

#[test]
fn validate_uuid_refuses_a_different_uuid() {
    let _one = one_guest_test_at_a_time();
    let test = "validate_uuid_refuses_a_different_uuid";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (info, mut src, mut dst, guest) =
        uuid_migration("uuid-diff", Some(UUID_A), Some(UUID_B), true, true);
    assert_eq!(info["status"], "failed", "{info}");
    let err = info["error-desc"].as_str().unwrap_or("");
    eprintln!("{test}: {err}");
    assert!(
        err.contains("UUID received is") && err.contains(UUID_A) && err.contains(UUID_B),
        "QEMU's message names both UUIDs: {err}"
    );
    assert_source_intact(&mut src, &guest);
    assert_destination_refused(&mut dst, Duration::from_secs(10));
}

#[test]
fn validate_uuid_accepts_the_same_uuid() {
    let _one = one_guest_test_at_a_time();
    let test = "validate_uuid_accepts_the_same_uuid";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (info, _src, mut dst, guest) =
        uuid_migration("uuid-same", Some(UUID_A), Some(UUID_A), true, true);
    assert_completed_and_verified(&info, &mut dst, &guest);
}

#[test]
fn validate_uuid_set_on_the_destination_only_is_not_checked() {
    let _one = one_guest_test_at_a_time();
    let test = "validate_uuid_set_on_the_destination_only_is_not_checked";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // QEMU: the source decides whether the UUID travels; without it nothing is checked.
    let (info, _src, mut dst, guest) =
        uuid_migration("uuid-dstonly", Some(UUID_A), Some(UUID_B), false, true);
    assert_completed_and_verified(&info, &mut dst, &guest);
}

#[test]
fn validate_uuid_with_no_uuid_on_the_destination_is_not_an_error() {
    let _one = one_guest_test_at_a_time();
    let test = "validate_uuid_with_no_uuid_on_the_destination_is_not_an_error";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // QEMU (vmstate_uuid_post_load): "UUID is received ..., but local uuid isn't set" is
    // only a warning; the migration goes on.
    let (info, _src, mut dst, guest) = uuid_migration("uuid-unset", Some(UUID_A), None, true, true);
    assert_eq!(
        info["status"], "completed",
        "a destination started without --uuid has no UUID to compare (QEMU warns and goes \
         on), but Ferry compares the source's UUID with all zeros and fails: {info}"
    );
    assert_completed_and_verified(&info, &mut dst, &guest);
}

#[test]
fn a_destination_that_stops_reading_fails_the_migration_instead_of_hanging() {
    let _one = one_guest_test_at_a_time();
    let test = "a_destination_that_stops_reading_fails_the_migration_instead_of_hanging";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let src = start_source("stall-src", &guest, guest.source(None));
    // The destination would give up on the silent stream after its own io timeout: a
    // longer one than the source's 30 s keeps this test about the source's detection.
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts
        .extra
        .extend(["--migration-io-timeout".into(), "90".into()]);
    let (mut dst, uri) = start_dest("stall-dst", dopts);
    let mut src = src;
    // The peer takes 2 MiB, then reads no more (a hung destination, a stuck middlebox).
    let proxy = proxy_to(
        &uri,
        Faults {
            stall_after: Some(2 * MIB),
            ..Faults::default()
        },
    );
    migrate(&mut src, &proxy.uri());
    let t0 = std::time::Instant::now();
    // Ferry fails a write that makes no progress for 30 s.
    let err = assert_failed_with(&mut src, Duration::from_secs(45), &[""]);
    eprintln!("{test}: failed after {:?}: {err}", t0.elapsed());
    assert_eq!(proxy.forwarded_up(), 2 * MIB);
    assert_source_intact(&mut src, &guest);
    // The source's socket timed out without a word to the peer (no FIN, no RST). Once the
    // middlebox forwards again and then gives up too, the destination finds the stream cut
    // short and refuses it.
    proxy.set_stall(false);
    std::thread::sleep(Duration::from_millis(200));
    proxy.cut();
    assert_destination_refused(&mut dst, Duration::from_secs(10));
    let lower = err.to_lowercase();
    assert!(
        lower.contains("timed out")
            || lower.contains("timeout")
            || lower.contains("stopped reading"),
        "error-desc should say the destination stopped taking data: {err}"
    );
}

#[test]
fn a_destination_that_reports_a_failure_and_stops_reading_fails_the_migration_at_once() {
    use std::io::{Read, Write};
    let _one = one_guest_test_at_a_time();
    let test = "a_destination_that_reports_a_failure_and_stops_reading_fails_the_migration_at_once";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    // A write that makes no progress would only fail after 10 minutes here: the migration
    // must end on the destination's word, not on the source's timeout.
    let mut sopts = guest.source(None);
    sopts
        .extra
        .extend(["--migration-io-timeout".into(), "600".into()]);
    let mut src = start_source("said-failed-src", &guest, sopts);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let fake = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        // Take the first MiB of the stream, say why it is refused, then read no more while
        // keeping the connection open (a destination busy tearing down, say).
        let mut first = vec![0u8; MIB as usize];
        s.read_exact(&mut first)?;
        let why = migration::stream::reply::Reply::Failed("fake destination: no room".into());
        s.write_all(&why.encode())?;
        let _ = held.recv_timeout(Duration::from_secs(120));
        Ok(())
    });
    migrate(&mut src, &format!("tcp:127.0.0.1:{port}"));
    let err = assert_failed_with(
        &mut src,
        Duration::from_secs(30),
        &["fake destination: no room"],
    );
    assert!(err.contains("the destination failed"), "{err}");
    drop(release);
    fake.join()
        .expect("the fake destination thread")
        .expect("the fake destination read the first MiB and replied");
    assert_source_intact(&mut src, &guest);
}
