"""Matplotlib figures of results, written as PNG (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechmem.atomic import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def min_f1_bar_png(table: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of min F1 per taxonomy with 95% intervals (best on top), beside its controls:
    the probe (diamond), the shuffled-label control (cross), the permutation null's 95th percentile
    (triangle), chance (tick) and the paper's Pythia-12B figure (black bar) where the row has them."""
    t = table.sort_values("min_f1").reset_index(drop=True)
    y = np.arange(len(t))
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(t) + 1.6))
    err = np.vstack([t["min_f1"] - t["min_f1_ci_low"], t["min_f1_ci_high"] - t["min_f1"]])
    colors = ["tab:blue" if n == 3 else "tab:orange" for n in t["num_classes"]]
    ax.barh(y, t["min_f1"], xerr=err, color=colors, capsize=3, alpha=0.85)
    markers = (("min_f1_probe", "D", "tab:green", "probe (attention statistics)"),
               ("min_f1_control", "x", "tab:red", "shuffled-label control"),
               ("min_f1_null_p95", "<", "tab:purple", "null, 95th percentile"),
               ("min_f1_chance", "|", "grey", "chance (100 / classes)"),
               ("paper_12b_min_f1", "|", "black", "paper, Pythia-12B"))
    for column, marker, color, label in markers:
        if column in t and t[column].notna().any():
            ax.scatter(t[column], y, marker=marker, color=color, s=160 if marker == "|" else 36, zorder=3,
                       label=label, linewidths=2.5 if color == "black" else 1.5)
    aligned = t["aligned"] if "aligned" in t else [None] * len(t)
    names = [n + ("  (not aligned)" if a is not None and a == a and not bool(a) else "")  # a == a: not NaN
             for n, a in zip(t["tax_name"], aligned)]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("min F1 over classes (%), 95% bootstrap interval")
    ax.set_xlim(0, 100)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title("Alignment of memorization taxonomies with attention (blue: 3 classes, orange: 4)", fontsize=9)
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


# --------------------------------------------------------------------------------------------
# Localization and ablation (mechmem.localize, mechmem.ablation)
# --------------------------------------------------------------------------------------------
def delta_maps_png(delta: np.ndarray, class_names: Sequence[str], path: Path, title: str | None = None,
                   prefix_len: int = 32) -> None:
    """Delta[c] per class (rows) and layer (columns), as in the paper's localization figures.

    Each class has its own colour scale (shared by its layers), so a row shows where in the model
    that class is decided; dashed lines mark the prefix/suffix boundary.
    """
    delta = np.asarray(delta, dtype=float)
    n_classes, n_layers = delta.shape[:2]
    fig, axes = plt.subplots(n_classes, n_layers, figsize=(1.9 * n_layers + 1.2, 1.9 * n_classes + 0.6),
                             squeeze=False)
    for c in range(n_classes):
        vmax = max(float(delta[c].max()), 1e-12)
        for l in range(n_layers):
            ax = axes[c, l]
            im = ax.imshow(delta[c, l], cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
            if 0 < prefix_len < delta.shape[-1]:
                ax.axhline(prefix_len - 0.5, color="white", lw=0.5, ls="--")
                ax.axvline(prefix_len - 0.5, color="white", lw=0.5, ls="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"layer {l}", fontsize=9)
            if l == 0:
                ax.set_ylabel(class_names[c], fontsize=9)
        fig.colorbar(im, ax=axes[c, :].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle(title or "Delta: decisive attention regions per class (query down, key across)", fontsize=10)
    _save(fig, path)


def layer_importance_png(importance: np.ndarray, class_names: Sequence[str], path: Path,
                         title: str | None = None) -> None:
    """Delta summed per layer, per class: raw (left) and as a share of the class's total (right)."""
    imp = np.asarray(importance, dtype=float)
    share = imp / np.maximum(imp.sum(1, keepdims=True), 1e-30)
    layers = np.arange(imp.shape[1])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for c, name in enumerate(class_names):
        a.plot(layers, imp[c], marker="o", label=name)
        b.plot(layers, share[c], marker="o", label=name)
    a.set_ylabel("sum of Delta over the layer")
    b.set_ylabel("share of the class's Delta")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle(title or "How much each layer matters to each class", fontsize=10)
    _save(fig, path)


def head_scores_png(scores: np.ndarray, class_names: Sequence[str], path: Path, top: int = 3) -> None:
    """Per class, a layer x head heat map of head scores; the top heads are outlined."""
    scores = np.asarray(scores, dtype=float)
    n_classes, n_layers, n_heads = scores.shape
    fig, axes = plt.subplots(1, n_classes, figsize=(n_classes * (0.35 * n_heads + 2.2), 0.35 * n_layers + 1.8),
                             squeeze=False, layout="constrained")
    for c, ax in enumerate(axes[0]):
        im = ax.imshow(scores[c], cmap="viridis", aspect="auto")
        for flat in np.argsort(-scores[c], axis=None)[:top]:
            l, h = np.unravel_index(flat, scores[c].shape)
            ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, color="red", lw=1.5))
        ax.set_title(class_names[c], fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"Head scores: each head's share of the decisive attention (top {top} outlined; "
                 f"uniform = {1 / (n_layers * n_heads):.3f})", fontsize=10)
    _save(fig, path)


def ablation_png(summary: pd.DataFrame, path: Path, metric: str = "extractable",
                 loss_sets: Sequence[str] = ("Non-Memo",)) -> None:
    """Per target class (rows) and eval set (columns): `metric` vs k for the targeted heads and the
    random control (means with intervals), the unablated baseline at k = 0; last columns: the loss
    on `loss_sets` (the non-memorized text)."""
    s = summary
    targets = [t for t in s.loc[s["condition"] == "targeted", "target_class"].unique()]
    sets = list(s.loc[s["metric"] == metric, "eval_set"].unique())
    loss_cols = [f"loss: {n}" for n in loss_sets if n in set(s["eval_set"])]
    cols = sets + loss_cols
    fig, axes = plt.subplots(max(1, len(targets)), len(cols), figsize=(2.4 * len(cols), 2.4 * max(1, len(targets))),
                             squeeze=False)
    for i, target in enumerate(targets or [""]):
        for j, eval_set in enumerate(cols):
            ax = axes[i, j]
            m = "loss" if eval_set in loss_cols else metric
            sel = s[(s["metric"] == m) & (s["eval_set"] == eval_set.removeprefix("loss: "))]
            base = sel[sel["condition"] == "baseline"]
            for kind, color, rows in (("targeted", "tab:red", sel[(sel["condition"] == "targeted") & (sel["target_class"] == target)]),
                                      ("random", "tab:gray", sel[sel["condition"] == "random"])):
                rows = pd.concat([base, rows]).sort_values("k")
                ax.plot(rows["k"], rows["value"], marker="o", color=color, label=kind)
                ax.fill_between(rows["k"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.2)
            if m != "loss":
                ax.set_ylim(-0.03, 1.03)
                if j > 0:
                    ax.tick_params(labelleft=False)
            else:
                ax.yaxis.set_label_position("right")
            ax.set_xscale("symlog", linthresh=1)
            ks = sorted(sel["k"].unique())
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(eval_set, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"heads of {target}\n{metric}", fontsize=9)
            if m == "loss":
                ax.set_ylabel("loss (nats/token)", fontsize=8)
            if i == len(targets) - 1 or not targets:
                ax.set_xlabel("heads ablated (k)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Ablating the heads localized for a class vs random heads (95% intervals)", fontsize=10)
    _save(fig, path)
