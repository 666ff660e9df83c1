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


class WindowIndex:
    """Every `width`-token window of a stream, hashed and sorted once, for many queries.

    A query's count is the number of positions whose window equals it token for token: hash
    matches are only candidates, so a collision can never make a window occur that does not.
    """

    def __init__(self, stream: Int[np.ndarray, " n_tokens"], width: int):
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        self.stream, self.width = np.asarray(stream), width
        hashes = window_hashes(self.stream, width)
        self.order = np.argsort(hashes, kind="stable")
        self.sorted_hashes = hashes[self.order]

    def occurrences(self, windows: Int[np.ndarray, "n width"], *, chunk: int = 1 << 20,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(row of `windows`, start position in the stream) of every occurrence, confirmed token by
        token; found once, they give the counts in any prefix of the stream (`counts_before`)."""
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[1] != self.width:
            raise ValueError(f"windows must be [n, {self.width}], got shape {windows.shape}")
        q = _hash_rows(windows)
        lo = np.searchsorted(self.sorted_hashes, q, side="left")
        hi = np.searchsorted(self.sorted_hashes, q, side="right")
        # Confirm every candidate position token by token, in chunks of candidate pairs.
        n_cand = hi - lo
        query = np.repeat(np.arange(len(windows)), n_cand)
        starts = np.repeat(lo, n_cand) + (np.arange(n_cand.sum()) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand))
        offsets = np.arange(self.width)
        rows, positions = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for a in tqdm(range(0, len(query), chunk), desc="confirming duplicates",
                      disable=not progress or len(query) <= chunk):
            qi, pos = query[a:a + chunk], self.order[starts[a:a + chunk]]
            same = (self.stream[pos[:, None] + offsets] == windows[qi]).all(axis=1)
            rows.append(qi[same].astype(np.int64))
            positions.append(pos[same].astype(np.int64))
        return np.concatenate(rows), np.concatenate(positions)

    def count(self, windows: Int[np.ndarray, "n width"], *, chunk: int = 1 << 20, progress: bool = True,
              before: int | None = None) -> np.ndarray:
        """How many times each row of `windows` occurs in the stream (int64, exact); with
        `before`, only occurrences starting before that position (a checkpoint's data so far)."""
        rows, positions = self.occurrences(windows, chunk=chunk, progress=progress)
        return counts_before(rows, positions, len(windows), before)

    def contains(self, windows: Int[np.ndarray, "n width"]) -> np.ndarray:
        """Whether each row of `windows` occurs in the stream at all."""
        return self.count(windows, progress=False) > 0


def counts_before(rows: np.ndarray, positions: np.ndarray, n: int, before: int | None = None) -> np.ndarray:
    """Occurrences (`WindowIndex.occurrences`) counted per window, only those starting before
    `before` when given."""
    if before is not None:
        rows = rows[positions < before]
    return np.bincount(rows, minlength=n).astype(np.int64)


def count_windows(
    stream: Int[np.ndarray, " n_tokens"], windows: Int[np.ndarray, "n width"], *, chunk: int = 1 << 20,
    progress: bool = True,
) -> np.ndarray:
    """How many times each row of `windows` occurs in `stream` (int64, exact).

    The generic counter of `mechmem.tables` (the one `experiments/build_table.py` runs on any corpus),
    with this module's hash base; `chunk` and `progress` are kept for callers and unused."""
    from mechmem.tables.windows import SampleSet

    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, width], got shape {windows.shape}")
    if len(windows) == 0:
        return np.zeros(0, dtype=np.int64)
    samples = SampleSet(windows, base=int(_BASE))
    return samples.per_sample(*samples.count(np.asarray(stream)))
