//! Local migration with x-ignore-shared: the guest's memfd is passed over a unix socket,
//! no page is copied, and whatever fails the guest runs in exactly one process.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use migration::stream::frame::{FrameKind, FrameWriter};
use migration::stream::header::{
    Header, FEATURE_IGNORE_SHARED, FEATURE_SWITCHOVER_ACK, STREAM_VERSION,
};
use migration::stream::ram::RamRecord;
use migration::stream::Reply;
use migration::transport::fd_passing::send_fd;
use serde_json::{json, Value};
use tests::{ferry_bin, kvm_missing, skip_unless, Ferry, FerryOptions, TempDir};
use vmm::qmp::QmpClient;

const HANDED_OVER: &str = "belongs to another Ferry process";

fn ignore_shared(f: &mut Ferry, on: bool) {
    f.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]}),
    );
}

fn capability(f: &mut Ferry, name: &str) -> bool {
    f.cmd("query-migrate-capabilities", json!({}))
        .as_array()
        .and_then(|a| a.iter().find(|c| c["capability"] == name))
        .and_then(|c| c["state"].as_bool())
        .unwrap_or(false)
}

fn source(tag: &str, memory: &str) -> Ferry {
    Ferry::start(
        tag,
        &FerryOptions {
            memory: memory.into(),
            vcpus: 2,
            ..FerryOptions::default()
        },
    )
}

fn destination(tag: &str, memory: &str) -> Ferry {
    Ferry::start(
        tag,
        &FerryOptions {
            memory: memory.into(),
            vcpus: 2,
            workload: None,
            incoming: Some("defer".into()),
            ..FerryOptions::default()
        },
    )
}

/// Source and destination with x-ignore-shared, the destination listening on a unix socket.
fn local_pair(tag: &str, memory: &str) -> (Ferry, Ferry, String) {
    let mut src = source(&format!("{tag}-src"), memory);
    let mut dst = destination(&format!("{tag}-dst"), memory);
    ignore_shared(&mut src, true);
    ignore_shared(&mut dst, true);
    let uri = format!("unix:{}", dst.dir.join("migration.sock").display());
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    (src, dst, uri)
}

#[test]
fn a_4g_guest_migrates_locally_without_copying_its_memory() {
    if skip_unless(
        "a_4g_guest_migrates_locally_without_copying_its_memory",
        kvm_missing(),
    ) {
        return;
    }
    let (mut src, mut dst, uri) = local_pair("local-4g", "4G");
    std::thread::sleep(Duration::from_millis(300));
    let before = src.pages_written();
    assert!(before > 0, "the guest must be dirtying memory");
    src.cmd("migrate", json!({ "uri": uri }));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["ram"]["total"], 4u64 << 30);
    let sent = info["ram"]["transferred"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent < 1 << 20,
        "only state and metadata travel, not 4 GiB of memory: {sent} bytes"
    );
    assert_eq!(info["ram"]["normal"], 0, "no page was sent: {info}");
    assert!(info["x-ferry-downtime-us"].as_u64().is_some(), "{info}");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(dst.status(), "running");

    // The source never runs or writes the guest's memory again.
    assert_eq!(src.status(), "postmigrate");
    assert!(src.cmd_err("cont", json!({})).contains(HANDED_OVER));
    assert!(src
        .cmd_err("ferry-guest-set-rate", json!({"rate": 1}))
        .contains(HANDED_OVER));
    assert!(src
        .cmd_err("migrate", json!({"uri": "unix:/nonexistent"}))
        .contains(HANDED_OVER));
    assert_eq!(
        src.cmd("ferry-query-config", json!({}))["memory-handed-over"],
        true
    );
    // With the destination's guest stopped, nothing changes the shared memory.
    dst.cmd("stop", json!({}));
    let d1 = dst.cmd("ferry-memory-digest", json!({}))["digest"].clone();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        d1,
        "the source must not write guest memory after the switchover"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    dst.cmd("cont", json!({}));

    // The guest continues where it was; the old process can go.
    assert!(dst.pages_written() >= before);
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
    assert_eq!(checked, 64 << 8);
    src.cmd("quit", json!({}));
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    let after = dst.pages_written();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        dst.pages_written() > after,
        "the guest keeps running after the old process exited"
    );
    let (_, bad) = dst.guest_verify();
    assert_eq!(bad, 0);
}

#[test]
fn local_migration_is_refused_where_memory_cannot_be_shared() {
    if skip_unless(
        "local_migration_is_refused_where_memory_cannot_be_shared",
        kvm_missing(),
    ) {
        return;
    }
    let mut src = source("local-refuse", "256M");
    ignore_shared(&mut src, true);
    let e = src.cmd_err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(e.contains("needs a unix: URI"), "{e}");
    let file = src.dir.join("out.bin");
    let e = src.cmd_err(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert!(e.contains("needs a unix: URI"), "{e}");
    assert!(!file.exists(), "nothing was written");
    // The seed's rule: postcopy-ram and x-ignore-shared exclude each other.
    let e = src.cmd_err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    );
    assert!(
        e.contains("Postcopy is not compatible with ignore-shared"),
        "{e}"
    );
    assert_eq!(src.status(), "running");
    assert_eq!(
        src.cmd("query-migrate", json!({}))["status"].as_str(),
        None,
        "no migration started"
    );

    let mut anon = Ferry::start(
        "local-refuse-anon",
        &FerryOptions {
            memory: "256M,backend=anon".into(),
            ..FerryOptions::default()
        },
    );
    ignore_shared(&mut anon, true);
    let sock = anon.dir.join("m.sock");
    let e = anon.cmd_err(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    assert!(e.contains("anonymous private"), "{e}");
    assert_eq!(anon.status(), "running");
    let (_, bad) = anon.guest_verify();
    assert_eq!(bad, 0);
}

#[test]
fn a_destination_without_the_capability_refuses_and_the_source_keeps_running() {
    if skip_unless(
        "a_destination_without_the_capability_refuses_and_the_source_keeps_running",
        kvm_missing(),
    ) {
        return;
    }
    let mut src = source("local-nocap-src", "256M");
    let mut dst = destination("local-nocap-dst", "256M");
    ignore_shared(&mut src, true);
    let uri = format!("unix:{}", dst.dir.join("m.sock").display());
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    src.cmd("migrate", json!({ "uri": uri }));
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or("");
    assert!(why.contains("x-ignore-shared capability is off"), "{why}");
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
    assert_eq!(src.status(), "running");
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0);
}

#[test]
fn a_failure_after_the_destination_mapped_the_memory_leaves_the_source_its_only_user() {
    if skip_unless(
        "a_failure_after_the_destination_mapped_the_memory_leaves_the_source_its_only_user",
        kvm_missing(),
    ) {
        return;
    }
    // The destination dies once it mapped the memory, the guest stopped for switchover.
    let (mut src, mut dst, uri) = local_pair("local-kill", "512M");
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    src.cmd("migrate", json!({ "uri": uri }));
    src.wait_migration(Duration::from_secs(30), |i| i["status"] == "pre-switchover");
    dst.kill();
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.status(), "running");
    let before = src.pages_written();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        src.pages_written() > before,
        "the source's guest runs again"
    );
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0);

    // Cancelled at the same point: the destination gives up without writing anything.
    let (mut src, mut dst, uri) = local_pair("local-cancel", "512M");
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    src.cmd("migrate", json!({ "uri": uri }));
    src.wait_migration(Duration::from_secs(30), |i| i["status"] == "pre-switchover");
    src.cmd("migrate_cancel", json!({}));
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
    assert_eq!(src.status(), "running");
    src.cmd("stop", json!({}));
    let host = src.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{host}");
    src.cmd("cont", json!({}));
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0);
}

#[test]
fn a_frozen_source_makes_the_local_destination_give_up_and_leaves_the_source_its_memory() {
    if skip_unless(
        "a_frozen_source_makes_the_local_destination_give_up_and_leaves_the_source_its_memory",
        kvm_missing(),
    ) {
        return;
    }
    let mut src = source("local-frozen-src", "512M");
    let mut dst = Ferry::start(
        "local-frozen-dst",
        &FerryOptions {
            memory: "512M".into(),
            vcpus: 2,
            workload: None,
            incoming: Some("defer".into()),
            extra: vec!["--migration-io-timeout".into(), "2".into()],
            ..FerryOptions::default()
        },
    );
    ignore_shared(&mut src, true);
    ignore_shared(&mut dst, true);
    let uri = format!("unix:{}", dst.dir.join("migration.sock").display());
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    src.cmd("migrate", json!({ "uri": uri }));
    src.wait_migration(Duration::from_secs(30), |i| i["status"] == "pre-switchover");
    // The destination mapped the memory and waits for the state; the source freezes.
    let pid = src.pid() as i32;
    // SAFETY: kill(2) on a child process this test started; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let code = dst.wait_exit(Duration::from_secs(20));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(code, Some(1), "the destination gives up\n{}", dst.log());
    let log = dst.log();
    assert!(
        log.contains("nothing arrived from the source for 3s"),
        "the destination says why:\n{log}"
    );
    // Continued, the source learns why the destination left (its next keepalive fails, or
    // the reply says so) and runs its guest in its memory again.
    let info = src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(src.status(), "running");
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0);
}

/// A stream that claims shared memory but then carries pages is refused before a byte of
/// the shared memory is written; one that passes no descriptor is refused too.
#[test]
fn a_shared_memory_stream_carrying_pages_is_refused_and_writes_nothing() {
    if skip_unless(
        "a_shared_memory_stream_carrying_pages_is_refused_and_writes_nothing",
        kvm_missing(),
    ) {
        return;
    }
    const SIZE: u64 = 256 << 20;
    let header = Header {
        version: STREAM_VERSION,
        features: FEATURE_IGNORE_SHARED | FEATURE_SWITCHOVER_ACK,
        uuid: [0; 16],
        ram_size: SIZE,
        page_size: 4096,
        vcpus: 2,
        multifd_channels: 0,
        multifd_compression: 0,
    };
    // A "source" memory: a shared file whose page 5 holds a marker.
    let dir = TempDir::new("local-rogue");
    let mem_path = Path::new("/dev/shm").join(format!("ferry-rogue-{}", std::process::id()));
    let memory = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&mem_path)
        .expect("shm file");
    let _ = std::fs::remove_file(&mem_path);
    memory.set_len(SIZE).expect("size");
    memory
        .write_all_at(&[0x5a; 4096], 5 * 4096)
        .expect("marker");

    let mut dst = destination("local-rogue-dst", "256M");
    ignore_shared(&mut dst, true);
    let sock = dir.join("m.sock");
    dst.cmd(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let mut s = connect(&sock);
    s.write_all(&header.encode()).expect("header");
    send_fd(&s, &SIZE.to_le_bytes(), memory.as_fd()).expect("fd");
    let mut w = FrameWriter::new(s.try_clone().expect("clone"));
    w.frame(FrameKind::PassEnd, &1u64.to_le_bytes())
        .expect("pass end");
    w.flush().expect("flush");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let ack = Reply::read_from(&mut s).expect("reply");
    assert_eq!(
        ack,
        Reply::SwitchoverAck,
        "the destination mapped the memory"
    );
    let page = vec![0xa5u8; 4096];
    let rec = RamRecord::Page {
        offset: 5 * 4096,
        hash: ram::page_hash(&page),
    };
    let _ = w.ram_frame(&[rec.entry()], &[page.as_slice()]);
    let _ = w.flush();
    match Reply::read_from(&mut s) {
        Ok(Reply::Failed(why)) => assert!(why.contains("x-ignore-shared"), "{why}"),
        other => panic!("expected FAILED, got {other:?}"),
    }
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
    let mut now = vec![0u8; 4096];
    memory.read_exact_at(&mut now, 5 * 4096).expect("read");
    assert!(
        now.iter().all(|&b| b == 0x5a),
        "the destination wrote into shared memory"
    );

    // No descriptor at all.
    let mut dst = destination("local-rogue-nofd", "256M");
    ignore_shared(&mut dst, true);
    let sock = dir.join("m2.sock");
    dst.cmd(
        "migrate-incoming",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    let mut s = connect(&sock);
    s.write_all(&header.encode()).expect("header");
    s.write_all(&SIZE.to_le_bytes()).expect("payload");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    match Reply::read_from(&mut s) {
        Ok(Reply::Failed(why)) => assert!(why.contains("no file descriptor"), "{why}"),
        other => panic!("expected FAILED, got {other:?}"),
    }
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A process started by `ferry upgrade` (not our child): killed when the test ends.
struct Adopted(u32);

impl Drop for Adopted {
    fn drop(&mut self) {
        if self.0 > 1 {
            // SAFETY: kill(2) on a pid this test learned from the process itself.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn upgrade(qmp: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(ferry_bin())
        .arg("upgrade")
        .arg("--qmp")
        .arg(qmp)
        .args(extra)
        .output()
        .expect("run ferry upgrade")
}

fn qmp_cmd(c: &mut QmpClient, command: &str, args: Value) -> Value {
    let args = if args == json!({}) { None } else { Some(args) };
    c.execute(command, args)
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

#[test]
fn ferry_upgrade_replaces_the_process_while_the_guest_runs() {
    if skip_unless(
        "ferry_upgrade_replaces_the_process_while_the_guest_runs",
        kvm_missing(),
    ) {
        return;
    }
    let mut old = source("upgrade", "1G");
    old.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 123_456_789}),
    );
    old.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = old.pages_written();
    let old_pid = old.pid();
    let banner = old.serial();
    assert!(!banner.is_empty(), "the guest printed its banner");
    let out = upgrade(&old.qmp_path, &[]);
    assert!(
        out.status.success(),
        "ferry upgrade failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("upgraded"));
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0));

    let mut new = QmpClient::connect(&old.qmp_path).expect("the new process serves QMP there");
    let config = qmp_cmd(&mut new, "ferry-query-config", json!({}));
    let new_pid = config["pid"].as_u64().unwrap_or(0) as u32;
    let _guard = Adopted(new_pid);
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        qmp_cmd(&mut new, "query-status", json!({}))["status"],
        "running"
    );
    // The old process's settings carried over; x-ignore-shared was only for the handover.
    let params = qmp_cmd(&mut new, "query-migrate-parameters", json!({}));
    assert_eq!(params["max-bandwidth"], 123_456_789);
    let caps = qmp_cmd(&mut new, "query-migrate-capabilities", json!({}));
    let state = |name: &str| {
        caps.as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == name))
            .map(|c| c["state"].clone())
    };
    assert_eq!(state("events"), Some(json!(true)));
    assert_eq!(state("x-ignore-shared"), Some(json!(false)));
    let progress = |c: &mut QmpClient| {
        qmp_cmd(c, "ferry-guest-progress", json!({}))["pages-written"]
            .as_u64()
            .unwrap_or(0)
    };
    let after = progress(&mut new);
    assert!(after >= before);
    std::thread::sleep(Duration::from_millis(300));
    assert!(progress(&mut new) > after, "the guest keeps running");
    let v = qmp_cmd(
        &mut new,
        "ferry-guest-verify",
        json!({"timeout-ms": 30_000}),
    );
    assert_eq!(v["bad-pages"], 0, "{v}");
    // The console continues in the same file.
    let serial = old.serial();
    assert!(
        serial.starts_with(&banner),
        "the serial file was not truncated"
    );
    drop(new);

    // Again, from the new process.
    let out = upgrade(&old.qmp_path, &[]);
    assert!(
        out.status.success(),
        "second upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut newer = QmpClient::connect(&old.qmp_path).expect("QMP after the second upgrade");
    let pid = qmp_cmd(&mut newer, "ferry-query-config", json!({}))["pid"]
        .as_u64()
        .unwrap_or(0) as u32;
    let _guard2 = Adopted(pid);
    assert_ne!(pid, new_pid);
    let v = qmp_cmd(
        &mut newer,
        "ferry-guest-verify",
        json!({"timeout-ms": 30_000}),
    );
    assert_eq!(v["bad-pages"], 0, "{v}");
}

#[test]
fn a_failed_upgrade_leaves_the_guest_in_the_old_process() {
    if skip_unless(
        "a_failed_upgrade_leaves_the_guest_in_the_old_process",
        kvm_missing(),
    ) {
        return;
    }
    let mut old = source("upgrade-fail", "256M");
    // A "new binary" that dies at once.
    let out = upgrade(&old.qmp_path, &["--binary", "/bin/false"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the new process"), "{err}");
    assert_eq!(old.status(), "running");
    assert!(!capability(&mut old, "x-ignore-shared"));
    let (_, bad) = old.guest_verify();
    assert_eq!(bad, 0);
    // A new process that cannot take the guest (too little memory): the migration fails.
    let script = old.dir.join("small-ferry.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\na=(\"$@\")\nfor i in \"${{!a[@]}}\"; do [ \"${{a[$i]}}\" = --memory ] && a[$((i+1))]=128M; done\nexec {} \"${{a[@]}}\"\n",
            ferry_bin().display()
        ),
    )
    .expect("script");
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .expect("chmod");
    let out = upgrade(
        &old.qmp_path,
        &["--binary", script.to_str().unwrap_or(""), "--timeout", "30"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not complete"), "{err}");
    assert_eq!(old.status(), "running");
    assert!(!capability(&mut old, "x-ignore-shared"));
    let (_, bad) = old.guest_verify();
    assert_eq!(bad, 0);

    // Anonymous private memory cannot be handed over.
    let mut anon = Ferry::start(
        "upgrade-anon",
        &FerryOptions {
            memory: "256M,backend=anon".into(),
            ..FerryOptions::default()
        },
    );
    let out = upgrade(&anon.qmp_path, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("anonymous private"), "{err}");
    assert_eq!(anon.status(), "running");
}
