"""Which kernels one epoch of the fused CNN grid spends its GPU time in (torch.profiler), per convolution path.

    python benchmarks/cnn_profile.py --tasks 54 --layers 32 --samples 512

54 tasks = the 27 rows of a `--grid paper` group and their controls, trained in one pass.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from mechmem.cnn import PAPER_GRID, POOLINGS, Task, TrainConfig, train_cnn_tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=54)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=512, help="training samples (an epoch of them is profiled)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=30, help="kernels listed")
    args = p.parse_args()
    n = args.samples + 64
    feats = torch.rand(n, len(POOLINGS), args.layers, 64, 64, device="cuda").half()
    labels = np.arange(n) % 3
    tasks = [Task(np.roll(labels, t), np.arange(args.samples), np.arange(args.samples, n)) for t in range(args.tasks)]
    for fft in (True, False):
        train = TrainConfig(protocol="paper", epochs=1, batch_size=args.batch_size, fft=fft)
        train_cnn_tasks(feats, POOLINGS, tasks, 3, PAPER_GRID, train, progress=False)  # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_cnn_tasks(feats, POOLINGS, tasks, 3, PAPER_GRID, train, progress=False)
            torch.cuda.synchronize()
        print(f"=== fft={fft}: {args.tasks} tasks x 8 configs, {args.samples} samples, batch {args.batch_size}, "
              f"{args.layers} layers")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
