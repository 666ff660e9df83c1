"""Does CNN training on a GPU give the same CNNs again, and the same when torchrun splits the configs?

    python benchmarks/gpu_equality.py --layers 32 --samples 2048 --world 2

Trains the 8 paper CNNs on several tasks at once (as `run_alignment` does) on random features:
twice with every config in one process, and once per rank's share of the configs
(`mechmem.distributed.shard_configs`, as ranks of `torchrun --nproc-per-node WORLD` train them),
with cuDNN deterministic and not. Prints, for each setting, the largest difference of any CNN's
eval logits and weights between the reruns and between the whole and the shards (0.0 = bit for bit).
A rank on another GPU of the same model runs the same kernels as these shards do here.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mechmem.cnn import PAPER_GRID, POOLINGS, Task, TrainConfig, train_cnn_tasks
from mechmem.distributed import Dist, shard_configs


def max_diff(a, b) -> dict[str, float]:
    """Largest |difference| of eval logits and of weights over matching CNNs (a[task][config])."""
    logits = weights = 0.0
    for ta, tb in zip(a, b):
        for x, y in zip(ta, tb):
            assert x.config == y.config
            logits = max(logits, (x.eval_logits - y.eval_logits).abs().max().item())
            sa, sb = x.model.state_dict(), y.model.state_dict()
            weights = max(weights, max((sa[k] - sb[k]).abs().max().item() for k in sa))
    return {"eval_logits": logits, "weights": weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=2048, help="train samples a task (eval adds a quarter)")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--world", type=int, default=2, help="ranks to split the configs over")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = args.samples + args.samples // 4
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(n, len(POOLINGS), args.layers, 64, 64, generator=g).half().to(device)
    rng = np.random.default_rng(0)
    tasks = [Task(rng.integers(0, 2, n), np.arange(args.samples), np.arange(args.samples, n)) for _ in range(args.tasks)]
    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
              "layers": args.layers, "samples": args.samples, "tasks": args.tasks, "epochs": args.epochs,
              "world": args.world}
    for deterministic in (True, False):
        train = TrainConfig(protocol="paper", epochs=args.epochs, device=device, deterministic=deterministic)
        whole = [train_cnn_tasks(feats, POOLINGS, tasks, 2, PAPER_GRID, train, progress=False) for _ in range(2)]
        shards = [train_cnn_tasks(feats, POOLINGS, tasks, 2, mine, train, progress=False)
                  for mine in (shard_configs(PAPER_GRID, Dist(r, args.world)) for r in range(args.world))]
        by_name = [{c.config.name: c for s in shards for c in s[t]} for t in range(args.tasks)]
        joined = [[by_name[t][c.name] for c in PAPER_GRID] for t in range(args.tasks)]
        key = "deterministic" if deterministic else "nondeterministic"
        report[key] = {"rerun_max_abs_diff": max_diff(whole[0], whole[1]),
                       "shards_vs_whole_max_abs_diff": max_diff(whole[0], joined)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
