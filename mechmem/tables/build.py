"""A memorization table for any model, checkpoint and corpus, in the published schema, with a manifest.

Stages, each resumable from the output folder's `work/`:
1. samples: drawn from the corpus (`samples.draw`) or another table's rows (`--samples-from`);
2. labels: greedy extraction with the model at its revision (`mechmem.memorization`, KV cache;
   under torchrun each rank decodes its chunks) -> `memorization_score`, `greedy_suffix`;
3. counts: exact `sequence_duplicates` over the whole corpus on Dask (`count.count_sequences`);
4. table: text (the model's tokenizer), heuristics and ROUGE columns (`mechmem.heuristics` via
   `mechmem.data`), the label columns (`relabel`), written atomically beside `manifest.json`
   (model, revision, weights fingerprint, corpus files with hashes, counts, timings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechmem.atomic import atomic_json, atomic_write, sha256_file
from mechmem.data import (PREFIX_LEN, SEQ_LEN, add_derived_columns, check_vocab, load_memorization_data, tokens_array,
                          validate)
from mechmem.distributed import Dist
from mechmem.tables import samples as S
from mechmem.tables.corpus import Corpus
from mechmem.tables.count import CountConfig, count_sequences
from mechmem.tables.relabel import Labeller, load_tokenizer

logger = logging.getLogger(__name__)
TABLE_FILE, MANIFEST_FILE = "memorization.parquet", "manifest.json"
RECOMPUTED = ("memorization_score", "greedy_suffix", "sequence_duplicates", "text", "is_incrementing",
              "is_repeating", "is_code", "rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix",
              "label_model", "label_revision", "label_weights")


@dataclass
class BuildConfig:
    samples: int | None = None           # draw this many windows from the corpus...
    samples_from: str | None = None      # ...or relabel this table's sequences
    sampling: str = "positions"          # positions | documents (samples.SAMPLINGS)
    seed: int = 0
    batch_size: int = 256                # greedy decoding batch
    chunk: int = 4096                    # samples a greedy chunk: the unit of resume and of torchrun work
    hash_corpus: bool = True             # SHA-256 of every corpus file in the manifest (reads it all once)
    count: CountConfig = field(default_factory=CountConfig)

    def check(self) -> None:
        if (self.samples is None) == (self.samples_from is None):
            raise ValueError("give exactly one of --samples N or --samples-from TABLE")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.sampling not in S.SAMPLINGS:
            raise ValueError(f"--sampling must be one of {', '.join(S.SAMPLINGS)}, got {self.sampling!r}")
        if self.batch_size < 1 or self.chunk < 1:
            raise ValueError("--batch-size and --chunk must be >= 1")
        self.count.check()


def corpus_paths(paths: list[str]) -> list[str]:
    """'testbed' is the testbed's rebuilt training stream (`mechmem.testbed.membership`, cached)."""
    out = []
    for p in paths:
        if p == "testbed":
            from mechmem.testbed.membership import cache_dir, training_corpus

            training_corpus()
            out.append(str(cache_dir() / "train_stream.npy"))
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------ samples
def _source_table(source: str) -> pd.DataFrame:
    """The sequences of a memorization table, or of any parquet/JSON-lines file with just
    `sequence_id` and `tokens` (64 ids a row): what is recomputed is dropped, other columns kept."""
    try:
        df = load_memorization_data(source, progress=False)
    except ValueError as err:
        if "is missing" not in str(err) or not Path(source).is_file():
            raise
        from mechmem.data import _read_table

        df = _read_table(Path(source))
        for column in ("sequence_id", "tokens"):
            if column not in df.columns:
                raise ValueError(f"--samples-from {source}: column {column!r} is missing") from None
        df = df.assign(tokens=list(tokens_array(df)))
        if not df["sequence_id"].is_unique:
            raise ValueError(f"--samples-from {source}: sequence_id repeats") from None
    return df.drop(columns=[c for c in RECOMPUTED if c in df.columns]).reset_index(drop=True)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def samples_file(corpus: Corpus, cfg: BuildConfig, work: Path) -> Path:
    """Where the samples of these settings are kept: another --samples or --seed never resumes them."""
    return work / f"samples-{_key(cfg.samples, cfg.samples_from, cfg.sampling, cfg.seed, corpus.describe())}.parquet"


def prepare_samples(corpus: Corpus, cfg: BuildConfig, work: Path, d_vocab: int | None = None) -> pd.DataFrame:
    """sequence_id and tokens (plus a source table's own columns), saved once in `work`: a resumed
    build labels the very same samples. With `d_vocab`, samples holding a token id outside the
    model's vocabulary are refused (`data.check_vocab`) before anything is written."""
    path = samples_file(corpus, cfg, work)
    if path.exists():
        return pd.read_parquet(path)
    if cfg.samples_from is not None:
        df = _source_table(cfg.samples_from)
    else:
        ids, tokens = S.draw(corpus, cfg.samples, seed=cfg.seed, sampling=cfg.sampling)  # type: ignore[arg-type]
        df = pd.DataFrame({"sequence_id": ids, "tokens": list(tokens)})
    if d_vocab is not None:
        check_vocab(df, d_vocab)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: df.to_parquet(p))
    return df


# ------------------------------------------------------------------------------------------ labels
def greedy_labels(model, tokens: np.ndarray, folder: Path, cfg: BuildConfig, *, dist: Dist = Dist(),
                  device=None, progress: bool = True) -> np.ndarray:
    """[n, 32] greedy continuations of every sample's prefix, chunk by chunk into `folder`
    (resumable; under torchrun each rank decodes every world_size-th chunk, rank 0 reads them all)."""
    from mechmem.memorization import greedy_continuation

    folder.mkdir(parents=True, exist_ok=True)
    chunks = list(range(0, len(tokens), cfg.chunk))

    def path(i: int) -> Path:
        return folder / f"chunk-{i:09d}-{min(i + cfg.chunk, len(tokens)):09d}.npy"

    mine = [i for i in dist.share(chunks) if not path(i).exists()]
    for i in tqdm(mine, desc="greedy extraction", unit="chunk", disable=not progress or len(mine) < 2):
        prefix = torch.from_numpy(tokens[i:i + cfg.chunk, :PREFIX_LEN])
        new = greedy_continuation(model, prefix, SEQ_LEN - PREFIX_LEN, batch_size=cfg.batch_size, device=device,
                                  progress=progress and len(mine) < 2)
        array = new.numpy().astype(np.int64)
        atomic_write(path(i), lambda p: np.save(p, array))  # noqa: B023  (called at once)
    dist.barrier()
    if not chunks:
        return np.zeros((0, SEQ_LEN - PREFIX_LEN), dtype=np.int64)
    return np.concatenate([np.load(path(i)) for i in chunks])


# ------------------------------------------------------------------------------------------ table
def assemble(samples: pd.DataFrame, greedy: np.ndarray, duplicates: np.ndarray, tokenizer,
             labeller: Labeller, *, progress: bool = True) -> pd.DataFrame:
    """The published schema (plus greedy_suffix, the label columns and a source table's own columns)."""
    from mechmem import heuristics

    tokens = tokens_array(samples)
    df = samples.copy()
    df["tokens"] = list(tokens)
    df["text"] = tokenizer.batch_decode(tokens.tolist())
    df["memorization_score"] = (greedy == tokens[:, PREFIX_LEN:]).mean(axis=1)
    df["sequence_duplicates"] = np.asarray(duplicates, dtype=np.int64)
    texts = tqdm(df["text"].tolist(), desc="heuristics", disable=not progress or len(df) < 10_000)
    flags = [(heuristics.is_incrementing(t), heuristics.is_repeating(t)) for t in texts]
    df["is_incrementing"] = np.array([f[0] for f in flags], dtype=bool)
    df["is_repeating"] = np.array([f[1] for f in flags], dtype=bool)
    df = add_derived_columns(validate(df), progress=progress)
    df["greedy_suffix"] = list(greedy.astype(np.int64))
    df["label_model"] = labeller.model
    df["label_revision"] = labeller.revision
    df["label_weights"] = labeller.weights
    return df


def write_table(df: pd.DataFrame, path: Path) -> None:
    out = df.copy()
    for c in ("tokens", "greedy_suffix"):
        out[c] = [np.asarray(x, dtype=np.int64) for x in out[c]]
    atomic_write(path, lambda p: out.to_parquet(p, index=False))


@dataclass
class Built:
    table: pd.DataFrame
    manifest: dict


def build_table(model, model_name: str, revision: str | None, corpus: Corpus, cfg: BuildConfig,
                out: str | os.PathLike, *, dist: Dist = Dist(), device=None, progress: bool = True) -> Built | None:
    """Label samples of `corpus` with `model` (loaded from `model_name` at `revision`) into
    `out/memorization.parquet` and `out/manifest.json`. Returns None on ranks other than 0."""
    from mechmem.models import weights_fingerprint

    out = Path(out)
    work = out / "work"
    timings: dict[str, float] = {}
    t = time.time()
    samples = prepare_samples(corpus, cfg, work) if dist.is_main else None
    dist.barrier()
    if samples is None:
        samples = pd.read_parquet(samples_file(corpus, cfg, work))
    tokens = tokens_array(samples)
    timings["samples_s"] = round(time.time() - t, 3)
    t = time.time()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    greedy_dir = work / f"greedy-{samples_file(corpus, cfg, work).stem}-{_key(model_name, revision, dtype)}"
    greedy = greedy_labels(model, tokens, greedy_dir, cfg, dist=dist, device=device, progress=progress)
    timings["greedy_s"] = round(time.time() - t, 3)
    if not dist.is_main:
        return None
    counted = count_sequences(corpus, tokens, cfg.count, work_dir=work / "counts", progress=progress)
    timings["count_s"] = counted.seconds
    t = time.time()
    labeller = Labeller(model_name, revision, weights_fingerprint(model))
    table = assemble(samples, greedy, counted.counts, load_tokenizer(model_name, revision), labeller,
                     progress=progress)
    write_table(table, out / TABLE_FILE)
    timings["table_s"] = round(time.time() - t, 3)
    files = corpus.describe()
    if cfg.hash_corpus:
        for f in tqdm(files, desc="hashing corpus", disable=not progress or len(files) < 2):
            f["sha256"] = sha256_file(f["path"])
    memo = table["memorization_score"].to_numpy() == 1
    manifest = {
        "model": model_name, "revision": revision, "weights_fingerprint": labeller.weights,
        "model_name_loaded": getattr(model, "mechmem_name", None),
        "dtype": dtype,
        "corpus": {"paths": corpus.paths, "files": files, "tokens": corpus.n_tokens, "tokenizer": corpus.tokenizer},
        "config": asdict(cfg),
        "counts": {"samples": int(len(table)), "extractable": int(memo.sum()),
                   "in_corpus": int((table["sequence_duplicates"] > 0).sum()),
                   "windows_scanned": counted.windows_scanned, "shards": counted.shards,
                   "shards_resumed": counted.shards_resumed, "engine": counted.engine,
                   "world_size": dist.world_size},
        "timings": timings,
        "table": TABLE_FILE,
    }
    atomic_json(out / MANIFEST_FILE, manifest, default=str)
    return Built(table, manifest)


def read_manifest(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / MANIFEST_FILE).read_text())
