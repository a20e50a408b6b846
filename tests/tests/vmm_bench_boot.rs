//! `ferry bench boot` end to end: real runs, a JSON report whose figures hang together.

use std::process::Command;

use serde_json::Value;
use tests::{ferry_bin, kvm_missing, skip_unless};

#[test]
fn bench_boot_reports_boot_times_and_memory_split_as_json() {
    if skip_unless(
        "bench_boot_reports_boot_times_and_memory_split_as_json",
        kvm_missing(),
    ) {
        return;
    }
    let out = Command::new(ferry_bin())
        .args([
            "bench",
            "boot",
            "--runs",
            "3",
            "--warmup",
            "0",
            "--memory",
            "64M",
            "--workload",
            "working-set=8M,rate=20000",
            "--settle-ms",
            "300",
            "--json",
        ])
        .output()
        .expect("run ferry bench boot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ferry bench boot failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).expect("--json prints one JSON document");
    assert_eq!(r["bench"], "boot");
    let cmd: Vec<&str> = r["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        cmd.join(" "),
        "ferry run --memory 64M --vcpus 1 --serial stdout --workload working-set=8M,rate=20000"
    );
    let t = &r["first_serial_byte"];
    assert_eq!(t["runs"], 3);
    let samples: Vec<f64> = t["samples_ms"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(samples.len(), 3);
    let (min, med, max) = (
        t["min_ms"].as_f64().unwrap_or(-1.0),
        t["median_ms"].as_f64().unwrap_or(-1.0),
        t["max_ms"].as_f64().unwrap_or(-1.0),
    );
    assert!(
        0.0 < min && min <= med && med <= max && max < 10_000.0,
        "{t}"
    );
    let m = &r["memory"];
    let p = &m["process"];
    let kib = |v: &Value| v.as_u64().unwrap_or(0);
    assert_eq!(
        kib(&p["vm_rss_kib"]),
        kib(&p["rss_anon_kib"]) + kib(&p["rss_file_kib"]) + kib(&p["rss_shmem_kib"]),
        "VmRSS = RssAnon + RssFile + RssShmem: {p}"
    );
    assert_eq!(
        kib(&m["overhead_kib"]),
        kib(&p["rss_anon_kib"]) + kib(&p["rss_file_kib"])
    );
    let touched = kib(&m["guest_touched_kib"]);
    assert!(
        (1024..=64 << 10).contains(&touched),
        "the guest touched part of its 64 MiB (at least some of its 8 MiB working set): {m}"
    );
    assert!(kib(&m["overhead_kib"]) > 0, "{m}");
    assert!(m["method"].as_str().unwrap_or("").contains("RssShmem"));
    assert_eq!(r["goals"]["boot_ms"], 20.0);
    assert_eq!(r["goals"]["overhead_mib"], 16);
}
