#!/usr/bin/env bash
# One GPU against torchrun on two, and one GPU against itself, on the offline testbed:
#   bash benchmarks/multi_gpu_check.sh OUTDIR [more run_alignment.py arguments]
# Writes OUTDIR/one_vs_one.json and OUTDIR/one_vs_two.json (benchmarks/compare_runs.py).
set -euo pipefail
out=$1; shift
args=(--configs paper --quiet "$@")
CUDA_VISIBLE_DEVICES=0 python3 experiments/run_alignment.py "${args[@]}" --out "$out/one_a" &
CUDA_VISIBLE_DEVICES=1 python3 experiments/run_alignment.py "${args[@]}" --out "$out/one_b" &
wait
torchrun --nproc-per-node 2 experiments/run_alignment.py "${args[@]}" --out "$out/two"
python3 benchmarks/compare_runs.py "$out/one_a" "$out/one_b" | tee "$out/one_vs_one.json"
python3 benchmarks/compare_runs.py "$out/one_a" "$out/two" | tee "$out/one_vs_two.json"
