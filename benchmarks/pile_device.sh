#!/usr/bin/env bash
# Issue 23 on one GPU machine, start to end, as one background job that outlives the ten-minute
# commands (each call only waits and collects):
#   MECHMEM_CACHE=/tmp/mmc setsid nohup bash benchmarks/pile_device.sh PACK_DIR RUN_DIR > RUN_DIR.log 2>&1 &
# build (corpus, train, label, report) into $MECHMEM_CACHE/testbed-pile, then pile_study.sh into
# RUN_DIR/study; RUN_DIR/results.tgz (refreshed after each stage) holds the build's manifest,
# summary and figures and the study's summary.tgz. RUN_DIR/done holds the exit status at the end.
# Labels in bfloat16 (13 checkpoints in float32 would take some 7 of the session's 30 GPU minutes);
# LABEL_DTYPE_CHECK=1: RUN_DIR/label_dtype.json then measures what that changed on the final
# checkpoint against float32 (measured on the first build: docs/results/pile_testbed/label_dtype_first_build.json).
# GRID_SEEDS: training seeds of the grid's CNNs (default 1, as the paper preset: 3 would not fit a
# session's GPU time; the quick preset at the final checkpoint trains 3). TINY=1 DEVICE=cpu: the
# same at toy size on a CPU.
set -uo pipefail
pack=$1
run=$2
dev=${DEVICE:-cuda}
name=testbed-pile
tiny=()
if [ -n "${TINY:-}" ]; then name=testbed-pile-tiny; tiny=(--tiny); fi  # a dry run of this script on a CPU
cache="${MECHMEM_CACHE:?set MECHMEM_CACHE}/$name"
mkdir -p "$run"
collect() {
    local files=()
    for f in manifest.json summary.md checkpoints.png testbed_memorization.png work/train_log.json; do
        [ -f "$cache/$f" ] && files+=("$cache/$f")
    done
    for f in "$run"/study/summary.tgz "$run"/label_dtype.json "$run".log; do [ -f "$f" ] && files+=("$f"); done
    [ ${#files[@]} -gt 0 ] && tar czf "$run/results.tgz.part" -P "${files[@]}" && mv "$run/results.tgz.part" "$run/results.tgz"
}
t0=$SECONDS
python3 -m mechmem.testbed.build --preset pile-regime "${tiny[@]}" --device "$dev" --pack "$pack" --label-dtype bfloat16 \
    --label-from "${LABEL_FROM:-128}" \
    --max-seconds "${MAX_SECONDS:-600}"
status=$?
echo "== build exit $status after $((SECONDS - t0)) s"
collect
if [ $status -eq 0 ]; then
    # What the labels allow (`pile_regime.study_sizes`: the grid leaves a quarter of the smallest
    # class held out for the ablation; the checkpoint study is sized by the third-last checkpoint).
    read -r train_pc eval_pc ck_train ck_eval revisions < <(python3 -c "import json, sys
from mechmem.testbed.pile_regime import study_sizes
s = study_sizes(json.load(open(sys.argv[1])))
print(*s['grid'], *s['checkpoints'], ' '.join(s['revisions']))" "$cache/manifest.json")
    echo "== study: grid $train_pc + $eval_pc a class; checkpoints $ck_train + $ck_eval: $revisions"
    TRAIN_PER_CLASS=$train_pc EVAL_PER_CLASS=$eval_pc REVISIONS=$revisions GRID_SEEDS=${GRID_SEEDS:-1} \
        CK_TRAIN_PER_CLASS=$ck_train CK_EVAL_PER_CLASS=$ck_eval \
        bash benchmarks/pile_study.sh "$run/study" "$name"
    status=$?
    collect
    if [ -n "${LABEL_DTYPE_CHECK:-}" ]; then
        final=$(python3 -c "import json; print(json.load(open('$cache/manifest.json'))['final'])")
        python3 benchmarks/label_dtype.py --model "$name@$final" --device "$dev" --out "$run/label_dtype.json" || status=1
        collect
    fi
fi
echo "== all done, exit $status, $((SECONDS - t0)) s"
collect
echo "$status" > "$run/done"
