#!/usr/bin/env bash
# The --grid paper study timed by benchmarks/grid_timing.py with an older mechmem and with this one, on
# the same extracted features (the older run extracts; the newer one reuses its store):
#   BEFORE=<folder holding the older mechmem package> bash benchmarks/grid_before_after.sh SIZE N EPOCHS OUT
# N: the first N four-class and N three-class paper rows; EPOCHS: every CNN trains exactly that many.
# Logs and timing.json of both land in OUT/before and OUT/after.
set -euo pipefail
size=$1; n=$2; epochs=$3; out=$4
args=(--size "$size" --rows-per-class-count "$n" --epochs "$epochs" --patience 0)
mkdir -p "$out"
PYTHONPATH="$BEFORE:${PYTHONPATH:-}" python3 benchmarks/grid_timing.py "${args[@]}" --out "$out/before" 2>&1 \
    | grep -v "it/s]\|s/it]" | tee "$out/before.log"
mkdir -p "$out/after"
cp -al "$out/before/features" "$out/after/features"   # hard links: the same store, no copy
cp "$out/before/model_view_tokens.npz" "$out/after/"
python3 benchmarks/grid_timing.py "${args[@]}" --out "$out/after" 2>&1 | grep -v "it/s]\|s/it]" | tee "$out/after.log"
