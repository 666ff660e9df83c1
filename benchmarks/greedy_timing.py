"""Where the second testbed's label stage spends its time: greedy decoding of every candidate window
by one checkpoint, at the pile-regime model's shape (random weights), per dtype and batch size.

    python benchmarks/greedy_timing.py --windows 138420 --batch-sizes 1024 4096 8192 --dtypes float32 bfloat16

The build labels 13 checkpoints of 138,420 windows each (`pile_regime.label_checkpoint`: float32 weights
with eager attention cast to `--label-dtype`, then `memorization.greedy_continuation` with the key/value
cache). Random weights decode as many steps as trained ones, so the time is the label stage's decoding
(the table's write is timed apart: `table.write_table`, zstd level 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem.memorization import PREFIX_LEN, SUFFIX_LEN, greedy_continuation  # noqa: E402
from mechmem.testbed.pile_regime import preset  # noqa: E402
from mechmem.testbed.train import model_config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=138_420, help="prefixes decoded (the 2026-12-06 build's count)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4096])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--attention", nargs="+", default=["eager"], choices=["eager", "sdpa"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny preset's model (a smoke run on a CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here too")
    args = p.parse_args(argv)
    if min(args.windows, *args.batch_sizes) < 1:
        print("greedy_timing.py: --windows and --batch-sizes must be positive", file=sys.stderr)
        return 2
    from transformers import GPTNeoXForCausalLM

    cfg = preset("tiny" if args.tiny else "pile-regime")
    torch.backends.cuda.matmul.allow_tf32 = False  # as the labels
    torch.manual_seed(0)
    prefixes = torch.randint(0, cfg.corpus.vocab_size, (args.windows, PREFIX_LEN))
    rows = []
    for attention in args.attention:
        hf_config = model_config(cfg.corpus.vocab_size, cfg.train)
        hf_config._attn_implementation = attention
        base = GPTNeoXForCausalLM(hf_config).eval()
        for dtype in args.dtypes:
            model = base.to(device=args.device, dtype=getattr(torch, dtype))
            for batch in args.batch_sizes:
                greedy_continuation(model, prefixes[:batch], SUFFIX_LEN, batch_size=batch, device=args.device,
                                    progress=False)  # warm-up
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                greedy_continuation(model, prefixes, SUFFIX_LEN, batch_size=batch, device=args.device, progress=False)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                rows.append({"attention": attention, "dtype": dtype, "batch": batch, "windows": args.windows,
                             "seconds": round(seconds, 2), "windows_per_s": round(args.windows / seconds)})
                print(f"{attention:6s} {dtype:9s} batch {batch:6d}: {seconds:7.2f} s for {args.windows:,} windows "
                      f"({args.windows / seconds:,.0f}/s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
