"""What the testbed shows: extraction rate against duplicate count, pure guesses, class counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

BUCKETS = [(0, 0, "0 (never seen)"), (1, 1, "1"), (2, 5, "2-5"), (6, 50, "6-50"), (51, 1000, "51-1000"),
           (1001, None, ">1000")]


def rate_by_duplicates(candidates: pd.DataFrame) -> pd.DataFrame:
    """Share of windows with memorization_score == 1, per duplicate-count bucket."""
    dup, memo = candidates["sequence_duplicates"].to_numpy(), candidates["memorization_score"].to_numpy() == 1
    rows = []
    for lo, hi, name in BUCKETS:
        m = (dup >= lo) & (dup <= hi if hi is not None else True)
        rows.append({"duplicates": name, "windows": int(m.sum()), "extractable": int(memo[m].sum()),
                     "rate": float(memo[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def rate_by_source(candidates: pd.DataFrame) -> pd.DataFrame:
    g = candidates.assign(memo=candidates["memorization_score"] == 1).groupby("source")
    return pd.DataFrame({"windows": g.size(), "extractable": g["memo"].sum(), "rate": g["memo"].mean()})


def class_counts(table: pd.DataFrame, t: int = 5, rho: float = 0.5) -> dict:
    """Counts of the two benchmark taxonomies (METHOD.md §2-3), straight from the definitions."""
    need = {"is_incrementing", "is_repeating", "rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix"}
    if not need <= set(table.columns):
        return {}
    memo = table["memorization_score"].to_numpy() == 1
    pattern = table["is_incrementing"].to_numpy() | table["is_repeating"].to_numpy()
    rouge = np.maximum(table["rouge_L_prefix_to_suffix"], table["rouge_3_prefix_to_suffix"]).to_numpy() >= rho
    guess = memo & (pattern | rouge)
    recite = memo & (table["sequence_duplicates"].to_numpy() > t)
    reconstruct = memo & pattern & ~recite
    return {
        f"Non-Memo, Guess, Others (rho {rho})": {
            "Non-Memo": int((~memo).sum()), "Guess": int(guess.sum()), "Others": int((memo & ~guess).sum())},
        f"other_recite_reconstruct_recollect (t {t})": {
            "Non-Memo": int((~memo).sum()), "Recite": int(recite.sum()), "Reconstruct": int(reconstruct.sum()),
            "Recollect": int((memo & ~recite & ~reconstruct).sum())},
    }


def rate_figure(candidates: pd.DataFrame, path: Path) -> None:
    """Extraction rate per duplicate-count bucket (text vs patterns), and per planted copy count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterned = candidates["source"].isin(["pattern", "heldout_pattern"])
    groups = [("text (stdlib, planted, held out)", candidates[~patterned], "tab:blue"),
              ("patterns (incrementing, repeating)", candidates[patterned], "tab:green")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    x = np.arange(len(BUCKETS))
    for k, (label, part, color) in enumerate(groups):
        rates = rate_by_duplicates(part)
        bars = a.bar(x + (k - 0.5) * 0.4, 100 * rates["rate"].fillna(0), 0.4, label=label, color=color)
        for bar, (_, r) in zip(bars, rates.iterrows()):
            if r["windows"]:
                a.text(bar.get_x() + 0.2, bar.get_height() + 1.5, f"{100 * r['rate']:.0f}%\n{r['windows']}",
                       ha="center", fontsize=6.5)
    a.set_xticks(x, [name for _, _, name in BUCKETS])
    a.set_ylim(0, 118)
    a.set_xlabel("copies of the 64-token window in the training stream")
    a.set_ylabel("extractable (score = 1), %")
    a.set_title("Scored windows (bar labels: rate, windows)")
    a.legend(fontsize=8, loc="upper left")

    planted = candidates[candidates["source"] == "planted"]
    per = planted.groupby("planted_count")["memorization_score"].apply(lambda s: 100 * (s == 1).mean())
    b.semilogx(per.index, per.to_numpy(), "o", ms=4, color="tab:orange")
    b.set_xlabel("copies planted (one point per count)")
    b.set_ylabel("extractable windows of the passage, %")
    b.set_ylim(-5, 105)
    b.set_title("Planted passages")
    b.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.1%}" if c == "rate" else str(v) for c, v in zip(cols, r)) + " |")
    return "\n".join(lines)
