"""Overhead of the regurgitation monitor: monitored generation against plain generation of the same tokens.

    python benchmarks/monitor_overhead.py                                        # CPU, testbed, batch 64
    python benchmarks/monitor_overhead.py --device cuda --models testbed 160m 1b --new-tokens 32 128

Same process, same prompts, same greedy tokens (checked):
- `plain`: `mechmem.memorization.greedy_continuation`, the project's cached greedy decoding;
- `monitored`: `mechmem.monitor.monitor`: the same decoding with the pattern hooks copying the first
  window's attention, one extra step for its last row, every later window re-encoded, and the CNNs.
The CNNs are the quick grid's two configs (k6_c10 mean and max) with random weights: a trained
row's CNNs cost the same. `testbed` is the shipped model; a size ("160m", "1b") a random-weight
Pythia of that shape (no download). After a warm-up of each, `--repeats` rounds time plain and
monitored in turn; reports each one's median and the ratio monitored / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechmem.cnn import QUICK_GRID, AttentionCNN  # noqa: E402
from mechmem.memorization import greedy_continuation  # noqa: E402
from mechmem.models import load_model, random_pythia  # noqa: E402
from mechmem.monitor import MonitorConfig, SpanClassifier, monitor  # noqa: E402


def classifier_for(model) -> SpanClassifier:
    torch.manual_seed(0)
    return SpanClassifier([AttentionCNN(model.cfg.n_layers, 3, c) for c in QUICK_GRID], ["Non-Memo", "Guess", "Others"])


def seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def timed(fns: dict, device, repeats: int) -> dict[str, list[float]]:
    """Each function once to warm up, then `repeats` rounds of all of them in turn (drift hits all alike)."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].append(seconds(fn, device))
    return out


def measure(model, batch: int, n_new: int, repeats: int) -> dict:
    device = next(model.parameters()).device
    prompts = torch.randint(0, min(model.cfg.d_vocab, 8000), (batch, 32), generator=torch.Generator().manual_seed(0))
    clf = classifier_for(model)
    cfg = MonitorConfig(max_new_tokens=n_new, batch_size=batch)
    plain_tokens = greedy_continuation(model, prompts, n_new, batch_size=batch, progress=False)
    result = monitor(model, prompts, clf, cfg, progress=False)
    assert (torch.as_tensor(result.outputs) == plain_tokens).all(), "monitored generation changed the tokens"
    times = timed({"plain": lambda: greedy_continuation(model, prompts, n_new, batch_size=batch, progress=False),
                   "monitored": lambda: monitor(model, prompts, clf, cfg, progress=False)}, device, repeats)
    p, m = statistics.median(times["plain"]), statistics.median(times["monitored"])
    return {"batch": batch, "prompt": 32, "new_tokens": n_new, "stretches_per_prompt": len(result.spans) // batch,
            "plain_s": round(p, 4), "monitored_s": round(m, 4), "ratio": round(m / p, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["testbed"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        model = (load_model("testbed", device=args.device, dtype=args.dtype) if name == "testbed"
                 else random_pythia(name, device=args.device, dtype=args.dtype))
        for n_new in args.new_tokens:
            row = {"model": name, "device": args.device, "dtype": args.dtype,
                   **measure(model, args.batch_size, n_new, args.repeats)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
