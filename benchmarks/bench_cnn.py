"""Training CNN configs together vs one after another.

    pytest benchmarks/bench_cnn.py --benchmark-enable      # small, CPU, under a minute
    python benchmarks/bench_cnn.py --layers 36 --samples 2048 --memmap   # larger, on the GPU if any

"sequential" is the paper's way: one training per config, each re-reading the features. "together"
reads each batch once and feeds it to every config; "together_fused" also runs same-shaped configs
(mean/max pairs) as one grouped network. The pytest benchmarks read a float16 .npy memmap, as a
feature store holds them.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mechmem.cnn import PAPER_GRID, TrainConfig, train_cnns

POOLS = ("mean", "max")
CONFIGS = PAPER_GRID[:4]  # k6 x {c10, c16} x {mean, max}: two fusable pairs
N_TRAIN, N_EVAL, N_LAYERS, SEQ = 128, 32, 6, 64


def make_store(path: Path, n: int, n_layers: int, seq: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, len(POOLS), n_layers, seq, seq))
    rng = np.random.default_rng(0)
    for start in range(0, n, 256):
        feats[start:start + 256] = rng.random(feats[start:start + 256].shape, dtype=np.float32)
    feats.flush()
    return np.load(path, mmap_mode="r"), np.arange(n) % 3


def train(features, labels, n_train, configs, fuse, device=None, epochs=1):
    return train_cnns(features, POOLS, labels, np.arange(n_train), np.arange(n_train, len(labels)), 3,
                      configs, TrainConfig(epochs=epochs, fuse=fuse, device=device), progress=False)


MODES = {
    "sequential": lambda f, y, n, cfgs, dev: [train(f, y, n, [c], False, dev) for c in cfgs],
    "together": lambda f, y, n, cfgs, dev: train(f, y, n, cfgs, False, dev),
    "together_fused": lambda f, y, n, cfgs, dev: train(f, y, n, cfgs, True, dev),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.npy", N_TRAIN + N_EVAL, N_LAYERS)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.benchmark(group="cnn-train-4-configs-cpu")
def test_train(benchmark, store, mode):
    benchmark.pedantic(MODES[mode], args=(*store, N_TRAIN, CONFIGS, "cpu"), rounds=3, warmup_rounds=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--samples", type=int, default=2048, help="train samples (eval adds a quarter)")
    p.add_argument("--device", default=None)
    p.add_argument("--memmap", action="store_true", help="read features from a .npy memmap, not a tensor")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = args.samples + args.samples // 4
    with tempfile.TemporaryDirectory() as tmp:
        feats, labels = make_store(Path(tmp) / "features.npy", n, args.layers)
        if not args.memmap:
            feats = torch.from_numpy(np.array(feats)).to(device)
        MODES["together_fused"](feats, labels, 64, PAPER_GRID, device)  # warm up kernels and allocator
        times = {}
        for mode, fn in MODES.items():
            runs = []
            for _ in range(args.repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn(feats, labels, args.samples, PAPER_GRID, device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t)
            times[mode] = min(runs)
    print(f"8 configs (PAPER_GRID), 1 epoch, {args.samples} train samples, {args.layers} layers, "
          f"{'memmap' if args.memmap else 'tensor'} features, device {device}")
    for mode, t in times.items():
        print(f"  {mode:15s} {t:8.2f} s   sequential / this = {times['sequential'] / t:.2f}x")


if __name__ == "__main__":
    main()
