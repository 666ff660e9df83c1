"""A row's training seeds in one pass (`Task.seed`) against one pass a seed, in one process.

    python benchmarks/seeds_one_pass.py [--rows 5] [--seeds 3] [--device cuda] [--out seeds_one_pass.json]

What the quick preset, the second testbed's seeds step and checkpoint study, and the monitor's
shuffled-label controls train: a few rows, each with its control, under several seeds. Before
`Task.seed` the runner made one `train_cnn_tasks` call a seed; now one call takes them all. Random
features of the offline testbed's shape (6 layers, 64 x 64, two pools), the quick preset's two
configs and converged protocol, a fixed epoch count (random features would stop at once). Prints
and writes both times, their ratio, and the largest difference between the two ways' eval logits
(zero unfused on a CPU, float rounding fused on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechmem.cnn import QUICK_GRID, Task, TrainConfig, train_cnn_tasks  # noqa: E402
from mechmem.controls import shuffled_control  # noqa: E402


def rows_of(n_rows: int, n_samples: int, n_classes: int, rng: np.random.Generator) -> list[Task]:
    out = []
    for _ in range(n_rows):
        order = rng.permutation(n_samples)
        out.append(Task(rng.integers(0, n_classes, n_samples), order[: n_samples * 2 // 3], order[n_samples * 2 // 3:]))
    return out


def with_controls(tasks: list[Task], n_rows: int) -> list[Task]:
    """The tasks, then each one's shuffled-label control (shuffled by its row's index, as the runner's are by seed)."""
    return tasks + [shuffled_control(t, k % n_rows, follows=k) for k, t in enumerate(tasks)]


def one_pass_a_seed(features, rows: list[Task], n_seeds: int, train: TrainConfig) -> list[list]:
    """What the runner did before `Task.seed`: one call a seed; [seed][rows, then their controls][config]."""
    return [train_cnn_tasks(features, ("mean", "max"), with_controls(rows, len(rows)), 3, QUICK_GRID,
                            replace(train, seed=k), progress=False) for k in range(n_seeds)]


def one_pass(features, rows: list[Task], n_seeds: int, train: TrainConfig) -> list:
    """What it does now: every seed's rows (seed-major), then their controls, in one call."""
    seeded = [replace(t, seed=k) for k in range(n_seeds) for t in rows]
    return train_cnn_tasks(features, ("mean", "max"), with_controls(seeded, len(rows)), 3, QUICK_GRID, train,
                           progress=False)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=1350, help="per row: 300 + 150 a class, three classes")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="seeds_one_pass.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    features = torch.rand(args.samples, 2, args.layers, 64, 64).half()
    rows = rows_of(args.rows, args.samples, 3, rng)
    train = TrainConfig(epochs=args.epochs, patience=0, device=args.device)
    R, S = args.rows, args.seeds
    one_pass(features, rows[:1], 1, replace(train, epochs=1))  # warm-up: CUDA context, kernels, allocator
    apart_s, apart = timed(lambda: one_pass_a_seed(features, rows, S, train))
    together_s, together = timed(lambda: one_pass(features, rows, S, train))
    # apart[k] = row 0..R-1, then their controls; together = every seed's rows (seed-major), then their controls
    pairs = [(apart[k][i], together[k * R + i]) for k in range(S) for i in range(R)]
    pairs += [(apart[k][R + i], together[S * R + k * R + i]) for k in range(S) for i in range(R)]
    worst = max(float((x.eval_logits - y.eval_logits).abs().max()) for a, b in pairs for x, y in zip(a, b))
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": args.rows,
              "seeds": args.seeds, "cnns": 2 * S * R * len(QUICK_GRID), "epochs": args.epochs,
              "one_pass_a_seed_s": round(apart_s, 2), "one_pass_s": round(together_s, 2),
              "ratio": round(apart_s / together_s, 2), "max_abs_eval_logit_difference": worst}
    print(json.dumps(report, indent=1))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
