import pytest
import torch

import mechmem.batching as B
from mechmem.features import extract_attention


def test_batch_size_fills_the_free_memory_and_is_capped():
    assert B.batch_size_for(per_sample=100, fixed=1000, free=11_000, headroom=1.0) == 100
    assert B.batch_size_for(per_sample=100, fixed=1000, free=11_000, headroom=0.5) == 45
    assert B.batch_size_for(per_sample=1, fixed=0, free=10**12) == B.MAX_BATCH_SIZE
    assert B.batch_size_for(per_sample=10**9, fixed=0, free=10) == 1  # never below one sample


def test_probe_measures_the_per_sample_cost(monkeypatch):
    """Peak memory affine in the batch (5 MB fixed + 3 MB a sample): the probe recovers both terms."""
    mem = {"allocated": 7_000, "peak": 7_000}
    fixed, per_sample, free = 5 * 2**20, 3 * 2**20, 40 * 2**30

    def run(b):
        mem["peak"] = max(mem["peak"], mem["allocated"] + fixed + b * per_sample)

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: mem["allocated"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["allocated"]))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(B, "free_bytes", lambda device: free)
    size = B.probe_batch_size(run, torch.device("cuda"), max_batch=100_000)
    assert size == int((0.85 * free - fixed) // per_sample)
    assert B.probe_batch_size(run, torch.device("cpu")) == B.CPU_BATCH_SIZE


def test_a_batch_that_runs_out_of_memory_is_retried_smaller(caplog):
    seen = []

    def step(start, stop):
        if stop - start > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.append((start, stop))

    with caplog.at_level("WARNING", logger="mechmem"):
        last = B.run_batches(10, 8, step)
    assert "out of memory at batch 8; retrying at 4" in caplog.text
    assert last == 2
    assert seen == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # every sample once, in order


def test_out_of_memory_at_one_sample_is_raised(caplog):
    def step(start, stop):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError), caplog.at_level("WARNING", logger="mechmem"):
        B.run_batches(4, 2, step)
    assert "out of memory" in caplog.text


def test_extraction_survives_out_of_memory_with_the_same_features(tiny_model, tiny_tokens, monkeypatch, caplog):
    expected = extract_attention(tiny_model, tiny_tokens, batch_size=2)
    import mechmem.features as F

    real = F._forward_to_last_pattern

    def tight(model, tokens, fast):
        if len(tokens) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokens, fast)

    monkeypatch.setattr(F, "_forward_to_last_pattern", tight)
    with caplog.at_level("WARNING", logger="mechmem"):
        got = extract_attention(tiny_model, tiny_tokens, batch_size=10)
    assert "out of memory" in caplog.text
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
