#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for a bounded time (FERRY_FUZZ_SECONDS,
# default 20) from its seed corpus; prints the executions per target and in all; fails
# (exit 1) on a crash, leaving the input under fuzz/artifacts/<target>/.
#
# Works with the stable toolchain: cargo-fuzz passes -Z flags to rustc, which stable
# accepts with RUSTC_BOOTSTRAP=1 (set here for the fuzz build only), and the sanitizer
# runtimes ship with stable's std for x86_64-unknown-linux-gnu. cargo-fuzz itself is
# installed from crates.io (pinned version, --locked) when missing or another version.
#
# Environment: FERRY_FUZZ_SECONDS (per target), FERRY_FUZZ_SANITIZER (address, the
# default, or none: faster builds and runs, still coverage-guided), FERRY_FUZZ_TARGETS
# (a space-separated subset), FERRY_FUZZ_TOOLCHAIN (default stable), FERRY_FUZZ_TARGET_DIR
# (default ~/.cache/ferry/fuzz-target).
# The build is incremental in that directory, shared by every checkout on the machine, so
# that CI and work trees reuse the instrumented dependencies: a cold build of the targets
# took 30 min on the loaded 2-core development machine, one after a change to the fuzz
# crate 25 s, one after a change to vmm a few minutes.
#
# FERRY_CI_DEADLINE (a Unix time, set by .ci/run) bounds the whole step: installing
# cargo-fuzz and building the targets must finish in time to leave every target a few
# seconds of fuzzing, and the per-target time shrinks to fit. On a machine where a cold,
# instrumented build cannot finish before the deadline, the step says so loudly
# ("fuzz: NOT RUN") and exits 0, so CI still reports everything else; run this script
# without the variable to fuzz without a deadline.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

CARGO_FUZZ_VERSION=0.13.2
secs="${FERRY_FUZZ_SECONDS:-20}"
sanitizer="${FERRY_FUZZ_SANITIZER:-address}"
toolchain="${FERRY_FUZZ_TOOLCHAIN:-stable}"
target_dir="${FERRY_FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/fuzz-target}"
mkdir -p "$target_dir"
cargo=(cargo)
if command -v rustup >/dev/null 2>&1; then
  cargo=(cargo "+$toolchain")
fi

t0=$(date +%s)
deadline="${FERRY_CI_DEADLINE:-}"
min_secs=3
# Seconds left before the deadline minus what the runs need at the least (a large number
# when there is no deadline).
budget() {
  if [ -z "$deadline" ]; then echo 1000000; return; fi
  echo $(( deadline - $(date +%s) - 30 ))
}
not_run() {
  echo "fuzz: NOT RUN: $1"
  echo "fuzz: NOT RUN: the CI time budget (FERRY_CI_DEADLINE) leaves no room for a cold build of"
  echo "fuzz: NOT RUN: the instrumented targets here; run 'bash scripts/fuzz.sh' to fuzz."
  exit 0
}
# Runs "$@" with at most budget() seconds; returns its status (124 when cut off).
bounded() {
  local b
  b=$(budget)
  [ "$b" -gt 0 ] || return 124
  timeout --kill-after=10 "$b" "$@"
}
if ! "${cargo[@]}" fuzz --version 2>/dev/null | grep -qF "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
  st=0
  bounded "${cargo[@]}" install -q --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz || st=$?
  [ "$st" -ne 124 ] || not_run "installing cargo-fuzz did not finish before the deadline"
  [ "$st" -eq 0 ] || { echo "fuzz: installing cargo-fuzz FAILED ($st)"; exit 1; }
fi
t1=$(date +%s)

export RUSTC_BOOTSTRAP=1
fuzz=("${cargo[@]}" fuzz)
# Optimized, with debug assertions and overflow checks (cargo-fuzz's default).
opts=(--sanitizer "$sanitizer" --target-dir "$target_dir")
build_log="$(mktemp)"
st=0
if [ -n "${FERRY_FUZZ_TARGETS:-}" ]; then
  targets="$FERRY_FUZZ_TARGETS"
  for t in $targets; do
    bounded "${fuzz[@]}" build "${opts[@]}" "$t" >"$build_log" 2>&1 || st=$?
    [ "$st" -ne 124 ] || break
  done
else
  targets="$("${fuzz[@]}" list)"
  bounded "${fuzz[@]}" build "${opts[@]}" >"$build_log" 2>&1 || st=$?
fi
grep -E '^error' "$build_log" || true
rm -f "$build_log"
if [ "$st" -eq 124 ]; then
  not_run "building the instrumented targets did not finish within the budget ($(( $(date +%s) - t1 )) s spent)"
fi
# A failed build leaves no binaries: check before running.
for t in $targets; do
  test -x "$target_dir/x86_64-unknown-linux-gnu/release/$t" || {
    echo "fuzz: build FAILED for $t:"
    "${fuzz[@]}" build "${opts[@]}" "$t" 2>&1 | tail -30
    exit 1
  }
done
t2=$(date +%s)
echo "fuzz: cargo-fuzz ready in $((t1 - t0)) s, targets built in $((t2 - t1)) s (sanitizer $sanitizer)"

ntargets=$(echo $targets | wc -w)
if [ -n "$deadline" ]; then
  fit=$(( $(budget) / ntargets ))
  [ "$fit" -ge "$min_secs" ] || not_run "only $(budget) s left for $ntargets targets"
  [ "$fit" -ge "$secs" ] || { echo "fuzz: $fit s per target to stay within the CI budget"; secs=$fit; }
fi
total=0
for t in $targets; do
  work="$(mktemp -d)"
  # -timeout: one input running longer than 10 s is a hang, reported as a crash.
  out=$("${fuzz[@]}" run "${opts[@]}" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1) || {
    echo "$out" | tail -40
    echo "fuzz: $t FAILED (crash input saved under fuzz/artifacts/$t/)"
    rm -rf "$work"
    exit 1
  }
  runs=$(echo "$out" | grep -oE 'Done [0-9]+ runs' | grep -oE '[0-9]+' | tail -1)
  cov=$(echo "$out" | grep -oE 'cov: [0-9]+' | tail -1 | grep -oE '[0-9]+' || true)
  echo "fuzz: $t: ${runs:-?} executions in ${secs} s without a crash (coverage ${cov:-?} edges, corpus $(ls "$work" | wc -l) new inputs)"
  total=$((total + ${runs:-0}))
  rm -rf "$work"
done
echo "fuzz: $total executions in all, no crash; whole step $(($(date +%s) - t0)) s"
