"""Training the CNN grid: configurations together (and fused) vs one after another.

    python benchmarks/cnn_timing.py --layers 36 --samples 2048 [--memmap]   # on the GPU if any

"sequential" is the paper's way: one training per config, each re-reading the features. "together"
reads each batch once and feeds it to every config; "together_fused" also runs same-shaped configs
(mean/max pairs) as one grouped network with cuDNN's convolutions; "together_fused_bf16" does so
under bfloat16 autocast (TrainConfig.precision); "together_fused_fft" convolves through the FFT
(TrainConfig.fft, the default on a GPU), "together_fused_fft_bf16" too under bf16 autocast.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mechmem.cnn import PAPER_GRID, POOLINGS, Task, TrainConfig, train_cnn_tasks, train_cnns
from mechmem.timing import PHASES


def make_store(path: Path, n: int, n_layers: int, seq: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A float16 .npy memmap of random features, as a feature store holds them, and 3-class labels."""
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, len(POOLINGS), n_layers, seq, seq))
    rng = np.random.default_rng(0)
    for start in range(0, n, 256):
        feats[start:start + 256] = rng.random(feats[start:start + 256].shape, dtype=np.float32)
    feats.flush()
    return np.load(path, mmap_mode="r"), np.arange(n) % 3


def train(features, labels, n_train, configs, fuse, device=None, deterministic=True, epochs=1, precision="float32",
          tasks=1, fft=False, batch_size=16):
    """One epoch of `configs`; with tasks > 1, that many taxonomies (other labels, same samples) in
    lockstep, as run_alignment trains the rows of a grid."""
    cfg = TrainConfig(protocol="paper", epochs=epochs, fuse=fuse, device=device, deterministic=deterministic,
                      precision=precision, fft=fft, batch_size=batch_size)
    train_idx, eval_idx = np.arange(n_train), np.arange(n_train, len(labels))
    if tasks == 1:
        return train_cnns(features, POOLINGS, labels, train_idx, eval_idx, 3, configs, cfg, progress=False)
    return train_cnn_tasks(features, POOLINGS, [Task(np.roll(labels, t), train_idx, eval_idx) for t in range(tasks)],
                           3, configs, cfg, progress=False)


MODES = {
    "sequential": lambda f, y, n, cfgs, dev, **kw: [train(f, y, n, [c], False, dev, **kw) for c in cfgs],
    "together": lambda f, y, n, cfgs, dev, **kw: train(f, y, n, cfgs, False, dev, **kw),
    "together_fused": lambda f, y, n, cfgs, dev, **kw: train(f, y, n, cfgs, True, dev, **kw),
    "together_fused_bf16": lambda f, y, n, cfgs, dev, **kw: train(f, y, n, cfgs, True, dev, precision="bf16", **kw),
    "together_fused_fft": lambda f, y, n, cfgs, dev, **kw: train(f, y, n, cfgs, True, dev, fft=True, **kw),
    "together_fused_fft_bf16": lambda f, y, n, cfgs, dev, **kw: train(f, y, n, cfgs, True, dev, fft=True,
                                                                      precision="bf16", **kw),
}


def time_modes(n_layers: int, n_train: int, device: str, *, memmap: bool = False, repeats: int = 2,
               modes=tuple(MODES), deterministic: bool = True, tasks: int = 1, batch_size: int = 16) -> dict[str, float]:
    """Best wall-clock seconds of one epoch of the paper's 8 configs (for each of `tasks` taxonomies)
    on `n_train` samples, per mode."""
    n = n_train + n_train // 4
    times = {}
    phases: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        feats, labels = make_store(Path(tmp) / "features.npy", n, n_layers)
        if not memmap:
            feats = torch.from_numpy(np.array(feats)).to(device)
        kw = dict(deterministic=deterministic, tasks=tasks, batch_size=batch_size)
        for mode in modes:  # warm up kernels and allocator
            MODES[mode](feats, labels, 64, PAPER_GRID, device, **kw)
        for mode in modes:
            runs = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                PHASES.start()
                t = time.perf_counter()
                MODES[mode](feats, labels, n_train, PAPER_GRID, device, **kw)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t)
                phases[mode] = PHASES.stop()
            times[mode] = min(runs)
    return times, phases


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--samples", type=int, default=2048, help="train samples (eval adds a quarter)")
    p.add_argument("--device", default=None)
    p.add_argument("--memmap", action="store_true", help="read features from a .npy memmap, not a tensor")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nondeterministic", action="store_true", help="let cuDNN pick its kernels (TrainConfig)")
    p.add_argument("--tasks", type=int, default=1, help="taxonomies trained in lockstep (--grid paper: 27)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--batch-size", type=int, default=16, help="the paper's 16; the converged protocol's 64")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    times, phases = time_modes(args.layers, args.samples, device, memmap=args.memmap, repeats=args.repeats,
                       deterministic=not args.nondeterministic, tasks=args.tasks, modes=args.modes,
                       batch_size=args.batch_size)
    print(f"8 configs (PAPER_GRID) x {args.tasks} task(s), 1 epoch, {args.samples} train samples, {args.layers} layers, "
          f"{'memmap' if args.memmap else 'tensor'} features, device {device}, "
          f"{'non' if args.nondeterministic else ''}deterministic cuDNN, batch {args.batch_size}")
    for mode, t in times.items():
        ratios = [f"{base} / this = {times[base] / t:.2f}x" for base in ("sequential", "together_fused", "together_fused_bf16") if base in times]
        print(f"  {mode:19s} {t:8.2f} s   " + "   ".join(ratios))
        print("      of which (last repeat): " + ", ".join(f"{k} {v:.2f} s" for k, v in phases[mode].items()))


if __name__ == "__main__":
    main()
