"""pytest-benchmark: a row's training seeds in one pass (`Task.seed`) vs one pass a seed (CPU, small).

    python -m pytest benchmarks/bench_seeds.py --benchmark-enable      # about a minute

The GPU run, where the one pass should gain most, is `python benchmarks/seeds_one_pass.py`
(see benchmarks/README.md); both ways give the same CNNs (tests/test_cnn.py).
"""

import numpy as np
import pytest
import torch

from mechmem.cnn import TrainConfig
from seeds_one_pass import one_pass, one_pass_a_seed, rows_of

N_SAMPLES, N_LAYERS, N_ROWS, N_SEEDS = 120, 3, 2, 3
WAYS = {"one pass a seed": one_pass_a_seed, "one pass": one_pass}


@pytest.fixture(scope="module")
def inputs():
    features = torch.rand(N_SAMPLES, 2, N_LAYERS, 64, 64, generator=torch.Generator().manual_seed(0)).half()
    return features, rows_of(N_ROWS, N_SAMPLES, 3, np.random.default_rng(0))


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.benchmark(group="cnn-seeds-cpu")
def test_seeds(benchmark, inputs, way):
    features, rows = inputs
    train = TrainConfig(epochs=2, patience=0, device="cpu")
    benchmark.pedantic(WAYS[way], args=(features, rows, N_SEEDS, train), rounds=2, warmup_rounds=0)
