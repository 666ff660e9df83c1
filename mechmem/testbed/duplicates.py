"""Exact duplicate counts of 64-token windows in a token stream.

`sequence_duplicates` in the published data is how many times a sample's 64 tokens occur in
the training data. Here the training data is one token stream, so the count is exact: every
window of the stream is hashed, the queries are looked up by hash, and every hash match is
confirmed token by token (a hash collision can never inflate a count).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm

_BASE = np.uint64(1_000_003)


def window_hashes(stream: Int[np.ndarray, " n_tokens"], width: int) -> np.ndarray:
    """uint64 polynomial hash of every `width`-token window, one per start position."""
    n = len(stream) - width + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    s = np.asarray(stream).astype(np.uint64) + np.uint64(1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):  # arithmetic mod 2**64
            h = h * _BASE + s[j:j + n]
    return h


def _hash_rows(rows: np.ndarray) -> np.ndarray:
    h = np.zeros(len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows.shape[1]):
            h = h * _BASE + (rows[:, j].astype(np.uint64) + np.uint64(1))
    return h


def count_windows(
    stream: Int[np.ndarray, " n_tokens"], windows: Int[np.ndarray, "n width"], *, chunk: int = 1 << 20,
    progress: bool = True,
) -> np.ndarray:
    """How many times each row of `windows` occurs in `stream` (int64, exact)."""
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, width], got shape {windows.shape}")
    width = windows.shape[1]
    stream = np.asarray(stream)
    hashes = window_hashes(stream, width)
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    q = _hash_rows(windows)
    lo = np.searchsorted(sorted_h, q, side="left")
    hi = np.searchsorted(sorted_h, q, side="right")
    counts = np.zeros(len(windows), dtype=np.int64)
    # Confirm every candidate position token by token, in chunks of candidate pairs.
    n_cand = hi - lo
    query = np.repeat(np.arange(len(windows)), n_cand)
    starts = np.repeat(lo, n_cand) + (np.arange(n_cand.sum()) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand))
    offsets = np.arange(width)
    for a in tqdm(range(0, len(query), chunk), desc="confirming duplicates", disable=not progress or len(query) <= chunk):
        qi, pos = query[a:a + chunk], order[starts[a:a + chunk]]
        same = (stream[pos[:, None] + offsets] == windows[qi]).all(axis=1)
        np.add.at(counts, qi[same], 1)
    return counts
