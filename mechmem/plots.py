"""Matplotlib figures of results, written as PNG (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).stem}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def min_f1_bar_png(table: pd.DataFrame, path: Path, reference: pd.DataFrame | None = None) -> None:
    """Horizontal bars of min F1 per taxonomy with bootstrap 95% intervals (best on top)."""
    t = table.sort_values("min_f1")
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(t) + 1.2))
    err = np.vstack([t["min_f1"] - t["min_f1_ci_low"], t["min_f1_ci_high"] - t["min_f1"]])
    colors = ["tab:blue" if n == 3 else "tab:orange" for n in t["num_classes"]]
    ax.barh(t["tax_name"], t["min_f1"], xerr=err, color=colors, capsize=3)
    if reference is not None:
        ref = reference.set_index("tax_name")["min_f1"]
        ax.scatter([ref.get(n, np.nan) for n in t["tax_name"]], t["tax_name"], marker="|", s=200,
                   color="black", label="paper (Pythia-12B)", zorder=3)
        ax.legend(loc="lower right")
    ax.set_xlabel("min F1 over classes (%), 95% bootstrap interval")
    ax.set_xlim(0, 100)
    ax.set_title("Alignment of memorization taxonomies with attention (blue: 3 classes, orange: 4)")
    _save(fig, path)


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix (true class by row), counts summed over the CNN configs."""
    conf = np.asarray(confusion, dtype=float)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.1 * len(class_names) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(j, i, f"{100 * norm[i, j]:.0f}%", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
