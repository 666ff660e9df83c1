#!/usr/bin/env bash
# Issue 23's study of the second testbed, once it is built (python -m mechmem.testbed.build --preset
# pile-regime --device cuda), on the same machine; every step resumes where a cut-off call left it:
#   MECHMEM_CACHE=$PWD/.device/cache DEVICE=cuda bash benchmarks/pile_study.sh OUT [NAME]
# 1. the paper's grid on the final checkpoint, 1000 + 500 a class, converged, controls and probe
#    (OUT/grid; paper_agreement.json: Spearman with the paper's 12B figures, the headline row's rank,
#    CNN against probe);
# 2. the quick preset on every checkpoint, each with the labels its build gave it (OUT/checkpoints,
#    checkpoints.png: alignment across training);
# 3. localization of "Non-Memo, Guess, Others" on the grid's CNNs and ablation of its top heads
#    against random heads (OUT/localize, OUT/ablate);
# 4. the regurgitation monitor on held-out prompts of this testbed, against the model's confidence and
#    the membership index (OUT/monitor, benchmarks/monitor_eval.py).
# OUT/summary.tgz then holds every table, figure and row (no features, CNNs or labels): small enough
# to come back from a GPU machine.
set -euo pipefail
out=$1
name=${2:-testbed-pile}
dev=${DEVICE:-cuda}
root="${MECHMEM_CACHE:-$HOME/.cache/mechmem}/$name/checkpoints"
python3 experiments/run_alignment.py --grid paper --train-per-class 1000 --eval-per-class 500 \
    --model "$name" --data "$name" --device "$dev" --quiet --out "$out/grid"
python3 experiments/checkpoints.py --model "$name" --revisions $(ls "$root") --data "$name@{revision}" \
    --device "$dev" --quiet --out "$out/checkpoints" -- --device "$dev"
python3 experiments/localize.py --run "$out/grid" --taxonomy "Non-Memo, Guess, Others" --device "$dev" --quiet \
    --out "$out/localize"
python3 experiments/ablate_heads.py --localization "$out/localize" --device "$dev" --quiet --out "$out/ablate"
python3 benchmarks/monitor_eval.py --model "$name" --run "$out/grid" --device "$dev" --out "$out/monitor"
tar czf "$out/summary.tgz" --exclude=features --exclude=cnns --exclude='*.parquet' --exclude='*.npz' \
    --exclude='*.safetensors' -C "$out" grid checkpoints localize ablate monitor
echo "wrote $out/summary.tgz ($(du -h "$out/summary.tgz" | cut -f1))"
