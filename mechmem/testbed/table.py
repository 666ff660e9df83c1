"""The testbed's memorization table, in the published data's schema.

One row per shipped window: its 64 tokens and text, the model's greedy continuation and
`memorization_score`, the exact `sequence_duplicates` in the training stream, the pattern and
ROUGE columns of `mechmem.heuristics`, and the ground truth only a testbed has: `in_training`,
`planted_count`, `source`.

`sequence_id` is the window's start position in the training stream, or 10**9 plus its position
in the held-out stream, so every row can be traced back to the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mechmem.memorization import PREFIX_LEN
from mechmem.testbed.corpus import SOURCES, Corpus
from mechmem.testbed.duplicates import count_windows

logger = logging.getLogger(__name__)

HELDOUT_ID_OFFSET = 10**9


@dataclass
class TableConfig:
    seed: int = 0
    # Rows shipped per source: a uniform random subset of the scored candidates (None: all).
    # Uniform within a source keeps the table's rates those of the candidates.
    max_rows: dict = field(default_factory=lambda: {"stdlib": 24000, "planted": None, "pattern": None,
                                                    "heldout": 6000, "heldout_pattern": None})


def score_candidates(corpus: Corpus, greedy: np.ndarray, duplicates: np.ndarray | None = None) -> pd.DataFrame:
    """Every scored candidate window, without text or heuristics (the report's population).

    `duplicates`: each window's count in the training data, when the caller has it (a checkpoint
    counts only the part of the stream it was trained on); default: counted in the whole stream.
    """
    tokens = corpus.window_tokens()
    if greedy.shape != (len(tokens), tokens.shape[1] - PREFIX_LEN):
        raise ValueError(f"greedy continuations {greedy.shape} do not match {len(tokens)} candidate windows")
    w = corpus.windows
    dup = count_windows(corpus.train_stream, tokens) if duplicates is None else np.asarray(duplicates, dtype=np.int64)
    return pd.DataFrame({
        "sequence_id": w["position"] + HELDOUT_ID_OFFSET * w["stream"].astype(np.int64),
        "tokens": list(tokens),
        "greedy_suffix": list(greedy.astype(np.int64)),
        "memorization_score": (greedy == tokens[:, PREFIX_LEN:]).mean(axis=1),
        "sequence_duplicates": dup,
        "in_training": dup > 0,
        "planted_count": w["planted_count"],
        "source": w["source"],
        "family": w["family"],
    })


def document_ids(sequence_ids: np.ndarray, streams: tuple[np.ndarray, np.ndarray], eos: int) -> np.ndarray:
    """The EOS-delimited document of each window (`sequence_id`: its position in the training stream,
    or 10**9 plus its position in the held-out one), numbered within its stream (held out: + 10**9).
    The unit the alignment intervals resample: windows of one document are not independent."""
    sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
    stream_of, position = np.divmod(sequence_ids, HELDOUT_ID_OFFSET)
    out = np.empty(len(sequence_ids), dtype=np.int64)
    for s, stream in enumerate(streams):
        at = stream_of == s
        out[at] = HELDOUT_ID_OFFSET * s + np.searchsorted(np.flatnonzero(stream == eos), position[at], side="right")
    return out


def select_rows(candidates: pd.DataFrame, cfg: TableConfig) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    keep = []
    for source in SOURCES:
        idx = np.flatnonzero(candidates["source"].to_numpy() == source)
        cap = cfg.max_rows.get(source)
        if cap is not None and len(idx) > cap:
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        keep.append(idx)
    return candidates.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def add_text_columns(table: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """`text`, and the heuristics' columns when `mechmem.heuristics` is available."""
    tokens = np.stack(table["tokens"].to_numpy())
    table = table.copy()
    table["text"] = tokenizer.decode_batch(tokens.tolist(), skip_special_tokens=False)
    try:
        from mechmem import heuristics
    except ImportError:
        logger.warning("mechmem.heuristics is not available: the table has no pattern/ROUGE/code columns")
        return table
    table["is_incrementing"] = [bool(heuristics.is_incrementing(t)) for t in table["text"]]
    table["is_repeating"] = [bool(heuristics.is_repeating(t)) for t in table["text"]]
    table["is_code"] = [bool(heuristics.is_code(t)) for t in table["text"]]
    rouge_l, rouge_3 = heuristics.rouge_columns(tokens)
    table["rouge_L_prefix_to_suffix"] = np.asarray(rouge_l, dtype=float)
    table["rouge_3_prefix_to_suffix"] = np.asarray(rouge_3, dtype=float)
    return table


COLUMNS = ["sequence_id", "tokens", "text", "memorization_score", "sequence_duplicates", "is_incrementing",
           "is_repeating", "rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix", "is_code", "in_training",
           "planted_count", "source", "family", "greedy_suffix", "stream_duplicates", "document"]


def write_table(table: pd.DataFrame, path, compression_level: int = 19) -> None:
    """The table's published columns as parquet. zstd level 19 keeps the shipped testbed's bytes (and its
    manifest's hashes) as they were; a build that writes a table per checkpoint passes a low level
    (3: 0.9 s against 16 s for 138,420 windows, 6% larger)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [c for c in COLUMNS if c in table.columns]
    t = table[cols].copy()
    for c in ("tokens", "greedy_suffix"):
        t[c] = [np.asarray(x, dtype=np.int64) for x in t[c]]
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), path, compression="zstd",
                   compression_level=compression_level)
