#!/usr/bin/env bash
# Makes the two 2 GiB guest-memory images that `ferry bench migrate` loads (mixed: half zero
# pages, half pages of /usr/lib; random: incompressible) with shared/bench-data/gen_dataset.py,
# into a cache directory, skipping an image that is already there and complete.
#
# usage: scripts/bench-data.sh [DIR]
#   DIR defaults to $FERRY_BENCH_DATA, else ${XDG_CACHE_HOME:-$HOME/.cache}/ferry/bench-data.
#   $FERRY_GEN_DATASET names the generator (default: shared/bench-data/gen_dataset.py beside
#   this checkout). Prints the directory on the last line.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${FERRY_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/bench-data}}"
gen="${FERRY_GEN_DATASET:-}"
if [ -z "$gen" ]; then
    for candidate in "$here/../shared/bench-data/gen_dataset.py" "$here/shared/bench-data/gen_dataset.py"; do
        if [ -f "$candidate" ]; then
            gen="$candidate"
            break
        fi
    done
fi
if [ -z "$gen" ] || [ ! -f "$gen" ]; then
    echo "bench-data: gen_dataset.py not found (set FERRY_GEN_DATASET)" >&2
    exit 1
fi
size=$((2 * 1024 * 1024 * 1024))
mkdir -p "$dir"
for kind in mixed random; do
    out="$dir/$kind.img"
    if [ -f "$out" ] && [ "$(stat -c %s "$out")" -eq "$size" ]; then
        echo "bench-data: $out is there" >&2
        continue
    fi
    echo "bench-data: generating $out (2 GiB; this takes a minute or two)" >&2
    rm -f "$out.partial"
    python3 "$gen" "$kind" "$out.partial" >&2
    mv "$out.partial" "$out"
done
echo "$dir"
