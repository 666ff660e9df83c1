"""Alignment across training checkpoints: each checkpoint's attention against its own labels.

A checkpoint is a hub model at a revision (Pythia's `stepN`) or a local folder. For each, the
table is relabelled with that checkpoint (`relabel.relabel_table`: memorization_score and greedy
suffix; duplicates are the corpus's and do not change), then the benchmark runs on it. This module
holds the pieces `experiments/checkpoints.py` strings together: the list, the training step of
each, the relabelled table (saved, so a resumed study does not decode again), the
table-by-checkpoint summary and its figure.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mechmem.atomic import atomic_write
from mechmem.tables.relabel import Labeller, loaded_labeller, relabel_table, same_labeller, table_labeller

PYTHIA_FINAL_STEP = 143000


@dataclass(frozen=True)
class Checkpoint:
    model: str                 # hub name or local folder, as load_model takes it
    revision: str | None = None
    step: int | None = None

    @property
    def label(self) -> str:
        """A folder name for this checkpoint's outputs."""
        name = self.revision or Path(self.model).name or self.model
        return re.sub(r"[^\w.-]+", "_", name)


def training_step(model: str, revision: str | None) -> int | None:
    """`stepN` in the revision or in the folder's name; Pythia's default branch is its last step."""
    for text in (revision, Path(model).name if revision is None else None):
        m = re.search(r"step[-_]?(\d+)", text or "")
        if m:
            return int(m.group(1))
    if revision is None and "pythia" in model.lower() and not Path(model).exists():
        return PYTHIA_FINAL_STEP
    return None


def checkpoint_list(model: str | None, revisions: list[str] | None, folders: list[str] | None) -> list[Checkpoint]:
    """Revisions of one hub model, or local checkpoint folders, ordered by training step."""
    if bool(revisions) == bool(folders):
        raise ValueError("give either --revisions (with --model) or --checkpoints FOLDER ...")
    if revisions:
        if not model:
            raise ValueError("--revisions needs --model")
        out = [Checkpoint(model, r, training_step(model, r)) for r in revisions]
    else:
        out = [Checkpoint(f, None, training_step(f, None)) for f in folders or []]
    if len({c.label for c in out}) != len(out):
        raise ValueError("two checkpoints share a name: " + ", ".join(c.label for c in out))
    if all(c.step is not None for c in out):
        out.sort(key=lambda c: c.step)  # type: ignore[arg-type, return-value]
    else:  # no step in some names: their order as given
        out = [Checkpoint(c.model, c.revision, k if c.step is None else c.step) for k, c in enumerate(out)]
    return out


def data_name(data: str, ck: Checkpoint) -> str:
    """The table a checkpoint is benchmarked on: `data`, or with `{revision}` in it that checkpoint's own
    (`testbed-pile@{revision}` -> `testbed-pile@step512`)."""
    return data.format(revision=ck.revision or ck.label) if "{revision}" in data else data


def label_checkpoint(df: pd.DataFrame, model, ck: Checkpoint, path: str | os.PathLike, *, batch_size: int = 256,
                     device=None, progress: bool = True) -> Path:
    """The table labelled by this checkpoint, written to `path` (kept: a resumed study reads it)."""
    path = Path(path)
    if path.exists():
        return path
    loaded = loaded_labeller(model, ck.model, ck.revision)
    have = table_labeller(df)
    if have is not None and same_labeller(have, loaded) and "greedy_suffix" in df.columns:
        out = df.copy()
        out["label_model"], out["label_revision"], out["label_weights"] = loaded.model, loaded.revision, loaded.weights
    else:
        out = relabel_table(df, model, Labeller(loaded.model, loaded.revision, loaded.weights),
                            batch_size=batch_size, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = out.copy()
    for c in ("tokens", "greedy_suffix"):
        table[c] = [np.asarray(x, dtype=np.int64) for x in table[c]]
    atomic_write(path, lambda p: table.to_parquet(p, index=False))
    return path


SUMMARY_COLUMNS = ["checkpoint", "step", "tax_name", "num_classes", "min_f1", "min_f1_ci_low", "min_f1_ci_high",
                   "min_f1_control", "min_f1_probe", "extractable"]


def summarize(results: list[tuple[Checkpoint, pd.DataFrame, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long table: one row a taxonomy x checkpoint, wide table: min F1, taxonomy x checkpoint)."""
    parts = []
    for ck, table, extractable in results:
        t = table.copy()
        t["checkpoint"], t["step"], t["extractable"] = ck.label, ck.step, extractable
        parts.append(t[[c for c in SUMMARY_COLUMNS if c in t.columns]])
    long = pd.concat(parts, ignore_index=True)
    order = [ck.label for ck, _, _ in results]
    wide = long.pivot_table(index="tax_name", columns="checkpoint", values="min_f1", aggfunc="first")[order]
    return long, wide.reset_index()


def plot_min_f1(long: pd.DataFrame, path: str | os.PathLike) -> None:
    """Min F1 against training step, one line a taxonomy, with its 95% interval as a band and its
    shuffled-label control dotted (where the runs had controls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    steps = sorted(long["step"].unique())
    positive = [x for x in steps if x > 0]
    log = len(steps) > 2 and bool(positive) and max(positive) / min(positive) > 20  # Pythia's steps are log-spaced
    for name, part in long.groupby("tax_name", sort=False):
        part = part.sort_values("step")
        line, = ax.plot(part["step"], part["min_f1"], "o-", ms=3, lw=1.2, label=name)
        if {"min_f1_ci_low", "min_f1_ci_high"} <= set(part.columns):
            ax.fill_between(part["step"], part["min_f1_ci_low"], part["min_f1_ci_high"], color=line.get_color(),
                            alpha=0.15, lw=0)
        if "min_f1_control" in part.columns and part["min_f1_control"].notna().any():
            ax.plot(part["step"], part["min_f1_control"], ":", lw=1, color=line.get_color())
    if log:
        ax.set_xscale("symlog", linthresh=max(1, min(positive))) if min(steps) == 0 else ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("min F1 (%), 95% interval; dotted: control")
    ax.set_title("Alignment across checkpoints (each checkpoint's own labels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
