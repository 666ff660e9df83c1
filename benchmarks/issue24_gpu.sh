#!/usr/bin/env bash
# Issue 24's GPU measurements in one call, an older mechmem against this one on the same machine:
#   BEFORE=<folder holding an older mechmem package> bash benchmarks/issue24_gpu.sh OUT [STEPS]
# STEPS (default "profile two-rows greedy"; also "two-rows-12b", "grid-epoch"), each written to OUT:
#   profile    one epoch of a whole 2.8b group's steps (54 tasks x 8 configs, 32 layers), before and after
#              (cnn_profile.py --steps-only: seconds a step, and its parts);
#   two-rows   the two-row 2.8b study, 6 fixed epochs, controls and probe (grid_timing.py), this code only:
#              its phases against the table of benchmarks/README.md (the background probe's wait, the CNNs);
#   two-rows-12b  the same at Pythia-12b (random weights, compatibility mode; model loading is its own phase);
#   grid-epoch all 54 rows at 2.8b, one fixed epoch (a measured epoch of the whole grid: x 22.2 epochs for
#              the converged protocol's CNNs), this code only; about 6 minutes;
#   greedy     the second testbed's label decoding (greedy_timing.py), per attention and batch size.
# BEFORE for this session's lever: `mkdir -p .before && git archive 38ffbfa mechmem | tar -x -C .before &&
# find .before -type f ! -name '*.py' -delete` (carried with the call; .before is ignored by git).
set -uo pipefail
out=$1
steps=${2:-profile two-rows greedy}
mkdir -p "$out"
now=$PYTHONPATH
# Progress bars to lines, their updates dropped, line by line: a call cut at its time limit still
# brings back what was printed (a grid-epoch cut at 370 s on 2026-12-07 came back empty, held in tr's buffer).
lines() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "it/s\|s/it"; }
for step in $steps; do
    echo "== $step"
    case $step in
        profile)
            for v in before after; do
                path=$now; [ $v = before ] && path=${BEFORE:?set BEFORE}:$now
                PYTHONPATH=$path python3 benchmarks/cnn_profile.py --steps-only --protocol converged --samples 1024 \
                    --paths fft --rows 25 > "$out/profile_$v.txt" 2>&1
                grep -A5 "a step" "$out/profile_$v.txt" | sed "s/^/$v /"
            done ;;
        two-rows|two-rows-12b)
            size=2.8b; [ "$step" = two-rows-12b ] && size=12b
            python3 benchmarks/grid_timing.py --size $size --rows-per-class-count 1 --epochs 6 --patience 0 \
                --out "/tmp/issue24_$step" 2>&1 | lines > "$out/$step.txt"
            cp "/tmp/issue24_$step/timing.json" "$out/${step}_timing.json"
            tail -20 "$out/$step.txt" ;;
        grid-epoch)
            python3 benchmarks/grid_timing.py --size 2.8b --epochs 1 --patience 0 \
                --out /tmp/issue24_grid_epoch 2>&1 | lines > "$out/grid_epoch.txt"
            cp /tmp/issue24_grid_epoch/timing.json "$out/grid_epoch_timing.json"
            tail -20 "$out/grid_epoch.txt" ;;
        greedy)
            python3 benchmarks/greedy_timing.py --windows 32768 --batch-sizes 4096 8192 --dtypes bfloat16 \
                --attention eager sdpa --out "$out/greedy.json" 2>&1 | grep -v Warn ;;
        *)
            echo "issue24_gpu.sh: unknown step '$step' (profile, two-rows, two-rows-12b, grid-epoch, greedy)" >&2
            exit 2 ;;
    esac
done
