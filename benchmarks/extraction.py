"""Attention-feature extraction: fused hooks against the plain forward and the paper's path.

All paths run on the same model, in the same process, so their ratio is what matters:
- `plain`: the model's forward pass with no hooks (the floor for any hook-based method);
- `hf_sdpa`: Hugging Face's GPT-NeoX with SDPA attention and the same weights (GPU floor);
- `fused`: `mechmem.features.extract_attention` (pooling inside the hooks, mean and max), which
  runs `mechmem.fastpath`'s lean forward on a Pythia bridge;
- `fused_bridge`: the same extraction through the bridge's own forward (`fastpath=False`);
- `paper`: the original pipeline: `run_with_cache` of every hook, the cache copied to the CPU,
  one HDF5 dataset per sample of all heads' patterns in float16;
- `paper_patterns`: the same with only the pattern hooks cached (the most charitable reading of
  the paper's path: what remains is the copy to the CPU and the per-sample HDF5 writes).

    python benchmarks/extraction.py --sizes 31m --n 64 --batch 16                 # CPU
    python benchmarks/extraction.py --device cuda --dtype bf16 --sizes 410m 1b 2.8b 6.9b 12b --n 2048 \
        --batch 64 auto --hf-sdpa --cnn --paper-n 64                                 # H200
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from mechmem.features import _extract, extract_attention
from mechmem.hooks import pattern_hook
from mechmem.models import _resolve_dtype, build_hf_pythia, pythia_spec, random_pythia


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_forward(model, tokens: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        model(tokens[start : start + batch_size].to(device))
    _sync(device)


def fused(model, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    return extract_attention(model, tokens, pooling=("mean", "max"), batch_size=batch_size)


def fused_bridge(model, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The same extraction through the bridge's own forward instead of mechmem.fastpath."""
    return extract_attention(model, tokens, pooling=("mean", "max"), batch_size=batch_size, fastpath=False)


@torch.no_grad()
def paper_path(model, tokens: torch.Tensor, batch_size: int, h5_path: Path, only_patterns: bool = False) -> None:
    import h5py

    device = next(model.parameters()).device
    n_layers = model.cfg.n_layers
    names = {pattern_hook(l) for l in range(n_layers)}
    kwargs = {"names_filter": lambda name: name in names} if only_patterns else {}
    with h5py.File(h5_path, "w") as f:
        for start in range(0, len(tokens), batch_size):
            _, cache = model.run_with_cache(tokens[start : start + batch_size].to(device), **kwargs)
            cache = {name: act.to("cpu") for name, act in cache.items()}
            patterns = torch.stack([cache[pattern_hook(l)] for l in range(n_layers)], dim=1)
            for i, sample in enumerate(patterns.to(torch.float16).numpy()):
                f.create_dataset(f"sample_{start + i}", data=sample)


def hf_sdpa_twin(size: str, device, dtype):
    """Hugging Face's GPT-NeoX of the same size and seed with SDPA attention (no hooks at all)."""
    return build_hf_pythia(size, device=device, dtype=dtype, seed=0, attn_implementation="sdpa")


def timed(fn, *args, repeats: int = 2) -> tuple[float, float | None]:
    """Best of `repeats` wall-clock runs after one warm-up, and the peak GPU memory (GiB) they reached."""
    fn(*args)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def run_size(size: str, *, n: int, batches: list, device: str, dtype: str, repeats: int, paper: bool,
             paper_n: int | None = None, hf_sdpa: bool = False, hf_eager: bool = False, cnn: bool = False,
             compatibility_mode: bool = True):
    """Yield one row of timings per batch size ("auto": what extraction picks from free GPU memory)."""
    dev = torch.device(device)
    model = random_pythia(size, device=dev, dtype=_resolve_dtype(dtype), compatibility_mode=compatibility_mode)
    twin = hf_sdpa_twin(size, dev, _resolve_dtype(dtype)) if hf_sdpa else None
    tokens = torch.randint(0, model.cfg.d_vocab, (n, 64), generator=torch.Generator().manual_seed(0))
    for asked in batches:
        batch = asked
        row = {"size": size, "device": device, "dtype": dtype, "n": n, "batch_asked": asked,
               "compatibility_mode": compatibility_mode,
               "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads}
        if asked == "auto":
            batch = _extract(model, tokens, pooling=("mean", "max"), batch_size=None, device=dev)[1]
        row["batch"] = batch
        row["plain_s"], row["plain_peak_gib"] = timed(plain_forward, model, tokens, batch, repeats=repeats)
        row["fused_s"], row["fused_peak_gib"] = timed(fused, model, tokens, batch, repeats=repeats)
        row["fused_bridge_s"], _ = timed(fused_bridge, model, tokens, batch, repeats=repeats)
        if twin is not None:
            twin.config._attn_implementation = "sdpa"
            row["hf_sdpa_s"], row["hf_sdpa_peak_gib"] = timed(plain_forward, twin, tokens, batch, repeats=repeats)
            if hf_eager:  # the same model with eager attention
                twin.config._attn_implementation = "eager"
                row["hf_eager_s"], _ = timed(plain_forward, twin, tokens, batch, repeats=repeats)
        row["fused_bytes_per_sample"] = 2 * model.cfg.n_layers * 64 * 64 * 2  # mean+max, float16
        if paper and asked == batches[0]:  # slow: once a size
            with tempfile.TemporaryDirectory() as tmp:
                h5 = Path(tmp) / "paper.h5"
                m = min(n, paper_n or n)  # the paper's path is slow: time it on fewer samples
                row["paper_n"] = m
                t, row["paper_peak_gib"] = timed(paper_path, model, tokens[:m], batch, h5, repeats=1)
                row["paper_s"] = t * n / m
                row["paper_bytes_per_sample"] = os.path.getsize(h5) / m
                t, _ = timed(paper_path, model, tokens[:m], batch, h5, True, repeats=1)
                row["paper_patterns_s"] = t * n / m
        for key in ("plain_s", "fused_s", "fused_bridge_s", "hf_sdpa_s", "hf_eager_s", "paper_s", "paper_patterns_s"):
            if key in row:
                row[key[:-2] + "_samples_per_s"] = n / row[key]
        row["fused_vs_plain"] = row["plain_s"] / row["fused_s"]
        if "hf_sdpa_s" in row:
            row["fused_vs_hf_sdpa"] = row["hf_sdpa_s"] / row["fused_s"]
        if "paper_s" in row:
            row["fused_vs_paper"] = row["paper_s"] / row["fused_s"]
            row["fused_vs_paper_patterns"] = row["paper_patterns_s"] / row["fused_s"]
            row["storage_ratio_per_pool"] = (row["fused_bytes_per_sample"] / 2) / row["paper_bytes_per_sample"]
        yield row
    del model, twin
    if cnn:  # the 8 paper CNNs on this size's number of layers, 2048 samples, 1 epoch
        from cnn_timing import time_modes

        if dev.type == "cuda":
            torch.cuda.empty_cache()
        n_layers = pythia_spec(size).n_layers
        times, _ = time_modes(n_layers, 2048, device, repeats=1, modes=("sequential", "together_fused"))
        yield {"size": size, "device": device, "cnn_n_layers": n_layers, "cnn_train_samples": 2048,
               **{f"cnn_{k}_s": v for k, v in times.items()},
               **{f"cnn_{k}_samples_per_s": 2048 / v for k, v in times.items()},
               "cnn_together_fused_vs_sequential": times["sequential"] / times["together_fused"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["31m"])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", nargs="+", default=["16"],
                   help="one or more batch sizes; 'auto' is the one extraction picks from free GPU memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-paper", action="store_true")
    p.add_argument("--hf-sdpa", action="store_true", help="also time Hugging Face's SDPA forward (GPU floor)")
    p.add_argument("--hf-eager", action="store_true", help="with --hf-sdpa: also its eager attention")
    p.add_argument("--cnn", action="store_true", help="also time training the 8 paper CNNs at each size's depth")
    p.add_argument("--paper-n", type=int, help="time the paper's path on this many samples only")
    p.add_argument("--json", type=Path, help="append rows as JSON lines here")
    p.add_argument("--no-compatibility-mode", action="store_true",
                   help="boot without TransformerLens's weight processing (how 12b was measured, results/)")
    args = p.parse_args()
    batches = [b if b == "auto" else int(b) for b in args.batch]
    for size in args.sizes:
        for row in run_size(size, n=args.n, batches=batches, device=args.device, dtype=args.dtype,
                            repeats=args.repeats, paper=not args.no_paper, paper_n=args.paper_n,
                            hf_sdpa=args.hf_sdpa, hf_eager=args.hf_eager, cnn=args.cnn,
                            compatibility_mode=not args.no_compatibility_mode):
            print(json.dumps(row), flush=True)  # one line at a time, so a later crash loses nothing
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        gc.collect()  # the next size needs this one's memory back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
