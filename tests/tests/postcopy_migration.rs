//! Postcopy live migration (issue 9): a guest that dirties memory faster than the link can
//! carry it is switched with `migrate-start-postcopy`, runs on the destination before its
//! memory arrived, and loses nothing; with and without `postcopy-preempt`, with
//! `postcopy-blocktime`, and with the destination held with `-S` so memory can be compared.

mod migration_support;

use std::time::Duration;

use migration_support::{
    migrate, set_caps, set_params, start_dest, start_source, wait_transferred, Guest,
};
use serde_json::{json, Value};
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions};

const MIB: u64 = 1 << 20;

/// A guest rewriting 32 MiB flat out: precopy at 8 MiB/s never converges.
const FAST: Guest = Guest {
    memory: "128M",
    vcpus: 2,
    working_set: "32M",
    rate: 0,
};

/// Source and destination with postcopy enabled; the source limited to `max-bandwidth`
/// 8 MiB/s in precopy so that only postcopy can finish. `dest_extra` goes to the
/// destination's command line (e.g. `-S`).
fn pair(tag: &str, caps: &[&str], dest_extra: &[&str]) -> (Ferry, Ferry, String) {
    let src = start_source(&format!("{tag}-src"), &FAST, FAST.source(None));
    let mut opts = FAST.dest("tcp:127.0.0.1:0", None);
    opts.extra = dest_extra.iter().map(|s| s.to_string()).collect();
    let (mut dst, uri) = start_dest(&format!("{tag}-dst"), opts);
    let mut src = src;
    set_caps(&mut src, caps);
    set_caps(&mut dst, caps);
    set_params(&mut src, json!({"max-bandwidth": 8 * MIB}));
    (src, dst, uri)
}

/// Starts precopy, lets it send a few MiB, then switches to postcopy.
fn migrate_then_switch(src: &mut Ferry, uri: &str) {
    migrate(src, uri);
    let mid = wait_transferred(src, 2 * MIB, Duration::from_secs(10));
    assert_eq!(mid["status"], "active", "{mid}");
    src.cmd("migrate-start-postcopy", json!({}));
}

/// Waits for the source's migration to complete (through postcopy-active).
fn wait_completed(src: &mut Ferry, dst: &mut Ferry) -> (Value, Value) {
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(
        info["status"],
        "completed",
        "{info}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    assert_eq!(src.status(), "postmigrate");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}\n{}", dst.log());
    (info, d)
}

/// The guest runs on the destination and verifies every page of its working set.
fn assert_guest_intact(dst: &mut Ferry) {
    assert_eq!(dst.status(), "running");
    let before = dst.pages_written();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        dst.pages_written() > before,
        "the guest runs on the destination"
    );
    let (checked, bad) = dst.guest_verify();
    assert_eq!(
        bad, 0,
        "the guest must verify every page on the destination"
    );
    assert_eq!(checked, FAST.ws_pages());
}

fn postcopy_with(tag: &str, caps: &[&str]) -> (Ferry, Ferry, Value, Value) {
    let (mut src, mut dst, uri) = pair(tag, caps, &[]);
    migrate_then_switch(&mut src, &uri);
    let (info, d) = wait_completed(&mut src, &mut dst);
    assert!(
        info["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0,
        "pages were sent in postcopy: {info}"
    );
    assert!(
        info["downtime"].as_u64().is_some(),
        "downtime is reported: {info}"
    );
    assert_guest_intact(&mut dst);
    (src, dst, info, d)
}

#[test]
fn postcopy_completes_a_migration_precopy_cannot_and_keeps_every_page() {
    let _one = one_guest_test_at_a_time();
    let test = "postcopy_completes_a_migration_precopy_cannot_and_keeps_every_page";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (_src, _dst, info, d) = postcopy_with("pc", &["postcopy-ram", "postcopy-blocktime"]);
    let pc = &info["x-ferry-postcopy"];
    eprintln!(
        "{test}: downtime {} ms, total {} ms; source {pc}; destination {}",
        info["downtime"], info["total-time"], d["x-ferry-postcopy"]
    );
    assert!(
        info["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "the running guest faulted on missing pages and asked for them: {info}"
    );
    let total = d["postcopy-blocktime"].as_u64();
    let per_vcpu = d["postcopy-vcpu-blocktime"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(total.is_some(), "postcopy-blocktime is reported: {d}");
    assert_eq!(per_vcpu.len(), FAST.vcpus, "one blocktime per vCPU: {d}");
    assert!(
        per_vcpu.iter().any(|v| v.as_u64().unwrap_or(0) > 0),
        "vCPUs were blocked on missing pages for some time: {d}"
    );
}

#[test]
fn postcopy_preempt_sends_requested_pages_on_a_second_channel() {
    let _one = one_guest_test_at_a_time();
    let test = "postcopy_preempt_sends_requested_pages_on_a_second_channel";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (_src, _dst, info, d) = postcopy_with("pcpre", &["postcopy-ram", "postcopy-preempt"]);
    eprintln!(
        "{test}: downtime {} ms, total {} ms; source {}; destination {}",
        info["downtime"], info["total-time"], info["x-ferry-postcopy"], d["x-ferry-postcopy"]
    );
    assert!(
        info["x-ferry-postcopy"]["urgent-pages"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "requested pages were served: {info}"
    );
    assert!(
        d["postcopy-blocktime"].is_null(),
        "no blocktime without the capability: {d}"
    );
}

#[test]
fn postcopy_to_a_stopped_destination_delivers_memory_identical_to_the_source() {
    let _one = one_guest_test_at_a_time();
    let test = "postcopy_to_a_stopped_destination_delivers_memory_identical_to_the_source";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let (mut src, mut dst, uri) = pair("pcstop", &["postcopy-ram"], &["-S"]);
    migrate_then_switch(&mut src, &uri);
    wait_completed(&mut src, &mut dst);
    assert_eq!(dst.status(), "paused", "-S keeps the destination paused");
    assert_eq!(
        src.cmd("ferry-memory-digest", json!({}))["digest"],
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        "every page arrived as the source left it"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    let err = src.cmd_err("cont", json!({}));
    assert!(
        err.contains("handed over"),
        "the source never runs the guest again: {err}"
    );
    dst.cmd("cont", json!({}));
    assert_guest_intact(&mut dst);
}

#[test]
fn postcopy_commands_refuse_what_they_cannot_do_with_qemus_errors() {
    let _one = one_guest_test_at_a_time();
    let test = "postcopy_commands_refuse_what_they_cannot_do_with_qemus_errors";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let mut f = Ferry::start(
        "pcerr",
        &FerryOptions {
            memory: "64M".into(),
            workload: Some("working-set=4M,rate=1000".into()),
            ..FerryOptions::default()
        },
    );
    let expect = |f: &mut Ferry, cmd: &str, args: Value, words: &str| {
        let err = f.cmd_err(cmd, args);
        assert!(err.contains(words), "{cmd}: {err}");
    };
    expect(
        &mut f,
        "migrate-start-postcopy",
        json!({}),
        "Enable postcopy with migrate_set_capability before the start of migration",
    );
    set_caps(&mut f, &["postcopy-ram"]);
    expect(
        &mut f,
        "migrate-start-postcopy",
        json!({}),
        "Postcopy must be started after migration has been started",
    );
    expect(
        &mut f,
        "migrate-pause",
        json!({}),
        "only supported during postcopy-active state",
    );
    expect(
        &mut f,
        "migrate-recover",
        json!({"uri": "tcp:127.0.0.1:0"}),
        "can only be run when postcopy is paused",
    );
    expect(
        &mut f,
        "migrate",
        json!({"uri": "tcp:127.0.0.1:1", "resume": true}),
        "Cannot resume if there is no paused migration",
    );
    assert_eq!(f.status(), "running", "nothing changed for the guest");
}

/// Whether `path` lies on tmpfs or hugetlbfs, where userfaultfd serves file-backed memory.
fn on_uffd_capable_fs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: struct statfs is plain integers, for which all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes one struct statfs into the live local; `c` is a valid C string.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    matches!(st.f_type as i64, TMPFS_MAGIC | HUGETLBFS_MAGIC)
}

#[test]
fn an_incoming_destination_probes_postcopy_from_its_command_line_on() {
    let test = "an_incoming_destination_probes_postcopy_from_its_command_line_on";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    // Guest memory in a plain file, which userfaultfd cannot serve (QEMU: "Host backend files
    // need to be TMPFS or HUGETLBFS only"); the probe refuses postcopy-ram for it.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("postcopy-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    if on_uffd_capable_fs(&dir) {
        eprintln!(
            "skipping {test}: {} is on tmpfs or hugetlbfs",
            dir.display()
        );
        return;
    }
    let image = dir.join("guest.img");
    std::fs::write(&image, vec![0u8; 16 << 20]).expect("write the image");
    let memory = format!("16M,mem-path={},share=on", image.display());
    let start = |tag: &str, incoming: Option<&str>| {
        Ferry::start(
            tag,
            &FerryOptions {
                memory: memory.clone(),
                workload: None,
                incoming: incoming.map(str::to_string),
                ..FerryOptions::default()
            },
        )
    };
    let postcopy_on = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});

    // `--incoming defer` is the incoming side before `migrate-incoming`, as QEMU's
    // RUN_STATE_INMIGRATE is from `-incoming defer` on: the set is refused at once.
    let mut dst = start("probe-defer", Some("defer"));
    let err = dst.cmd_err("migrate-set-capabilities", postcopy_on.clone());
    assert!(err.starts_with("Postcopy is not supported: "), "{err}");
    assert_eq!(
        dst.cmd("query-migrate-capabilities", json!({}))
            .as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == "postcopy-ram"))
            .map(|c| c["state"].clone()),
        Some(json!(false)),
        "a refused set changes nothing"
    );
    drop(dst);

    // A source (not incoming) is not probed, as in QEMU.
    let mut src = start("probe-source", None);
    src.cmd("migrate-set-capabilities", postcopy_on);
    drop(src);

    // The same through -global at start-up: the whole set is checked as the incoming side.
    let out = std::process::Command::new(tests::ferry_bin())
        .args(["run", "--memory", &memory, "--serial", "none"])
        .args([
            "--incoming",
            "defer",
            "--global",
            "migration.x-postcopy-ram=on",
        ])
        .output()
        .expect("run ferry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--global: Postcopy is not supported: "),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
