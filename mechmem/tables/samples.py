"""The samples a table labels: 64-token windows drawn from the corpus (seeded), or another table's.

- "positions": uniform over every window start of every file's stream (documents joined as
  stored: the windows packed training reads, as Pythia's memorization evaluation reads them).
- "documents": a document uniformly among those of at least 64 tokens, then a start uniformly
  inside it (the window never crosses a boundary); long documents weigh no more than short ones.

Samples are distinct positions, drawn without replacement; `sequence_id` is the window's global
token offset (`corpus` module docstring).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int

from mechmem.tables.corpus import Corpus, CorpusFile, document_starts, read_tokens

SAMPLINGS = ("positions", "documents")
WIDTH = 64


def _file_windows(file: CorpusFile, starts: np.ndarray, width: int, tokenizer: str | None) -> np.ndarray:
    if not len(starts):
        return np.zeros((0, width), dtype=np.int64)
    lo, hi = int(starts.min()), int(starts.max()) + width
    if file.kind in ("megatron", "npy") and hi - lo > (1 << 24):   # sparse: one small read a window
        return np.stack([read_tokens(file, int(s), int(s) + width, tokenizer) for s in starts])
    block = read_tokens(file, lo, hi, tokenizer)
    return block[(starts - lo)[:, None] + np.arange(width)]


def window_tokens(corpus: Corpus, ids: Int[np.ndarray, " n"], width: int = WIDTH) -> Int[np.ndarray, "n width"]:
    """The tokens of the windows at global offsets `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    offsets = corpus.offsets()
    which = np.searchsorted(offsets, ids, side="right") - 1
    out = np.zeros((len(ids), width), dtype=np.int64)
    for k, f in enumerate(corpus.files):
        rows = np.flatnonzero(which == k)
        if len(rows):
            out[rows] = _file_windows(f, ids[rows] - offsets[k], width, corpus.tokenizer)
    return out


def _document_room(corpus: Corpus, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Global start offsets and window counts of every document that holds a window."""
    starts, room = [], []
    for f, off in zip(corpus.files, corpus.offsets()):
        s = document_starts(f, corpus.tokenizer)
        ends = np.append(s[1:], f.n_tokens or 0)
        r = np.maximum(ends - s - width + 1, 0)
        keep = r > 0
        starts.append(s[keep] + off)
        room.append(r[keep])
    return np.concatenate(starts).astype(np.int64), np.concatenate(room).astype(np.int64)


def available(corpus: Corpus, sampling: str = "positions", width: int = WIDTH) -> int:
    """How many distinct windows `sampling` can draw."""
    if sampling == "positions":
        return int(sum(max(n - width + 1, 0) for n in corpus.lengths()))
    return int(_document_room(corpus, width)[1].sum())


def draw(corpus: Corpus, n: int, *, seed: int = 0, sampling: str = "positions", width: int = WIDTH
         ) -> tuple[Int[np.ndarray, " n"], Int[np.ndarray, "n width"]]:
    """(sequence ids, tokens) of `n` distinct windows, sorted by id. ValueError if the corpus has fewer."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    have = available(corpus, sampling, width)
    if n > have:
        raise ValueError(f"--samples {n} is more than the corpus can give: {have} distinct {width}-token windows "
                         f"({sampling})")
    rng = np.random.default_rng(seed)
    if sampling == "positions":
        room = np.array([max(m - width + 1, 0) for m in corpus.lengths()], dtype=np.int64)
        flat = np.sort(rng.choice(int(room.sum()), size=n, replace=False))
        cum = np.cumsum(room)
        k = np.searchsorted(cum, flat, side="right")
        ids = corpus.offsets()[k] + flat - (cum[k] - room[k])
    else:
        starts, room = _document_room(corpus, width)
        chosen: set[int] = set()
        while len(chosen) < n:  # documents uniformly, then a start inside; redraw repeats
            docs = rng.integers(0, len(starts), size=2 * (n - len(chosen)))
            picks = starts[docs] + (rng.random(len(docs)) * room[docs]).astype(np.int64)
            for p in picks.tolist():
                if len(chosen) < n:
                    chosen.add(p)
        ids = np.array(sorted(chosen), dtype=np.int64)
    return ids.astype(np.int64), window_tokens(corpus, ids, width)
