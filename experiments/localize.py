"""Localize memorization classes in the model: guided-backprop Delta maps, layer importance, ranked heads.

    python experiments/localize.py                                   # offline, testbed, "Non-Memo, Guess, Others"
    python experiments/localize.py --run runs/alignment-quick --taxonomy "Non-Memo, Recite[5], Others"
    python experiments/localize.py --run runs/alignment-paper        # a paper-grid run (8 CNNs averaged)

Reads the trained CNNs, the feature store's tokens and the eval split of one taxonomy from a
run_alignment output folder (--run). Without --run it uses runs/alignment-quick when that run
trained the taxonomy (or OUT/alignment from an earlier call), and otherwise trains what it needs
(one taxonomy, the quick CNN grid, 300 + 150 samples a class) into OUT/alignment first; --train
forces that.

Writes into --out: heads.csv (every head of every class, ranked, with its hook name and a 95%
interval), layers.csv, localization.npz/.json (the maps, for mechmem.localize.Localization.load),
delta_maps.png, layer_importance.png, head_scores.png and config.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)

DEFAULT_OUT = ROOT / "runs" / "localize"
DEFAULT_RUN = ROOT / "runs" / "alignment-quick"


def parse_args(argv=None):
    from mechmem.localize import DEFAULT_TAXONOMY

    p = cli.Parser("localize", __doc__)
    p.add_argument("--run", type=Path, help="a run_alignment output folder (default: runs/alignment-quick if usable)")
    p.add_argument("--taxonomy", default=None, help=f"display name or row slug (default {DEFAULT_TAXONOMY!r})")
    p.add_argument("--train", action="store_true",
                   help="train the CNNs into OUT/alignment even if a usable run exists")
    p.add_argument("--model", default=None, help="model (default: the run's; 'testbed' when training)")
    p.add_argument("--data", default="testbed", help="memorization data, used only when training the CNNs")
    p.add_argument("--samples-per-class", type=int, default=96, help="eval samples localized per class")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-per-class", type=int, default=300, help="when training: CNN training samples a class")
    p.add_argument("--eval-per-class", type=int, default=150, help="when training: eval samples a class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _has_row(run: Path, taxonomy: str | None) -> bool:
    from mechmem.localize import DEFAULT_TAXONOMY
    from mechmem.run import RunFolder

    try:
        RunFolder(run).find_row(taxonomy, default=DEFAULT_TAXONOMY)
        return RunFolder(run).has_features()
    except (FileNotFoundError, ValueError):
        return False


def train_row(args, out: Path) -> Path:
    """Train the quick CNN grid on the one taxonomy localization needs; returns the run folder."""
    from mechmem import alignment as al
    from mechmem import taxonomy as tx
    from mechmem.cnn import QUICK_GRID, TrainConfig
    from mechmem.data import check_vocab, load_memorization_data
    from mechmem.localize import DEFAULT_TAXONOMY
    from mechmem.models import load_model
    from mechmem.run import RunFolder

    name = args.taxonomy or DEFAULT_TAXONOMY
    row = al.Row(*tx.parse_name(name))
    model_name = args.model or "testbed"
    cfg = al.AlignmentConfig(rows=(row,), train_per_class=args.train_per_class, eval_per_class=args.eval_per_class,
                             configs=QUICK_GRID, train=TrainConfig(seed=args.seed, device=args.device), seed=args.seed)
    RunFolder(out).write_config(model_name, args.data, cfg, argv=sys.argv[1:])
    print(f"training the quick CNN grid on {name!r} ({args.train_per_class}+{args.eval_per_class} a class) into {out}")
    df = load_memorization_data(args.data)
    model = load_model(model_name, device=args.device)
    check_vocab(df, model.cfg.d_vocab)
    al.run_alignment(model, df, cfg, out, progress=not args.quiet)
    return out


def write_outputs(loc, out: Path) -> None:
    """Tables, arrays and the three figures of one localization."""
    from mechmem.plots import delta_maps_png, head_scores_png, layer_importance_png

    loc.save(out)
    title = loc.meta.get("tax_name") or ", ".join(loc.class_names)
    delta_maps_png(loc.delta, loc.class_names, out / "delta_maps.png",
                   title=f"Delta maps, {title} ({len(loc.cnn_names)} CNNs, {int(loc.n_samples.min())}+ samples a class)")
    layer_importance_png(loc.layer_importance, loc.class_names, out / "layer_importance.png",
                         title=f"Layer importance, {title}")
    head_scores_png(loc.head_scores, loc.class_names, out / "head_scores.png")


def summary_text(loc, top: int = 5) -> str:
    table = loc.head_table()
    lines = []
    share = loc.layer_importance / loc.layer_importance.sum(1, keepdims=True)
    for c, name in enumerate(loc.class_names):
        best = table[(table["class"] == name) & (table["rank"] <= top)]
        heads = ", ".join(f"L{r.layer}H{r.head} {r.score:.3f}" for r in best.itertuples())
        layers = " ".join(f"{s:.2f}" for s in share[c])
        lines.append(f"{name:>28}: top heads {heads}\n{'':>30}layer shares {layers}")
    return "\n".join(lines)


def _check_inputs(args) -> None:
    """Bad input that would otherwise fail late or with a traceback: found before any work."""
    cli.check_device(args.device)
    cli.check_out_dir(args.out)
    cli.check_positive(args, "samples_per_class", "batch_size", "train_per_class", "eval_per_class")
    if args.run is not None and not args.run.is_dir():
        raise cli.CliError(f"--run folder {args.run} does not exist")


def main(argv=None) -> int:
    return cli.main("localize", parse_args, run, argv)


def run(args) -> int:
    from dataclasses import asdict

    from mechmem.atomic import atomic_json
    from mechmem.localize import LocalizeConfig, localize_run
    from mechmem.models import load_model
    from mechmem.run import RunFolder

    _check_inputs(args)
    t0 = time.time()
    if args.train:
        if args.run is not None:
            raise ValueError("--train and --run exclude each other")
        run_dir = train_row(args, args.out / "alignment")
    elif args.run is not None:
        if not _has_row(args.run, args.taxonomy):
            raise ValueError(f"{args.run} has no trained CNNs and features for {args.taxonomy or 'the default taxonomy'}")
        run_dir = args.run
    elif _has_row(DEFAULT_RUN, args.taxonomy):
        run_dir = DEFAULT_RUN
    elif _has_row(args.out / "alignment", args.taxonomy):
        run_dir = args.out / "alignment"
    else:
        run_dir = train_row(args, args.out / "alignment")
    name, revision = RunFolder(run_dir).model_name()
    model = load_model(args.model or name, device=args.device, revision=revision)
    cfg = LocalizeConfig(samples_per_class=args.samples_per_class, batch_size=args.batch_size, seed=args.seed)
    print(f"localizing {args.taxonomy or 'the default taxonomy'} from {run_dir} ({args.samples_per_class} samples a class)")
    loc = localize_run(run_dir, model, taxonomy=args.taxonomy, cfg=cfg, progress=not args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(loc, args.out)
    atomic_json(args.out / "config.json",
                {"args": {k: str(v) for k, v in vars(args).items()}, "run": str(run_dir), "model": args.model or name,
                 "revision": revision, "config": asdict(cfg)})
    print(summary_text(loc))
    print(f"\nwrote {args.out}/heads.csv, layers.csv, delta_maps.png, layer_importance.png, head_scores.png "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
