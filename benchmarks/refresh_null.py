"""Recompute a finished run's permutation null and `aligned` verdicts from its rows, without retraining.

    python benchmarks/refresh_null.py docs/results/testbed_grid_paper_converged [--data testbed]

The null depends only on the eval split's labels (`mechmem.controls.permutation_null`), which each
rows/<row>.json names by sequence id; every other number of the row (CNNs, control, probe) is kept.
Rewrites rows/*.json, alignment.csv, alignment.md and the figures in place (atomically). Used once,
when the null changed from "the CNNs' predictions against permuted labels" to "an input-blind guesser
with the eval class proportions" after the grids of 2026-12-06 had run; kept so the step can be
repeated and checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mechmem import alignment as al
from mechmem.controls import is_aligned, null_summary, permutation_null
from mechmem.data import load_memorization_data
from mechmem.run import RunFolder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--data", default="testbed")
    args = p.parse_args()
    run = RunFolder(args.folder)
    settings = json.loads(run.settings_file.read_text())
    df = load_memorization_data(args.data)
    pos = pd.Series(np.arange(len(df)), index=df["sequence_id"].to_numpy())
    rows = []
    for slug, rec in run.rows().items():
        row = al.Row(**rec["row"])
        y_eval = row.labels(df)[pos[np.array(rec["eval_sequence_ids"])].to_numpy()]
        rec |= null_summary(permutation_null(y_eval, settings.get("null_permutations", 1000), seed=settings["seed"]),
                            rec["min_f1"])
        rec["aligned"] = is_aligned(rec)
        run.write_row(slug, rec)
        rows.append(row)
    table = al.collect_table(args.folder, rows)
    al.write_outputs(table, args.folder)
    print(al.ranking_text(table))


if __name__ == "__main__":
    main()
