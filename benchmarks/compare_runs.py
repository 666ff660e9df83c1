"""How far apart two run_alignment.py outputs are (e.g. one GPU against torchrun on two).

    python benchmarks/compare_runs.py runs/one-gpu runs/two-gpus

Prints one JSON object: whether the feature stores are bitwise equal (and their largest difference),
the largest difference of any min F1 / mean F1 in alignment.csv, how many rows' confusion matrices
differ, and the largest difference of any CNN's eval logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from mechmem.run import RunFolder


def compare(a: Path, b: Path) -> dict:
    run_a, run_b = RunFolder(a), RunFolder(b)
    fa, fb = run_a.feature_store().features, run_b.feature_store().features
    ta, tb = pd.read_csv(run_a.table_file), pd.read_csv(run_b.table_file)
    if list(ta["tax_name"]) != list(tb["tax_name"]):
        ta, tb = ta.sort_values("tax_name").reset_index(drop=True), tb.sort_values("tax_name").reset_index(drop=True)
    logits_diff, confusion_differs = 0.0, 0
    for slug, ra in run_a.rows().items():
        rb = run_b.read_row(slug)
        confusion_differs += ra["confusion"] != rb["confusion"]
        folder_a, folder_b = run_a.cnn_folder(slug), run_b.cnn_folder(slug)
        for name in json.loads((folder_a / "cnns.json").read_text())["models"]:
            la = load_file(str(folder_a / f"{name}.safetensors"))["eval_logits"]
            lb = load_file(str(folder_b / f"{name}.safetensors"))["eval_logits"]
            logits_diff = max(logits_diff, float(np.abs(la - lb).max()))
    return {
        "features_equal": bool(fa.shape == fb.shape and np.array_equal(fa, fb)),
        "features_max_abs_diff": float(np.abs(fa.astype(np.float32) - fb.astype(np.float32)).max()),
        "rows": len(ta), "min_f1_max_abs_diff": float((ta["min_f1"] - tb["min_f1"]).abs().max()),
        "mean_f1_max_abs_diff": float((ta["mean_f1"] - tb["mean_f1"]).abs().max()),
        "rows_with_other_confusion": confusion_differs, "eval_logits_max_abs_diff": logits_diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    print(json.dumps(compare(args.a, args.b)))


if __name__ == "__main__":
    main()
