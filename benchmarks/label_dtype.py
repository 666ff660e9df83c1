"""What labelling a checkpoint in bfloat16 changes against float32 (TF32 off), on the same windows.

    python benchmarks/label_dtype.py --model testbed-pile@step1680 --out runs/pile/label_dtype.json

The second testbed's GPU build labels its checkpoints in bfloat16 (`--label-dtype bfloat16`) to fit
a session's GPU time; this decodes the checkpoint's windows again in float32 and compares: windows
whose 32 greedy tokens differ, whose memorization score differs, and the extractable (score = 1)
labels as a 2 x 2 table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem.atomic import atomic_json  # noqa: E402
from mechmem.memorization import PREFIX_LEN, greedy_continuation  # noqa: E402
from mechmem.testbed import TABLE_FILE, checkpoint_folder  # noqa: E402
from mechmem.testbed.train import load_fp32  # noqa: E402


def compare(table: pd.DataFrame, greedy: np.ndarray) -> dict:
    """The table's labels (its own dtype) against `greedy`, the same windows decoded again."""
    tokens = np.stack(table["tokens"].to_numpy())
    theirs = np.stack(table["greedy_suffix"].to_numpy())
    score = (greedy == tokens[:, PREFIX_LEN:]).mean(axis=1)
    a, b = table["memorization_score"].to_numpy() == 1, score == 1
    return {
        "windows": int(len(table)),
        "continuation_differs": int((theirs != greedy).any(axis=1).sum()),
        "score_differs": int((np.abs(table["memorization_score"].to_numpy() - score) > 1e-9).sum()),
        "extractable": {"table": int(a.sum()), "again": int(b.sum()), "both": int((a & b).sum()),
                        "table_only": int((a & ~b).sum()), "again_only": int((~a & b).sum())},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="testbed-pile@stepN (its folder holds the table)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    folder = checkpoint_folder(args.model)
    table = pd.read_parquet(folder / TABLE_FILE)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_fp32(folder, args.device)
    tokens = torch.as_tensor(np.stack(table["tokens"].to_numpy())[:, :PREFIX_LEN])
    t0 = time.time()
    greedy = greedy_continuation(model, tokens, len(table["greedy_suffix"].iloc[0]), batch_size=args.batch_size,
                                 device=args.device).numpy()
    result = {"model": args.model, "again_dtype": "float32", "tf32": False, "seconds": round(time.time() - t0, 1),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              **compare(table, greedy)}
    atomic_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # bad input (no such run, row or checkpoint): one line, exit 2
    from mechmem import cli

    raise SystemExit(cli.main(f"benchmarks/{Path(__file__).name}", lambda argv: argv, main, sys.argv[1:]))
