"""The alignment benchmark across training checkpoints, each read against its own memorization labels.

    python experiments/checkpoints.py --model EleutherAI/pythia-160m-deduped \
        --revisions step1000 step8000 step32000 step143000 --data semantic-filters:160m-deduped \
        --out runs/checkpoints-160m -- --grid quick --device cuda
    python experiments/checkpoints.py --checkpoints ckpts/step100 ckpts/step1000 ckpts/step4000 \
        --data runs/table-mine/memorization.parquet --out runs/checkpoints-mine

Per checkpoint (ordered by training step): the table is relabelled with that checkpoint
(memorization_score and greedy suffix by greedy extraction; mechmem.tables) into
OUT/CHECKPOINT/labels.parquet, then experiments/run_alignment.py runs on it, as a command of its
own (controls and probe as there), into OUT/CHECKPOINT/alignment/. Arguments after `--` go to
run_alignment.py as they are (--grid, --taxonomies, --train-per-class, --device, ...); it checks
them itself, before its own work: a bad one stops the study in one line, exit 2, after the first
checkpoint's labels (kept for the rerun). Writes OUT/checkpoints.csv (one row a
taxonomy x checkpoint: min F1 with its interval, control, probe, extractable samples),
OUT/checkpoints_min_f1.csv (taxonomy x checkpoint) and OUT/checkpoints.png (min F1 against training
step per taxonomy, with intervals). A checkpoint where no row has enough samples in every class
(early in training few samples are memorized) is skipped, its reasons in
OUT/skipped_checkpoints.json. An interrupted study resumes: finished labels and rows are kept.

`--data` may name each checkpoint's own table with `{revision}` (e.g. `testbed-pile@{revision}`, the
second testbed, whose build labels every checkpoint): a table already labelled by its checkpoint is
used as it is, not decoded again.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)


def parse_args(argv=None):
    p = cli.Parser("checkpoints", __doc__)
    p.add_argument("--model", default=None, help="hub name whose --revisions to study")
    p.add_argument("--revisions", nargs="+", default=None, help="e.g. step1000 step8000 step143000")
    p.add_argument("--checkpoints", nargs="+", default=None, help="local checkpoint folders (HF format)")
    p.add_argument("--data", default="testbed",
                   help="the table whose samples every checkpoint relabels; '{revision}' in it: each checkpoint's own")
    p.add_argument("--device", default=None, help="for relabelling (pass run_alignment's own after --)")
    p.add_argument("--dtype", default=None, help="model dtype for relabelling")
    p.add_argument("--batch-size", type=int, default=256, help="greedy decoding batch")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quiet", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.alignment_args = argv[split + 1:]
    return args


def main(argv=None) -> int:
    return cli.main("checkpoints", parse_args, run, argv)


def _alignment_argv(args, ck, labels: Path) -> list[str]:
    own = ["--model", ck.model, "--data", str(labels), "--out", str(args.out / ck.label / "alignment")]
    if ck.revision:
        own += ["--revision", ck.revision]
    if args.quiet:
        own.append("--quiet")
    return [*own, *args.alignment_args]


def _run_alignment(argv: list[str]) -> int:
    """experiments/run_alignment.py as its own process (scripts share code through mechmem, never by
    importing each other): its output and one-line errors go straight to this terminal."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run_alignment.py"), *argv], env=env).returncode


def run(args) -> int:
    import gc
    import json

    import pandas as pd

    from mechmem.atomic import atomic_json, atomic_write
    from mechmem.data import check_vocab, load_memorization_data
    from mechmem.models import _resolve_dtype, load_model
    from mechmem.run import SKIPPED
    from mechmem.tables.checkpoints import checkpoint_list, data_name, label_checkpoint, plot_min_f1, summarize
    from mechmem.tables.relabel import check_available

    checkpoints = checkpoint_list(args.model, args.revisions, args.checkpoints)
    cli.check_device(args.device)
    _resolve_dtype(args.dtype)
    cli.check_out_dir(args.out)
    for flag in ("--model", "--revision", "--data", "--out", "--relabel"):
        if flag in args.alignment_args:
            raise cli.CliError(f"{flag} is set per checkpoint by this script: leave it out after --")
    for ck in checkpoints:  # every checkpoint loadable: before any work
        check_available(ck.model, ck.revision)
    loaded = data_name(args.data, checkpoints[0])
    df = load_memorization_data(loaded, progress=not args.quiet)
    print(f"{len(checkpoints)} checkpoints: " + ", ".join(f"{c.label} (step {c.step})" for c in checkpoints))
    results, skipped = [], {}
    for ck in checkpoints:
        labels = args.out / ck.label / "labels.parquet"
        if not labels.exists():
            if data_name(args.data, ck) != loaded:  # each checkpoint's own table
                loaded = data_name(args.data, ck)
                df = load_memorization_data(loaded, progress=not args.quiet)
            model = load_model(ck.model, device=args.device, dtype=args.dtype, revision=ck.revision)
            check_vocab(df, model.cfg.d_vocab)
            label_checkpoint(df, model, ck, labels, batch_size=args.batch_size, device=args.device,
                             progress=not args.quiet)
            del model
            gc.collect()
        extractable = int((pd.read_parquet(labels, columns=["memorization_score"])["memorization_score"] == 1).sum())
        print(f"== {ck.label} (step {ck.step}): {extractable} extractable samples of {len(df)}")
        run_dir = args.out / ck.label / "alignment"
        (run_dir / SKIPPED).unlink(missing_ok=True)  # rewritten by every run: only this run's may be read
        code = _run_alignment(_alignment_argv(args, ck, labels))
        if code != 0 and (run_dir / SKIPPED).is_file() and not (run_dir / "alignment.csv").is_file():
            # No row has enough samples at this checkpoint (early in training, few are memorized):
            # recorded, and the study goes on.
            skipped[ck.label] = json.loads((run_dir / SKIPPED).read_text())
            print(f"== {ck.label}: no taxonomy row has enough samples in every class; skipped")
            continue
        if code != 0:
            return code
        results.append((ck, pd.read_csv(run_dir / "alignment.csv"), extractable))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_json(args.out / "skipped_checkpoints.json", skipped)
    if not results:
        raise cli.CliError(f"no checkpoint has a taxonomy row with enough samples in every class (reasons: "
                           f"{args.out / 'skipped_checkpoints.json'}); lower --train-per-class/--eval-per-class after --")
    long, wide = summarize(results)
    atomic_write(args.out / "checkpoints.csv", lambda p: long.to_csv(p, index=False))
    atomic_write(args.out / "checkpoints_min_f1.csv", lambda p: wide.to_csv(p, index=False))
    plot_min_f1(long, args.out / "checkpoints.png")
    print(wide.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    print(f"wrote {args.out / 'checkpoints.csv'}, checkpoints_min_f1.csv, checkpoints.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
