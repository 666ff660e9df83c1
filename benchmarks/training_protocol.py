"""How should the CNN be trained? Variants of the training protocol on one run's stored features.

    python benchmarks/training_protocol.py --run runs/alignment-quick --seeds 3 \
        --variant paper protocol=paper --variant converged \
        --variant layer input_scaling=layer --variant bs16 batch_size=16

Reads the run's feature store and every row's training split (rows/*.json), retrains the row's
CNNs under each variant (`name key=value ...`, fields of TrainConfig; the protocol's defaults fill
the rest) with several training seeds, and fits the attention-statistics probe on the same samples.
Prints per variant the mean min F1 over rows, the mean spread over seeds, epochs and time; writes
every (variant, row, seed) to --out as CSV.

Variants are scored on a **selection split**: a stratified fifth of each row's training split, held
out from every variant's training (and from its validation part). The run's eval split, the one its
tables report, is never read: choosing a protocol here cannot tune it to the reported numbers.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mechmem import alignment as al
from mechmem.cnn import (PAPER_GRID, QUICK_GRID, Task, TrainConfig, alignment_summary, classification_metrics,
                         split_validation, train_cnn_tasks)
from mechmem.data import load_memorization_data
from mechmem.features import FeatureStore
from mechmem.probe import attention_statistics, train_probe
from mechmem.run import RunFolder


def parse_variant(words: list[str]) -> tuple[str, dict]:
    types = {f.name: f.type for f in fields(TrainConfig)}
    kw = {}
    for word in words[1:]:
        key, value = word.split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown TrainConfig field {key!r}")
        kw[key] = value if key in ("protocol", "input_scaling", "precision", "device") else \
            (value == "true" if value in ("true", "false") else (float(value) if "." in value else int(value)))
    return words[0], kw


SELECTION_FRACTION = 0.2
SELECTION_SEED = 0x5E1  # not a training seed: the selection split stays put whatever the variants' seeds


def load_rows(run: Path, df: pd.DataFrame, store: FeatureStore):
    """(row, labels over the store, fitting rows, selection rows) per finished row of the run: the
    row's training split less a stratified selection split; its eval split is left out."""
    out = []
    pos = pd.Series(np.arange(len(df)), index=df["sequence_id"].to_numpy())  # sequence id -> table row
    for rec in RunFolder(run).rows().values():
        row = al.Row(**rec["row"])
        labels_df = row.labels(df)
        tr_ids, ev_ids = np.array(rec["train_sequence_ids"]), np.array(rec["eval_sequence_ids"])
        labels = np.zeros(len(store.sequence_ids), dtype=np.int64)
        tr, ev = store.index(tr_ids), store.index(ev_ids)
        labels[tr], labels[ev] = labels_df[pos[tr_ids].to_numpy()], labels_df[pos[ev_ids].to_numpy()]
        fit, selection = split_validation(labels, tr, SELECTION_FRACTION, SELECTION_SEED)
        assert not np.intersect1d(selection, ev).size
        out.append((row, labels, fit, selection))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--data", default="testbed")
    p.add_argument("--variant", nargs="+", action="append", required=True, help="name key=value ...")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--configs", choices=["quick", "paper"], default="quick")
    p.add_argument("--rows", nargs="*", help="row slugs (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    configs = QUICK_GRID if args.configs == "quick" else PAPER_GRID
    df = load_memorization_data(args.data)
    store = RunFolder(args.run).feature_store()
    features = torch.from_numpy(np.array(store.features))
    rows = [r for r in load_rows(args.run, df, store) if not args.rows or r[0].slug in args.rows]
    records = []
    stats = attention_statistics(features)
    val_fraction = TrainConfig().val_fraction or 0.0
    for row, labels, tr, sel in rows:  # the probe fits what the converged CNNs of seed 0 fit
        fit = split_validation(labels, tr, val_fraction, 0)[0]
        probe = train_probe(stats, labels, fit, sel, len(row.class_names()))
        m = classification_metrics(labels[sel], probe.eval_logits.argmax(-1), len(row.class_names()))
        records.append({"variant": "probe", "row": row.name, "seed": 0, "min_f1": 100 * m.min_f1,
                        "epochs": 0, "seconds": 0.0})
    for words in args.variant:
        name, kw = parse_variant(words)
        groups: dict[int, list] = {}
        for r in rows:
            groups.setdefault(len(r[0].class_names()), []).append(r)
        for seed in range(args.seeds):
            train = TrainConfig(**{"device": args.device, **kw, "seed": seed})
            for n_classes, group in groups.items():
                t0 = time.perf_counter()
                out = train_cnn_tasks(features, store.pooling, [Task(lab, tr, ev) for _, lab, tr, ev in group],
                                      n_classes, configs, train, progress=False)
                dt = time.perf_counter() - t0
                for (row, labels, _, ev), cnns in zip(group, out):
                    s = alignment_summary(cnns, labels[ev], n_boot=1)
                    records.append({"variant": name, "row": row.name, "seed": seed, "min_f1": s["min_f1"],
                                    "epochs": float(np.mean([c.epochs_run for c in cnns])),
                                    "seconds": dt / len(group)})
            print(f"{name} seed {seed} done", flush=True)
            if args.out:  # after every seed: a cut-off run keeps what it finished
                pd.DataFrame.from_records(records).to_csv(args.out, index=False)
    table = pd.DataFrame.from_records(records)
    by = table.groupby(["variant", "row"])["min_f1"]
    summary = pd.DataFrame({"mean_min_f1": by.mean().groupby("variant").mean(),
                            "mean_seed_sd": by.std().groupby("variant").mean(),
                            "epochs": table.groupby("variant")["epochs"].mean(),
                            "seconds_per_row_seed": table.groupby("variant")["seconds"].mean()})
    print(summary.round(2).to_string())
    print(by.mean().unstack(0).round(1).to_string())


if __name__ == "__main__":
    main()
