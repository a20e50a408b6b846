//! Cases from QEMU's migration test suite that apply to Ferry (see
//! shared/qemu-migration-tests.md): a bad destination port, MIGRATION events,
//! pause-before-switchover with migrate-continue, switchover-ack with return-path.

mod migration_support;

use std::time::{Duration, Instant};

use migration_support::{
    assert_source_intact, migrate, set_caps, start_dest, start_source, wait_status, Guest, SMALL,
};
use serde_json::{json, Value};
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry};

/// The `status` of every MIGRATION event received so far (oldest first), and the
/// MIGRATION_PASS numbers.
fn migration_events(f: &mut Ferry) -> (Vec<String>, Vec<u64>) {
    let mut statuses = Vec::new();
    let mut passes = Vec::new();
    for e in f.qmp().take_events() {
        let data = e.data.unwrap_or(Value::Null);
        match e.event.as_str() {
            "MIGRATION" => statuses.push(data["status"].as_str().unwrap_or("?").to_string()),
            "MIGRATION_PASS" => passes.push(data["pass"].as_u64().unwrap_or(0)),
            _ => {}
        }
    }
    (statuses, passes)
}

fn wait_running(f: &mut Ferry) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.status() != "running" {
        assert!(
            Instant::now() < deadline,
            "the guest must run: {}\n{}",
            f.status(),
            f.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_verifies(f: &mut Ferry, guest: &Guest) {
    wait_running(f);
    let (checked, bad) = f.guest_verify();
    assert_eq!((checked, bad), (guest.ws_pages(), 0));
}

#[test]
fn bad_destination_port_0_goes_setup_then_failed_and_the_source_keeps_running() {
    let _one = one_guest_test_at_a_time();
    let test = "bad_destination_port_0_goes_setup_then_failed_and_the_source_keeps_running";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("port0-src", &guest, guest.source(None));
    set_caps(&mut src, &["events"]);
    migrate(&mut src, "tcp:127.0.0.1:0");
    let info = wait_status(&mut src, &["failed", "completed"], Duration::from_secs(15));
    assert_eq!(info["status"], "failed", "{info}");
    let err = info["error-desc"].as_str().unwrap_or("");
    assert!(
        err.contains("127.0.0.1:0"),
        "the error names the address: {info}"
    );
    let (statuses, _) = migration_events(&mut src);
    assert_eq!(
        statuses,
        vec!["setup", "failed"],
        "MIGRATION events of a failed connect"
    );
    assert_source_intact(&mut src, &guest);
    // Cancelling a failed migration changes nothing.
    src.cmd("migrate_cancel", json!({}));
    assert_eq!(src.cmd("query-migrate", json!({}))["status"], "failed");
}

#[test]
fn events_capability_reports_setup_active_device_completed() {
    let _one = one_guest_test_at_a_time();
    let test = "events_capability_reports_setup_active_device_completed";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("events-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("events-dst", guest.dest("tcp:127.0.0.1:0", None));
    set_caps(&mut src, &["events"]);
    set_caps(&mut dst, &["events"]);
    src.qmp().take_events();
    dst.qmp().take_events();
    migrate(&mut src, &uri);
    let done = src
        .qmp()
        .wait_event("MIGRATION", Duration::from_secs(1))
        .expect("the first MIGRATION event arrives at once");
    assert_eq!(
        done.data.as_ref().map(|d| d["status"].clone()),
        Some(json!("setup"))
    );
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "completed", "{info}");
    // Any straggler event is on the socket by now; one more command collects it.
    std::thread::sleep(Duration::from_millis(100));
    src.cmd("query-status", json!({}));
    let (mut statuses, passes) = migration_events(&mut src);
    statuses.insert(0, "setup".into());
    assert_eq!(
        statuses,
        vec!["setup", "active", "device", "completed"],
        "the source's MIGRATION events"
    );
    assert!(
        !passes.is_empty() && passes.windows(2).all(|w| w[1] > w[0]),
        "MIGRATION_PASS events count passes up: {passes:?}"
    );
    wait_running(&mut dst);
    dst.cmd("query-status", json!({}));
    let (dst_statuses, _) = migration_events(&mut dst);
    assert_eq!(
        dst_statuses,
        vec!["active", "completed"],
        "the destination's MIGRATION events (setup came before the capability was set)"
    );
    assert_verifies(&mut dst, &guest);
}

#[test]
fn pause_before_switchover_waits_for_migrate_continue_then_completes() {
    let _one = one_guest_test_at_a_time();
    let test = "pause_before_switchover_waits_for_migrate_continue_then_completes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("cont-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("cont-dst", guest.dest("tcp:127.0.0.1:0", None));
    set_caps(&mut src, &["pause-before-switchover", "events"]);
    let err = src.cmd_err("migrate-continue", json!({"state": "pre-switchover"}));
    assert!(err.contains("Migration not in expected state"), "{err}");
    migrate(&mut src, &uri);
    let info = wait_status(
        &mut src,
        &["pre-switchover", "completed", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(info["status"], "pre-switchover", "{info}");
    let err = src.cmd_err("migrate", json!({"uri": uri}));
    assert_eq!(err, "There's a migration process in progress");
    let err = src.cmd_err("migrate-continue", json!({"state": "active"}));
    assert_eq!(err, "Migration not in expected state: pre-switchover");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        src.cmd("query-migrate", json!({}))["status"],
        "pre-switchover"
    );
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "completed", "{info}");
    src.cmd("query-status", json!({}));
    let (statuses, _) = migration_events(&mut src);
    assert_eq!(
        statuses,
        vec!["setup", "active", "pre-switchover", "device", "completed"]
    );
    assert_verifies(&mut dst, &guest);
}

#[test]
fn switchover_ack_with_return_path_completes() {
    let _one = one_guest_test_at_a_time();
    let test = "switchover_ack_with_return_path_completes";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SMALL;
    let mut src = start_source("ack-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("ack-dst", guest.dest("tcp:127.0.0.1:0", None));
    let err = src.cmd_err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "switchover-ack", "state": true}]}),
    );
    assert_eq!(
        err,
        "Capability 'switchover-ack' requires capability 'return-path'"
    );
    for f in [&mut src, &mut dst] {
        set_caps(f, &["return-path", "switchover-ack"]);
    }
    migrate(&mut src, &uri);
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
        "switchover waits for the destination's ack, sent after the first pass: {info}"
    );
    assert_verifies(&mut dst, &guest);
}

#[test]
fn pre_switchover_holds_the_source_guest_stopped_as_qemu_does() {
    let _one = one_guest_test_at_a_time();
    let test = "pre_switchover_holds_the_source_guest_stopped_as_qemu_does";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // QEMU (migration_completion) stops the VM (finish-migrate) and only then enters
    // pre-switchover: management software uses the pause to act while the guest is still.
    let guest = SMALL;
    let mut src = start_source("hold-src", &guest, guest.source(None));
    let (mut dst, uri) = start_dest("hold-dst", guest.dest("tcp:127.0.0.1:0", None));
    set_caps(&mut src, &["pause-before-switchover"]);
    migrate(&mut src, &uri);
    let info = wait_status(
        &mut src,
        &["pre-switchover", "completed", "failed"],
        Duration::from_secs(30),
    );
    assert_eq!(info["status"], "pre-switchover", "{info}");
    let a = src.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    let b = src.pages_written();
    let state = src.status();
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    let done = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(done["status"], "completed", "{done}");
    assert_verifies(&mut dst, &guest);
    assert!(
        state == "finish-migrate" && a == b,
        "in pre-switchover the source guest must already be stopped (QEMU: finish-migrate), \
         but it is {state} and wrote {} pages during the pause",
        b - a
    );
}

/// Waits for the MIGRATION event whose status is one of `ends`; returns that status.
fn wait_migration_event(f: &mut Ferry, ends: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = f
            .qmp()
            .wait_event("MIGRATION", left)
            .unwrap_or_else(|e| panic!("no MIGRATION event ending in {ends:?}: {e}"));
        let status = e
            .data
            .as_ref()
            .and_then(|d| d["status"].as_str())
            .unwrap_or("?")
            .to_string();
        if ends.contains(&status.as_str()) {
            return status;
        }
    }
}

#[test]
fn capabilities_can_change_as_soon_as_the_final_event_arrives() {
    let _one = one_guest_test_at_a_time();
    let test = "capabilities_can_change_as_soon_as_the_final_event_arrives";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // QEMU derives "a migration is running" from the state: once `completed` or `failed`
    // is announced, migrate-set-capabilities is accepted. A client that reacts to the event
    // at once must not be told a migration is still in progress.
    let guest = SMALL;
    let mut src = start_source("final-event-src", &guest, guest.source(None));
    let dir = tests::TempDir::new("final-event");
    let file = dir.join("migration.bin");
    for (uri, end) in [
        ("tcp:127.0.0.1:0".to_string(), "failed"),
        (format!("file:{}", file.display()), "completed"),
    ] {
        set_caps(&mut src, &["events"]);
        src.qmp().take_events();
        migrate(&mut src, &uri);
        assert_eq!(
            wait_migration_event(&mut src, &["completed", "failed"]),
            end
        );
        src.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
        );
        src.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "xbzrle", "state": false}]}),
        );
        if end == "failed" {
            assert_source_intact(&mut src, &guest);
        }
    }
}
