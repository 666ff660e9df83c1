"""Evaluate the regurgitation monitor on held-out testbed prompts, against confidence and the membership index.

    python benchmarks/monitor_eval.py --run runs/alignment-quick --out docs/results/testbed_monitor
    python benchmarks/monitor_eval.py --run runs/alignment-quick --sample --out docs/results/testbed_monitor_sampled

Needs the testbed's training stream for the ground truth: rebuilt (about a minute, then cached) on
the Python the testbed manifest names (`mechmem.testbed.membership`). See `mechmem.testbed.monitor_eval`
for the prompt sources, the ground truth and the two questions. Beside the monitor and the two
baselines the issue names (confidence, the membership index), the same stretches go through the
row's controls: its shuffled-label CNNs and the attention-statistics probe fit on its training split.
Writes metrics.csv/.md (per question and method, prompt-bootstrap 95% intervals; monitor rows per CNN
training seed too), by_source.csv,
stretches.csv (every stretch: source, truth, scores) and settings.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem.atomic import atomic_json, atomic_text  # noqa: E402
from mechmem.cnn import AttentionCNN  # noqa: E402
from mechmem.data import load_memorization_data  # noqa: E402
from mechmem.features import extract_attention  # noqa: E402
from mechmem.localize import run_labels  # noqa: E402
from mechmem.models import load_model  # noqa: E402
from mechmem.monitor import MonitorConfig, SpanClassifier, monitor  # noqa: E402
from mechmem.probe import attention_statistics, train_probe  # noqa: E402
from mechmem.run import RunFolder  # noqa: E402
from mechmem.testbed.membership import membership_index, training_corpus  # noqa: E402
from mechmem.testbed.monitor_eval import (EvalConfig, by_source, evaluate, heldout_prompts,  # noqa: E402
                                          stretch_table, stretch_windows)
from mechmem.viz.samples import PROPOSED_TAXONOMY  # noqa: E402

N_RANDOM = 5  # untrained CNN draws


def seed_classifiers(run: Path, taxonomy: str) -> list[SpanClassifier]:
    """The row's CNNs per training seed, then its shuffled-label control CNNs (named "control")."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    out = []
    for i in [*folder.seed_indices(slug), "control"]:
        if (folder.cnn_folder(slug, i) / "cnns.json").is_file():
            out.append(SpanClassifier([t.model for t in folder.load_cnns(slug, i)], row["class_names"],
                                      name=f"seed {i}" if i != "control" else "control"))
    return out


def probe_probabilities(run: Path, taxonomy: str, feats: torch.Tensor, table: pd.DataFrame) -> np.ndarray:
    """The simple baseline: the attention-statistics probe (mechmem.probe) fit on the row's own training
    split, as run_alignment fits it, then applied to the monitor's windows (`feats`, pooled as the run's
    feature store pools). [window, class] probabilities."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    split, store = folder.split(slug), folder.feature_store()
    rows = store.index(split.train_ids)
    labels = run_labels(folder, row, split.train_ids, table)
    train_stats = attention_statistics(np.asarray(store.features[np.sort(rows)]))
    labels = labels[np.argsort(rows)]
    stats = np.concatenate([train_stats, attention_statistics(feats.half().float())])
    n = len(train_stats)
    fit = train_probe(stats, labels, np.arange(n), np.arange(n, len(stats)), len(row["class_names"]))
    return fit.eval_logits.exp().numpy()


def untrained_like(cnn: AttentionCNN) -> AttentionCNN:
    """Same config and input scaling (training-split statistics) as `cnn`, fresh random weights."""
    fresh = AttentionCNN(cnn.n_layers, cnn.n_classes, cnn.config, cnn.seq_len, cnn.input_scaling)
    if cnn.input_scaling != "raw":
        fresh.layers.scale.load_state_dict(cnn.layers.scale.state_dict())
    return fresh.eval()


def with_probabilities(df: pd.DataFrame, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The stretch table with another classifier's probabilities, labels and flags."""
    d = df.copy()
    for j, c in enumerate(class_names):
        d[f"p_{c}"] = probs[:, j]
    d["label"] = np.array(class_names)[probs.argmax(1)]
    d["flagged"] = probs.argmax(1) != class_names.index("Non-Memo")
    return d


def fmt(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.3f}"


def md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
                                            for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [cells[0], ["---"] * len(cells[0])] + cells[1:]) + "\n"


def markdown(metrics: pd.DataFrame) -> str:
    lines = ["| question | method | n | positives | flagged | AUROC [95% CI] | precision [95% CI] | recall [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    def cell(r, k: str) -> str:
        lo, hi = getattr(r, k + "_ci")
        return f"{fmt(getattr(r, k))} [{fmt(lo)}, {fmt(hi)}]"

    for r in metrics.itertuples():
        lines.append(f"| {r.question} | {r.method} | {r.n} | {r.positives} | {r.flagged} | {cell(r, 'auroc')} | "
                     f"{cell(r, 'precision')} | {cell(r, 'recall')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "alignment-quick")
    p.add_argument("--taxonomy", default=PROPOSED_TAXONOMY)
    p.add_argument("--prompts-per-source", type=int, default=EvalConfig.prompts_per_source)
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    p.add_argument("--n-boot", type=int, default=EvalConfig.n_boot)
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "monitor_eval")
    args = p.parse_args(argv)
    cfg = EvalConfig(args.prompts_per_source, args.max_new_tokens, args.n_boot)
    t0 = time.time()
    model = load_model("testbed", device=args.device)
    tok = model.tokenizer
    corpus = training_corpus()
    index = membership_index(corpus)
    table = load_memorization_data("testbed", progress=False)
    prompts = heldout_prompts(corpus, np.stack(table["tokens"].to_numpy()), tok.eos_token_id, cfg)
    clf = SpanClassifier.from_run(args.run, args.taxonomy)
    mcfg = MonitorConfig(max_new_tokens=cfg.max_new_tokens, sample=args.sample, temperature=args.temperature,
                         seed=args.seed)
    result = monitor(model, np.stack(prompts["prompt"].to_numpy()), clf, mcfg, tokenizer=None)
    t_monitor = time.time() - t0
    df = stretch_table(result, prompts, index, tok)
    metrics = evaluate(df, result.class_names, cfg.n_boot, cfg.seed).assign(cnns="first seed (what the CLI uses)")

    # The same stretches through each training seed's CNNs and the probe: features once (every pooling
    # of the run's store), every classifier reading the pools it needs.
    store_pooling = RunFolder(args.run).feature_store().pooling
    all_feats = extract_attention(model, torch.as_tensor(stretch_windows(result)), pooling=store_pooling,
                                  progress=True)
    feats = all_feats[:, [store_pooling.index(p) for p in clf.pooling]]
    per_seed = []
    for sc in seed_classifiers(args.run, args.taxonomy):
        d = with_probabilities(df, sc(feats).numpy(), result.class_names)
        m = evaluate(d, result.class_names, n_boot=cfg.n_boot if sc.name == "control" else 0)
        per_seed.append(m[m["method"] == "monitor (CNNs)"].assign(cnns=sc.name))
    # Untrained CNNs (the row's configs and input scaling, random weights): how far the attention, as
    # the CNNs see it, sorts the stretches before any training.
    for k in range(N_RANDOM):
        torch.manual_seed(1000 + k)
        rnd = SpanClassifier([untrained_like(c) for c in clf.cnns], result.class_names, name=f"random {k}")
        m = evaluate(with_probabilities(df, rnd(feats).numpy(), result.class_names), result.class_names, n_boot=0)
        per_seed.append(m[m["method"] == "monitor (CNNs)"].assign(cnns=rnd.name))
    seeds = pd.concat(per_seed)
    untrained = seeds[seeds["cnns"].str.startswith("random")]
    seeds = seeds[~seeds["cnns"].str.startswith("random")]
    control = seeds[seeds["cnns"] == "control"].assign(method="shuffled-label control CNNs")
    seeds = seeds[seeds["cnns"] != "control"]
    spread = seeds.groupby("question", sort=False)[["auroc", "precision", "recall"]].agg(["mean", "std"])
    spread.columns = [f"{a} {b}" for a, b in spread.columns]

    args.out.mkdir(parents=True, exist_ok=True)
    probe = evaluate(with_probabilities(df, probe_probabilities(args.run, args.taxonomy, all_feats, table),
                                        result.class_names),
                     result.class_names, cfg.n_boot, cfg.seed)
    probe = probe[probe["method"] == "monitor (CNNs)"].assign(method="attention-statistics probe", cnns="")
    metrics = pd.concat([metrics, probe, control])
    atomic_text(args.out / "metrics.csv", pd.concat([metrics, seeds, untrained]).to_csv(index=False))
    sources = by_source(df, result.class_names)
    atomic_text(args.out / "by_source.csv", sources.to_csv(index=False, float_format="%.3f"))
    atomic_text(args.out / "stretches.csv", df.to_csv(index=False, float_format="%.4f"))
    by_stretch = pd.concat([evaluate(g, result.class_names, n_boot=0).assign(start=start)
                            for start, g in df.groupby("start")])
    by_stretch = by_stretch[by_stretch["method"] != "membership index (ceiling)"][["start", "question", "method", "n",
                                                                                   "auroc"]]
    spread_random = untrained.groupby("question", sort=False)["auroc"].agg(["mean", "min", "max"]).reset_index()
    md = markdown(metrics) + "\nMonitor over CNN training seeds (one CNN set per seed; mean, sd):\n\n" \
        + md_table(spread.reset_index()) \
        + f"\nUntrained CNNs (the row's configs and input scaling, {N_RANDOM} random initialisations), AUROC:\n\n" \
        + md_table(spread_random) \
        + "\nBy stretch (start 0: attention captured during generation; 32: re-encoded), AUROC:\n\n" \
        + md_table(by_stretch) + "\n\nBy source:\n\n" \
        + md_table(sources) + "\n"
    atomic_text(args.out / "metrics.md", md)
    atomic_json(args.out / "settings.json", {
        "argv": sys.argv[1:], "run": str(args.run), "taxonomy": args.taxonomy, "eval": asdict(cfg),
        "monitor": asdict(mcfg), "prompts": int(len(prompts)), "stretches": int(len(df)),
        "seconds": round(time.time() - t0, 1), "monitor_seconds": round(t_monitor, 1), "device": args.device})
    print(md)
    print(f"{len(prompts)} prompts, {len(df)} stretches, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
