"""Greedy extraction for memorization tables: samples labelled per second at Pythia sizes on one GPU.

Each sample is a 32-token prefix decoded greedily for 32 tokens (`mechmem.memorization.
greedy_continuation`, KV cache), as `experiments/build_table.py` labels it. Random weights of each
Pythia size (`mechmem.models.random_pythia`): the cost does not depend on the weights' values.
The model loads as build_table loads it (TransformerBridge, compatibility mode; decoding runs on
the wrapped Hugging Face model).

    python benchmarks/greedy_extraction.py --device cuda --dtype bf16 --sizes 160m 1b 2.8b --n 8192 \
        --batch 256 1024 --out benchmarks/results/greedy_extraction.jsonl
    python benchmarks/greedy_extraction.py --sizes 14m --n 64 --batch 32        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16")
    p.add_argument("--sizes", nargs="+", default=["160m", "1b", "2.8b"])
    p.add_argument("--n", type=int, default=4096, help="samples a run")
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="decoding batch sizes")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args()

    from mechmem.memorization import greedy_continuation
    from mechmem.models import PYTHIA, random_pythia

    device = torch.device(args.device)
    records = []
    for size in args.sizes:
        model = random_pythia(size, device=device, dtype=args.dtype)
        vocab = PYTHIA[size].vocab_size
        prefixes = torch.randint(0, vocab, (args.n, 32), generator=torch.Generator().manual_seed(0))
        for batch in args.batch:
            greedy_continuation(model, prefixes[:batch], 32, batch_size=batch, device=device, progress=False)  # warm
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = greedy_continuation(model, prefixes, 32, batch_size=batch, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            rec = {"size": size, "device": str(device), "gpu": torch.cuda.get_device_name(device)
                   if device.type == "cuda" else None, "dtype": args.dtype, "n": args.n, "batch": batch,
                   "wall_s": round(wall, 3), "samples_per_s": round(args.n / wall, 1),
                   "tokens_per_s": round(args.n * 32 / wall),
                   "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
                   "cached_decoding": bool(getattr(model.original_model, "_mechmem_cache_exact", False))}
            assert out.shape == (args.n, 32)
            print(json.dumps(rec))
            records.append(rec)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
