"""Training CNN configs together vs one after another.

Run: pytest benchmarks/bench_cnn.py --benchmark-enable   (CPU, under a minute)

Features sit in a float16 .npy memmap, as a feature store holds them. "sequential" is the paper's way
(one training per config, each re-reading the features); "together" reads each batch once for all
configs, "together_fused" also runs same-shaped configs as one grouped network.
"""

import numpy as np
import pytest

from mechmem.cnn import PAPER_GRID, TrainConfig, train_cnns

CONFIGS = PAPER_GRID[:4]  # k6 x {c10, c16} x {mean, max}: two fusable pairs
N_TRAIN, N_EVAL, N_LAYERS, SEQ = 128, 32, 6, 64
POOLS = ("mean", "max")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "features.npy"
    n = N_TRAIN + N_EVAL
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, len(POOLS), N_LAYERS, SEQ, SEQ))
    rng = np.random.default_rng(0)
    feats[:] = rng.random(feats.shape, dtype=np.float32).astype(np.float16)
    feats.flush()
    labels = np.arange(n) % 3
    return np.load(path, mmap_mode="r"), labels


def train(store, configs, fuse):
    feats, labels = store
    return train_cnns(feats, POOLS, labels, np.arange(N_TRAIN), np.arange(N_TRAIN, N_TRAIN + N_EVAL), 3,
                      configs, TrainConfig(epochs=1, fuse=fuse), progress=False)


@pytest.mark.benchmark(group="cnn-train-4-configs")
def test_sequential(benchmark, store):
    benchmark.pedantic(lambda: [train(store, [c], True) for c in CONFIGS], rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="cnn-train-4-configs")
def test_together(benchmark, store):
    benchmark.pedantic(lambda: train(store, CONFIGS, False), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="cnn-train-4-configs")
def test_together_fused(benchmark, store):
    benchmark.pedantic(lambda: train(store, CONFIGS, True), rounds=3, warmup_rounds=1)
