//! QMP conformance against a real `ferry run --qmp`, judged by a client no one here wrote:
//! QEMU's `qemu.qmp` Python library runs `tests/python/qmp_conformance.py`.
//!
//! The interpreter is `$FERRY_PYTHON`, else the workspace's `.venv/bin/python` (made by
//! scripts/setup.sh); the test skips, saying why, when `qemu.qmp` cannot be imported.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{kvm_missing, skip_unless, Ferry, FerryOptions};

/// Why `qemu.qmp` cannot be used, or the interpreter that has it.
fn python_with_qemu_qmp() -> Result<PathBuf, String> {
    let python = match std::env::var_os("FERRY_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".venv/bin/python"),
    };
    let out = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if out.status.success() {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import qemu.qmp (run scripts/setup.sh, or set FERRY_PYTHON): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

fn small_guest() -> FerryOptions {
    FerryOptions {
        memory: "64M".into(),
        vcpus: 2,
        workload: Some("working-set=8M,rate=20000".into()),
        ..FerryOptions::default()
    }
}

#[test]
fn qemu_qmp_client_finds_ferry_conformant() {
    const NAME: &str = "qemu_qmp_client_finds_ferry_conformant";
    if skip_unless(NAME, kvm_missing()) {
        return;
    }
    let python = match python_with_qemu_qmp() {
        Ok(p) => p,
        Err(why) => {
            skip_unless(NAME, Some(why));
            return;
        }
    };
    let mut ferry = Ferry::start("qmp-conformance", &small_guest());
    let meta = std::fs::metadata(&ferry.qmp_path).expect("QMP socket exists");
    assert!(meta.file_type().is_socket(), "--qmp makes a unix socket");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the QMP socket is private to its owner"
    );
    // The harness's own client holds one connection; the script opens two more beside it.
    assert_eq!(ferry.status(), "running");
    let out = Command::new(&python)
        .arg(script("qmp_conformance.py"))
        .arg(&ferry.qmp_path)
        .arg((8u64 << 20 >> 12).to_string())
        .output()
        .expect("run the conformance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the qemu.qmp conformance script failed ({}):\n{stdout}\n{stderr}\nferry log:\n{}",
        out.status,
        ferry.log()
    );
    assert!(stdout.contains("qmp conformance: all checks passed"));
    // The script ends with `quit`: the process exits cleanly.
    assert_eq!(
        ferry.wait_exit(Duration::from_secs(10)),
        Some(0),
        "ferry exits with status 0 after quit:\n{}",
        ferry.log()
    );
}

#[test]
fn settings_survive_a_client_reconnecting() {
    const NAME: &str = "settings_survive_a_client_reconnecting";
    if skip_unless(NAME, kvm_missing()) {
        return;
    }
    let mut ferry = Ferry::start("qmp-reconnect", &small_guest());
    ferry.cmd("migrate-set-parameters", json!({"downtime-limit": 777}));
    // Several clients one after another: each new connection sees the same VMM.
    for round in 0..5 {
        let mut c = vmm::qmp::QmpClient::connect(&ferry.qmp_path)
            .unwrap_or_else(|e| panic!("connection {round}: {e}"));
        let p = c
            .execute("query-migrate-parameters", None)
            .unwrap_or_else(|e| panic!("connection {round}: {e}"));
        assert_eq!(p["downtime-limit"], 777, "connection {round}");
    }
    assert_eq!(ferry.status(), "running");
}
