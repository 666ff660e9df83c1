"""Training the CNN grid: configurations together (and fused) vs one after another.

    python benchmarks/cnn_timing.py --layers 36 --samples 2048 [--memmap]   # on the GPU if any

"sequential" is the paper's way: one training per config, each re-reading the features. "together"
reads each batch once and feeds it to every config; "together_fused" also runs same-shaped configs
(mean/max pairs) as one grouped network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mechmem.cnn import PAPER_GRID, POOLINGS, TrainConfig, train_cnns


def make_store(path: Path, n: int, n_layers: int, seq: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A float16 .npy memmap of random features, as a feature store holds them, and 3-class labels."""
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, len(POOLINGS), n_layers, seq, seq))
    rng = np.random.default_rng(0)
    for start in range(0, n, 256):
        feats[start:start + 256] = rng.random(feats[start:start + 256].shape, dtype=np.float32)
    feats.flush()
    return np.load(path, mmap_mode="r"), np.arange(n) % 3


def train(features, labels, n_train, configs, fuse, device=None, deterministic=True, epochs=1):
    return train_cnns(features, POOLINGS, labels, np.arange(n_train), np.arange(n_train, len(labels)), 3, configs,
                      TrainConfig(epochs=epochs, fuse=fuse, device=device, deterministic=deterministic), progress=False)


MODES = {
    "sequential": lambda f, y, n, cfgs, dev, det=True: [train(f, y, n, [c], False, dev, det) for c in cfgs],
    "together": lambda f, y, n, cfgs, dev, det=True: train(f, y, n, cfgs, False, dev, det),
    "together_fused": lambda f, y, n, cfgs, dev, det=True: train(f, y, n, cfgs, True, dev, det),
}


def time_modes(n_layers: int, n_train: int, device: str, *, memmap: bool = False, repeats: int = 2,
               modes=tuple(MODES), deterministic: bool = True) -> dict[str, float]:
    """Best wall-clock seconds of one epoch of the paper's 8 configs on `n_train` samples, per mode."""
    n = n_train + n_train // 4
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        feats, labels = make_store(Path(tmp) / "features.npy", n, n_layers)
        if not memmap:
            feats = torch.from_numpy(np.array(feats)).to(device)
        MODES["together_fused"](feats, labels, 64, PAPER_GRID, device, deterministic)  # warm up kernels and allocator
        for mode in modes:
            runs = []
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                MODES[mode](feats, labels, n_train, PAPER_GRID, device, deterministic)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t)
            times[mode] = min(runs)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--samples", type=int, default=2048, help="train samples (eval adds a quarter)")
    p.add_argument("--device", default=None)
    p.add_argument("--memmap", action="store_true", help="read features from a .npy memmap, not a tensor")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nondeterministic", action="store_true", help="let cuDNN pick its kernels (TrainConfig)")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    times = time_modes(args.layers, args.samples, device, memmap=args.memmap, repeats=args.repeats,
                       deterministic=not args.nondeterministic)
    print(f"8 configs (PAPER_GRID), 1 epoch, {args.samples} train samples, {args.layers} layers, "
          f"{'memmap' if args.memmap else 'tensor'} features, device {device}, "
          f"{'non' if args.nondeterministic else ''}deterministic cuDNN")
    for mode, t in times.items():
        print(f"  {mode:15s} {t:8.2f} s   sequential / this = {times['sequential'] / t:.2f}x")


if __name__ == "__main__":
    main()
