"""Ablate the heads localized for each memorized class, against random heads as control.

    python experiments/ablate_heads.py                         # offline, testbed (localizes first if needed)
    python experiments/ablate_heads.py --localization runs/localize --ks 1 2 4 8 --n-random 20 --method mean

For each memorized class of the localized taxonomy, its top-k heads (k = 1, 2, 4, 8) are ablated
(hook_z set to 0, or to its mean with --method mean) and, as control, k heads drawn at random
(--n-random draws per k, shared by every class). Measured on held-out samples of every class (not
used to train the CNNs or to rank the heads): the share still extractable, the mean memorization
score, and the loss on non-memorized text. Memorized classes are also split by duplication count
at the taxonomy's threshold.

Writes into --out: ablation.csv (targeted, random and baseline rows with 95% bootstrap intervals;
targeted rows carry their difference to random at the same k), ablation.png, extraction.png (the
memorization score), samples.npz (per-sample results of every condition) and config.json.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)

DEFAULT_LOCALIZATION = ROOT / "runs" / "localize"
DEFAULT_OUT = ROOT / "runs" / "ablation"


def parse_args(argv=None):
    p = cli.Parser("ablate_heads", __doc__)
    p.add_argument("--localization", type=Path, default=DEFAULT_LOCALIZATION,
                   help="output folder of experiments/localize.py (made with its defaults if absent)")
    p.add_argument("--model", default=None, help="model (default: the one the localization used)")
    p.add_argument("--data", default=None, help="memorization data (default: the localized run's)")
    p.add_argument("--per-class", type=int, default=80, help="held-out samples per class")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of heads ablated")
    p.add_argument("--n-random", type=int, default=10, help="random control draws per k")
    p.add_argument("--method", choices=["zero", "mean"], default="zero")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def ablate(model, df, labels, loc, cfg, out: Path, *, per_class: int, exclude_ids=(), duplicates_threshold=None,
           progress: bool = True):
    """The experiment once inputs are loaded: held-out sets, every condition, outputs. Returns (summary, held-out sets)."""
    from mechmem.ablation import ablation_experiment, held_out_sets
    from mechmem.atomic import atomic_write
    from mechmem.plots import ablation_png

    held = held_out_sets(df, labels, loc.class_names, per_class=per_class, exclude_ids=exclude_ids,
                         duplicates_threshold=duplicates_threshold, seed=cfg.seed)
    k_max = min(max(cfg.ks), loc.n_layers * loc.n_heads)
    rankings = {c: loc.top_heads(c, k_max) for c in held.memorized}
    sizes = ", ".join(f"{n} {len(t)}" for n, t in held.eval_sets.items())
    print(f"held-out samples: {sizes}; targets: {held.memorized}; {len(cfg.ks)} k x (1 per target + "
          f"{cfg.n_random} random) ablations, method {cfg.method}")
    summary, conditions = ablation_experiment(model, held.eval_sets, rankings, cfg, subsets=held.subsets,
                                              reference=held.reference, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "ablation.csv", lambda tmp: summary.round(6).to_csv(tmp, index=False))
    ablation_png(summary, out / "ablation.png", metric="extractable", loss_sets=held.non_memorized)
    ablation_png(summary, out / "extraction.png", metric="memorization_score", loss_sets=held.non_memorized)
    base = summary[(summary["condition"] == "baseline") & (summary["metric"] == "extractable")]
    for name in held.memorized:  # the data's scores were made without hooks: the baseline must agree
        share = float(base.loc[base["eval_set"] == name, "value"].iloc[0])
        if share < 1.0:
            print(f"warning: unablated, only {100 * share:.1f}% of held-out {name!r} samples are extractable "
                  "(the data's memorization scores were made with another model or numerics)")
    atomic_write(out / "samples.npz", lambda tmp: np.savez_compressed(
        tmp,
        condition=np.array([f"{c.kind}|{c.target}|{c.k}|{c.draw}" for c in conditions]),
        heads=np.array([";".join(f"L{l}H{h}" for l, h in c.heads) for c in conditions]),
        memorization_score=np.stack([c.results["memorization_score"] for c in conditions]),
        loss=np.stack([c.results["loss"] for c in conditions]),
        eval_set=np.concatenate([[n] * len(t) for n, t in held.eval_sets.items()]),
        sequence_id=np.concatenate(list(held.sequence_ids.values())),
    ))
    return summary, held


def headline(summary, loss_sets=("Non-Memo",)) -> str:
    """Targeted vs random, per target class, eval set and k: share extractable, and loss on non-memorized text."""
    s = summary[summary["condition"] == "targeted"]
    keep = (s["metric"] == "extractable") | ((s["metric"] == "loss") & s["eval_set"].isin(list(loss_sets)))
    lines = []
    for r in s[keep].itertuples():
        lines.append(f"{r.target_class:>22} k={r.k:<2} {r.eval_set:>26} {r.metric:>11}: {r.value:6.3f} "
                     f"(random {r.random_value:6.3f}; diff {r.diff_vs_random:+.3f} "
                     f"[{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]; {100 * r.frac_random_below:3.0f}% of draws <=, "
                     f"rank p {r.rank_p_below:.2f})")
    return "\n".join(lines)


def check_inputs(loc, run_dir: Path, model, df, labels) -> None:
    """Refuse a model or a data table that is not the one the localization was made from."""
    from mechmem.models import model_identity

    from mechmem.run import RunFolder

    saved = RunFolder(run_dir)
    if saved.has_features():
        made_with = saved.feature_store().manifest["model"]["weights"]
        if made_with != model_identity(model)["weights"]:
            raise ValueError(f"the model is not the one whose attention trained the CNNs of {run_dir}")
    now = pd.Series(labels, index=df["sequence_id"].to_numpy()).reindex(loc.sequence_ids)
    changed = int((now.to_numpy() != loc.labels).sum())
    if changed:
        raise ValueError(f"the data changed since localization: {changed} of {len(loc.labels)} localized samples "
                         "now have another class (or are gone); rerun experiments/localize.py")


def _check_inputs(args) -> None:
    """Bad input that would otherwise fail late or with a traceback: found before any work (the
    default localization may be computed first, which takes minutes)."""
    cli.check_device(args.device)
    cli.check_out_dir(args.out)
    cli.check_out_dir(args.localization, "--localization")
    cli.check_positive(args, "per_class", "ks", "n_random", "batch_size", "n_boot")


def main(argv=None) -> int:
    return cli.main("ablate_heads", parse_args, run, argv)


def run(args) -> int:
    from mechmem.ablation import AblationConfig
    from mechmem.alignment import Row
    from mechmem.atomic import atomic_json
    from mechmem.data import check_vocab, load_memorization_data
    from mechmem.localize import Localization
    from mechmem.models import load_model
    from mechmem.run import RunFolder

    _check_inputs(args)
    t0 = time.time()
    cfg = AblationConfig(ks=tuple(args.ks), n_random=args.n_random, method=args.method,
                         batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed)
    if not (args.localization / "localization.json").is_file() and args.localization == DEFAULT_LOCALIZATION:
        import subprocess

        print(f"no localization in {args.localization}: running experiments/localize.py with its defaults first")
        command = [sys.executable, str(ROOT / "experiments" / "localize.py"), "--out", str(args.localization)]
        if subprocess.run(command + (["--quiet"] if args.quiet else [])).returncode != 0:
            return 2
    loc = Localization.load(args.localization)
    run_dir = Path(loc.meta["run"])
    saved = RunFolder(run_dir)
    name, revision = saved.model_name()
    data = args.data or saved.raw_config()["data"]
    row = Row(**loc.meta["taxonomy"])
    df = load_memorization_data(data)
    labels = np.asarray(row.labels(df))
    model = load_model(args.model or name, device=args.device, revision=revision)
    check_vocab(df, model.cfg.d_vocab)
    check_inputs(loc, run_dir, model, df, labels)
    trained_on = saved.split(loc.meta["row"]).train_ids
    exclude = np.concatenate([trained_on, loc.sequence_ids.astype(np.int64)])
    summary, held = ablate(model, df, labels, loc, cfg, args.out, per_class=args.per_class, exclude_ids=exclude,
                     duplicates_threshold=row.threshold, progress=not args.quiet)
    atomic_json(args.out / "config.json",
                {"args": {k: str(v) for k, v in vars(args).items()}, "localization": str(args.localization),
                 "run": str(run_dir), "model": args.model or name, "data": data, "taxonomy": loc.meta.get("tax_name"),
                 "config": asdict(cfg)})
    print(headline(summary, held.non_memorized))
    print(f"\nwrote {args.out}/ablation.csv, ablation.png, extraction.png, samples.npz ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
