import pytest
import torch

import mechmem.batching as B
from mechmem.features import extract_attention


def test_batch_size_fills_the_free_memory_and_is_capped():
    assert B.batch_size_for(per_sample=100, fixed=1000, free=11_000, headroom=1.0) == 100
    assert B.batch_size_for(per_sample=100, fixed=1000, free=11_000, headroom=0.5) == 45
    assert B.batch_size_for(per_sample=1, fixed=0, free=10**12) == B.MAX_BATCH_SIZE
    assert B.batch_size_for(per_sample=10**9, fixed=0, free=10) == 1  # never below one sample


def _fake_cuda(monkeypatch, peak_of, free, *, first_pass_keeps=0):
    """torch.cuda's memory counters over a fake pass: `run(b)` peaks at `peak_of(b)` bytes above what
    is allocated; the first pass leaves `first_pass_keeps` bytes allocated (a cuBLAS workspace)."""
    mem = {"allocated": 7_000, "peak": 7_000, "passes": 0}

    def run(b):
        if mem["passes"] == 0:
            mem["allocated"] += first_pass_keeps
        mem["passes"] += 1
        mem["peak"] = max(mem["peak"], mem["allocated"] + peak_of(b))

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: mem["allocated"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["allocated"]))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(B, "free_bytes", lambda device: free)
    return run


def test_probe_measures_the_per_sample_cost(monkeypatch):
    """Peak memory affine in the batch (5 MB fixed + 3 MB a sample): the probe recovers both terms."""
    fixed, per_sample, free = 5 * 2**20, 3 * 2**20, 40 * 2**30
    run = _fake_cuda(monkeypatch, lambda b: fixed + b * per_sample, free)
    size = B.probe_batch_size(run, torch.device("cuda"), max_batch=100_000)
    assert size == int((0.85 * free - fixed) // per_sample)
    assert B.probe_batch_size(run, torch.device("cpu")) == B.CPU_BATCH_SIZE


def test_what_the_first_pass_leaves_allocated_is_not_a_per_sample_cost(monkeypatch, caplog):
    """A GPU's first pass allocates a 32 MB workspace that stays: charged to the 4-sample probe it
    made the slope -5 MB a sample and the batch the cap ("-7.03 MB a sample" on an H100). The
    warm-up pass takes it out of the measurement."""
    fixed, per_sample, free = 5 * 2**20, 3 * 2**20, 2 * 2**30
    run = _fake_cuda(monkeypatch, lambda b: fixed + b * per_sample, free, first_pass_keeps=32 * 2**20)
    with caplog.at_level("INFO", logger="mechmem"):
        size = B.probe_batch_size(run, torch.device("cuda"))
    assert size == int((0.85 * free - fixed) // per_sample) < B.MAX_BATCH_SIZE
    assert "(3.00 MB a sample)" in caplog.text


def test_the_per_sample_estimate_is_never_negative(monkeypatch, caplog):
    assert B.per_sample_cost((4, 8), (17.0, 29.0)) == (3.0, 5.0, True)  # affine: exact
    assert B.per_sample_cost((4, 8), (100.0, 60.0)) == (12.5, 0.0, False)  # shrinking: the larger peak / 8
    assert B.per_sample_cost((4, 8), (0.0, 0.0)) == (0.0, 0.0, False)
    free = 2 * 2**30  # a pass whose measured peak shrinks with the batch: the upper bound sizes it
    run = _fake_cuda(monkeypatch, lambda b: (40 - b) * 2**20, free)
    with caplog.at_level("INFO", logger="mechmem"):
        size = B.probe_batch_size(run, torch.device("cuda"))
    assert size == int(0.85 * free // (36 * 2**20 / 4 / 2))  # the 4-sample pass's 36 MB over 8 samples
    assert "(4.50 MB a sample, an upper bound" in caplog.text and "-" not in caplog.text


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
