//! `ferry run --global migration.NAME=VALUE`: QEMU's -global migration properties, parsed,
//! applied and visible through QMP; bad ones refused before the guest boots.

use std::process::Command;

use serde_json::json;
use tests::{ferry_bin, kvm_missing, skip_unless, Ferry, FerryOptions};

fn ferry_with(globals: &[&str]) -> Ferry {
    let mut extra = Vec::new();
    for g in globals {
        extra.push("--global".to_string());
        extra.push(format!("migration.{g}"));
    }
    Ferry::start(
        "globals",
        &FerryOptions {
            memory: "64M".into(),
            workload: Some("working-set=8M,rate=1000".into()),
            extra,
            ..FerryOptions::default()
        },
    )
}

#[test]
fn every_global_property_lands_in_qmp() {
    if skip_unless("every_global_property_lands_in_qmp", kvm_missing()) {
        return;
    }
    // Every parameter property with a non-default value, every capability that can be on
    // together, and every pseudo-property.
    let mut f = ferry_with(&[
        "x-compress-level=9",
        "x-compress-threads=3",
        "x-compress-wait-thread=off",
        "x-decompress-threads=5",
        "x-throttle-trigger-threshold=40",
        "x-cpu-throttle-initial=30",
        "x-cpu-throttle-increment=7",
        "x-cpu-throttle-tailslow=on",
        "x-max-bandwidth=64M",
        "x-downtime-limit=123",
        "x-checkpoint-delay=999",
        "multifd-channels=4",
        "multifd-compression=zstd",
        "multifd-zlib-level=3",
        "multifd-zstd-level=4",
        "xbzrle-cache-size=32M",
        "max-postcopy-bandwidth=1G",
        "max-cpu-throttle=80",
        "announce-initial=60",
        "announce-max=600",
        "announce-rounds=6",
        "announce-step=110",
        "tls-creds=",
        "tls-hostname=host.example",
        "tls-authz=authz0",
        "x-xbzrle=on",
        "x-auto-converge=on",
        "x-events=on",
        "x-return-path=on",
        "x-switchover-ack=on",
        "x-multifd=on",
        "store-global-state=off",
        "send-configuration=off",
        "send-section-footer=off",
        "decompress-error-check=off",
        "multifd-flush-after-each-section=on",
        "x-clear-bitmap-shift=14",
        "x-preempt-pre-7-2=on",
    ]);
    let p = f.cmd("query-migrate-parameters", json!({}));
    for (k, v) in [
        ("compress-level", json!(9)),
        ("compress-threads", json!(3)),
        ("compress-wait-thread", json!(false)),
        ("decompress-threads", json!(5)),
        ("throttle-trigger-threshold", json!(40)),
        ("cpu-throttle-initial", json!(30)),
        ("cpu-throttle-increment", json!(7)),
        ("cpu-throttle-tailslow", json!(true)),
        ("max-bandwidth", json!(64 << 20)),
        ("downtime-limit", json!(123)),
        ("x-checkpoint-delay", json!(999)),
        ("multifd-channels", json!(4)),
        ("multifd-compression", json!("zstd")),
        ("multifd-zlib-level", json!(3)),
        ("multifd-zstd-level", json!(4)),
        ("xbzrle-cache-size", json!(32 << 20)),
        ("max-postcopy-bandwidth", json!(1u64 << 30)),
        ("max-cpu-throttle", json!(80)),
        ("announce-initial", json!(60)),
        ("announce-max", json!(600)),
        ("announce-rounds", json!(6)),
        ("announce-step", json!(110)),
        ("tls-hostname", json!("host.example")),
        ("tls-authz", json!("authz0")),
    ] {
        assert_eq!(p[k], v, "parameter {k}: {p}");
    }
    let caps = f.cmd("query-migrate-capabilities", json!({}));
    let on: Vec<_> = caps
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == true)
        .map(|c| c["capability"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        on,
        [
            "xbzrle",
            "auto-converge",
            "events",
            "return-path",
            "multifd",
            "switchover-ack"
        ],
        "{caps}"
    );
    let props = f.cmd("ferry-query-migration-properties", json!({}));
    assert_eq!(
        props,
        json!({
            "store-global-state": false, "send-configuration": false,
            "send-section-footer": false, "decompress-error-check": false,
            "multifd-flush-after-each-section": true, "x-clear-bitmap-shift": 14,
            "x-preempt-pre-7-2": true,
        })
    );
    assert_eq!(f.status(), "running");
}

fn run_fails(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin())
        .args(["run", "--memory", "64M", "--serial", "none"])
        .args(args)
        .output()
        .expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_global_properties_are_refused_before_boot() {
    if skip_unless(
        "bad_global_properties_are_refused_before_boot",
        kvm_missing(),
    ) {
        return;
    }
    let (code, err) = run_fails(&["--global", "migration.x-nothing=on"]);
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "can't apply global migration.x-nothing=on: Property 'migration.x-nothing' not found"
        ),
        "{err}"
    );
    let (code, err) = run_fails(&["--global", "migration.x-multifd=perhaps"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("Parameter 'x-multifd' expects 'on' or 'off'"),
        "{err}"
    );
    let (code, err) = run_fails(&["--global", "migration.multifd-channels=256"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("Parameter 'multifd-channels' expects uint8_t"),
        "{err}"
    );
    let (code, err) = run_fails(&["--global", "virtio-net-pci.mq=on"]);
    assert_eq!(code, 2, "{err}");
    // Values that parse but break QEMU's whole-set rules: the set check runs before the guest.
    let (code, err) = run_fails(&["--global", "migration.x-compress-level=10"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Parameter 'compress_level' expects a value between 0 and 9"),
        "{err}"
    );
    let (code, err) = run_fails(&[
        "--global",
        "migration.x-postcopy-ram=on",
        "--global",
        "migration.x-multifd=on",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Postcopy is not yet compatible with multifd"),
        "{err}"
    );
}
