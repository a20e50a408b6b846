//! The QMP server over a real unix socket: wire format, several clients,
//! misbehaving clients, events, shutdown.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::qmp::{
    ClientOptions, CommandTable, EventBus, Limits, QmpClient, QmpError, QmpServer, ServerConfig,
    ServerHandle,
};

const T: Duration = Duration::from_secs(10);

fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferry-qmp-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server with a few test commands; `quit` shuts the server down from its handler.
struct Fixture {
    server: Option<QmpServer>,
    events: EventBus,
    path: PathBuf,
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        Fixture::with_config(name, ServerConfig::default())
    }

    fn with_config(name: &str, config: ServerConfig) -> Fixture {
        let dir = temp_dir(name);
        let path = dir.join("qmp.sock");
        let events = EventBus::new();
        let handle: Arc<Mutex<Option<ServerHandle>>> = Arc::new(Mutex::new(None));
        let mut table = CommandTable::new();
        let bus = events.clone();
        let quit_handle = handle.clone();
        table
            .register("echo", |args| Ok(Value::Object(args)))
            .register("sleep", |args| {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(100);
                thread::sleep(Duration::from_millis(ms));
                Ok(json!({"slept": ms}))
            })
            .register_no_args("stop", move || {
                bus.emit("STOP", None);
                Ok(json!({}))
            })
            .register_no_args("quit", move || {
                if let Some(h) = quit_handle.lock().unwrap().as_ref() {
                    h.shutdown();
                }
                Ok(json!({}))
            })
            .register_oob("ping-oob", |_| Ok(json!({"pong": true})));
        let server = QmpServer::start(&path, Arc::new(table), events.clone(), config).unwrap();
        *handle.lock().unwrap() = Some(server.handle());
        Fixture {
            server: Some(server),
            events,
            path,
            dir,
        }
    }

    fn handle(&self) -> ServerHandle {
        self.server.as_ref().unwrap().handle()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A hand-driven connection that sees the raw bytes.
struct Raw {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    /// One raw line including its "\r\n".
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn value(&mut self) -> Value {
        let line = self.line();
        assert!(line.ends_with("\r\n"), "line {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    fn negotiate(&mut self) {
        let greeting = self.value();
        assert!(greeting.get("QMP").is_some());
        self.send(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(self.value(), json!({"return": {}}));
    }

    /// True if nothing arrives within `wait`.
    fn silent_for(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut line = String::new();
        let got = self.reader.read_line(&mut line);
        self.stream.set_read_timeout(Some(T)).unwrap();
        matches!(got, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    }
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn wire_format_matches_qemu_greeting_negotiation_and_responses() {
    let f = Fixture::new("wire");
    let mut c = Raw::connect(&f.path);
    let greeting = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 1, \"major\": 8}}, \"package\": \"ferry-{}\"}}, \"capabilities\": [\"oob\"]}}}}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(c.line(), greeting);
    c.send(r#"{"execute": "echo", "id": 1}"#);
    assert_eq!(
        c.line(),
        "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
    );
    c.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
    assert_eq!(c.line(), "{\"return\": {}}\r\n");
    c.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(
        c.line(),
        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n"
    );
    c.send(r#"{"execute": "nope", "id": "x"}"#);
    assert_eq!(
        c.line(),
        "{\"id\": \"x\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
    );
    c.send("{\"execute\": \"echo\", \"arguments\": {\"s\": \"\u{e9}\"}, \"id\": {\"n\": [1, 2]}}");
    assert_eq!(
        c.line(),
        "{\"return\": {\"s\": \"\\u00E9\"}, \"id\": {\"n\": [1, 2]}}\r\n"
    );
}

#[test]
fn requests_split_across_writes_and_batched_in_one_write() {
    let f = Fixture::new("split");
    let mut c = Raw::connect(&f.path);
    c.negotiate();
    let req = r#"{"execute": "echo", "arguments": {"a": "{[\"]}"}, "id": 1}"#;
    for chunk in req.as_bytes().chunks(3) {
        c.stream.write_all(chunk).unwrap();
        c.stream.flush().unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(c.value(), json!({"return": {"a": "{[\"]}"}, "id": 1}));
    c.send("{\"execute\": \"echo\", \"id\": 2}\n\n  {\"execute\": \"echo\", \"id\": 3}{\"execute\": \"echo\", \"id\": 4}");
    for id in 2..=4 {
        assert_eq!(c.value()["id"], json!(id));
    }
}

#[test]
fn garbage_gets_parse_errors_and_the_session_survives() {
    let f = Fixture::new("garbage");
    let mut c = Raw::connect(&f.path);
    c.negotiate();
    c.send("@ not json at all\n");
    assert_eq!(
        c.value(),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}})
    );
    c.send("[1, 2]");
    assert_eq!(
        c.value()["error"]["desc"],
        json!("QMP input must be a JSON object")
    );
    c.send(r#"{"execute": "echo", "bogus": 1, "id": 5}"#);
    assert_eq!(
        c.value(),
        json!({"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}})
    );
    c.send(r#"{"execute": "echo", "id": 6}"#);
    assert_eq!(c.value(), json!({"return": {}, "id": 6}));
}

#[test]
fn a_huge_message_is_refused_and_the_session_survives() {
    let config = ServerConfig {
        limits: Limits {
            max_token_size: 1 << 20,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let f = Fixture::with_config("huge", config);
    let mut c = Raw::connect(&f.path);
    c.negotiate();
    // A 4 MiB string in one line, sent from another thread while we read.
    let mut writer = c.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer
            .write_all(b"{\"execute\": \"echo\", \"arguments\": {\"s\": \"")
            .unwrap();
        writer.write_all(&vec![b'A'; 4 << 20]).unwrap();
        writer
            .write_all(b"\"}}\n{\"execute\": \"echo\", \"id\": \"after\"}")
            .unwrap();
    });
    let first = c.value();
    assert_eq!(
        first,
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    // Whatever else the tail of the line produced, the next request works.
    loop {
        let v = c.value();
        if v.get("id") == Some(&json!("after")) {
            assert_eq!(v, json!({"return": {}, "id": "after"}));
            break;
        }
        assert!(v.get("error").is_some(), "{v}");
    }
    sender.join().unwrap();
}

#[test]
fn too_deep_nesting_is_refused() {
    let f = Fixture::new("deep");
    let mut c = Raw::connect(&f.path);
    c.negotiate();
    c.send(&"[".repeat(2000));
    assert_eq!(
        c.value()["error"]["desc"],
        json!("JSON nesting depth limit exceeded")
    );
    // A newline after garbage lets the client start over.
    c.send("\n");
    let mut c2 = Raw::connect(&f.path);
    c2.negotiate();
    c2.send(r#"{"execute": "echo", "id": 1}"#);
    assert_eq!(c2.value()["id"], json!(1));
}

#[test]
fn nesting_up_to_1024_is_parsed() {
    let f = Fixture::new("deep-ok");
    let mut c = Raw::connect(&f.path);
    c.negotiate();
    let inner = format!("{}{}", "[".repeat(1022), "]".repeat(1022));
    c.send(&format!(
        "{{\"execute\": \"echo\", \"arguments\": {{\"a\": {inner}}}, \"id\": 1}}"
    ));
    // serde_json stops at 128 levels; QEMU's parser (ours) takes 1024.
    let line = c.line();
    let mut parsed = vmm::qmp::JsonStreamer::default().feed(line.as_bytes());
    let v = parsed.remove(0).unwrap();
    assert_eq!(v["id"], json!(1));
    let mut depth = 0;
    let mut cur = &v["return"]["a"];
    while let Some(next) = cur.as_array().and_then(|a| a.first()) {
        depth += 1;
        cur = next;
    }
    // Two braces plus 1022 brackets: exactly QEMU's limit of 1024.
    assert_eq!(depth, 1021);
}

#[test]
fn a_client_hanging_on_half_a_request_does_not_block_others_or_shutdown() {
    let f = Fixture::new("half");
    let mut hung = Raw::connect(&f.path);
    hung.negotiate();
    hung.send(r#"{"execute": "echo", "arguments": {"a": "#);
    let mut c = QmpClient::connect(&f.path).unwrap();
    assert_eq!(
        c.execute("echo", Some(json!({"b": 2}))).unwrap(),
        json!({"b": 2})
    );
    assert!(hung.silent_for(Duration::from_millis(100)));
    // Shutdown and join do not wait for the hung request to complete.
    let start = Instant::now();
    drop(f);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(hung.line(), "");
}

#[test]
fn socket_is_owner_only_and_removed_on_shutdown() {
    let f = Fixture::new("mode");
    let meta = std::fs::symlink_metadata(&f.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    f.handle().shutdown();
    assert!(!f.path.exists());
    assert!(UnixStream::connect(&f.path).is_err());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = temp_dir("stale");
    let path = dir.join("qmp.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = QmpServer::start(
        &path,
        Arc::new(CommandTable::new()),
        EventBus::new(),
        ServerConfig::default(),
    )
    .unwrap();
    let client = QmpClient::connect(&path).unwrap();
    assert!(client.greeting()["QMP"].is_object());
    drop(client);
    server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_clients_in_turn() {
    let f = Fixture::new("turns");
    for round in 0..2 {
        let mut c = QmpClient::connect(&f.path).unwrap();
        assert_eq!(
            c.execute("echo", Some(json!({"round": round}))).unwrap(),
            json!({"round": round})
        );
    }
    assert!(wait_until(|| f.handle().clients() == 0));
}

#[test]
fn concurrent_clients_get_their_own_answers() {
    let f = Fixture::new("concurrent");
    let threads: Vec<_> = (0..6)
        .map(|n| {
            let path = f.path.clone();
            thread::spawn(move || {
                let mut c = QmpClient::connect(&path).unwrap();
                for i in 0..50 {
                    let got = c
                        .execute("echo", Some(json!({"client": n, "i": i})))
                        .unwrap();
                    assert_eq!(got, json!({"client": n, "i": i}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_client_vanishing_mid_command_does_not_affect_others() {
    let f = Fixture::new("vanish");
    let mut gone = Raw::connect(&f.path);
    gone.negotiate();
    gone.send(r#"{"execute": "sleep", "arguments": {"ms": 300}, "id": 1}"#);
    drop(gone);
    let mut c = QmpClient::connect(&f.path).unwrap();
    assert_eq!(c.execute("echo", None).unwrap(), json!({}));
    assert!(wait_until(|| f.handle().clients() == 1));
    assert_eq!(
        c.execute("sleep", Some(json!({"ms": 1}))).unwrap(),
        json!({"slept": 1})
    );
}

#[test]
fn a_client_flooding_garbage_does_not_slow_another() {
    let f = Fixture::new("flood");
    let path = f.path.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // Writes garbage as fast as it can and never reads its error responses.
    let flooder = thread::spawn(move || {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let junk = b"}{@]x\n".repeat(10_000);
        while !stop2.load(Ordering::SeqCst) {
            if s.write_all(&junk).is_err() {
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
    thread::sleep(Duration::from_millis(100));
    let mut c = QmpClient::connect(&f.path).unwrap();
    let start = Instant::now();
    for i in 0..100 {
        assert_eq!(
            c.execute("echo", Some(json!({"i": i}))).unwrap(),
            json!({"i": i})
        );
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    flooder.join().unwrap();
    assert!(
        elapsed < Duration::from_secs(5),
        "100 commands took {elapsed:?}"
    );
}

#[test]
fn events_reach_negotiated_clients_only() {
    let f = Fixture::new("events");
    let mut negotiated = Raw::connect(&f.path);
    negotiated.negotiate();
    let mut waiting = Raw::connect(&f.path);
    let _greeting = waiting.value();
    assert!(wait_until(|| f.events.subscribers() == 2));
    assert_eq!(f.events.emit("STOP", None), 1);
    let ev = negotiated.value();
    assert_eq!(ev["event"], json!("STOP"));
    assert!(ev["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    assert!(waiting.silent_for(Duration::from_millis(200)));
    // After negotiating, the second client sees later events, after its {"return": {}}.
    waiting.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(waiting.value(), json!({"return": {}}));
    f.events.emit("RESUME", Some(json!({"reason": "test"})));
    let line = waiting.line();
    assert!(line.starts_with("{\"timestamp\": {\"seconds\": "), "{line}");
    assert!(
        line.ends_with(", \"event\": \"RESUME\", \"data\": {\"reason\": \"test\"}}\r\n"),
        "{line}"
    );
    assert_eq!(negotiated.value()["event"], json!("RESUME"));
}

#[test]
fn event_emitted_by_a_command_reaches_the_client() {
    let f = Fixture::new("cmd-event");
    let mut c = QmpClient::connect(&f.path).unwrap();
    c.execute("stop", None).unwrap();
    let ev = c.wait_event("STOP", T).unwrap();
    assert_eq!(ev.event, "STOP");
    assert!(ev.data.is_none());
}

#[test]
fn a_slow_command_does_not_stall_events_to_other_clients() {
    let f = Fixture::new("slow");
    let path = f.path.clone();
    let slow = thread::spawn(move || {
        let mut c = QmpClient::connect(&path).unwrap();
        c.execute("sleep", Some(json!({"ms": 1500}))).unwrap()
    });
    let mut watcher = Raw::connect(&f.path);
    watcher.negotiate();
    thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    f.events
        .emit("MIGRATION", Some(json!({"status": "active"})));
    assert_eq!(watcher.value()["data"], json!({"status": "active"}));
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(slow.join().unwrap(), json!({"slept": 1500}));
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_never_blocks_emit() {
    let config = ServerConfig {
        output_queue_len: 16,
        ..ServerConfig::default()
    };
    let f = Fixture::with_config("overflow", config);
    let mut idle = Raw::connect(&f.path);
    idle.negotiate();
    let mut good = QmpClient::connect(&f.path).unwrap();
    // Big events fill the idle client's socket buffer, then its queue.
    let blob = "x".repeat(64 * 1024);
    let start = Instant::now();
    for _ in 0..200 {
        f.events.emit("BIG", Some(json!({"blob": blob})));
        // The good client keeps up.
        let _ = good.wait_event("BIG", T).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(wait_until(|| f.events.subscribers() == 1));
    // The idle client's connection was closed after what was already sent.
    idle.stream.set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    let _ = idle.reader.read_to_end(&mut rest);
    assert!(wait_until(|| f.handle().clients() == 1));
}

#[test]
fn half_closed_client_still_gets_its_responses() {
    let f = Fixture::new("halfclose");
    let mut c = Raw::connect(&f.path);
    c.send(
        r#"{"execute": "qmp_capabilities"}{"execute": "sleep", "arguments": {"ms": 50}, "id": 1}"#,
    );
    c.stream.shutdown(Shutdown::Write).unwrap();
    let _greeting = c.value();
    assert_eq!(c.value(), json!({"return": {}}));
    assert_eq!(c.value(), json!({"return": {"slept": 50}, "id": 1}));
    assert_eq!(c.line(), "", "server closes after the last response");
}

#[test]
fn exec_oob_overtakes_a_slow_in_band_command() {
    let f = Fixture::new("oob");
    let mut c = Raw::connect(&f.path);
    let _ = c.value();
    c.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
    assert_eq!(c.value(), json!({"return": {}}));
    c.send(r#"{"execute": "sleep", "arguments": {"ms": 500}, "id": "slow"}"#);
    thread::sleep(Duration::from_millis(50));
    c.send(r#"{"exec-oob": "ping-oob", "id": "fast"}"#);
    assert_eq!(c.value(), json!({"return": {"pong": true}, "id": "fast"}));
    assert_eq!(c.value(), json!({"return": {"slept": 500}, "id": "slow"}));
    c.send(r#"{"exec-oob": "echo", "id": "no"}"#);
    assert_eq!(
        c.value()["error"]["desc"],
        json!("The command echo does not support OOB")
    );
}

#[test]
fn quit_from_a_handler_answers_then_shuts_down() {
    let mut f = Fixture::new("quit");
    let mut watcher = Raw::connect(&f.path);
    watcher.negotiate();
    let mut c = QmpClient::connect(&f.path).unwrap();
    assert_eq!(c.execute("quit", None).unwrap(), json!({}));
    assert!(f.handle().is_shut_down());
    assert!(!f.path.exists());
    // Events emitted after quit but before join still go out (QEMU's SHUTDOWN).
    f.events.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    let server = f.server.take().unwrap();
    let joined = thread::spawn(move || server.join());
    assert_eq!(watcher.value()["event"], json!("SHUTDOWN"));
    assert_eq!(watcher.line(), "");
    joined.join().unwrap();
}

#[test]
fn max_clients_makes_extra_connections_wait() {
    let config = ServerConfig {
        max_clients: 1,
        ..ServerConfig::default()
    };
    let f = Fixture::with_config("max", config);
    let first = QmpClient::connect(&f.path).unwrap();
    let mut second = Raw::connect(&f.path);
    assert!(
        second.silent_for(Duration::from_millis(300)),
        "no greeting while the first is served"
    );
    drop(first);
    assert!(second.value().get("QMP").is_some());
}

#[test]
fn client_reports_command_errors_timeouts_and_keeps_events() {
    let f = Fixture::new("client");
    let mut c = QmpClient::connect_with(
        &f.path,
        ClientOptions {
            timeout: Duration::from_millis(300),
            negotiate: true,
        },
    )
    .unwrap();
    let err = c.execute("nope", None).unwrap_err();
    assert_eq!(err.qmp_error(), Some(&QmpError::unknown_command("nope")));
    let err = c.execute("echo", Some(json!([1]))).unwrap_err();
    assert_eq!(
        err.qmp_error().unwrap().desc,
        "QMP input member 'arguments' must be an object"
    );
    let err = c.execute("sleep", Some(json!({"ms": 1000}))).unwrap_err();
    assert!(matches!(err, vmm::qmp::ClientError::Timeout(_)), "{err}");
    c.set_timeout(T);
    // The late response to the timed-out command is skipped by id.
    f.events.emit("A", None);
    assert_eq!(
        c.execute("echo", Some(json!({"k": 1}))).unwrap(),
        json!({"k": 1})
    );
    let events = c.take_events();
    assert_eq!(
        events.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        vec!["A"]
    );
    assert!(matches!(
        c.wait_event("NEVER", Duration::from_millis(100)),
        Err(vmm::qmp::ClientError::Timeout(_))
    ));
}
