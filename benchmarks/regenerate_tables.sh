#!/usr/bin/env bash
# The commands behind the tables in README.md and docs/results/, one subcommand each:
#   bash benchmarks/regenerate_tables.sh quick-cpu        docs/results/testbed_quick        (this CPU)
#   bash benchmarks/regenerate_tables.sh quick-gpu        docs/results/testbed_quick_gpu   (one GPU)
#   bash benchmarks/regenerate_tables.sh protocol         benchmarks/results/training_protocol_*  (after quick-gpu)
#   bash benchmarks/regenerate_tables.sh grid-paper       docs/results/testbed_grid_paper_recipe
#   bash benchmarks/regenerate_tables.sh grid-converged   docs/results/testbed_grid_paper_converged
# RUNS (default runs/) holds the run folders (features included: several GB for the grids); RESULTS
# (default docs/results/) receives the tables, settings and rows, never the features or CNNs. A grid cut
# off by a time limit resumes when the same subcommand runs again on the same RUNS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
RESULTS=${RESULTS:-docs/results}
DEVICE=${DEVICE:-cuda}

keep() {  # keep <run folder> <results folder>: the tables and what decided them, not features or CNNs
    mkdir -p "$2"
    cp "$1"/alignment.csv "$1"/alignment.md "$1"/settings.json "$1"/skipped.json "$1"/*.png "$2"/ 2>/dev/null || true
    mkdir -p "$2"/rows && cp "$1"/rows/*.json "$2"/rows/
}

grid() {  # grid <protocol> <name>
    python3 experiments/run_alignment.py --grid paper --train-per-class 1000 --eval-per-class 500 \
        --training "$1" --device "$DEVICE" --quiet --out "$RUNS/$2"
    keep "$RUNS/$2" "$RESULTS/$2"
}

case "${1:-}" in
    quick-cpu)
        python3 experiments/run_alignment.py --device cpu --quiet --out "$RUNS/quick"
        keep "$RUNS/quick" "$RESULTS/testbed_quick" ;;
    quick-gpu)
        python3 experiments/run_alignment.py --device "$DEVICE" --quiet --out "$RUNS/quick_gpu"
        keep "$RUNS/quick_gpu" "$RESULTS/testbed_quick_gpu" ;;
    protocol)  # variants scored on a selection split of the training split, never on the eval split
        python3 benchmarks/training_protocol.py --run "$RUNS/quick_gpu" --seeds 3 --device "$DEVICE" \
            --out "${PROTOCOL_OUT:-$RESULTS/training_protocol.csv}" \
            --variant logpixel input_scaling=log-pixel --variant pixel input_scaling=pixel \
            --variant raw input_scaling=raw --variant layer input_scaling=layer --variant pat8 patience=8 \
            --variant bs16 batch_size=16 --variant lr3e-3 lr=0.003 --variant paper protocol=paper \
            --variant paper15 protocol=paper epochs=15 ;;
    grid-paper) grid paper testbed_grid_paper_recipe ;;
    grid-converged) grid converged testbed_grid_paper_converged ;;
    *) echo "usage: $0 {quick-cpu|quick-gpu|protocol|grid-paper|grid-converged}" >&2; exit 2 ;;
esac
