"""Which kernels one epoch of the fused CNN grid spends its GPU time in (torch.profiler), per convolution path.

    python benchmarks/cnn_profile.py --tasks 54 --layers 32 --samples 512
    python benchmarks/cnn_profile.py --steps-only --protocol converged --samples 1024   # the steps alone

54 tasks = the 27 rows of a `--grid paper` group and their controls, trained in one pass.
`--steps-only` profiles one epoch of training steps of an already built fleet (after a warm-up epoch),
without the set-up, validation and evaluation that dominate a short whole-call profile, and prints the
seconds a step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from mechmem.cnn import PAPER_GRID, POOLINGS, Task, TrainConfig, train_cnn_tasks


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU: a smoke run of the script)


ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
SORT = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=54)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=512, help="training samples (an epoch of them is profiled)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=30, help="kernels listed")
    p.add_argument("--protocol", choices=["paper", "converged"], default="paper")
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--steps-only", action="store_true", help="profile one epoch of steps of a built fleet")
    p.add_argument("--paths", default="fft,cudnn", help="convolution paths, comma-separated")
    args = p.parse_args()
    n = args.samples + 64
    feats = torch.rand(n, len(POOLINGS), args.layers, 64, 64, device=DEVICE).half()
    labels = np.arange(n) % 3
    tasks = [Task(np.roll(labels, t), np.arange(args.samples), np.arange(args.samples, n)) for t in range(args.tasks)]
    for fft in [path == "fft" for path in args.paths.split(",")]:
        train = TrainConfig(protocol=args.protocol, epochs=1, batch_size=args.batch_size, fft=fft,
                            precision=args.precision)
        if args.steps_only:
            steps_only(feats, tasks, train, args)
            continue
        train_cnn_tasks(feats, POOLINGS, tasks, 3, PAPER_GRID, train, progress=False)  # warm-up
        sync()
        with profile(activities=ACTIVITIES) as prof:
            train_cnn_tasks(feats, POOLINGS, tasks, 3, PAPER_GRID, train, progress=False)
            sync()
        print(f"=== fft={fft}: {args.tasks} tasks x 8 configs, {args.samples} samples, batch {args.batch_size}, "
              f"{args.layers} layers")
        print(prof.key_averages().table(sort_by=SORT, row_limit=args.rows, max_name_column_width=60))


def steps_only(feats, tasks, train: TrainConfig, args) -> None:
    """One epoch of a built fleet's steps, timed and profiled (internal API: a benchmark's licence)."""
    from mechmem.cnn.training import _Fleet, _Setup

    setup = _Setup.of(feats, POOLINGS, tasks, 3, PAPER_GRID, train)
    fleet = _Fleet(setup)
    perm = setup.fit_idx
    n_steps = -(-perm.shape[1] // args.batch_size)
    fleet.train_epoch(perm)  # warm-up: allocations, FFT plans, cuDNN's choice
    sync()
    t0 = time.perf_counter()
    fleet.train_epoch(perm)
    sync()
    per_step = (time.perf_counter() - t0) / n_steps
    parts = annotate(fleet)
    with profile(activities=ACTIVITIES) as prof:
        fleet.train_epoch(perm)
        sync()
    print(f"=== steps only, fft={train.fft}, {train.precision}, {args.protocol}: {len(tasks)} tasks x 8 configs, "
          f"{n_steps} steps of {args.batch_size}, {args.layers} layers: {per_step:.4f} s a step")
    averages = prof.key_averages()
    total = sum(e.self_device_time_total for e in averages) if DEVICE == "cuda" else None
    for e in averages:
        if e.key in parts:
            device = f", device {e.device_time_total / 1e6:.3f} s of {total / 1e6:.3f}" if total else ""
            print(f"  {e.key:24s} {e.count:5d} calls, host {e.cpu_time_total / 1e6:.3f} s{device}")
    print(averages.table(sort_by=SORT, row_limit=args.rows, max_name_column_width=60))


def annotate(fleet) -> list[str]:
    """Name the step's parts in the profile (the fleet's own methods, wrapped on this instance; the
    backward pass is what the named forward parts leave). Works with older fleets too: a method the
    fleet lacks is skipped."""
    from torch.profiler import record_function

    names = {"_read_tasks": "read features", "_inputs": "prepare inputs", "_run": "stacks (forward)"}
    parts = []
    for method, name in names.items():
        if not hasattr(fleet, method):
            continue
        inner = getattr(fleet, method)

        def wrapped(*a, _inner=inner, _name=name, **k):
            with record_function(_name):
                return _inner(*a, **k)

        setattr(fleet, method, wrapped)
        parts.append(name)
    step = fleet.optimizer.step

    def optimizer_step(*a, **k):
        with record_function("optimizer"):
            return step(*a, **k)

    fleet.optimizer.step = optimizer_step
    return parts + ["optimizer"]


if __name__ == "__main__":
    main()
