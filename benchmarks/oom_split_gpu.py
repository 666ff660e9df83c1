"""Does `train_cnn_tasks` recover on a real GPU when one step of all its tasks does not fit?

    python benchmarks/oom_split_gpu.py [--tasks 24] [--out oom_split.json]

The CPU test raises a simulated `torch.OutOfMemoryError`; here the device runs out for real (the
2.8b grid with its controls did on an H100): random features of Pythia-2.8b's shape (32 layers,
two pools, 32 x 32), the paper's 8 configs, each task with its shuffled-label control. It measures
a step's peak memory for all tasks and for a quarter of them, takes GPU memory away with a filler
until only the midpoint is free, trains again (two fixed epochs) and checks that the tasks were
split, that nothing raised, and that every CNN equals the one trained with all the memory (to float
rounding). Writes what it saw as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch

from mechmem.cnn import PAPER_GRID, Task, TrainConfig, train_cnn_tasks


def tasks_of(n_tasks: int, n_samples: int, rng: np.random.Generator) -> list[Task]:
    """n_tasks rows, each followed by its shuffled-label control."""
    out = []
    for _ in range(n_tasks):
        labels = rng.integers(0, 3, n_samples)
        order = rng.permutation(n_samples)
        train_idx, eval_idx = order[: n_samples * 2 // 3], order[n_samples * 2 // 3:]
        out.append(Task(labels, train_idx, eval_idx))
        shuffled = labels.copy()
        shuffled[train_idx] = rng.permutation(labels[train_idx])
        out.append(Task(shuffled, train_idx, eval_idx, follows=len(out) - 1))
    return out


def peak_of(features, tasks, train) -> tuple[float, list]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = train_cnn_tasks(features, ("mean", "max"), tasks, 3, PAPER_GRID, train, progress=False)
    return (torch.cuda.max_memory_allocated() - base) / 2**30, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=24, help="rows (each with a control)")
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--out", default="oom_split.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("oom_split_gpu.py: needs a CUDA device", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    features = torch.rand(args.samples, 2, 32, 32, 32, device="cuda")
    tasks = tasks_of(args.tasks, args.samples, rng)
    train = TrainConfig(epochs=2, patience=0, device="cuda")
    t0 = time.perf_counter()
    whole_gib, whole = peak_of(features, tasks, train)
    quarter_gib, _ = peak_of(features, tasks[: len(tasks) // 4], train)
    free = torch.cuda.mem_get_info()[0] / 2**30
    keep = (whole_gib + quarter_gib) / 2
    filler = torch.empty(int((free - keep) * 2**30), dtype=torch.uint8, device="cuda")
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mechmem").addHandler(handler)
    torch.cuda.empty_cache()
    split = train_cnn_tasks(features, ("mean", "max"), tasks, 3, PAPER_GRID, train, progress=False)
    del filler
    worst = max(float((a.eval_logits - b.eval_logits).abs().max()) for ta, tb in zip(whole, split)
                for a, b in zip(ta, tb))
    report = {"device": torch.cuda.get_device_name(), "tasks": len(tasks), "configs": len(PAPER_GRID),
              "peak_gib_all_tasks": round(whole_gib, 2), "peak_gib_quarter": round(quarter_gib, 2),
              "left_free_gib": round(keep, 2), "splits": warnings,
              "max_abs_eval_logit_difference": worst, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    ok = bool(warnings) and worst < 1e-3
    print("split and equal" if ok else "NOT as expected")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
