"""Compatibility mode on a GPU too small for TransformerLens's weight processing.

    python benchmarks/compat_offload.py --size 1b --check   # forced half offload vs none: same weights?
    python benchmarks/compat_offload.py --size 12b          # does 12b boot in compat mode on one H200?

`mechmem.models.enable_compatibility_mode` processes the last blocks on the CPU when processing
all of them on the GPU would not fit. With --check, one model is processed wholly on the GPU and
a second (same seed) with half its blocks on the CPU; the script prints how far their processed
weights and attention patterns differ. Without it, it boots SIZE in compat mode with the offload
the free memory calls for and compares its patterns with the same weights unprocessed.
Random Pythia weights, bf16; one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mechmem.features import extract_attention
from mechmem.models import PROCESSING_OVERHEAD, enable_compatibility_mode, param_bytes, random_pythia


def patterns(model, tokens) -> torch.Tensor:
    return extract_attention(model, tokens, per_head=True, batch_size=len(tokens))


def weight_diff(a, b) -> dict:
    sa, sb = a.state_dict(), b.state_dict()
    worst, differing, total = 0.0, 0, 0
    for k, x in sa.items():
        y = sb[k]
        if x.is_floating_point():
            d = (x.float() - y.float()).abs()
            worst, differing, total = max(worst, d.max().item()), differing + int((d > 0).sum()), total + d.numel()
    return {"weights_max_abs_diff": worst, "weights_fraction_differing": differing / max(total, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b")
    p.add_argument("--check", action="store_true", help="force half the blocks to the CPU; compare")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    dev = torch.device("cuda")
    tokens = torch.randint(0, 50_000, (args.batch, 64))
    make = lambda: random_pythia(args.size, device=dev, dtype="bf16", compatibility_mode=False)

    model = make()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    free = None
    if args.check:  # just enough free memory for processing all but the last half of the blocks
        kept = param_bytes(model) - param_bytes(model.blocks[0]) * (len(model.blocks) // 2)
        free = int((1 + PROCESSING_OVERHEAD[torch.bfloat16]) * kept)
    t0 = time.perf_counter()
    offload = enable_compatibility_mode(model, dev, free_bytes=free)
    torch.cuda.synchronize()
    row = {"size": args.size, "gpu": torch.cuda.get_device_name(), "blocks": len(model.blocks),
           "blocks_processed_on_cpu": len(offload), "processing_s": round(time.perf_counter() - t0, 1),
           "model_gb": base / 1e9, "peak_gb_while_processing": torch.cuda.max_memory_allocated() / 1e9,
           "on_gpu_after": all(p.device.type == "cuda" for p in model.parameters())}
    other = make()  # the same seed: the same random weights
    if args.check:
        enable_compatibility_mode(other, dev)  # all on the GPU
        row["reference"] = "processed wholly on the GPU"
        row.update(weight_diff(model, other))
    else:
        row["reference"] = "the same weights, not processed (no compatibility mode)"
    row["patterns_max_abs_diff"] = (patterns(model, tokens) - patterns(other, tokens)).abs().max().item()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
