"""The kind-of-text baseline (`alignment.source_baseline_scores`) for a finished run that predates it.

    python benchmarks/source_baseline.py RUN --data testbed                      # a table with a source column
    python benchmarks/source_baseline.py RUN --corpus $MECHMEM_CACHE/testbed-pile/work/corpus   # a pile-regime corpus
    python benchmarks/source_baseline.py RUN --data testbed --monitor MONITOR   # and a monitor evaluation of RUN

Runs written since record `min_f1_source` themselves. For an older run this recomputes it from what
the run kept: each row's train and eval sequence ids, which `taxonomy.balanced_split` writes grouped
by class (class 0's first), and each window's source (and document, for intervals over documents
as the run's own) from the memorization table or, for the second testbed whose tables stay on the GPU
machine, from its corpus (the same windows in the same order). Prints each row's CNN, probe and
kind-of-text scores as Markdown, and writes RUN/source_baseline.csv unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mechmem.alignment import source_baseline_scores
from mechmem.atomic import atomic_write
from mechmem.data import DOCUMENT, SOURCE
from mechmem.run import RunFolder


def windows_of_corpus(folder: Path) -> pd.DataFrame:
    """sequence_id, document and source of every candidate window of a pile-regime corpus."""
    from tokenizers import Tokenizer

    from mechmem.testbed.corpus import EOS, Corpus
    from mechmem.testbed.pile_regime import window_identities

    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(EOS)
    assert eos is not None  # every corpus tokenizer has it (mechmem.testbed.corpus)
    return window_identities(Corpus.load(folder), eos)


def class_grouped(ids: list[int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A row's sample ids and their classes: `taxonomy.balanced_split` writes them grouped by class,
    class 0's first, as many of each."""
    array = np.asarray(ids)
    if len(array) % n_classes:
        raise ValueError(f"{len(array)} sample ids are not {n_classes} equal class groups")
    return array, np.repeat(np.arange(n_classes), len(array) // n_classes)


def row_baseline(row: dict, windows: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """`windows`: indexed by sequence_id, with a source (and, for intervals over documents, a document) column."""
    n = row["num_classes"]
    (train_ids, y_train), (eval_ids, y_eval) = (class_grouped(row[f"{part}_sequence_ids"], n) for part in ("train", "eval"))
    groups = windows.loc[eval_ids, DOCUMENT].to_numpy() if DOCUMENT in windows and "interval_unit" in row else None
    return {"tax_name": row["tax_name"], "min_f1": row["min_f1"], "min_f1_probe": row.get("min_f1_probe"),
            **source_baseline_scores(windows.loc[train_ids, SOURCE].to_numpy(), y_train,
                                     windows.loc[eval_ids, SOURCE].to_numpy(), y_eval, n, row["min_f1_ci_low"],
                                     n_boot=n_boot, seed=seed, groups=groups)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a run_alignment output folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="the memorization table the run used (name or path), with a source column")
    where.add_argument("--corpus", type=Path, help="a pile-regime corpus folder (work/corpus of the build)")
    p.add_argument("--monitor", type=Path, help="also a monitor evaluation of RUN (benchmarks/monitor_eval.py's "
                   "output): the baseline's AUROCs on its stretches, written there")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    run = RunFolder(args.run)
    if not run.rows_dir.is_dir():
        print(f"source_baseline.py: no rows/ in {args.run} (give a run_alignment output folder)", file=sys.stderr)
        return 2
    if args.corpus is not None:
        if not (args.corpus / "corpus.json").exists():
            print(f"source_baseline.py: no corpus in {args.corpus}", file=sys.stderr)
            return 2
        windows = windows_of_corpus(args.corpus)
    else:
        from mechmem.data import load_memorization_data

        windows = load_memorization_data(args.data)
        if SOURCE not in windows:
            print(f"source_baseline.py: {args.data} has no {SOURCE!r} column", file=sys.stderr)
            return 2
    windows = windows.set_index("sequence_id")  # once, for every row and the monitor
    settings = json.loads(run.settings_file.read_text()) if run.settings_file.exists() else {}
    n_boot, seed = settings.get("n_boot", 1000), settings.get("seed", 0)  # the run's own
    rows = [run.read_row(f.stem) for f in sorted(run.rows_dir.glob("*.json"))]
    table = pd.DataFrame([row_baseline(r, windows, n_boot, seed) for r in rows]).sort_values("min_f1", ascending=False)
    print("| taxonomy | CNN | probe | kind of text [95% CI] | CNN's interval above it |\n|---|---|---|---|---|")
    for r in table.itertuples():
        probe = "-" if pd.isna(r.min_f1_probe) else f"{r.min_f1_probe:.1f}"
        print(f"| {r.tax_name} | {r.min_f1:.1f} | {probe} | {r.min_f1_source:.1f} "
              f"[{r.min_f1_source_ci_low:.1f}, {r.min_f1_source_ci_high:.1f}] | {'yes' if r.beyond_source else 'no'} |")
    if not args.no_write:
        atomic_write(run.path / "source_baseline.csv", lambda tmp: table.round(4).to_csv(tmp, index=False))
    if args.monitor is not None:
        return monitor_baseline(run, args.monitor, windows, args.no_write)
    return 0


def monitor_baseline(run: RunFolder, folder: Path, windows: pd.DataFrame, no_write: bool) -> int:
    """The kind-of-text baseline on a monitor evaluation's stretches, beside what it already measured
    (`windows` as `row_baseline` takes them)."""
    from mechmem.monitor_eval import evaluate, source_probabilities, with_probabilities

    if not (folder / "stretches.csv").exists():
        print(f"source_baseline.py: no stretches.csv in {folder}", file=sys.stderr)
        return 2
    settings = json.loads((folder / "settings.json").read_text())
    _, row = run.find_row(settings["taxonomy"], trained=False)
    n = row["num_classes"]
    train_ids, y_train = class_grouped(row["train_sequence_ids"], n)
    sources = windows.loc[train_ids, SOURCE].to_numpy()
    df = pd.read_csv(folder / "stretches.csv")
    probs = source_probabilities(sources, y_train, df["source"].to_numpy(), n)
    eval_cfg = settings.get("eval", {})
    kind = evaluate(with_probabilities(df, probs, row["class_names"]), row["class_names"],
                    eval_cfg.get("n_boot", 1000), eval_cfg.get("seed", 0))
    kind = kind[kind["method"] == "monitor (CNNs)"].assign(method="kind of text (source)")
    shipped = pd.read_csv(folder / "metrics.csv")
    shipped = shipped[shipped["kind"].isna()] if "kind" in shipped else shipped
    both = pd.concat([shipped, kind])
    print("\n| question | method | AUROC [95% CI] |\n|---|---|---|")
    for r in both.itertuples():
        low, high = (float(v) for v in str(r.auroc_ci).strip("()").split(","))
        print(f"| {r.question} | {r.method} | {r.auroc:.3f} [{low:.3f}, {high:.3f}] |")
    if not no_write:
        atomic_write(folder / "source_baseline.csv", lambda tmp: kind.to_csv(tmp, index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
