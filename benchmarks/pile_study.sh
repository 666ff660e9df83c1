#!/usr/bin/env bash
# Issue 23's study of the second testbed, once it is built (python -m mechmem.testbed.build --preset
# pile-regime --device cuda), on the same machine; every step resumes where a cut-off call left it:
#   MECHMEM_CACHE=$PWD/.device/cache DEVICE=cuda bash benchmarks/pile_study.sh OUT [NAME]
# 1. the paper's grid on the final checkpoint, 1000 + 500 a class (TRAIN_PER_CLASS, EVAL_PER_CLASS),
#    converged, controls and probe, GRID_SEEDS training seeds (default 1, the paper preset's)
#    (OUT/grid; paper_agreement.json: Spearman with the paper's 12B figures, the headline row's rank,
#    CNN against probe);
# 2. localization of "Non-Memo, Guess, Others" on the grid's CNNs and ablation of its top heads
#    against random heads (OUT/localize, OUT/ablate);
# 2b. the seed spread the grid (one seed) lacks: SEED_TAXONOMIES ("A;B", default the headline row) again
#    with SEEDS training seeds (default 3) at the grid's sizes (OUT/seeds; skipped when GRID_SEEDS >= 3);
# 2c. the same rows with Non-Memo drawn like the memorized classes (--match-source: the kind of text no
#    longer tells it apart), one seed, at the grid's sizes (OUT/matched);
# 3. the quick preset on every checkpoint (REVISIONS="step64 step128 ..." picks some; CK_TRAIN_PER_CLASS,
#    CK_EVAL_PER_CLASS its sizes, default 300 + 150), each with the labels its build gave it
#    (OUT/checkpoints, checkpoints.png: alignment across training);
# 4. the regurgitation monitor on held-out prompts of this testbed, against the model's confidence and
#    the membership index (OUT/monitor, benchmarks/monitor_eval.py): the longest step (~3 min on an
#    H100), after the checkpoints in their lane.
# GRID_TAXONOMIES="A;B": only these rows in the grid (a rehearsal's; default the paper's 54).
# STEPS="grid checkpoints ...": only these steps (default all seven), e.g. STEPS=checkpoints for the
# checkpoint trend alone on a rebuild whose grid is already reported.
# After the grid, two lanes run side by side on the one GPU: 2, 2b and 2c in one, 3 then 4 in the other
# (their steps leave the GPU idle between small kernels, which the other lane's can fill: on an H100
# the second build's lanes took 225 s for steps that add to 378 s).
# A step that fails is reported and the next one runs (the script then exits 1). After each step
# OUT/summary.tgz holds every table, figure and row made so far (no features, CNNs or labels): small
# enough to come back from a GPU machine.
set -uo pipefail
out=$1
name=${2:-testbed-pile}
dev=${DEVICE:-cuda}
root="${MECHMEM_CACHE:-$HOME/.cache/mechmem}/$name/checkpoints"
revisions=${REVISIONS:-$(ls "$root")}
failed=0
taxonomies=()
if [ -n "${GRID_TAXONOMIES:-}" ]; then IFS=';' read -ra rows <<< "$GRID_TAXONOMIES"; taxonomies=(--taxonomies "${rows[@]}"); fi

step() {  # step LABEL COMMAND...: run it (unless STEPS leaves it out), say how long it took, keep going if it fails
    local label=$1 t0=$SECONDS
    shift
    if [ -n "${STEPS+x}" ] && [[ " $STEPS " != *" $label "* ]]; then echo "== $label skipped (STEPS)"; return 0; fi
    echo "== $label"
    if "$@"; then echo "== $label done in $((SECONDS - t0)) s"; else echo "== $label FAILED after $((SECONDS - t0)) s"; failed=1; fi
    summary
}

summary() {  # OUT/summary.tgz from what is there now (a part file per process: the lanes write it too)
    local parts=() part="$out/summary.tgz.part.$BASHPID"
    for d in grid localize ablate seeds matched monitor checkpoints; do [ -d "$out/$d" ] && parts+=("$d"); done
    [ ${#parts[@]} -gt 0 ] || return 0
    tar czf "$part" --warning=no-file-changed --exclude=features --exclude=cnns --exclude='*.parquet' --exclude='*.npz' \
        --exclude='*.safetensors' --exclude='*.pt' -C "$out" "${parts[@]}" && mv "$part" "$out/summary.tgz"
    rm -f "$part"
}

alignment() {  # alignment DIR SEEDS [--taxonomies ...]: the paper's grid on the final checkpoint into OUT/DIR
    local dir=$1 seeds=$2
    shift 2
    python3 experiments/run_alignment.py --grid paper --train-per-class "${TRAIN_PER_CLASS:-1000}" \
        --eval-per-class "${EVAL_PER_CLASS:-500}" --cnn-seeds "$seeds" \
        --model "$name" --data "$name" --device "$dev" --quiet --out "$out/$dir" "$@"
}

mkdir -p "$out"
step grid alignment grid "${GRID_SEEDS:-1}" "${taxonomies[@]}"
(   # lane 1
    step localize python3 experiments/localize.py --run "$out/grid" --taxonomy "Non-Memo, Guess, Others" \
        --device "$dev" --quiet --out "$out/localize"
    # 20 random draws a k: against the draws the evidence is a rank, p >= 1 / (draws + 1) (the fourth
    # build's one on-target result lay below all 10 of its draws, p = 0.09); the lane has the time.
    step ablate python3 experiments/ablate_heads.py --localization "$out/localize" --device "$dev" --quiet \
        --n-random 20 --out "$out/ablate"
    IFS=';' read -ra seed_rows <<< "${SEED_TAXONOMIES:-Non-Memo, Guess, Others}"
    if [ "${GRID_SEEDS:-1}" -lt 3 ]; then
        step seeds alignment seeds "${SEEDS:-3}" --taxonomies "${seed_rows[@]}"
    fi
    step matched alignment matched 1 --taxonomies "${seed_rows[@]}" --match-source
    exit $failed
) &
lane1=$!
(   # lane 2
    # shellcheck disable=SC2086  # one word a revision
    step checkpoints python3 experiments/checkpoints.py --model "$name" --revisions $revisions --data "$name@{revision}" \
        --device "$dev" --quiet --out "$out/checkpoints" -- --device "$dev" \
        --train-per-class "${CK_TRAIN_PER_CLASS:-300}" --eval-per-class "${CK_EVAL_PER_CLASS:-150}"
    step monitor python3 benchmarks/monitor_eval.py --model "$name" --run "$out/grid" --device "$dev" --out "$out/monitor"
    exit $failed
) &
lane2=$!
wait $lane1 || failed=1
wait $lane2 || failed=1
summary
echo "wrote $out/summary.tgz ($(du -h "$out/summary.tgz" | cut -f1))"
exit $failed
