"""pytest-benchmark: fused extraction vs the plain forward vs the paper's HDF5 path (CPU).

    python -m pytest benchmarks/bench_extraction.py --benchmark-enable

Same model (random Pythia-31m shapes: 6 layers, 8 heads), same tokens, same process; compare
the three timings (ratios in benchmarks/README.md).
"""

import pytest
import torch

from extraction import fused, paper_path, plain_forward
from mechmem.models import random_pythia

N, BATCH = 32, 16


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = random_pythia("31m", device="cpu")
    tokens = torch.randint(0, model.cfg.d_vocab, (N, 64), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_plain_forward(benchmark, setup):
    benchmark.pedantic(plain_forward, args=(*setup, BATCH), rounds=3, warmup_rounds=1)


def test_fused_extraction(benchmark, setup):
    benchmark.pedantic(fused, args=(*setup, BATCH), rounds=3, warmup_rounds=1)


def test_paper_path(benchmark, setup, tmp_path):
    benchmark.pedantic(paper_path, args=(*setup, BATCH, tmp_path / "paper.h5"), rounds=3, warmup_rounds=1)
