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

# The polynomial hash by doubling (6 passes over the stream for 64 tokens), shared with `mechmem.tables`.
from mechmem.tables.windows import BASE, window_hashes

_BASE = BASE  # the hash's base, read at each call (a test sets 0: every window collides)


def _hash_rows(rows: np.ndarray) -> np.ndarray:
    return window_hashes(rows, rows.shape[1], _BASE)[:, 0]


def stable_sort(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`np.argsort(keys, kind="stable")`, the keys in that order), the same indices in 15 s instead of
    35 at 10**8 windows: an unstable sort, then each run of equal keys (the repeated windows) put back
    in ascending index order by one sort of (run, index) packed in an int64 (exact up to 4 * 10**9
    keys). Re-sorting within runs of equal keys leaves the sorted keys as they are."""
    order = np.argsort(keys)
    ranked = keys[order]
    equal = ranked[1:] == ranked[:-1]
    tied = np.flatnonzero(np.r_[equal, False] | np.r_[False, equal])  # sorted slots in a run of >= 2
    if len(tied):
        slots, tied_keys = order[tied], ranked[tied]
        run = np.cumsum(np.r_[True, tied_keys[1:] != tied_keys[:-1]])
        order[tied] = slots[np.argsort(run * len(keys) + slots)]
    return order, ranked


class WindowIndex:
    """Every `width`-token window of a stream, hashed and sorted once, for many queries.

    A query's count is the number of positions whose window equals it token for token: hash
    matches are only candidates, so a collision can never make a window occur that does not.
    """

    def __init__(self, stream: Int[np.ndarray, " n_tokens"], width: int):
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
        self.stream, self.width = np.asarray(stream), width
        hashes = window_hashes(self.stream, width, _BASE)
        self.order, self.sorted_hashes = stable_sort(hashes)

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
    samples = SampleSet(windows, base=_BASE)
    return samples.per_sample(*samples.count(np.asarray(stream)))
