"""The attention grid for reports: one PNG per sample, layers as rows and heads as columns (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from mechmem.atomic import atomic_write
from mechmem.viz.samples import SampleView


def _show(value, spec: str = "") -> str:
    return "—" if value is None else format(value, spec)


def attention_grid_png(v: SampleView, path: str | os.PathLike, *, gamma: float = 0.5) -> Path:
    """Layers as rows, heads as columns (then the class's decisive regions), prefix/suffix split dashed,
    localization's top heads framed in red. A power norm keeps the first-token sink from hiding the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    n_layers, n_heads, seq, _ = v.attention.shape
    region = v.sample_region_map if v.sample_region_map is not None else v.region_map
    region_of = "this sample" if v.sample_region_map is not None else "class mean"
    cols = n_heads + (region is not None)
    fig, axes = plt.subplots(n_layers, cols, figsize=(1.15 * cols + 0.6, 1.15 * n_layers + 0.9), squeeze=False)
    marks = v.rank_marks
    norm = PowerNorm(gamma, vmin=0.0, vmax=1.0)
    for l in range(n_layers):
        for c in range(cols):
            ax = axes[l, c]
            if c < n_heads:
                ax.imshow(v.attention[l, c], cmap="Blues", norm=norm, interpolation="nearest")
                if (l, c) in marks:
                    for side in ax.spines.values():
                        side.set(color="tab:red", linewidth=2.5)
                    ax.text(seq - 2, 2, f"#{marks[(l, c)]}", color="tab:red", ha="right", va="top", fontsize=7)
            elif region is not None:
                ax.imshow(region[l], cmap="Reds", vmin=0, vmax=float(region.max()) or 1.0, interpolation="nearest")
            ax.axhline(v.prefix_len - 0.5, color="tab:orange", lw=0.6, ls="--")
            ax.axvline(v.prefix_len - 0.5, color="tab:orange", lw=0.6, ls="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {c}" if c < n_heads else f"decisive regions\n({region_of})", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    facts = f"score {_show(v.memorization_score, '.2f')}, duplicates {_show(v.sequence_duplicates)}"
    p = v.mean_probabilities
    pred = "" if p is None else f", CNN: {v.predicted} ({p.max():.2f})"
    fig.suptitle(f"sample {v.sequence_id} · {v.class_name or 'unlabelled'} · {facts}{pred}", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.75 / fig.get_figheight(),
                        wspace=0.06, hspace=0.06)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
