"""pytest-benchmark: monitored generation against plain generation of the same tokens, on the CPU.

    python -m pytest benchmarks/bench_monitor.py --benchmark-enable        # about a minute

The testbed model, 64 prompts of 32 tokens, 32 or 128 new tokens (1 or 4 stretches a prompt). One
process, the same prompts and tokens; compare each group's two means (`plain` is the baseline). The
CNNs are the quick grid's two configs with random weights (a trained row's cost the same).
`benchmarks/monitor_overhead.py` measures the same on a GPU.
"""

import pytest
import torch

from mechmem.cnn import QUICK_GRID, AttentionCNN
from mechmem.memorization import greedy_continuation
from mechmem.models import load_model
from mechmem.monitor import MonitorConfig, SpanClassifier, monitor


@pytest.fixture(scope="module")
def setup():
    model = load_model("testbed", device="cpu")
    torch.manual_seed(0)
    clf = SpanClassifier([AttentionCNN(model.cfg.n_layers, 3, c) for c in QUICK_GRID], ["Non-Memo", "Guess", "Others"])
    prompts = torch.randint(0, 8000, (64, 32), generator=torch.Generator().manual_seed(0))
    return model, clf, prompts


@pytest.mark.parametrize("n_new", [32, 128])
@pytest.mark.parametrize("path", ["plain", "monitored"])
def test_generation(benchmark, setup, path, n_new):
    model, clf, prompts = setup
    benchmark.group = f"monitor-cpu-batch64-new{n_new}"
    if path == "plain":
        run = lambda: greedy_continuation(model, prompts, n_new, batch_size=64, progress=False)  # noqa: E731
    else:
        run = lambda: monitor(model, prompts, clf, MonitorConfig(max_new_tokens=n_new), progress=False)  # noqa: E731
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    tokens = out if path == "plain" else torch.as_tensor(out.outputs)
    assert tokens.shape == (64, n_new)
