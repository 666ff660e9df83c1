"""Wall-clock of the whole `--grid paper` study for one model size: free generation, extraction, 54 rows x 8 CNNs,
their controls and the probe, with where the time goes (`mechmem.timing` phases).

    python benchmarks/grid_timing.py --size 2.8b --out /tmp/grid --epochs 22 --patience 0  # one GPU
    torchrun --nproc-per-node 2 benchmarks/grid_timing.py --size 2.8b --out /tmp/grid     # two

Random Pythia weights (bf16) and a synthetic memorization table in the published schema, drawn so
that every one of the paper's 54 rows has enough samples in every class: the timings are real, the
min F1 scores mean nothing. On such features early stopping stops at once, which would flatter the
time: `--epochs N --patience 0` trains every CNN exactly N epochs (the converged protocol trained
22.2 epochs on average on the testbed's grid, docs/results/testbed_grid_paper_converged). An
interrupted run resumes from --out like run_alignment.py does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mechmem import alignment as al
from mechmem.cnn import PAPER_GRID, PRECISIONS, PROTOCOLS, TrainConfig
from mechmem.distributed import init_from_env, shutdown
from mechmem.models import random_pythia
from mechmem.run import RunFolder
from mechmem.timing import PHASES


def timing_table(n: int, vocab: int = 50_000, seed: int = 0) -> pd.DataFrame:
    """n samples, 70% memorized, duplicate counts spread over the paper's thresholds (5, 50, 1k),
    a fifth repeating, a third with high ROUGE, a quarter code: every paper row's classes fill up."""
    rng = np.random.default_rng(seed)
    memorized = rng.random(n) < 0.7
    bucket = rng.integers(0, 4, n)  # <= 5, <= 50, <= 1000, > 1000
    lo, hi = np.array([0, 6, 51, 1001])[bucket], np.array([6, 51, 1001, 100_000])[bucket]
    return pd.DataFrame({
        "sequence_id": np.arange(n, dtype=np.int64),
        "tokens": list(rng.integers(0, vocab, size=(n, 64))),
        "text": [""] * n,
        "memorization_score": np.where(memorized, 1.0, rng.integers(0, 32, n) / 32),
        "sequence_duplicates": rng.integers(lo, hi),
        "is_incrementing": rng.random(n) < 0.05,
        "is_repeating": rng.random(n) < 0.2,
        "rouge_L_prefix_to_suffix": np.where(rng.random(n) < 0.33, 0.75, 0.1),
        "rouge_3_prefix_to_suffix": np.where(rng.random(n) < 0.33, 0.75, 0.1),
        "is_code": rng.random(n) < 0.25,
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2.8b")
    p.add_argument("--samples", type=int, default=160_000, help="rows of the synthetic table")
    p.add_argument("--train-per-class", type=int, default=4000)
    p.add_argument("--eval-per-class", type=int, default=2000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--rows", type=int, default=54, help="only the first ROWS of the paper's rows (smoke tests)")
    p.add_argument("--rows-per-class-count", type=int, default=None,
                   help="only the first N four-class and N three-class rows (the whole study scales with rows)")
    p.add_argument("--patience", type=int, default=None, help="0: never stop early (with --epochs: a fixed count)")
    p.add_argument("--training", choices=PROTOCOLS, default="converged")
    p.add_argument("--epochs", type=int, default=None, help="default: the protocol's (paper: 3, converged: cap 60)")
    p.add_argument("--cnn-precision", choices=PRECISIONS, default="float32")
    args = p.parse_args()
    dist = init_from_env()
    PHASES.start()
    t0 = time.perf_counter()
    df = timing_table(args.samples)
    model = random_pythia(args.size, device="cuda" if torch.cuda.is_available() else "cpu", dtype=args.dtype)
    rows = al.paper_rows()[: args.rows]
    if args.rows_per_class_count is not None:
        rows = tuple(r for k in (4, 3) for r in [r for r in rows if len(r.class_names()) == k][:args.rows_per_class_count])
    cfg = al.AlignmentConfig(rows=rows, train_per_class=args.train_per_class,
                             eval_per_class=args.eval_per_class, configs=PAPER_GRID,
                             train=TrainConfig(protocol=args.training, epochs=args.epochs, patience=args.patience,
                                               precision=args.cnn_precision))
    t1 = time.perf_counter()
    plan = al.plan_rows(df, cfg.rows, cfg.train_per_class, cfg.eval_per_class, cfg.seed, cfg.split)
    store = al.feature_store_for(model, df, plan.samples, RunFolder(args.out).features_dir, cfg, dist=dist)
    t2 = time.perf_counter()
    if dist.is_main:  # said now, so that a run cut off during training still has its first phase
        print(json.dumps({"setup_s": t1 - t0, "generation_and_extraction_s": t2 - t1}), flush=True)
    table = al.run_alignment(model, df, cfg, args.out, dist=dist)  # finds the store built, trains the CNNs
    t3 = time.perf_counter()
    record = {"size": args.size, "world_size": dist.world_size, "gpu": torch.cuda.get_device_name() if
              torch.cuda.is_available() else "cpu", "rows_run": len(table), "rows_skipped": len(plan.skipped),
              "configs_per_row": len(cfg.configs), "cnn_precision": args.cnn_precision, "train_per_class": args.train_per_class,
              "eval_per_class": args.eval_per_class, "samples_extracted": int(store.manifest["n_samples"]),
              "setup_s": t1 - t0, "generation_and_extraction_s": t2 - t1, "cnn_training_s": t3 - t2,
              "study_s": t3 - t1, "epochs": cfg.train.epochs, "patience": cfg.train.patience,
              "phases_s": {k: round(v, 3) for k, v in PHASES.seconds.items()}}
    if dist.is_main:
        print(PHASES.table(), flush=True)
        print(json.dumps(record), flush=True)
        (args.out / "timing.json").write_text(json.dumps(record, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
