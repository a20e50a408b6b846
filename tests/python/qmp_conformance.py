#!/usr/bin/env python3
"""QMP conformance of a running `ferry run --qmp SOCKET`, checked with QEMU's own client.

Usage: qmp_conformance.py SOCKET WS_PAGES

The client is `qemu.qmp` (QMPClient, asyncio), which no one in this project wrote.
The script connects and negotiates, runs every command the VMM offers, checks the
results and QEMU's error texts for bad input (unknown commands, wrong argument types,
out-of-range parameters, incompatible capabilities), checks that a rejected set
leaves every setting as it was, sends malformed JSON on a second, raw connection,
watches STOP/RESUME/SHUTDOWN events, and ends with `quit`.

Prints one line per check; exits non-zero (with the reason) at the first failure.
"""

import asyncio
import json
import os
import stat
import sys

from qemu.qmp import ExecuteError, QMPClient

TIMEOUT = 20.0

# Every command the VMM must offer (issue 4 plus the migration commands and Ferry's own).
EXPECTED_COMMANDS = {
    "qmp_capabilities", "query-version", "query-commands", "query-status", "stop", "cont",
    "quit", "query-migrate-capabilities", "migrate-set-capabilities",
    "query-migrate-parameters", "migrate-set-parameters", "query-migrate", "migrate",
    "migrate-incoming", "migrate_cancel", "migrate-continue", "ferry-guest-verify",
    "ferry-host-verify", "ferry-guest-progress", "ferry-guest-set-rate",
    "ferry-memory-digest", "ferry-serial-tail",
}

# QEMU 8.1's capabilities as query-migrate-capabilities lists them (no "block").
QEMU_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "return-path", "pause-before-switchover",
    "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
    "postcopy-preempt", "switchover-ack",
]

# QEMU 8.1's parameter defaults (migration/options.c).
QEMU_DEFAULTS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "compress-level": 1, "compress-threads": 8, "compress-wait-thread": True,
    "decompress-threads": 2, "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False, "tls-creds": "",
    "tls-hostname": "", "tls-authz": "", "max-bandwidth": 128 << 20, "downtime-limit": 300,
    "x-checkpoint-delay": 20000, "block-incremental": False, "multifd-channels": 2,
    "xbzrle-cache-size": 64 << 20, "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99,
    "multifd-compression": "none", "multifd-zlib-level": 1, "multifd-zstd-level": 1,
}

# (arguments, QEMU's exact error text): wrong types and values out of range.
BAD_PARAMETERS = [
    ({"compress-level": 10}, "Parameter 'compress_level' expects a value between 0 and 9"),
    ({"compress-threads": 0}, "Parameter 'compress_threads' expects a value between 1 and 255"),
    ({"decompress-threads": 0},
     "Parameter 'decompress_threads' expects a value between 1 and 255"),
    ({"throttle-trigger-threshold": 101},
     "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    ({"cpu-throttle-initial": 100},
     "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    ({"cpu-throttle-increment": 0},
     "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    ({"downtime-limit": 2000001},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ({"multifd-zlib-level": 10},
     "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ({"multifd-zstd-level": 21},
     "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ({"xbzrle-cache-size": 1000},
     "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    ({"cpu-throttle-initial": 50, "max-cpu-throttle": 40},
     "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ({"announce-step": 10001}, "Parameter 'announce_step' expects a value between 0 and 10000"),
    # A valid value beside an invalid one: the whole set is refused, nothing applied.
    ({"downtime-limit": 123, "compress-level": 10},
     "Parameter 'compress_level' expects a value between 0 and 9"),
    # Wrong JSON types, as QEMU's input visitor words them.
    ({"downtime-limit": "fast"}, "Parameter 'downtime-limit' expects uint64"),
    ({"compress-level": 256}, "Parameter 'compress-level' expects uint8_t"),
    ({"compress-wait-thread": "yes"},
     "Invalid parameter type for 'compress-wait-thread', expected: boolean"),
    ({"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    ({"multifd-compression": "lz5"},
     "Parameter 'multifd-compression' does not accept value 'lz5'"),
    ({"no-such-parameter": 1}, "Parameter 'no-such-parameter' is unexpected"),
]

# (capabilities to enable at once, QEMU's exact error text).
BAD_CAPABILITIES = [
    (["postcopy-ram", "multifd"], "Postcopy is not yet compatible with multifd"),
    (["multifd", "compress"], "Multifd is not compatible with compress"),
    (["postcopy-preempt"], "Postcopy preempt requires postcopy-ram"),
    (["switchover-ack"], "Capability 'switchover-ack' requires capability 'return-path'"),
    (["background-snapshot", "auto-converge"],
     "Background-snapshot is not compatible with auto-converge"),
    (["zero-copy-send"], "Zero copy only available for non-compressed non-TLS multifd migration"),
    (["x-colo"], "QEMU compiled without replication module can't enable COLO"),
]

# (raw bytes, expected reply): malformed input on a raw connection.
RAW_CASES = [
    (b'{"execute": }', ("GenericError", "JSON parse error, expecting value")),
    (b'}', ("GenericError", "JSON parse error, expecting value")),
    (b'[1, 2]', ("GenericError", "QMP input must be a JSON object")),
    (b'"query-status"', ("GenericError", "QMP input must be a JSON object")),
    (b'{"arguments": {}}', ("GenericError", "QMP input lacks member 'execute'")),
    (b'{"execute": 1}', ("GenericError", "QMP input member 'execute' must be a string")),
    (b'{"execute": "query-status", "arguments": []}',
     ("GenericError", "QMP input member 'arguments' must be an object")),
    (b'{"execute": "query-status", "colour": 1}',
     ("GenericError", "QMP input member 'colour' is unexpected")),
    (b'{"execute": "no-such-command", "id": "r1"}',
     ("CommandNotFound", "The command no-such-command has not been found")),
    # QEMU's JSON accepts single-quoted strings.
    (b"{'execute': 'query-status', 'id': 'sq'}", "return"),
]


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok: {what}", flush=True)


async def expect_error(qmp, cmd, args, error_class, desc):
    try:
        got = await qmp.execute(cmd, args)
    except ExecuteError as err:
        check(err.error_class == error_class and str(err) == desc,
              f"{cmd} {json.dumps(args)} -> {error_class}: {desc!r} (got {err.error_class}: "
              f"{str(err)!r})")
        return
    raise SystemExit(f"FAIL: {cmd} {json.dumps(args)} succeeded with {got!r}, "
                     f"expected {error_class}: {desc!r}")


async def wait_event(listener, name):
    event = await asyncio.wait_for(listener.get(), TIMEOUT)
    check(event["event"] == name and "seconds" in event["timestamp"]
          and "microseconds" in event["timestamp"],
          f"{name} event arrives with a timestamp ({event})")
    return event


async def basics(qmp, ws_pages):
    version = qmp.greeting.QMP.version
    check(version["qemu"] == {"major": 8, "minor": 1, "micro": 0},
          f"greeting announces QEMU 8.1.0 ({version})")
    v = await qmp.execute("query-version")
    check(v["qemu"] == {"major": 8, "minor": 1, "micro": 0} and isinstance(v["package"], str),
          f"query-version ({v})")
    names = {c["name"] for c in await qmp.execute("query-commands")}
    missing = EXPECTED_COMMANDS - names
    check(not missing, f"query-commands lists every command (missing: {sorted(missing)})")
    status = await qmp.execute("query-status")
    check(status == {"running": True, "singlestep": False, "status": "running"},
          f"query-status of a booted guest ({status})")
    progress = await qmp.execute("ferry-guest-progress")
    check(progress["pages-written"] > 0 and len(progress["vcpus"]) >= 1,
          f"ferry-guest-progress ({progress['pages-written']} pages)")
    tail = await qmp.execute("ferry-serial-tail")
    check("Ferry test guest" in tail["output"], "ferry-serial-tail shows the banner")
    digest = await qmp.execute("ferry-memory-digest")
    check(len(digest["digest"]) == 16 and digest["size"] > 0, f"ferry-memory-digest {digest}")
    check(await qmp.execute("ferry-guest-set-rate", {"rate": 5000}) == {},
          "ferry-guest-set-rate")
    info = await qmp.execute("query-migrate")
    check(info == {}, f"query-migrate with no migration is empty ({info})")
    check(await qmp.execute("migrate_cancel") == {}, "migrate_cancel with no migration")
    await expect_error(qmp, "migrate-continue", {"state": "pre-switchover"}, "GenericError",
                       "Migration not in expected state: none")
    await expect_error(qmp, "migrate-incoming", {"uri": "tcp:127.0.0.1:1"}, "GenericError",
                       "'-incoming' was not specified on the command line")
    await expect_error(qmp, "migrate", {}, "GenericError", "Parameter 'uri' is missing")
    verify = await qmp.execute("ferry-guest-verify")
    check(verify == {"pages-checked": ws_pages, "bad-pages": 0},
          f"ferry-guest-verify of a running guest ({verify})")


async def stop_and_cont(qmp, ws_pages):
    with qmp.listener("STOP") as stops:
        check(await qmp.execute("stop") == {}, "stop")
        await wait_event(stops, "STOP")
    status = await qmp.execute("query-status")
    check(status["status"] == "paused" and status["running"] is False,
          f"query-status after stop ({status})")
    p1 = (await qmp.execute("ferry-guest-progress"))["pages-written"]
    await asyncio.sleep(0.2)
    p2 = (await qmp.execute("ferry-guest-progress"))["pages-written"]
    check(p1 == p2, f"a stopped guest writes nothing ({p1} -> {p2})")
    host = await qmp.execute("ferry-host-verify")
    check(host["bad-pages"] == 0 and host["pages-checked"] > 0,
          f"ferry-host-verify of the stopped guest ({host})")
    await expect_error(qmp, "ferry-guest-verify", {}, "GenericError",
                       "the guest is not running: it verifies its memory itself, so resume it "
                       "(cont) first")
    with qmp.listener("RESUME") as resumes:
        check(await qmp.execute("cont") == {}, "cont")
        await wait_event(resumes, "RESUME")
    status = await qmp.execute("query-status")
    check(status["status"] == "running", f"query-status after cont ({status})")
    await expect_error(qmp, "ferry-host-verify", {}, "GenericError",
                       "stop the guest first: a host-side check needs still memory")


async def capabilities(qmp):
    caps = await qmp.execute("query-migrate-capabilities")
    check([c["capability"] for c in caps] == QEMU_CAPABILITIES,
          "query-migrate-capabilities lists QEMU 8.1's capabilities in order")
    check(all(c["state"] is False for c in caps), "every capability starts off")
    on = {"capabilities": [{"capability": "xbzrle", "state": True},
                           {"capability": "auto-converge", "state": True}]}
    check(await qmp.execute("migrate-set-capabilities", on) == {}, "enable xbzrle+auto-converge")
    now = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
    check(now["xbzrle"] and now["auto-converge"] and not now["multifd"],
          "query shows exactly the enabled capabilities")
    before = await qmp.execute("query-migrate-capabilities")
    for names, desc in BAD_CAPABILITIES:
        args = {"capabilities": [{"capability": n, "state": True} for n in names]}
        await expect_error(qmp, "migrate-set-capabilities", args, "GenericError", desc)
    type_errors = [
        ({"capabilities": "xbzrle"},
         "Invalid parameter type for 'capabilities', expected: array"),
        ({"capabilities": [{"capability": "xbzrle", "state": "yes"}]},
         "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
        ({"capabilities": [{"capability": "warp-drive", "state": True}]},
         "Parameter 'capability' does not accept value 'warp-drive'"),
        ({}, "Parameter 'capabilities' is missing"),
        ({"capabilities": [], "extra": 1}, "Parameter 'extra' is unexpected"),
    ]
    for args, desc in type_errors:
        await expect_error(qmp, "migrate-set-capabilities", args, "GenericError", desc)
    after = await qmp.execute("query-migrate-capabilities")
    check(after == before, "capabilities unchanged after every rejected set")
    off = {"capabilities": [{"capability": "xbzrle", "state": False},
                            {"capability": "auto-converge", "state": False}]}
    check(await qmp.execute("migrate-set-capabilities", off) == {}, "disable them again")


async def parameters(qmp):
    params = await qmp.execute("query-migrate-parameters")
    wrong = {k: (params.get(k), v) for k, v in QEMU_DEFAULTS.items() if params.get(k) != v}
    check(not wrong, f"query-migrate-parameters has QEMU 8.1's defaults (differences: {wrong})")
    change = {"downtime-limit": 500, "max-bandwidth": 1 << 30, "multifd-channels": 4}
    check(await qmp.execute("migrate-set-parameters", change) == {}, "migrate-set-parameters")
    now = await qmp.execute("query-migrate-parameters")
    check(all(now[k] == v for k, v in change.items()), "query shows the new values")
    for args, desc in BAD_PARAMETERS:
        await expect_error(qmp, "migrate-set-parameters", args, "GenericError", desc)
        after = await qmp.execute("query-migrate-parameters")
        check(after == now, f"parameters unchanged after rejecting {json.dumps(args)}")


async def readline(reader):
    line = await asyncio.wait_for(reader.readline(), TIMEOUT)
    if not line:
        raise SystemExit("FAIL: the server closed the raw connection")
    check(line.endswith(b"\r\n"), f"server lines end in CRLF ({line[-2:]!r})")
    return json.loads(line)


async def raw_connection(path):
    """Malformed JSON and protocol errors on a second connection, beside the first."""
    reader, writer = await asyncio.open_unix_connection(path)
    greeting = await readline(reader)
    check("QMP" in greeting, "raw connection gets the greeting")
    writer.write(b'{"execute": "query-status", "id": 1}\n')
    await writer.drain()
    reply = await readline(reader)
    check(reply.get("error", {}).get("class") == "CommandNotFound"
          and reply["error"]["desc"] == "Expecting capabilities negotiation with "
          "'qmp_capabilities'" and reply.get("id") == 1,
          f"commands before negotiation are refused ({reply})")
    writer.write(b'{"execute": "qmp_capabilities"}\n')
    await writer.drain()
    check(await readline(reader) == {"return": {}}, "raw connection negotiates")
    for raw, want in RAW_CASES:
        writer.write(raw + b"\n")
        await writer.drain()
        reply = await readline(reader)
        if want == "return":
            check("return" in reply, f"{raw!r} -> return ({reply})")
            continue
        err = reply.get("error", {})
        check((err.get("class"), err.get("desc")) == want, f"{raw!r} -> {want} (got {reply})")
    # Bytes that are no JSON at all, then a good command: the connection survives.
    writer.write(b"\x01\xff garbage @@@\n")
    writer.write(b'{"execute": "query-status", "id": "after"}\n')
    await writer.drain()
    while True:
        reply = await readline(reader)
        if reply.get("id") == "after":
            break
        check(reply.get("error", {}).get("desc", "").startswith("JSON parse error"),
              f"garbage gets a JSON parse error ({reply})")
    check(reply.get("return", {}).get("status") == "running",
          "the raw connection still works after the garbage")
    writer.close()
    await writer.wait_closed()


async def main(path, ws_pages):
    mode = stat.S_IMODE(os.stat(path).st_mode)
    check(mode == 0o600, f"socket mode is 0600 (got {mode:o})")
    qmp = QMPClient("ferry-conformance")
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)
    check(True, "qemu.qmp connected and negotiated")
    await basics(qmp, ws_pages)
    await stop_and_cont(qmp, ws_pages)
    await capabilities(qmp)
    await parameters(qmp)
    await expect_error(qmp, "no-such-command", {}, "CommandNotFound",
                       "The command no-such-command has not been found")
    await expect_error(qmp, "query-status", {"verbose": True}, "GenericError",
                       "Parameter 'verbose' is unexpected")
    await expect_error(qmp, "ferry-guest-set-rate", {"rate": "fast"}, "GenericError",
                       "Parameter 'rate' expects uint64")
    await raw_connection(path)
    status = await qmp.execute("query-status")
    check(status["status"] == "running", "the first client still works beside the raw one")
    with qmp.listener("SHUTDOWN") as shutdowns:
        check(await qmp.execute("quit") == {}, "quit")
        event = await wait_event(shutdowns, "SHUTDOWN")
        check(event["data"] == {"guest": False, "reason": "host-qmp-quit"},
              f"SHUTDOWN says why ({event['data']})")
    try:
        await qmp.disconnect()
    except Exception as err:  # the server hangs up after quit, as QEMU does
        print(f"note: disconnect after quit: {err!r}")
    print("qmp conformance: all checks passed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
