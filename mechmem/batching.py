"""Batch sizes for model passes: chosen from free GPU memory, and halved when a batch does not fit.

A larger batch amortises the hooked model's per-module Python (at 1b on an H200 the extraction
goes from 0.58x to 0.85x of Hugging Face's SDPA forward between batch 64 and 256), so when no
batch size is given the largest one that fits is used. How much a sample costs is measured, not
guessed: after one warm-up pass (the first pass allocates what then stays: cuBLAS workspaces,
caches; charged to the probe it would make the slope negative), two probe batches are run and the
slope of their peak memory is the per-sample cost, never negative (`per_sample_cost`).
Whatever the estimate, a batch that raises `torch.OutOfMemoryError` is retried at half the size,
and the smaller size is kept for the batches after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 64  # no memory probe on a CPU: compute, not memory, is what limits it there
MAX_BATCH_SIZE = 1024  # beyond this the bridge's Python is amortised and nothing more is won


def free_bytes(device: torch.device) -> int | None:
    """Bytes the CUDA allocator can still get on `device` (free on the device plus its own cache)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def batch_size_for(per_sample: float, fixed: float, free: float, *, headroom: float = 0.85,
                   max_batch: int = MAX_BATCH_SIZE) -> int:
    """The largest batch whose `fixed + batch * per_sample` bytes fit in `headroom` of `free`."""
    if per_sample <= 0:
        return max_batch
    return int(max(1, min(max_batch, (headroom * free - max(fixed, 0.0)) // per_sample)))


def per_sample_cost(sizes: tuple[int, int], peaks: tuple[float, float]) -> tuple[float, float, bool]:
    """(bytes a sample, fixed bytes, measured) from the peak memory of passes over `sizes` samples.

    The slope of peak memory in the batch when it is positive (`measured`); otherwise (noise, an
    allocation that came and went between the passes) the larger pass's peak charged to its samples,
    an upper bound, with nothing fixed. Never negative: a negative estimate would read as "samples
    are free" and size the batch to the cap.
    """
    (small, large), (low, high) = sizes, peaks
    slope = (high - low) / (large - small)
    if slope > 0:
        return slope, low - small * slope, True
    return max(high, low, 0.0) / large, 0.0, False


def probe_batch_size(run: Callable[[int], None], device: torch.device, *, probe: int = 4,
                     max_batch: int = MAX_BATCH_SIZE) -> int:
    """Batch size for `run(b)` (a pass over b samples) from the peak memory of two probe passes.

    Peak memory of a pass is affine in the batch: `fixed + b * per_sample`. After an unmeasured
    warm-up pass, passes of `probe` and `2 * probe` samples give both terms; the batch is then
    sized to the memory that is free.
    """
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    run(probe)  # warm-up: what the first pass leaves allocated is the model's, not the samples'
    peaks = []
    for b in (probe, 2 * probe):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(b)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_sample, fixed, measured = per_sample_cost((probe, 2 * probe), (peaks[0], peaks[1]))
    free = free_bytes(device)
    assert free is not None, "probing needs a cuda device"
    size = batch_size_for(per_sample, fixed, free, max_batch=max_batch)
    logger.info("batch size %d from free GPU memory (%.2f MB a sample%s)", size, per_sample / 2**20,
                "" if measured else ", an upper bound: the probe passes did not grow with the batch")
    return size


def run_batches(n: int, batch_size: int, step: Callable[[int, int], None], *, progress=None) -> int:
    """Call `step(start, stop)` over [0, n) in batches; a batch that runs out of memory is retried
    at half the size. Returns the batch size that was last used (so a caller can keep it)."""
    start = 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            step(start, stop)
        except torch.OutOfMemoryError:
            if stop - start == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, (stop - start) // 2)
            logger.warning("out of memory at batch %d; retrying at %d", stop - start, batch_size)
            continue
        if progress is not None:
            progress.update(stop - start)
        start = stop
    return batch_size
