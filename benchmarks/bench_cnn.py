"""pytest-benchmark: training CNN configs together vs one after another (CPU, small).

    python -m pytest benchmarks/bench_cnn.py --benchmark-enable      # under a minute

The larger run, on the GPU, is `python benchmarks/cnn_timing.py` (see benchmarks/README.md).
Features are read from a float16 .npy memmap, as a feature store holds them.
"""

import pytest

from cnn_timing import MODES, make_store
from mechmem.cnn import PAPER_GRID

CONFIGS = PAPER_GRID[:4]  # k6 x {c10, c16} x {mean, max}: two fusable pairs
N_TRAIN, N_EVAL, N_LAYERS = 128, 32, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "features.npy", N_TRAIN + N_EVAL, N_LAYERS)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.benchmark(group="cnn-train-4-configs-cpu")
def test_train(benchmark, store, mode):
    benchmark.pedantic(MODES[mode], args=(*store, N_TRAIN, CONFIGS, "cpu"), rounds=3, warmup_rounds=1)
