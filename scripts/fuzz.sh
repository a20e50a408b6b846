#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each; FERRY_FUZZ_SECONDS overrides).
# Needs a nightly toolchain (cargo fuzz builds with -Zsanitizer=address); installs cargo-fuzz
# when missing. Without nightly it says so and does nothing: the property tests in the main
# suite still feed random input to every decoder.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${FERRY_FUZZ_SECONDS:-20}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: SKIP: no nightly toolchain on this machine (cargo fuzz needs one)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install -q --locked cargo-fuzz
fi
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build -O $targets >/dev/null
total=0
for t in $targets; do
  work="$(mktemp -d)"
  out=$(cargo +nightly fuzz run -O "$t" "$work" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1) || {
    echo "$out" | tail -40
    echo "fuzz: $t FAILED (crash input saved under fuzz/artifacts/$t/)"
    exit 1
  }
  runs=$(echo "$out" | grep -oE 'Done [0-9]+ runs' | grep -oE '[0-9]+' | tail -1)
  echo "fuzz: $t: ${runs:-?} executions in ${secs}s without a crash"
  total=$((total + ${runs:-0}))
  rm -rf "$work"
done
echo "fuzz: $total executions in all"
