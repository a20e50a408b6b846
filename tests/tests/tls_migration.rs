//! Live migration over TLS (QEMU's tls-creds / tls-hostname / tls-authz), main stream and
//! multifd channels, with certificates generated at run time; refusals end with a clear
//! error and the source guest running.

use std::time::Duration;

use serde_json::json;
use tests::certs::{write_dir, TestCa};
use tests::{free_port, kvm_missing, skip_unless, Ferry, FerryOptions, TempDir};

struct Pair {
    src: Ferry,
    dst: Ferry,
    port: u16,
    _dir: TempDir,
}

/// A source and a destination with TLS objects; `client_cn` names the source's certificate
/// and `server_names` the names in the destination's.
fn pair(tag: &str, client_cn: &str, server_names: &[&str], authz: Option<&str>) -> Pair {
    let dir = TempDir::new(tag);
    let ca = TestCa::new("Ferry CA");
    let sdir = write_dir(
        &dir.join("server"),
        &ca,
        "server",
        Some(ca.issue("dest", server_names, false)),
    );
    let cdir = write_dir(
        &dir.join("client"),
        &ca,
        "client",
        Some(ca.issue(client_cn, &[], false)),
    );
    let port = free_port();
    let src = Ferry::start(
        &format!("{tag}-src"),
        &FerryOptions {
            extra: vec![
                "--object".into(),
                format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    cdir.display()
                ),
            ],
            ..FerryOptions::default()
        },
    );
    let mut extra = vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            sdir.display()
        ),
    ];
    if let Some(identity) = authz {
        extra.push("--object".into());
        // QEMU's option syntax: a literal comma is written ",,".
        extra.push(format!(
            "authz-simple,id=auth0,identity={}",
            identity.replace(',', ",,")
        ));
    }
    let dst = Ferry::start(
        &format!("{tag}-dst"),
        &FerryOptions {
            workload: None,
            incoming: Some("defer".into()),
            extra,
            ..FerryOptions::default()
        },
    );
    Pair {
        src,
        dst,
        port,
        _dir: dir,
    }
}

fn start(p: &mut Pair, authz: bool, multifd: bool) {
    let mut dst_params = json!({"tls-creds": "tls0"});
    if authz {
        dst_params["tls-authz"] = json!("auth0");
    }
    p.dst.cmd("migrate-set-parameters", dst_params);
    p.src.cmd(
        "migrate-set-parameters",
        json!({"tls-creds": "tls0", "tls-hostname": "localhost"}),
    );
    if multifd {
        for f in [&mut p.src, &mut p.dst] {
            f.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
            );
        }
    }
    p.dst.cmd(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{}", p.port)}),
    );
    p.src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", p.port)}),
    );
}

fn assert_source_intact(src: &mut Ferry) {
    assert_eq!(src.status(), "running");
    let before = src.pages_written();
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        src.pages_written() > before,
        "the source guest keeps running"
    );
    assert_eq!(src.guest_verify().1, 0);
}

#[test]
fn tls_migration_main_stream_and_multifd_complete() {
    if skip_unless(
        "tls_migration_main_stream_and_multifd_complete",
        kvm_missing(),
    ) {
        return;
    }
    for multifd in [false, true] {
        let mut p = pair(
            "tls-ok",
            "source.example",
            &["localhost"],
            Some("CN=source.example,O=Ferry Tests"),
        );
        std::thread::sleep(Duration::from_millis(200));
        start(&mut p, true, multifd);
        let info = p.src.wait_migration_end(Duration::from_secs(60));
        assert_eq!(
            info["status"],
            "completed",
            "multifd={multifd}: {info}\n{}",
            p.dst.log()
        );
        if multifd {
            assert!(
                info["ram"]["multifd-bytes"].as_u64().unwrap_or(0) > 0,
                "{info}"
            );
        }
        let (checked, bad) = p.dst.guest_verify();
        assert!(checked > 0);
        assert_eq!(bad, 0, "multifd={multifd}");
    }
}

#[test]
fn a_wrong_hostname_fails_and_the_source_keeps_running() {
    if skip_unless(
        "a_wrong_hostname_fails_and_the_source_keeps_running",
        kvm_missing(),
    ) {
        return;
    }
    let mut p = pair("tls-host", "source.example", &["elsewhere.example"], None);
    start(&mut p, false, false);
    let info = p.src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "failed");
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap_or("")
            .contains("Certificate does not match the hostname localhost"),
        "{info}"
    );
    assert_source_intact(&mut p.src);
    assert!(
        p.dst
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|c| c != 0),
        "the destination refuses"
    );
}

#[test]
fn a_client_not_allowed_by_tls_authz_is_refused() {
    if skip_unless(
        "a_client_not_allowed_by_tls_authz_is_refused",
        kvm_missing(),
    ) {
        return;
    }
    let mut p = pair(
        "tls-authz",
        "intruder.example",
        &["localhost"],
        Some("CN=source.example,O=Ferry Tests"),
    );
    start(&mut p, true, false);
    let info = p.src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "failed", "{info}");
    let denied = |log: &str| log.contains("TLS x509 authz check for") && log.contains("is denied");
    let log = p.dst.wait_log(Duration::from_secs(10), denied);
    assert!(denied(&log), "{log}");
    assert_source_intact(&mut p.src);
}

#[test]
fn zero_copy_with_tls_and_unknown_credentials_are_refused() {
    if skip_unless(
        "zero_copy_with_tls_and_unknown_credentials_are_refused",
        kvm_missing(),
    ) {
        return;
    }
    let mut p = pair("tls-refuse", "source.example", &["localhost"], None);
    p.src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}, {"capability": "zero-copy-send", "state": true}]}),
    );
    let e = p
        .src
        .cmd_err("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    assert_eq!(
        e,
        "Zero copy only available for non-compressed non-TLS multifd migration"
    );
    p.src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "zero-copy-send", "state": false}, {"capability": "multifd", "state": false}]}),
    );
    p.src
        .cmd("migrate-set-parameters", json!({"tls-creds": "nope"}));
    p.src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", p.port)}),
    );
    let info = p.src.wait_migration_end(Duration::from_secs(30));
    assert_eq!(info["status"], "failed");
    assert_eq!(info["error-desc"], "No TLS credentials with id 'nope'");
    assert_source_intact(&mut p.src);
}
