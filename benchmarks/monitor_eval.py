"""Evaluate the regurgitation monitor on held-out testbed prompts, against confidence and the membership index.

    python benchmarks/monitor_eval.py --run runs/alignment-quick --out docs/results/testbed_monitor
    python benchmarks/monitor_eval.py --run runs/alignment-quick --sample --out docs/results/testbed_monitor_sampled
    python benchmarks/monitor_eval.py --model testbed-pile --run runs/pile/grid --out runs/pile/monitor   # second testbed

Needs the testbed's training stream for the ground truth: rebuilt (about a minute, then cached) on
the Python the testbed manifest names (`mechmem.testbed.membership`). See `mechmem.monitor_eval`
for the prompt sources, the held-out rule, the ground truth and the two questions. Beside the monitor and
the two baselines the issue names (confidence, the membership index), the same stretches go through the
row's CNNs of every training seed, the attention-statistics probe fit on its training split, the
kind-of-text baseline (each stretch's source, its class frequencies in that split), shuffled-label
control CNNs (`--control-seeds` shuffles, each trained for the real CNNs' mean best epoch, no early
stopping, last weights) and untrained CNNs; every one scored in the monitor's direction.
Writes metrics.csv/.md (per question and method, 95% intervals resampling source documents; per seed
rows too), heldout.csv (the held-out rule's exclusions by source), by_source.csv, stretches.csv (every
kept stretch: source, document, truth, scores) and settings.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem.controls import shuffled_control  # noqa: E402
from mechmem.atomic import atomic_json, atomic_text  # noqa: E402
from mechmem.cnn import AttentionCNN, Task, load_cnns, save_cnns, train_cnn_tasks  # noqa: E402
from mechmem.data import load_memorization_data  # noqa: E402
from mechmem.features import extract_attention  # noqa: E402
from mechmem.localize import run_labels  # noqa: E402
from mechmem.models import load_model  # noqa: E402
from mechmem.monitor import MonitorConfig, SpanClassifier, monitor  # noqa: E402
from mechmem.monitor_eval import (EvalConfig, TrainingOverlap, by_source, evaluate,  # noqa: E402
                                  heldout_prompts, overlapping_prompts, source_probabilities, stretch_table,
                                  stretch_windows, with_probabilities)
from mechmem.probe import attention_statistics, train_probe  # noqa: E402
from mechmem.run import RunFolder  # noqa: E402
from mechmem.testbed.membership import membership_index, testbed_corpus  # noqa: E402
from mechmem.viz.samples import PROPOSED_TAXONOMY  # noqa: E402

N_RANDOM = 5  # untrained CNN draws


def seed_classifiers(run: Path, taxonomy: str) -> list[SpanClassifier]:
    """The row's CNNs, one classifier per training seed."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    return [SpanClassifier([t.model for t in folder.load_cnns(slug, i)], row["class_names"], name=f"seed {i}")
            for i in folder.seed_indices(slug)]


def training_samples(run: Path, taxonomy: str, table: pd.DataFrame) -> np.ndarray:
    """[sample, 64] tokens of every sample the row's CNNs were trained or scored on (train + eval ids)."""
    folder = RunFolder(run)
    split = folder.split(folder.find_row(taxonomy)[0])
    ids = np.concatenate([split.train_ids, split.eval_ids])
    tokens = pd.Series(list(table["tokens"].to_numpy()), index=table["sequence_id"].to_numpy())
    return np.stack([np.asarray(t, dtype=np.int64) for t in tokens.loc[ids]])


def row_task(run: Path, taxonomy: str, table: pd.DataFrame) -> tuple[Task, np.ndarray]:
    """The row's split as a Task on its run's feature store, and the store's features (float16)."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    split, store = folder.split(slug), folder.feature_store()
    tr, ev = store.index(split.train_ids), store.index(split.eval_ids)
    labels = np.zeros(len(store.sequence_ids), dtype=np.int64)
    labels[tr] = run_labels(folder, row, split.train_ids, table)
    labels[ev] = run_labels(folder, row, split.eval_ids, table)
    return Task(labels, tr, ev), np.array(store.features)


def control_classifiers(run: Path, taxonomy: str, table: pd.DataFrame, n_seeds: int, device: str
                        ) -> tuple[list[SpanClassifier], int]:
    """Shuffled-label control CNNs, one set per shuffle seed k (training labels permuted by
    `controls.shuffled_control(task, k)`, CNN seed train.seed + k): the row's configs and protocol,
    but trained for exactly E epochs on the whole training split and kept at their last weights, E the
    real CNNs' mean best epoch. (Early stopping on shuffled labels would stop at noise.) The missing
    sets train in one pass, each as it would alone. Each set is saved
    in the run folder, cnns/<slug>/control_fixed_e<E>/shuffle<k>/, and reused by later evaluations of the
    row (the sampled variant reads the greedy one's). Returns (sets, E)."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    real = [t for i in folder.seed_indices(slug) for t in folder.load_cnns(slug, i)]
    epochs = max(1, int(round(float(np.mean([t.best_epoch for t in real])))))
    train_cfg = folder.read_config().config.train
    configs = [t.config for t in folder.load_cnns(slug, 0)]
    saved = [folder.cnn_folder(slug) / f"control_fixed_e{epochs}" / f"shuffle{k}" for k in range(n_seeds)]
    missing = [k for k in range(n_seeds) if not (saved[k] / "cnns.json").is_file()]
    if missing:  # the missing sets in one pass, each under its own training seed (`Task.seed`)
        task, features = row_task(run, taxonomy, table)
        cfg = replace(train_cfg, val_fraction=0.0, epochs=epochs, device=device)
        trained = train_cnn_tasks(torch.from_numpy(features), folder.feature_store().pooling,
                                  [shuffled_control(replace(task, seed=train_cfg.seed + k), k) for k in missing],
                                  len(row["class_names"]), configs, cfg, progress=True)
        for k, cnns in zip(missing, trained):
            save_cnns(cnns, saved[k])
    return [SpanClassifier([t.model for t in load_cnns(saved[k])], row["class_names"], name=f"control {k}")
            for k in range(n_seeds)], epochs


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


def kind_of_text_probabilities(run: Path, taxonomy: str, table: pd.DataFrame, stretch_sources: pd.Series) -> np.ndarray:
    """The kind-of-text baseline (`monitor_eval.source_probabilities`), fit on the row's training split."""
    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy)
    train_ids = folder.split(slug).train_ids
    sources = table.set_index("sequence_id").loc[train_ids, "source"].to_numpy()
    return source_probabilities(sources, run_labels(folder, row, train_ids, table), stretch_sources.to_numpy(),
                                len(row["class_names"]))


def untrained_like(cnn: AttentionCNN) -> AttentionCNN:
    """Same config and input scaling (training-split statistics) as `cnn`, fresh random weights."""
    fresh = AttentionCNN(cnn.n_layers, cnn.n_classes, cnn.config, cnn.seq_len, cnn.input_scaling)
    if cnn.input_scaling != "raw":
        fresh.layers.scale.load_state_dict(cnn.layers.scale.state_dict())
    return fresh.eval()


def fmt(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.3f}"


def md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
                                            for row in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [cells[0], ["---"] * len(cells[0])] + cells[1:]) + "\n"


def markdown(metrics: pd.DataFrame) -> str:
    lines = ["| question | method | n | documents | positives | flagged | AUROC [95% CI] | precision [95% CI] | "
             "recall [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k: str) -> str:
        lo, hi = getattr(r, k + "_ci")
        return f"{fmt(getattr(r, k))} [{fmt(lo)}, {fmt(hi)}]"

    for r in metrics.itertuples():
        lines.append(f"| {r.question} | {r.method} | {r.n} | {r.groups} | {r.positives} | {r.flagged} | "
                     f"{cell(r, 'auroc')} | {cell(r, 'precision')} | {cell(r, 'recall')} |")
    return "\n".join(lines) + "\n"


def spread(per_seed: pd.DataFrame) -> pd.DataFrame:
    """AUROC (and precision, recall) over the seeds of each kind of classifier: mean, sd, min, max."""
    out = per_seed.groupby(["kind", "question"], sort=False)["auroc"].agg(["count", "mean", "std", "min", "max"])
    prec = per_seed.groupby(["kind", "question"], sort=False)[["precision", "recall"]].mean()
    return out.join(prec.add_suffix(" (mean)")).reset_index().rename(columns={"count": "seeds", "std": "sd"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed", help="'testbed', or the second testbed by name (testbed-pile[@stepN])")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "alignment-quick")
    p.add_argument("--taxonomy", default=PROPOSED_TAXONOMY)
    p.add_argument("--prompts-per-source", type=int, default=EvalConfig.prompts_per_source)
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    p.add_argument("--n-boot", type=int, default=EvalConfig.n_boot)
    p.add_argument("--overlap", type=int, default=EvalConfig.overlap,
                   help="held-out rule: drop a prompt whose windows share this many consecutive tokens with a "
                        "training sample")
    p.add_argument("--control-seeds", type=int, default=5, help="shuffled-label control CNN sets")
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "monitor_eval")
    args = p.parse_args(argv)
    cfg = EvalConfig(args.prompts_per_source, args.max_new_tokens, args.n_boot, overlap=args.overlap)
    t0 = time.time()
    corpus = testbed_corpus(args.model)
    model = load_model(args.model, device=args.device)
    tok = model.tokenizer
    index = membership_index(corpus)
    table = load_memorization_data(args.model, progress=False)
    overlap = TrainingOverlap(training_samples(args.run, args.taxonomy, table), cfg.overlap)
    prompts, skipped = heldout_prompts(corpus, overlap, tok.eos_token_id, cfg)
    clf = SpanClassifier.from_run(args.run, args.taxonomy)
    mcfg = MonitorConfig(max_new_tokens=cfg.max_new_tokens, sample=args.sample, temperature=args.temperature,
                         seed=args.seed)
    result = monitor(model, np.stack(prompts["prompt"].to_numpy()), clf, mcfg, tokenizer=None)
    t_monitor = time.time() - t0

    # The held-out rule after generation: every window the CNNs read for a prompt, the model's own text.
    excluded = overlapping_prompts(result, overlap)
    prompts["excluded"] = excluded
    kept = prompts[~excluded]
    by = prompts.groupby("source")
    heldout = pd.DataFrame({"skipped at selection": pd.Series(skipped), "generated": by.size(),
                            "excluded after generation": by["excluded"].sum(), "kept": kept.groupby("source").size(),
                            "documents kept": kept.groupby("source")["source_id"].nunique()})
    heldout = heldout.reindex(list(skipped)).fillna(0).astype(int).rename_axis("source").reset_index()
    all_df = stretch_table(result, prompts, index, tok)
    keep = ~excluded[all_df["prompt"].to_numpy()]
    df = all_df[keep].reset_index(drop=True)
    metrics = evaluate(df, result.class_names, cfg.n_boot, cfg.seed).assign(cnns="first seed (what the CLI uses)")

    # The same stretches through every classifier: features once (every pooling of the run's store),
    # each classifier reading the pools it needs.
    store_pooling = RunFolder(args.run).feature_store().pooling
    all_feats = extract_attention(model, torch.as_tensor(stretch_windows(result)[keep]), pooling=store_pooling,
                                  progress=True)
    feats = all_feats[:, [store_pooling.index(p) for p in clf.pooling]]

    def monitor_rows(sc: SpanClassifier, kind: str) -> pd.DataFrame:
        m = evaluate(with_probabilities(df, sc(feats).numpy(), result.class_names), result.class_names, n_boot=0)
        return m[m["method"] == "monitor (CNNs)"].assign(kind=kind, cnns=sc.name)

    per_seed = [monitor_rows(sc, "trained CNNs (training seeds)") for sc in seed_classifiers(args.run, args.taxonomy)]
    controls, control_epochs = control_classifiers(args.run, args.taxonomy, table, args.control_seeds, args.device)
    per_seed += [monitor_rows(sc, "shuffled-label control CNNs (shuffle seeds)") for sc in controls]
    # Untrained CNNs (the row's configs and input scaling, random weights): how far the attention, as
    # the CNNs see it, sorts the stretches before any training.
    for k in range(N_RANDOM):
        torch.manual_seed(1000 + k)
        rnd = SpanClassifier([untrained_like(c) for c in clf.cnns], result.class_names, name=f"random {k}")
        per_seed.append(monitor_rows(rnd, "untrained CNNs (initialisations)"))
    seeds = pd.concat(per_seed)

    args.out.mkdir(parents=True, exist_ok=True)
    probe = evaluate(with_probabilities(df, probe_probabilities(args.run, args.taxonomy, all_feats, table),
                                        result.class_names),
                     result.class_names, cfg.n_boot, cfg.seed)
    probe = probe[probe["method"] == "monitor (CNNs)"].assign(method="attention-statistics probe", cnns="")
    kind = evaluate(with_probabilities(df, kind_of_text_probabilities(args.run, args.taxonomy, table, df["source"]),
                                       result.class_names), result.class_names, cfg.n_boot, cfg.seed)
    kind = kind[kind["method"] == "monitor (CNNs)"].assign(method="kind of text (source)", cnns="")
    metrics = pd.concat([metrics, probe, kind])
    atomic_text(args.out / "metrics.csv", pd.concat([metrics, seeds]).to_csv(index=False))
    atomic_text(args.out / "heldout.csv", heldout.to_csv(index=False))
    sources = by_source(df, result.class_names)
    atomic_text(args.out / "by_source.csv", sources.to_csv(index=False, float_format="%.3f"))
    atomic_text(args.out / "stretches.csv", df.to_csv(index=False, float_format="%.4f"))
    by_stretch = pd.concat([evaluate(g, result.class_names, n_boot=0).assign(start=start)
                            for start, g in df.groupby("start")])
    by_stretch = by_stretch[by_stretch["method"] != "membership index (ceiling)"][["start", "question", "method", "n",
                                                                                   "auroc"]]
    md = (f"Held-out rule: a prompt is left out when a window the CNNs read for it shares {cfg.overlap} consecutive "
          f"tokens (any offset) with one of the row's {overlap.n_rows} train/eval samples. Skipped at selection "
          f"(the true text overlaps): {sum(skipped.values())}; excluded after generation (the generated windows "
          f"overlap): {int(excluded.sum())} of {len(prompts)}; kept: {int((~excluded).sum())} prompts, "
          f"{len(df)} stretches, {df['source_id'].nunique()} source documents.\n\n" + md_table(heldout)
          + "\nIntervals: 95%, resampling source documents.\n\n" + markdown(metrics)
          + f"\nOver seeds, AUROC in the monitor's direction (never flipped). Shuffled-label controls: "
          f"{args.control_seeds} shuffles, each trained {control_epochs} epochs (the real CNNs' mean best epoch), "
          f"last weights. Untrained: {N_RANDOM} initialisations, the row's input scaling.\n\n"
          + md_table(spread(seeds))
          + "\nBy stretch (start 0: attention captured during generation; 32: re-encoded), AUROC:\n\n"
          + md_table(by_stretch) + "\n\nBy source:\n\n" + md_table(sources) + "\n")
    atomic_text(args.out / "metrics.md", md)
    atomic_json(args.out / "settings.json", {
        "argv": sys.argv[1:], "run": str(args.run), "taxonomy": args.taxonomy, "eval": asdict(cfg),
        "monitor": asdict(mcfg), "candidates_skipped": int(sum(skipped.values())), "prompts": int(len(prompts)),
        "prompts_excluded": int(excluded.sum()), "prompts_kept": int((~excluded).sum()),
        "stretches": int(len(df)), "documents": int(df["source_id"].nunique()), "training_samples": overlap.n_rows,
        "control_seeds": args.control_seeds, "control_epochs": control_epochs,
        "seconds": round(time.time() - t0, 1), "monitor_seconds": round(t_monitor, 1), "device": args.device})
    print(md)
    print(f"{int((~excluded).sum())} of {len(prompts)} prompts kept, {len(df)} stretches, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":  # bad input (no such run, row or checkpoint): one line, exit 2
    from mechmem import cli

    raise SystemExit(cli.main(f"benchmarks/{Path(__file__).name}", lambda argv: argv, main, sys.argv[1:]))
