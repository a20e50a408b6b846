//! The `background-snapshot` capability against the real probe: accepted exactly when
//! `ferry probe` finds the guest's memory write-trackable, refused with QEMU's texts
//! otherwise, and refused beside the capabilities QEMU excludes.

mod snapshot_support;

use serde_json::json;
use snapshot_support::{probe, write_tracking};
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions, TempDir};

fn set_cap(f: &mut Ferry, name: &str, on: bool) -> Result<(), String> {
    f.try_cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": name, "state": on}]}),
    )
    .map(|_| ())
    .map_err(|e| match e {
        vmm::qmp::ClientError::Command(c) => c.desc,
        other => panic!("QMP: {other}"),
    })
}

/// What QEMU answers for a write-tracking level.
fn expected(support: &str) -> Result<(), String> {
    match support {
        "compatible" => Ok(()),
        "available" => {
            Err("Background-snapshot is not compatible with guest memory configuration".into())
        }
        _ => Err("Background-snapshot is not supported by host kernel".into()),
    }
}

#[test]
fn capability_follows_the_probe_for_each_memory_backend() {
    let _one = one_guest_test_at_a_time();
    let test = "capability_follows_the_probe_for_each_memory_backend";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let p = probe();
    let dir = TempDir::new("snap-cap");
    // A file on a disk file system (/var/tmp, as the probe uses), not tmpfs.
    let disk = std::path::PathBuf::from(format!("/var/tmp/ferry-snap-cap-{}", std::process::id()));
    let cases = [
        ("memfd", "256M".to_string()),
        ("anon", "256M,backend=anon".to_string()),
        (
            "tmpfs-file,shared",
            format!(
                "256M,mem-path={},share=on",
                std::path::Path::new("/dev/shm")
                    .join(format!("ferry-snap-cap-{}", std::process::id()))
                    .display()
            ),
        ),
        (
            "disk-file,shared",
            format!("256M,mem-path={},share=on", disk.display()),
        ),
    ];
    let mut seen_refusal = false;
    for (backend, memory) in cases {
        let support = write_tracking(&p, backend)["support"]
            .as_str()
            .unwrap_or("absent")
            .to_string();
        let mut f = Ferry::start(
            &format!("snap-cap-{}", backend.replace(',', "-")),
            &FerryOptions {
                memory: memory.clone(),
                ..FerryOptions::default()
            },
        );
        let got = set_cap(&mut f, "background-snapshot", true);
        assert_eq!(
            got,
            expected(&support),
            "{backend} ({memory}): the probe says {support}"
        );
        seen_refusal |= got.is_err();
        let caps = f.cmd("query-migrate-capabilities", json!({}));
        let on = caps
            .as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == "background-snapshot"))
            .map(|c| c["state"].clone());
        assert_eq!(on, Some(json!(got.is_ok())), "{caps}");
        drop(f);
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(format!("/dev/shm/ferry-snap-cap-{}", std::process::id()));
    drop(dir);
    // On a host with userfaultfd write-protect, a disk file is the case that is refused.
    if write_tracking(&p, "memfd")["support"] == "compatible" {
        assert!(seen_refusal, "a regular disk file cannot be write-tracked");
    }
}

#[test]
fn excluded_capabilities_are_refused_in_both_orders() {
    let _one = one_guest_test_at_a_time();
    let test = "excluded_capabilities_are_refused_in_both_orders";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    if write_tracking(&probe(), "memfd")["support"] != "compatible" {
        eprintln!("SKIP {test}: ferry probe: memfd memory is not write-trackable here");
        return;
    }
    let mut f = Ferry::start("snap-excl", &FerryOptions::default());
    for other in [
        "xbzrle",
        "auto-converge",
        "multifd",
        "pause-before-switchover",
        "validate-uuid",
        "return-path",
        "release-ram",
    ] {
        set_cap(&mut f, "background-snapshot", true).unwrap();
        assert_eq!(
            set_cap(&mut f, other, true),
            Err(format!(
                "Background-snapshot is not compatible with {other}"
            )),
            "{other} after background-snapshot"
        );
        set_cap(&mut f, "background-snapshot", false).unwrap();
        set_cap(&mut f, other, true).unwrap();
        assert_eq!(
            set_cap(&mut f, "background-snapshot", true),
            Err(format!(
                "Background-snapshot is not compatible with {other}"
            )),
            "background-snapshot after {other}"
        );
        set_cap(&mut f, other, false).unwrap();
    }
    // A snapshot is written to a file; other URIs are refused up front.
    set_cap(&mut f, "background-snapshot", true).unwrap();
    let e = f.cmd_err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(e.contains("use a file: URI"), "{e}");
    assert_eq!(f.status(), "running");
}
