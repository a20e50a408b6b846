//! Conformance smoke test: QEMU's own Python client (`qemu.qmp`, async and
//! legacy APIs) drives a Ferry QMP server. Runs when `qemu.qmp` is importable
//! by `$FERRY_PYTHON` (default `python3`), otherwise says why it skipped.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::process::Command;
use std::sync::Arc;

use serde_json::{json, Value};
use vmm::qmp::{CommandTable, EventBus, QmpServer, ServerConfig};

const SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

async def main(path):
    qmp = QMPClient('ferry-test')
    await qmp.connect(path)
    version = qmp.greeting.QMP.version
    assert version['qemu'] == {'major': 8, 'minor': 1, 'micro': 0}, version
    assert 'oob' in qmp.greeting.QMP.capabilities
    assert await qmp.execute('echo', {'a': [1, 'x']}) == {'a': [1, 'x']}
    try:
        await qmp.execute('nope')
        raise SystemExit('nope did not fail')
    except ExecuteError as err:
        assert err.error_class == 'CommandNotFound', err.error_class
        assert str(err) == 'The command nope has not been found', str(err)
    with qmp.listener('STOP') as listener:
        await qmp.execute('stop')
        event = await asyncio.wait_for(listener.get(), 10)
        assert event['event'] == 'STOP' and 'timestamp' in event, event
    # Pipelined requests, answered in order and routed by id.
    got = await asyncio.gather(*[qmp.execute('echo', {'i': i}) for i in range(20)])
    assert [g['i'] for g in got] == list(range(20)), got
    assert await qmp.execute('ping-oob', oob=True) == {'pong': True}
    await qmp.disconnect()

def legacy_api(path):
    legacy = QEMUMonitorProtocol(path)
    greeting = legacy.connect(negotiate=True)
    assert greeting['QMP']['version']['qemu']['major'] == 8
    assert legacy.cmd('echo', k='v') == {'k': 'v'}
    raw = legacy.cmd_raw('nope')
    assert raw['error']['class'] == 'CommandNotFound', raw
    legacy.close()
    print('qemu.qmp conformance ok')

asyncio.run(main(sys.argv[1]))
legacy_api(sys.argv[1])
"#;

fn python() -> String {
    std::env::var("FERRY_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn have_qemu_qmp(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn qemu_python_client_drives_the_server() {
    let python = python();
    if !have_qemu_qmp(&python) {
        eprintln!(
            "skipped: {python} cannot import qemu.qmp (pip install qemu.qmp, or set FERRY_PYTHON)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-qmp-python-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("qmp.sock");

    let events = EventBus::new();
    let bus = events.clone();
    let mut table = CommandTable::new();
    table
        .register("echo", |args| Ok(Value::Object(args)))
        .register_no_args("stop", move || {
            bus.emit("STOP", None);
            Ok(json!({}))
        })
        .register_oob("ping-oob", |_| Ok(json!({"pong": true})));
    let server = QmpServer::start(&path, Arc::new(table), events, ServerConfig::default()).unwrap();

    let out = Command::new(&python)
        .args(["-c", SCRIPT])
        .arg(&path)
        .output()
        .unwrap();
    server.join();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "qemu.qmp failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("qemu.qmp conformance ok"));
}
