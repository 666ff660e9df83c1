"""How far one run's table moved from another's, row by row (the same rows, e.g. before and after a code change):

    python benchmarks/compare_rows.py docs/results/testbed_grid_paper_converged runs/testbed_grid_paper_converged

Reads only rows/*.json (no features, no CNNs). Prints the mean and largest |difference| of min F1, how
many new figures lie inside the old row's 95% interval, the rank correlation, the controls' and the
probe's moves, epochs, and how many verdicts ("aligned") stayed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def rows(folder: Path) -> dict[str, dict]:
    return {r["tax_name"]: r for r in (json.loads(f.read_text()) for f in sorted((folder / "rows").glob("*.json")))}


def compare(a: dict[str, dict], b: dict[str, dict]) -> str:
    keys = sorted(set(a) & set(b))
    d = np.array([b[k]["min_f1"] - a[k]["min_f1"] for k in keys])
    inside = sum(a[k]["min_f1_ci_low"] <= b[k]["min_f1"] <= a[k]["min_f1_ci_high"] for k in keys)
    ranks = pd.DataFrame({"a": [a[k]["min_f1"] for k in keys], "b": [b[k]["min_f1"] for k in keys]}).rank()
    rho = float(np.corrcoef(ranks["a"], ranks["b"])[0, 1])  # Spearman: Pearson of the ranks
    control = np.array([b[k].get("min_f1_control", np.nan) - a[k].get("min_f1_control", np.nan) for k in keys])
    probe = np.array([b[k].get("min_f1_probe", np.nan) - a[k].get("min_f1_probe", np.nan) for k in keys])
    epochs = np.array([b[k]["epochs"] - a[k]["epochs"] for k in keys])
    same = sum(b[k]["aligned"] == a[k]["aligned"] for k in keys)
    return (f"rows {len(keys)}: min F1 mean|d| {np.abs(d).mean():.2f} max {np.abs(d).max():.2f} mean d {d.mean():+.2f}; "
            f"inside the first run's CI {inside}/{len(keys)}; Spearman {rho:.3f}; control mean|d| "
            f"{np.nanmean(np.abs(control)):.2f}; probe max|d| {np.nanmax(np.abs(probe)):.3f}; epochs mean d "
            f"{epochs.mean():+.2f}; same verdict {same}/{len(keys)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    print(compare(rows(args.a), rows(args.b)))


if __name__ == "__main__":
    main()
