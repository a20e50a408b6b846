#!/bin/bash
# Downtime of a live migration over a slow, deeply buffered link: source and destination run
# in one network namespace whose loopback is shaped by a token bucket (tc tbf: RATE, with a
# queue of QLAT), the guest rewrites WS of memory at PR pages/s, downtime-limit is DL ms.
# Prints one line per run (status, downtime, total time, dirty syncs, MiB sent).
#
# usage: bash scripts/bench-slow-link.sh [FERRY_BINARY] [RUNS]
#   env: RATE (50mbit) QLAT (1s) WS (64M) PR (1000) DL (300) SLEEP (4: seconds the guest
#        runs before the migration, to fill its working set)
# Needs root, `ip netns` and the sch_tbf qdisc (netem is not needed).
set -euo pipefail
F=${1:-target/release/ferry}
RUNS=${2:-3}
F=$(realpath "$F")
NS=ferry-slow-$$
D=$(mktemp -d /tmp/ferry-slow-link.XXXXXX)
cleanup() {
    pkill -f "$D/" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" tc qdisc replace dev lo root tbf rate "${RATE:-50mbit}" burst 256kb latency "${QLAT:-1s}"
qmp() { "$F" qmp "$@"; }
for run in $(seq "$RUNS"); do
    rm -f "$D"/*.sock
    ip netns exec "$NS" "$F" run --memory 512M --vcpus 1 --workload "working-set=${WS:-64M},rate=${PR:-1000}" \
        --qmp "$D/src.sock" --serial none >"$D/src.log" 2>&1 &
    ip netns exec "$NS" "$F" run --memory 512M --vcpus 1 --incoming tcp:127.0.0.1:47111 \
        --qmp "$D/dst.sock" --serial none >"$D/dst.log" 2>&1 &
    for _ in $(seq 100); do [ -S "$D/src.sock" ] && [ -S "$D/dst.sock" ] && break; sleep 0.1; done
    sleep "${SLEEP:-4}"
    qmp "$D/src.sock" migrate-set-parameters "{\"downtime-limit\":${DL:-300}}" >/dev/null
    qmp "$D/src.sock" migrate '{"uri":"tcp:127.0.0.1:47111"}' >/dev/null
    for _ in $(seq 1200); do
        case "$(qmp "$D/src.sock" query-migrate)" in *'"completed"'*|*'"failed"'*) break ;; esac
        sleep 0.1
    done
    qmp "$D/src.sock" query-migrate | python3 -c 'import json,sys
d=json.load(sys.stdin); r=d["ram"]
print("run", sys.argv[1], d["status"], "downtime", d.get("downtime"), "ms, total", d["total-time"], "ms, syncs", r["dirty-sync-count"], ",", r["transferred"]>>20, "MiB")' "$run"
    pkill -f "$D/" 2>/dev/null || true
    wait 2>/dev/null || true
done
