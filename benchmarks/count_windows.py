"""Duplicate counting (`mechmem.tables.count`): 64-token windows counted per second per worker.

A synthetic corpus of .npy shards (random ids of Pythia's vocabulary, with the sample windows
planted a few times so that confirmation has hits to check) is counted against a sample set on a
Dask LocalCluster of 1, 2, ... worker processes (one thread each). The cluster is started and
warmed up before the clock starts: the figure is the steady counting rate, what a long build sees.
`synchronous` is the same task in this process, no Dask. Every run's counts are checked equal.

    python benchmarks/count_windows.py --tokens 64e6 --workers 1 2 --out benchmarks/results/count.jsonl
    python benchmarks/count_windows.py --tokens 1e9 --workers 1 2 4 8 16   # the GPU machine's CPUs

From the rate per worker r (windows/s) the Pile (about 300e9 tokens: as many windows) takes
300e9 / (r x cores) seconds, if workers scale and the disks keep up (each worker reads 2 bytes a
token: r x cores x 2 B/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

PILE_TOKENS = 300e9


def make_corpus(folder: Path, tokens: int, files: int, n_samples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    per = tokens // files
    streams = [rng.integers(0, 50_000, per, dtype=np.uint16) for _ in range(files)]
    samples = np.stack([streams[0][p:p + 64] for p in rng.integers(0, per - 64, n_samples)]).astype(np.int64)
    for s in streams:  # plant a few samples a few times
        for k in rng.integers(0, n_samples, 50):
            at = int(rng.integers(0, per - 64))
            s[at:at + 64] = samples[k]
    for k, s in enumerate(streams):
        np.save(folder / f"part-{k:03d}.npy", s)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=32e6)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--tokens-per-shard", type=int, default=1 << 22)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (0: every core)")
    p.add_argument("--no-synchronous", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args()

    from dask.distributed import Client, LocalCluster

    from mechmem.tables.corpus import Corpus
    from mechmem.tables.count import CountConfig, count_sequences

    cores = os.cpu_count() or 1
    records, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        samples = make_corpus(Path(folder), int(args.tokens), args.files, args.samples)
        corpus = Corpus.open(folder)
        runs = ([] if args.no_synchronous else [("synchronous", 1)]) + \
            [("local", w or cores) for w in args.workers]
        for engine, workers in runs:
            cfg = CountConfig(scheduler="synchronous" if engine == "synchronous" else "local", workers=workers,
                              tokens_per_shard=args.tokens_per_shard)
            if engine == "synchronous":
                t0 = time.perf_counter()
                result = count_sequences(corpus, samples, cfg, progress=False)
                wall = time.perf_counter() - t0
                startup = 0.0
            else:
                t0 = time.perf_counter()
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
                client = Client(cluster)
                client.run(lambda: __import__("mechmem.tables.count"))  # imports paid before the clock
                startup = time.perf_counter() - t0
                t0 = time.perf_counter()
                result = count_sequences(corpus, samples, cfg, progress=False, client=client)
                wall = time.perf_counter() - t0
                client.close()
                cluster.close()
            if reference is None:
                reference = result.counts
            assert np.array_equal(result.counts, reference), "engines disagree"
            rate = result.windows_scanned / wall
            rec = {"engine": engine, "workers": workers, "cores": cores, "tokens": corpus.n_tokens,
                   "samples": len(samples), "shards": result.shards, "tokens_per_shard": args.tokens_per_shard,
                   "wall_s": round(wall, 3), "startup_s": round(startup, 2),
                   "windows_per_s": round(rate), "windows_per_s_per_worker": round(rate / workers),
                   "pile_hours_64_cores": round(PILE_TOKENS / (rate / workers * 64) / 3600, 1),
                   "pile_hours_512_cores": round(PILE_TOKENS / (rate / workers * 512) / 3600, 2),
                   "cpu": platform.processor() or platform.machine(), "hits": int((result.counts > 0).sum())}
            print(json.dumps(rec))
            records.append(rec)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
