"""The second testbed's study as the Markdown its report quotes, beside the first testbed and the paper.

    python benchmarks/pile_report.py docs/results/pile_testbed [--first docs/results/testbed_grid_paper_converged]

Reads what `benchmarks/pile_study.sh` wrote (grid/alignment.csv, grid/paper_agreement.json,
grid/source_baseline.csv where `source_baseline.py` added the kind-of-text baseline to an older run,
grid/by_source.csv, seeds/alignment.csv, matched/alignment.csv, localize/{layers,heads}.csv, ablate/ablation.csv, monitor/metrics.csv,
checkpoints/checkpoints_min_f1.csv; a missing part is said so) and prints:
the grid's feasible rows with interval, probe, null, control, kind-of-text baseline where known, the first testbed's score on the same
row (its interval, rank among its rows, probe) and the paper's 12B figure; the headline row's rank,
Spearman with the paper (this testbed, and the first testbed over the same rows), CNN against probe;
what the CNNs called the headline row's eval samples of each source;
the seed spread of the rows trained again with several seeds; the same rows with Non-Memo matched by
source; each class's top layers and heads and
what ablating them did against random heads (with the rank p against the draws themselves); the
monitor's AUROCs; min F1 across checkpoints. The interpretation stays the report's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = "Non-Memo, Guess, Others"


def _ci(row: pd.Series, key: str = "min_f1") -> str:
    return f"{row[key]:.1f} [{row[f'{key}_ci_low']:.1f}, {row[f'{key}_ci_high']:.1f}]"


def grid_table(grid: pd.DataFrame, first: pd.DataFrame | None) -> list[str]:
    head = "| taxonomy | this testbed | probe | null p95 | control |"
    rule = "|---|---|---|---|---|"
    source = "min_f1_source" in grid
    if source:
        head += " kind of text |"
        rule += "---|"
    if first is not None:
        head += " first testbed | its probe |"
        rule += "---|---|"
        first = first.assign(rank=first["min_f1"].rank(ascending=False, method="min").astype(int)).set_index("tax_name")
    lines = [head + " paper 12B |", rule + "---|"]
    for _, r in grid.sort_values("min_f1", ascending=False).iterrows():
        name = f"**{r.tax_name}**" if r.tax_name == HEADLINE else r.tax_name
        cells = [name, _ci(r), f"{r.min_f1_probe:.1f}", f"{r.min_f1_null_p95:.1f}", f"{r.min_f1_control:.1f}"]
        if source:
            cells.append(_ci(r, "min_f1_source"))
        if first is not None:
            if r.tax_name in first.index:
                f = first.loc[r.tax_name]
                cells += [f"{_ci(f)} ({f['rank']} of {len(first)})", f"{f.min_f1_probe:.1f}"]
            else:
                cells += ["-", "-"]
        paper = r.get("paper_12b_min_f1")
        cells.append("-" if pd.isna(paper) else f"{paper:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def agreement(study: Path, grid: pd.DataFrame, first: pd.DataFrame | None) -> list[str]:
    path = study / "grid" / "paper_agreement.json"
    if not path.exists():
        return [f"- no {path.relative_to(study)}"]
    a = json.loads(path.read_text())
    h = a.get("headline_row")
    lines = [f"- \"{h['name']}\": {h['min_f1']:.1f}, {h['rank']} of {h['of']} rows" if h
             else f"- \"{HEADLINE}\": not among the feasible rows"]
    spearman = a.get("spearman_with_paper_12b", {})  # (only where 3 rows or more have the paper's figure)
    if not spearman:
        lines.append("- Spearman with the paper's 12B figures: fewer than 3 rows")
    for scope, s in spearman.items():
        lines.append(f"- Spearman with the paper's 12B figures, {scope}: {s['rho']:.2f} (p = {s['p']:.2f}, {s['rows']} rows)")
    if first is not None:
        both = grid.merge(first, on="tax_name", suffixes=("", "_first")).dropna(subset=["paper_12b_min_f1"])
        if len(both) >= 3:
            rho, p = spearmanr(both["min_f1_first"], both["paper_12b_min_f1"])
            lines.append(f"- the first testbed over the same {len(both)} rows: {rho:.2f} (p = {p:.2f})")
    c = a.get("cnn_vs_probe")
    if c is None:
        return lines + ["- no probe in this run"]
    lines.append(f"- CNN at or above the probe on {c['cnn_at_or_above_probe']} of {c['rows']} rows, above the "
                 f"probe's interval on {c['cnn_above_probe_interval']}; the probe above the CNN's interval on "
                 f"{c['probe_above_cnn_interval']}")
    return lines


def by_source(study: Path, row: str = HEADLINE, min_n: int = 10) -> list[str]:
    """The headline row's eval samples by (true class, source): what the CNNs called them."""
    path = study / "grid" / "by_source.csv"
    if not path.exists():
        return ["- no grid/by_source.csv (a run before sources were recorded, or a table without them)"]
    long = pd.read_csv(path)
    long = long[(long["tax_name"] == row) & (long["classifier"] == "CNNs") & (long["n"] >= min_n)]
    if long.empty:
        return [f"- no \"{row}\" samples by source"]
    wide = long.pivot_table(index=["true", "source", "n"], columns="called", values="share", sort=False)
    called = list(dict.fromkeys(long["called"]))
    lines = ["| true class | source | samples | " + " | ".join(f"called {c}" for c in called) + " |",
             "|---|---|---|" + "---|" * len(called)]
    for (true, source, n), r in wide.iterrows():
        lines.append(f"| {true} | {source} | {n} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in called) + " |")
    return lines


def matched(study: Path, grid: pd.DataFrame) -> list[str]:
    """The rows again with Non-Memo drawn like the memorized classes (--match-source), beside the grid's."""
    path = study / "matched" / "alignment.csv"
    if not path.exists():
        return ["- no matched/alignment.csv (pile_study.sh's matched step did not run)"]
    lines = []
    for r in pd.read_csv(path).itertuples():
        plain = grid.loc[grid["tax_name"] == r.tax_name, "min_f1"]
        was = f" (as drawn: {plain.iloc[0]:.1f})" if len(plain) else ""
        kind = f", kind of text {r.min_f1_source:.1f}" if hasattr(r, "min_f1_source") else ""
        lines.append(f"- {r.tax_name}: {r.min_f1:.1f} [{r.min_f1_ci_low:.1f}, {r.min_f1_ci_high:.1f}]{was}; probe "
                     f"{r.min_f1_probe:.1f}{kind}, null {r.min_f1_null_p95:.1f}, control {r.min_f1_control:.1f}")
    return lines


def seeds(study: Path) -> list[str]:
    path = study / "seeds" / "alignment.csv"
    if not path.exists():
        return ["- no seed spread (no seeds/alignment.csv: pile_study.sh's seeds step did not run)"]
    table = pd.read_csv(path)
    if "min_f1_seed_sd" not in table:
        return ["- seeds/alignment.csv has no seed spread (trained with one seed)"]
    settings = study / "seeds" / "settings.json"
    n = json.loads(settings.read_text()).get("cnn_seeds", "?") if settings.exists() else "?"
    return [f"- {r.tax_name}: {_ci(r)} over {n} training seeds, seed sd {r.min_f1_seed_sd:.1f}"
            for _, r in table.iterrows()]


def localization(study: Path, top: int = 5) -> list[str]:
    layers, heads = study / "localize" / "layers.csv", study / "localize" / "heads.csv"
    if not (layers.exists() and heads.exists()):
        return ["- localization did not run (no localize/layers.csv and heads.csv)"]
    layers, heads = pd.read_csv(layers), pd.read_csv(heads)
    lines = []
    for name, part in layers.groupby("class", sort=False):
        best = part.sort_values("share", ascending=False).head(3)
        where = ", ".join(f"layer {r.layer} {r.share:.2f}" for r in best.itertuples())
        names = ", ".join(f"L{r.layer}H{r.head}" for r in heads[heads["class"] == name].sort_values("rank").head(top).itertuples())
        lines.append(f"- {name}: {where} of the importance; top heads {names}")
    return lines


def ablation(study: Path) -> list[str]:
    """Each localized head set's extractable share (and Non-Memo's loss) against as many random heads;
    for extraction also the rank p against the random draws themselves (`ablation.rank_p_below`, from
    `frac_random_below` and the draws' count, which runs older than that column also have)."""
    from mechmem.ablation import rank_p_below

    path = study / "ablate" / "ablation.csv"
    if not path.exists():
        return ["- the ablation did not run (no ablate/ablation.csv)"]
    a = pd.read_csv(path)
    draws = a[a["condition"] == "random"].groupby("k")["n_draws"].max()
    lines = []
    for (target, k), part in a[a["condition"] == "targeted"].groupby(["target_class", "k"], sort=False):
        cells = []
        for r in part.itertuples():
            plain = "(" not in r.eval_set
            if plain and ((r.metric == "extractable" and r.eval_set != "Non-Memo") or
                          (r.metric == "loss" and r.eval_set == "Non-Memo")):
                cell = (f"{r.eval_set} {r.metric} {r.value:.3f} vs {r.random_value:.3f}, "
                        f"{r.diff_vs_random:+.3f} [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]")
                if r.metric == "extractable" and k in draws.index:
                    n = int(draws[k])
                    cell += f", rank p {rank_p_below(round(r.frac_random_below * n), n):.2f}"
                cells.append(cell)
        lines.append(f"- top {k} for {target} ({part['heads'].iloc[0]}): " + "; ".join(cells))
    return lines


def monitor(study: Path) -> list[str]:
    path = study / "monitor" / "metrics.csv"
    if not path.exists():
        return ["- the monitor did not run (no monitor/metrics.csv)"]
    m = pd.read_csv(path)

    def interval(text) -> str:
        low, high = (float(v) for v in str(text).strip("()").split(","))
        return f"[{low:.3f}, {high:.3f}]"

    baseline = study / "monitor" / "source_baseline.csv"  # the kind of text, recomputed for an older evaluation
    if baseline.exists() and "kind of text (source)" not in set(m["method"]):
        m = pd.concat([m, pd.read_csv(baseline)])
    lines = [f"- {r.question}, {r.method}: AUROC {r.auroc:.3f} {interval(r.auroc_ci)} ({r.n} stretches, "
             f"{r.positives} positive)" for r in m[m["kind"].isna()].itertuples()]
    for (question, kind), part in m[m["kind"].notna()].groupby(["question", "kind"], sort=False):
        lines.append(f"- {question}, {kind}: AUROC mean {part.auroc.mean():.3f}, {part.auroc.min():.3f} to "
                     f"{part.auroc.max():.3f} over {len(part)}")
    return lines


def checkpoints(study: Path) -> list[str]:
    path = study / "checkpoints" / "checkpoints_min_f1.csv"
    if not path.exists():
        return ["- the checkpoint study did not run (no checkpoints/checkpoints_min_f1.csv)"]
    table = pd.read_csv(path).set_index("tax_name")
    full = study / "checkpoints" / "checkpoints.csv"  # with intervals, probe and control, where written
    full = pd.read_csv(full).set_index(["tax_name", "checkpoint"]) if full.exists() else None

    def cell(name: str, revision: str, value: float) -> str:
        if pd.isna(value):
            return "-"
        if full is None or (name, revision) not in full.index:
            return f"{value:.1f}"
        r = full.loc[(name, revision)]
        return f"{_ci(r)}, probe {r.min_f1_probe:.1f}, control {r.min_f1_control:.1f}"

    lines = ["| taxonomy | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    for name, row in table.iterrows():
        lines.append(f"| {name} | " + " | ".join(cell(name, k, v) for k, v in row.items()) + " |")
    skipped = study / "checkpoints" / "skipped_checkpoints.json"
    if skipped.exists():
        lines.append(f"\nSkipped checkpoints: {skipped.read_text().strip()}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=Path, help="what pile_study.sh wrote (its grid/, monitor/, checkpoints/)")
    p.add_argument("--first", type=Path, default=ROOT / "docs/results/testbed_grid_paper_converged",
                   help="the first testbed's grid run (its alignment.csv); 'none' to leave it out")
    args = p.parse_args(argv)
    grid_csv = args.study / "grid" / "alignment.csv"
    if not grid_csv.exists():
        print(f"pile_report.py: no {grid_csv} (give the folder pile_study.sh wrote)", file=sys.stderr)
        return 2
    first = None
    if str(args.first) != "none":
        if not (args.first / "alignment.csv").exists():
            print(f"pile_report.py: no {args.first / 'alignment.csv'}", file=sys.stderr)
            return 2
        first = pd.read_csv(args.first / "alignment.csv")
    grid = pd.read_csv(grid_csv)
    baseline = args.study / "grid" / "source_baseline.csv"  # the kind-of-text baseline, recomputed for an older run
    if "min_f1_source" not in grid and baseline.exists():
        grid = grid.merge(pd.read_csv(baseline).drop(columns=["min_f1", "min_f1_probe"]), on="tax_name", how="left")
    out = ["**Grid**", "", *grid_table(grid, first), "", *agreement(args.study, grid, first), "",
           f"**By source** (\"{HEADLINE}\", eval samples, the CNNs' calls; sources with 10 samples or more)", "",
           *by_source(args.study), "",
           "**Seed spread**", "", *seeds(args.study), "",
           "**Non-Memo matched by source** (`--match-source`)", "", *matched(args.study, grid), "",
           "**Localization**", "", *localization(args.study), "",
           "**Ablation** (localized heads against random ones, difference [95% CI])", "", *ablation(args.study), "",
           "**Monitor**", "", *monitor(args.study), "", "**Checkpoints** (min F1 [95% CI], probe, control)", "", *checkpoints(args.study)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
