"""`sequence_duplicates`: exact occurrences of each sample's 64 tokens in a whole corpus, on Dask.

Each shard (a token range of one corpus file, `corpus.Shard`) is one task: hash its rolling
windows, keep those whose hash is a sample's (the small sample set is broadcast to every worker
once), confirm every hit token by token (`windows.SampleSet.count`). A task returns only the
samples it found, so results are small; the driver adds them up.

Engines (`CountConfig.scheduler`):
- "local" (default): a `dask.distributed.LocalCluster` started and closed here, one process a
  worker (`workers`, default all cores), one thread each: no service to set up.
- "tcp://HOST:8786": the same tasks on a running Dask cluster (`dask scheduler` + `dask worker`, or
  dask-jobqueue on SLURM). Workers must reach the corpus files at the same paths.
- "synchronous": no cluster; the tasks run one after the other in this process (small corpora,
  tests, debugging).

Resume: with `work_dir`, each finished shard's result is written (atomically) as one small file
named after the shard and the samples' fingerprint; a killed build recounts only the shards
without one. Memory per worker is bounded by a shard (33 bytes a token at peak, measured).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm

from mechmem.atomic import atomic_write
from mechmem.tables.corpus import Corpus, Shard, document_starts, read_tokens
from mechmem.tables.windows import BASE, SampleSet

logger = logging.getLogger(__name__)
SCOPES = ("stream", "document")


@dataclass
class CountConfig:
    scope: str = "stream"            # stream: every window of a file's stream (what packed training
                                     # reads); document: only windows inside one document
    tokens_per_shard: int = 1 << 24  # window starts a task (16M: 0.55 GB of worker memory at peak)
    scheduler: str = "local"         # "local", "synchronous", or a scheduler address tcp://HOST:PORT
    workers: int | None = None       # local cluster: worker processes (default: every core)
    base: int = BASE                 # the rolling hash's base (tests force collisions with 1)

    def check(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {self.tokens_per_shard}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.scheduler not in ("local", "synchronous") and "://" not in self.scheduler:
            raise ValueError(f"scheduler must be 'local', 'synchronous' or an address like tcp://HOST:8786, "
                             f"got {self.scheduler!r}")


def count_shard(shard: Shard, samples: SampleSet, scope: str = "stream", tokenizer: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(distinct sample rows found, their counts, windows scanned) in one shard: the Dask task."""
    n = shard.file.n_tokens or 0
    stop = n if shard.stop is None else shard.stop
    tokens = read_tokens(shard.file, shard.start, min(stop + samples.width - 1, n), tokenizer)
    docs = None
    if scope == "document":
        starts = document_starts(shard.file, tokenizer, shard.start + 1, shard.start + len(tokens)) - shard.start
        docs = np.concatenate([[0], starts])
    rows, counts = samples.count(tokens, doc_starts=docs, limit=stop - shard.start)
    return rows, counts, max(min(stop - shard.start, len(tokens) - samples.width + 1), 0)


def samples_fingerprint(samples: SampleSet, scope: str) -> str:
    """Names a count: the distinct windows, the hash base and the scope (resume never mixes two)."""
    h = hashlib.sha256(samples.windows.astype(np.int64).tobytes())
    h.update(f"{samples.base}:{scope}".encode())
    return h.hexdigest()[:16]


def _result_path(work_dir: Path, shard: Shard) -> Path:
    return work_dir / f"{shard.key}.npz"


def _save(path: Path, rows: np.ndarray, counts: np.ndarray, scanned: int) -> None:
    atomic_write(path, lambda p: np.savez(p, rows=rows, counts=counts, scanned=scanned))


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, int] | None:
    try:
        with np.load(path) as z:
            return z["rows"], z["counts"], int(z["scanned"])
    except (OSError, ValueError, KeyError):
        return None  # torn or foreign: count the shard again


@dataclass
class CountResult:
    counts: np.ndarray               # one per sample
    windows_scanned: int
    shards: int
    shards_resumed: int
    seconds: float
    engine: str


def _client(cfg: CountConfig):
    """A Dask client (and the cluster it started, to close) for the configured scheduler."""
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler == "local":
        cluster = LocalCluster(n_workers=cfg.workers or os.cpu_count() or 1, threads_per_worker=1,
                               processes=True, dashboard_address=None)
        return Client(cluster), cluster
    return Client(cfg.scheduler, timeout="20s"), None


def count_sequences(corpus: Corpus, windows: Int[np.ndarray, "n width"], cfg: CountConfig | None = None, *,
                    work_dir: str | os.PathLike | None = None, progress: bool = True, client=None) -> CountResult:
    """How many times each row of `windows` occurs in the corpus (exact), shard by shard on Dask.

    `client`: a `dask.distributed.Client` already connected (left open); else one for
    `cfg.scheduler` is made here and closed."""
    cfg = cfg or CountConfig()
    cfg.check()
    t0 = time.time()
    samples = SampleSet(windows, cfg.base)
    shards = corpus.shards(cfg.tokens_per_shard)
    folder = None
    if work_dir is not None:
        folder = Path(work_dir) / samples_fingerprint(samples, cfg.scope)
        folder.mkdir(parents=True, exist_ok=True)
    total = np.zeros(len(samples), dtype=np.int64)
    scanned, resumed, todo = 0, 0, []
    for shard in shards:
        done = _load(_result_path(folder, shard)) if folder is not None and _result_path(folder, shard).exists() \
            else None
        if done is None:
            todo.append(shard)
            continue
        np.add.at(total, done[0], done[1])
        scanned += done[2]
        resumed += 1
    bar = tqdm(total=len(shards), initial=resumed, desc="counting windows", unit="shard", disable=not progress)

    def finish(shard: Shard, result) -> None:
        nonlocal scanned
        rows, counts, n = result
        if folder is not None:
            _save(_result_path(folder, shard), rows, counts, n)
        np.add.at(total, rows, counts)
        scanned += n
        bar.update(1)

    engine = cfg.scheduler
    if todo and cfg.scheduler == "synchronous":
        for shard in todo:
            finish(shard, count_shard(shard, samples, cfg.scope, corpus.tokenizer))
    elif todo:
        from dask.distributed import as_completed

        own = client is None
        client, cluster = _client(cfg) if own else (client, None)
        try:
            where = cfg.scheduler if own else "client"
            engine = f"dask {where} ({len(client.scheduler_info().get('workers', {}))} workers)"
            shared = client.scatter(samples, broadcast=True)
            fp = samples_fingerprint(samples, cfg.scope)
            futures = {client.submit(count_shard, s, shared, cfg.scope, corpus.tokenizer, key=f"count-{s.key}-{fp}",
                                     pure=False): s for s in todo}
            for future in as_completed(futures):
                finish(futures[future], future.result())
        finally:
            if own:
                client.close()
            if cluster is not None:
                cluster.close()
    bar.close()
    return CountResult(samples.per_sample(np.flatnonzero(total), total[total > 0]), scanned, len(shards), resumed,
                       round(time.time() - t0, 3), engine)
