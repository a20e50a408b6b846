//! `ferry bench migrate --quick`: the harness runs real migrations end to end and its JSON
//! report carries every section with sane figures.

use std::process::Command;

use serde_json::Value;
use tests::{ferry_bin, kvm_missing, one_guest_test_at_a_time, skip_unless, TempDir};

#[test]
fn bench_migrate_quick_reports_every_section() {
    if skip_unless("bench_migrate_quick_reports_every_section", kvm_missing()) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    // No data sets here: --quick makes small stand-ins.
    let empty = TempDir::new("bench-no-data");
    let out = Command::new(ferry_bin())
        .args([
            "bench",
            "migrate",
            "--quick",
            "--json",
            "--configs",
            "plain,multifd-2",
            "--downtime-runs",
            "1",
            "--data-dir",
        ])
        .arg(empty.path())
        .output()
        .expect("run ferry bench migrate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["bench"], "migrate");
    assert_eq!(r["memory_bytes"], 256u64 << 20);

    let tcp = r["tcp"].as_array().expect("tcp references");
    assert!(tcp
        .iter()
        .any(|f| f["streams"] == 1 && f["gib_per_s"].as_f64() > Some(0.0)));
    assert!(tcp.iter().any(|f| f["streams"] == 2));

    let rows = r["throughput"].as_array().expect("throughput rows");
    // 2 data sets x (plain fresh + plain prealloc + multifd-2 fresh).
    assert_eq!(rows.len(), 6, "{rows:?}");
    for row in rows {
        let name = format!("{} {} {}", row["data_set"], row["config"], row["dest"]);
        if row["config"] == "plain" {
            let m = &row["measured"];
            assert!(m.is_object(), "{name}: plain always runs: {row}");
            assert_eq!(m["digests_match"], true, "{name}");
            let g = m["guest_gib_per_s"].as_f64().unwrap_or(0.0);
            assert!(g > 0.01 && g < 100.0, "{name}: {g} GiB/s");
            assert!(m["wire_vs_tcp"].as_f64().is_some(), "{name}");
        } else {
            // Multifd either ran (and moved bytes on its channels) or says why not.
            assert!(
                row["measured"]["multifd_bytes"].as_u64() > Some(0)
                    || row["unavailable"].is_string(),
                "{name}: {row}"
            );
        }
    }
    // The mixed set's zero pages are not sent: less wire than guest memory.
    let mixed = rows
        .iter()
        .find(|x| x["data_set"] == "mixed" && x["config"] == "plain" && x["dest"] == "fresh")
        .expect("mixed plain fresh");
    assert!(
        mixed["measured"]["wire_bytes"].as_u64().unwrap_or(u64::MAX) < (200u64 << 20),
        "{mixed}"
    );

    let d = &r["downtime"];
    assert_eq!(d["runs"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(d["runs"][0]["bad_pages"], 0);
    assert!(d["summary"]["max_ms"].as_f64().is_some());

    let rates = r["rate_limit"].as_array().expect("rate rows");
    assert_eq!(rates.len(), 4);
    let measured: Vec<&Value> = rates.iter().filter(|x| x["measured"].is_number()).collect();
    assert!(
        !measured.is_empty(),
        "32 MiB/s is always measurable: {rates:?}"
    );
    for x in &measured {
        let e = x["error_pct"].as_f64().unwrap_or(100.0);
        assert!(
            e.abs() < 25.0,
            "the limiter holds the rate roughly even in a smoke run: {x}"
        );
    }
    assert!(rates
        .iter()
        .all(|x| x["measured"].is_number() || x["note"].is_string()));

    let sync = r["dirty_sync"].as_array().expect("dirty sync rows");
    assert_eq!(sync.len(), 4);
    assert!(sync
        .iter()
        .filter(|x| x["tracker"] == "bitmap")
        .all(|x| x["unavailable"].is_null() && x["us_per_gib"].as_f64() > Some(0.0)));
    assert!(r["commands"].as_array().is_some_and(|c| !c.is_empty()));

    let pop = r["populate"].as_array().expect("populate rows");
    assert_eq!(pop.len(), 3, "memfd, anon, anon+THP");
    for x in pop {
        assert!(x["touch_gib_per_s"].as_f64() > Some(0.0), "{x}");
        assert!(x["populate_gib_per_s"].as_f64() > Some(0.0), "{x}");
    }
}

fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(ferry_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run ferry bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry bench {args:?}: {stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn bench_snapshot_quick_reports_stall_faults_and_the_stop_the_world_reference() {
    if skip_unless("bench_snapshot_quick", kvm_missing()) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let r = bench_json(&["snapshot", "--quick"]);
    let m = &r["median"];
    let num = |k: &str| m[k].as_f64().unwrap_or(-1.0);
    assert!(num("stall-ms") > 0.0, "{r}");
    assert!(
        num("stop-the-world-stall-ms") > num("stall-ms"),
        "stopping for the whole save stalls longer than a background snapshot: {r}"
    );
    assert!(
        num("bytes") >= (64u64 << 20) as f64,
        "the working set is saved: {r}"
    );
    assert!(num("fault-p99-us") >= num("fault-p50-us"), "{r}");
    let ratio = num("guest-rate-ratio");
    assert!(ratio > 0.0 && ratio <= 1.5, "{r}");
    assert!(r["p99-goal-met"].is_boolean(), "{r}");
}

#[test]
fn bench_local_reports_downtime_per_size_and_the_copy_reference() {
    if skip_unless("bench_local", kvm_missing()) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let r = bench_json(&[
        "local",
        "--sizes",
        "256M,512M",
        "--runs",
        "1",
        "--workload",
        "working-set=32M,rate=20000",
    ]);
    let rows = r["rows"].as_array().expect("rows");
    let local: Vec<&Value> = rows.iter().filter(|w| w["kind"] == "local").collect();
    assert_eq!(local.len(), 2, "{r}");
    let copy = rows
        .iter()
        .find(|w| w["kind"] != "local")
        .expect("a copying reference row");
    for row in &local {
        let run = &row["runs"][0];
        assert!(run["downtime_us"].as_u64() > Some(0), "{row}");
        assert!(
            run["transferred"].as_u64() < Some(1 << 20),
            "no guest memory is copied: {row}"
        );
    }
    assert!(
        copy["runs"][0]["transferred"].as_u64() > Some(16 << 20),
        "the reference copies the working set: {copy}"
    );
    assert!(
        r["copy_ratio"].as_f64().is_some_and(|x| x > 0.0 && x < 1.0),
        "{r}"
    );
}
