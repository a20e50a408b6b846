//! Throughput and latency figures of the QMP layer (not run by default):
//! `cargo test --release -p vmm --test qmp_perf -- --ignored --nocapture`

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::qmp::{CommandTable, EventBus, JsonStreamer, QmpClient, QmpServer, ServerConfig};

fn temp_socket(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ferry-qmp-perf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("qmp.sock"), dir)
}

#[test]
#[ignore = "performance figures; run with --release --ignored --nocapture"]
fn framing_throughput() {
    // One 32 MiB string argument, fed in 64 KiB reads like the server does.
    let mut input = b"{\"execute\": \"x\", \"arguments\": {\"s\": \"".to_vec();
    input.extend(std::iter::repeat_n(b'a', 32 << 20));
    input.extend_from_slice(b"\"}}");
    let mut s = JsonStreamer::default();
    let start = Instant::now();
    let mut got = Vec::new();
    for chunk in input.chunks(64 * 1024) {
        got.extend(s.feed(chunk));
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got.len(), 1);
    assert!(got[0].is_ok());
    println!("framing: one 32 MiB message: {:.0} MiB/s", 32.0 / secs);

    // Many small requests.
    let one = br#"{"execute": "query-migrate", "arguments": {"a": [1, 2.5, "x"]}, "id": 12345}"#;
    let input: Vec<u8> = one
        .iter()
        .chain(b"\n")
        .copied()
        .cycle()
        .take((one.len() + 1) * 200_000)
        .collect();
    let start = Instant::now();
    let mut n = 0;
    for chunk in input.chunks(64 * 1024) {
        n += s.feed(chunk).len();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(n, 200_000);
    println!(
        "framing: small requests: {:.0} k/s ({:.0} MiB/s)",
        n as f64 / secs / 1e3,
        input.len() as f64 / secs / 1048576.0
    );
}

#[test]
#[ignore = "performance figures; run with --release --ignored --nocapture"]
fn command_round_trip_and_event_fan_out() {
    let (path, dir) = temp_socket("rt");
    let mut table = CommandTable::new();
    table.register("echo", |a| Ok(Value::Object(a)));
    let events = EventBus::new();
    let server = QmpServer::start(
        &path,
        Arc::new(table),
        events.clone(),
        ServerConfig::default(),
    )
    .unwrap();

    let mut c = QmpClient::connect(&path).unwrap();
    let n = 20_000;
    let start = Instant::now();
    for i in 0..n {
        assert_eq!(
            c.execute("echo", Some(json!({"i": i}))).unwrap()["i"],
            json!(i)
        );
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "round trip: {:.1} us per command ({:.0} commands/s, one client)",
        secs / n as f64 * 1e6,
        n as f64 / secs
    );

    let mut watchers: Vec<QmpClient> = (0..4).map(|_| QmpClient::connect(&path).unwrap()).collect();
    let events_n = 500;
    let start = Instant::now();
    for i in 0..events_n {
        events.emit("TICK", Some(json!({"i": i})));
    }
    let emit_secs = start.elapsed().as_secs_f64();
    for w in &mut watchers {
        for _ in 0..events_n {
            w.wait_event("TICK", Duration::from_secs(10)).unwrap();
        }
    }
    let all_secs = start.elapsed().as_secs_f64();
    println!(
        "events: emit {:.1} us each to 5 clients; {} events delivered to 4 readers in {:.1} ms",
        emit_secs / events_n as f64 * 1e6,
        events_n,
        all_secs * 1e3
    );
    drop(watchers);
    drop(c);
    server.join();
    let _ = std::fs::remove_dir_all(&dir);
}
