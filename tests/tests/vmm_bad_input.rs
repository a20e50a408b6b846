//! Bad input against a real `ferry run`: misbehaving QMP clients (garbage, half-written JSON,
//! huge lines, clients that vanish mid-command, floods) must be answered or dropped while
//! another client keeps working and the guest keeps running with every page intact; bad
//! command-line values must end in a clear error and exit code 2, never a crash.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{ferry_bin, kvm_missing, skip_unless, Ferry, FerryOptions, TempDir};

const WS_PAGES: u64 = 8 << 8; // working-set=8M

/// One guest at a time: this machine is small and shared.
fn one_guest() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn start(tag: &str) -> Ferry {
    Ferry::start(
        tag,
        &FerryOptions {
            memory: "64M".into(),
            vcpus: 2,
            workload: Some("working-set=8M,rate=20000".into()),
            ..FerryOptions::default()
        },
    )
}

/// The process is alive, the guest runs and writes pages, and it verifies with no bad page.
fn assert_guest_healthy(ferry: &mut Ferry, after: &str) {
    assert_eq!(
        ferry.try_wait(),
        None,
        "ferry died after {after}:\n{}",
        ferry.log()
    );
    assert_eq!(ferry.status(), "running", "after {after}");
    let before = ferry.pages_written();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ferry.pages_written() <= before {
        assert!(
            Instant::now() < deadline,
            "the guest stopped writing pages after {after}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (checked, bad) = ferry.guest_verify();
    assert_eq!(bad, 0, "bad pages after {after}");
    assert_eq!(checked, WS_PAGES, "after {after}");
    assert!(
        !ferry.log().contains("panicked"),
        "ferry panicked after {after}:\n{}",
        ferry.log()
    );
}

/// A raw connection that has read the greeting (and negotiated when asked).
fn raw(path: &Path, negotiate: bool) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).expect("connect to the QMP socket");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut greeting = String::new();
    r.read_line(&mut greeting).expect("greeting");
    assert!(greeting.contains("\"QMP\""), "greeting: {greeting}");
    let mut s2 = s;
    if negotiate {
        s2.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .expect("negotiate");
        let mut line = String::new();
        r.read_line(&mut line).expect("negotiation reply");
        assert_eq!(line, "{\"return\": {}}\r\n");
    }
    (s2, r)
}

/// Reads reply lines until EOF, an error or `limit` time; returns them.
fn drain(mut r: BufReader<UnixStream>, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => lines.push(line.clone()),
        }
    }
    lines
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn garbage_bytes_get_parse_errors_and_the_guest_keeps_running() {
    if skip_unless("garbage", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-garbage");
    let (mut s, r) = raw(&ferry.qmp_path, true);
    let reader = thread::spawn(move || drain(r, Duration::from_secs(30)));
    for seed in 1..=4u64 {
        s.write_all(&noise(256 << 10, seed)).expect("send garbage");
    }
    s.write_all(b"\n{\"execute\":\"query-status\",\"id\":\"still-here\"}\n")
        .expect("send a good command");
    let _ = s.shutdown(Shutdown::Write);
    let lines = reader.join().expect("reader");
    assert!(
        lines.iter().any(|l| l.contains("JSON parse error")),
        "garbage must be answered with parse errors; got {} lines",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with("\r\n") && serde_json::from_str::<Value>(l.trim_end()).is_ok()),
        "every reply is one JSON line"
    );
    assert_guest_healthy(&mut ferry, "1 MiB of garbage");
}

#[test]
fn half_written_json_then_disconnect_is_dropped_quietly() {
    if skip_unless("half_written", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-half");
    for i in 0..25 {
        let (mut s, _r) = raw(&ferry.qmp_path, i % 2 == 0);
        s.write_all(b"{\"execute\": \"query-status\", \"argu")
            .expect("send half a request");
        drop(s);
    }
    // Half a request, then the rest on the same connection: it is one request.
    let (mut s, mut r) = raw(&ferry.qmp_path, true);
    s.write_all(b"{\"execute\": \"query-st")
        .expect("first half");
    thread::sleep(Duration::from_millis(50));
    s.write_all(b"atus\", \"id\": 7}").expect("second half");
    let mut line = String::new();
    r.read_line(&mut line).expect("reply");
    let v: Value = serde_json::from_str(line.trim_end()).expect("JSON reply");
    assert_eq!(v["id"], 7, "{line}");
    assert_eq!(v["return"]["status"], "running", "{line}");
    assert_guest_healthy(&mut ferry, "25 half-written requests");
}

#[test]
fn huge_lines_are_answered_or_dropped_without_growing_the_vmm() {
    if skip_unless("huge_lines", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-huge");
    let rss_before = ferry.status_kib("RssAnon");

    // 40 MiB inside one string token: under QEMU's 64 MiB token limit, so it is parsed and
    // refused as an unexpected argument.
    let mut msg = b"{\"execute\":\"query-status\",\"arguments\":{\"blob\":\"".to_vec();
    msg.resize(msg.len() + (40 << 20), b'A');
    msg.extend_from_slice(b"\"},\"id\":\"big\"}\n");
    let (mut s, mut r) = raw(&ferry.qmp_path, true);
    s.write_all(&msg).expect("send 40 MiB");
    let mut line = String::new();
    r.read_line(&mut line).expect("reply to the 40 MiB request");
    assert_eq!(
        line,
        "{\"id\": \"big\", \"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'blob' is unexpected\"}}\r\n"
    );
    drop((s, r));

    // 80 MiB in one token: over the limit. The VMM answers with an error or drops the
    // client; either way it must not keep the bytes.
    let mut msg = b"{\"execute\":\"query-status\",\"arguments\":{\"blob\":\"".to_vec();
    msg.resize(msg.len() + (80 << 20), b'B');
    msg.extend_from_slice(b"\"}}\n");
    let (mut s, r) = raw(&ferry.qmp_path, true);
    let reader = thread::spawn(move || drain(r, Duration::from_secs(60)));
    let sent = s.write_all(&msg);
    let _ = s.shutdown(Shutdown::Write);
    let lines = reader.join().expect("reader");
    assert!(
        sent.is_err() || lines.iter().all(|l| l.contains("\"error\"")),
        "an over-long token must not be executed: {lines:?}"
    );
    drop(msg);

    // Tens of MiB with no newline and no JSON at all.
    let (mut s, r) = raw(&ferry.qmp_path, true);
    let reader = thread::spawn(move || drain(r, Duration::from_secs(60)));
    let chunk = vec![b'9'; 1 << 20];
    for _ in 0..32 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = reader.join();

    assert_guest_healthy(&mut ferry, "huge lines");
    let rss_after = ferry.status_kib("RssAnon");
    eprintln!("RssAnon before the huge lines {rss_before} KiB, after {rss_after} KiB");
    assert!(
        rss_after < rss_before + (32 << 10),
        "the VMM must not hold on to huge input: RssAnon {rss_before} KiB -> {rss_after} KiB"
    );
}

#[test]
fn clients_vanishing_mid_command_do_not_disturb_the_vmm() {
    if skip_unless("vanishing", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-vanish");
    let requests: [&[u8]; 4] = [
        b"{\"execute\":\"ferry-guest-verify\"}\n",
        b"{\"execute\":\"query-migrate-parameters\"}\n",
        b"{\"execute\":\"ferry-memory-digest\"}\n",
        b"{\"execute\":\"query-commands\"}\n",
    ];
    for round in 0..40 {
        let (mut s, r) = raw(&ferry.qmp_path, true);
        s.write_all(requests[round % requests.len()])
            .expect("send a command");
        if round % 3 == 0 {
            let _ = s.shutdown(Shutdown::Read);
        }
        drop((s, r)); // gone before the reply
    }
    // Results of commands whose client vanished are applied all the same.
    let (mut s, _r) = raw(&ferry.qmp_path, true);
    s.write_all(
        b"{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":4321}}\n",
    )
    .expect("send");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = ferry.cmd("query-migrate-parameters", json!({}));
        if p["downtime-limit"] == 4321 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the vanished client's set was not applied: {p}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_guest_healthy(&mut ferry, "40 clients vanishing mid-command");
}

fn flood(path: PathBuf, requests: usize) -> usize {
    let (mut s, r) = raw(&path, true);
    let reader = thread::spawn(move || drain(r, Duration::from_secs(60)));
    let bad: [&[u8]; 5] = [
        b"{\"execute\": }\n",
        b"[]\n",
        b"{\"execute\": \"nope\"}\n",
        b"{\"execute\": \"query-status\", \"arguments\": 5}\n",
        b"}}}]]]\n",
    ];
    let mut batch = Vec::new();
    for i in 0..requests {
        batch.extend_from_slice(bad[i % bad.len()]);
    }
    let _ = s.write_all(&batch);
    let _ = s.shutdown(Shutdown::Write);
    reader.join().map(|l| l.len()).unwrap_or(0)
}

#[test]
fn a_flood_of_malformed_requests_does_not_starve_another_client() {
    if skip_unless("flood", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-flood");
    let path = ferry.qmp_path.clone();
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let p = path.clone();
            thread::spawn(move || flood(p, 20_000))
        })
        .collect();
    let churn_path = path.clone();
    let churn = thread::spawn(move || {
        for i in 0..100u64 {
            if let Ok(mut s) = UnixStream::connect(&churn_path) {
                let _ = s.write_all(&noise(512, i + 1));
                let mut sink = [0u8; 256];
                let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
                let _ = s.read(&mut sink);
            }
        }
    });
    let mut worst = Duration::ZERO;
    let mut served = 0;
    while !flooders.iter().all(|f| f.is_finished()) || !churn.is_finished() {
        let t = Instant::now();
        assert_eq!(ferry.status(), "running");
        worst = worst.max(t.elapsed());
        served += 1;
        thread::sleep(Duration::from_millis(5));
    }
    for f in flooders {
        let answered = f.join().expect("flooder");
        assert!(
            answered >= 20_000,
            "every malformed request gets an error reply: {answered} of 20000"
        );
    }
    churn.join().expect("churn");
    assert!(
        worst < Duration::from_secs(5),
        "the other client waited {worst:?} for query-status"
    );
    eprintln!("served {served} query-status during the flood, worst {worst:?}");
    assert_guest_healthy(&mut ferry, "a flood of 40000 malformed requests");
}

#[test]
fn idle_clients_over_the_limit_wait_and_are_served_once_others_leave() {
    if skip_unless("idle_clients", kvm_missing()) {
        return;
    }
    let _one = one_guest();
    let mut ferry = start("bad-idle");
    let mut idle = Vec::new();
    for _ in 0..12 {
        let s = UnixStream::connect(&ferry.qmp_path).expect("connect");
        idle.push(s);
    }
    // The harness's own client is one of those served: it keeps working.
    assert_eq!(ferry.status(), "running");
    drop(idle);
    let (mut s, mut r) = raw(&ferry.qmp_path, true);
    s.write_all(b"{\"execute\":\"query-status\"}\n")
        .expect("send");
    let mut line = String::new();
    r.read_line(&mut line).expect("reply");
    assert!(line.contains("\"running\""), "{line}");
    assert_guest_healthy(&mut ferry, "12 idle clients");
}

/// Runs `ferry run ARGS` (which must fail before booting); returns (exit code, stderr).
fn run_fails(args: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new("bad-cli");
    let serial = format!("file:{}", dir.join("serial.txt").display());
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("run");
    let given = |name: &str| args.iter().any(|a| a.starts_with(name));
    if !given("--serial") {
        cmd.args(["--serial", &serial]);
    }
    if !given("--memory") {
        cmd.args(["--memory", "64M"]);
    }
    let mut child = cmd
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (st.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry run {args:?} did not exit: it accepted bad input");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn assert_usage_error(args: &[&str], mentions: &str) {
    let (code, err) = run_fails(args);
    assert!(
        !err.contains("panicked"),
        "ferry run {args:?} crashed:\n{err}"
    );
    assert_eq!(
        code,
        Some(2),
        "ferry run {args:?} must exit with status 2 (bad command line); stderr:\n{err}\n\
         (known cause when the status is 1: cli/run.rs checks only the syntax of the options \
         and returns 1 for every Machine::boot error, so values that parse but cannot run, \
         such as --vcpus 0 or a working set larger than --memory, are reported as runtime \
         failures)"
    );
    assert!(
        err.contains(mentions),
        "ferry run {args:?}: the error must name {mentions:?}:\n{err}"
    );
    assert!(
        err.lines().count() <= 5,
        "a short, clear message, not a dump:\n{err}"
    );
}

#[test]
fn bad_memory_values_are_usage_errors() {
    for v in [
        "1X",
        "0",
        "3M",
        "",
        "64M,backend=floppy",
        "64M,share=maybe",
        "64M,colour=blue",
    ] {
        assert_usage_error(&["--memory", v], "--memory");
    }
    assert_usage_error(&["--memory=-64M"], "--memory");
}

#[test]
fn bad_workload_values_are_usage_errors() {
    for v in [
        "rate=fast",
        "rate=-1",
        "speed=1",
        "rate",
        "working-set=",
        "working-set=-1",
        "=",
    ] {
        assert_usage_error(&["--workload", v], "--workload");
    }
}

#[test]
fn a_working_set_larger_than_memory_is_a_usage_error() {
    if skip_unless("working_set_too_large", kvm_missing()) {
        return;
    }
    assert_usage_error(&["--workload", "working-set=1G"], "working set");
}

#[test]
fn bad_serial_values_are_usage_errors() {
    for v in ["bogus", "file:", "tcp:127.0.0.1:1", "FILE:/tmp/x"] {
        assert_usage_error(&["--serial", v], "--serial");
    }
}

#[test]
fn bad_uuids_are_usage_errors() {
    for v in [
        "not-a-uuid",
        "123e4567-e89b-12d3-a456-42661417400",
        "123e4567-e89b-12d3-a456-4266141740000",
        "",
    ] {
        assert_usage_error(&["--uuid", v], "--uuid");
    }
}

#[test]
fn bad_incoming_uris_are_usage_errors() {
    for v in [
        "bogus:uri",
        "",
        "tcp:",
        "tcp:127.0.0.1",
        "tcp:127.0.0.1:99999",
        "tcp:host:port",
        "tcp:[::1",
        "unix:",
        "file:",
    ] {
        assert_usage_error(&["--incoming", v], "--incoming");
    }
}

#[test]
fn non_numeric_vcpus_are_usage_errors() {
    assert_usage_error(&["--vcpus", "abc"], "--vcpus");
    assert_usage_error(&["--vcpus=-1"], "--vcpus");
}

#[test]
fn out_of_range_vcpus_are_usage_errors() {
    if skip_unless("out_of_range_vcpus", kvm_missing()) {
        return;
    }
    assert_usage_error(&["--vcpus", "0"], "--vcpus");
    assert_usage_error(&["--vcpus", "100000"], "--vcpus");
}

#[test]
fn more_vcpus_than_the_host_recommends_are_refused() {
    if skip_unless("more_vcpus_than_recommended", kvm_missing()) {
        return;
    }
    let probe = Command::new(ferry_bin())
        .args(["probe", "--json"])
        .output()
        .expect("run ferry probe");
    let probe: serde_json::Value =
        serde_json::from_slice(&probe.stdout).expect("ferry probe --json prints JSON");
    let recommended = probe
        .pointer("/kvm/nr-vcpus")
        .and_then(serde_json::Value::as_u64)
        .expect("probe reports nr-vcpus");
    if recommended >= 64 {
        eprintln!("SKIP more_vcpus_than_recommended: the host recommends {recommended} vCPUs");
        return;
    }
    let too_many = (recommended + 1).to_string();
    let (code, err) = run_fails(&["--vcpus", &too_many]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "--vcpus {too_many} exceeds the {recommended} vCPUs"
        )),
        "{err}"
    );
}

#[test]
fn an_unwritable_serial_file_or_qmp_path_is_a_clear_runtime_error() {
    if skip_unless("unwritable_paths", kvm_missing()) {
        return;
    }
    for args in [
        ["--serial", "file:/nonexistent-ferry-dir/serial.txt"],
        ["--qmp", "/nonexistent-ferry-dir/qmp.sock"],
    ] {
        let (code, err) = run_fails(&args);
        assert_eq!(code, Some(1), "ferry run {args:?}:\n{err}");
        assert!(
            err.contains("No such file or directory") && !err.contains("panicked"),
            "ferry run {args:?}: {err}"
        );
    }
}
