"""pytest-benchmark: one CNN training step on the CPU, default layout vs channels-last.

    python -m pytest benchmarks/bench_cnn_layout.py --benchmark-enable      # under a minute

Why `mechmem.cnn` trains channels-last on the CPU: oneDNN's convolutions for these shapes (6 input
channels of 64x64, kernel 6, 10 channels) run faster in that layout (1.3x at batch 16). One process, the
same model and batch; compare the two groups' means. The results equal each other to float rounding.
"""

import pytest
import torch

from mechmem.cnn import AttentionCNN, CNNConfig


@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.benchmark(group="cnn-step-cpu-layout")
def test_train_step(benchmark, layout, batch):
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = AttentionCNN(6, 3, CNNConfig(6, 10, "mean")).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 6, 64, 64).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
