#!/usr/bin/env bash
# Runs Ferry's whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins
./target/release/ferry probe || true
export FERRY_BIN="$PWD/target/release/ferry"
export FERRY_PYTHON="$PWD/.venv/bin/python"
# Each guest test has its own watchdog (tests/src/watchdog.rs); this bounds the whole run
# so that CI reports a failure instead of hanging if something escapes it.
timeout --kill-after=30 "${FERRY_TEST_BUDGET_SECS:-2700}" \
    cargo test --release --workspace --no-fail-fast -- --test-threads="${FERRY_TEST_THREADS:-2}"
