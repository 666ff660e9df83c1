"""Hashes of every fixed-width token window, and the exact count of sample windows in a stream.

The hash is a polynomial in the tokens modulo 2**64. It is built by doubling (the hash of a
2w-token window is the first half's times BASE**w plus the second half's), so a 64-token window
costs 6 vectorised passes over the stream, not 64. It only proposes candidates: every hit is
confirmed token by token, so a collision can never make a count larger than the truth.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int

BASE = 1_000_003
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a hash's top bits, well spread, index the filter


def _pow(base: np.uint64, e: int) -> np.uint64:
    out = np.uint64(1)
    with np.errstate(over="ignore"):
        for _ in range(e):
            out = out * base
    return out


def window_hashes(tokens: Int[np.ndarray, "... n"], width: int, base: int = BASE) -> np.ndarray:
    """uint64 hash of every `width`-token window along the last axis: [..., n - width + 1].

    Rows of exactly `width` tokens give one hash each ([..., 1]): samples and stream windows
    share the function, so equal windows always hash equal."""
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    x = np.asarray(tokens)
    n = x.shape[-1] - width + 1
    if n <= 0:
        return np.zeros((*x.shape[:-1], 0), dtype=np.uint64)
    b = np.uint64(base)
    with np.errstate(over="ignore"):
        level = x.astype(np.uint64) + np.uint64(1)     # hash of 1-token windows (0 never a factor)
        level_width = 1
        acc: np.ndarray | None = None                  # hash of the first `acc_width` tokens of each window
        acc_width = 0
        remaining = width
        while True:
            if remaining & 1:
                # append a `level_width` block after what acc already covers
                part = level[..., acc_width:acc_width + n]
                acc = part.copy() if acc is None else acc * _pow(b, level_width) + part
                acc_width += level_width
            remaining >>= 1
            if not remaining:
                break
            m = level.shape[-1] - level_width
            level = level[..., :m] * _pow(b, level_width) + level[..., level_width:level_width + m]
            level_width *= 2
    assert acc is not None
    return acc


def valid_starts(n: int, width: int, doc_starts: np.ndarray | None) -> np.ndarray:
    """Boolean [n - width + 1]: the windows that lie inside one document (all, without documents)."""
    count = max(n - width + 1, 0)
    ok = np.ones(count, dtype=bool)
    if doc_starts is None or len(doc_starts) <= 1 or count == 0:
        return ok
    starts = np.arange(count)
    ends = np.append(np.asarray(doc_starts)[1:], n)    # each document's end
    doc = np.searchsorted(doc_starts, starts, side="right") - 1
    return starts + width <= ends[np.maximum(doc, 0)]


class SampleSet:
    """The distinct sample windows, sorted by hash, broadcast to every counting worker (small)."""

    def __init__(self, windows: Int[np.ndarray, "n width"], base: int = BASE):
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise ValueError(f"sample windows must be [n >= 1, width], got shape {windows.shape}")
        self.width, self.base = int(windows.shape[1]), int(base)
        unique, self.inverse = np.unique(windows, axis=0, return_inverse=True)
        self.inverse = self.inverse.reshape(-1)
        hashes = window_hashes(unique, self.width, self.base)[:, 0]
        order = np.argsort(hashes, kind="stable")
        self.windows, self.hashes = unique[order], hashes[order]
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.inverse = rank[self.inverse]                # sample -> row of self.windows
        # A bit table over the hashes' mixed top bits: most stream windows are ruled out by one
        # lookup, and only the few that pass are searched for among the sorted hashes.
        self.filter_bits = int(min(26, max(12, np.ceil(np.log2(len(unique))) + 8)))
        self.filter = np.zeros(1 << self.filter_bits, dtype=bool)
        self.filter[self._slot(self.hashes)] = True

    def __getstate__(self) -> dict:
        """What a worker needs, compactly: the bit table is rebuilt there, the sample order is not sent."""
        state = dict(self.__dict__)
        del state["filter"]
        state["inverse"] = None
        small = self.windows.min() >= 0 and self.windows.max() < 2**31
        state["windows"] = self.windows.astype(np.int32) if small else self.windows
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.filter = np.zeros(1 << self.filter_bits, dtype=bool)
        self.filter[self._slot(self.hashes)] = True

    def _slot(self, hashes: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((hashes * _MIX) >> np.uint64(64 - self.filter_bits)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def count(self, stream: Int[np.ndarray, " n"], *, doc_starts: np.ndarray | None = None,
              limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Occurrences in `stream` of each distinct window, as (rows, counts) of the windows found.

        Only window starts below `limit` count (a shard reads width - 1 tokens past its end so that a
        window crossing into the next shard is counted once, here); with `doc_starts`, only windows
        inside one document."""
        stream = np.asarray(stream, dtype=np.int64)
        h = window_hashes(stream, self.width, self.base)
        ok = valid_starts(len(stream), self.width, doc_starts)
        if limit is not None:
            ok[limit:] = False
        pos = np.flatnonzero(self.filter[self._slot(h)] & ok)
        lo = np.searchsorted(self.hashes, h[pos], side="left")
        found = lo < len(self.hashes)
        found[found] = self.hashes[lo[found]] == h[pos[found]]
        pos, lo = pos[found], lo[found]
        if not len(pos):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        # every sample window with the hit's hash is a candidate: confirm each token by token
        hi = np.searchsorted(self.hashes, h[pos], side="right")
        n_cand = hi - lo
        cand_pos = np.repeat(pos, n_cand)
        cand_row = np.repeat(lo, n_cand) + (np.arange(n_cand.sum()) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand))
        same = (stream[cand_pos[:, None] + np.arange(self.width)] == self.windows[cand_row]).all(axis=1)
        rows, counts = np.unique(cand_row[same], return_counts=True)
        return rows.astype(np.int64), counts.astype(np.int64)

    def per_sample(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Counts of the distinct windows (sparse) -> one count per sample, in the samples' order."""
        total = np.zeros(len(self.windows), dtype=np.int64)
        np.add.at(total, rows, counts)
        return total[self.inverse]
