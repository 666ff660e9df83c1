"""The alignment benchmark: rank memorization taxonomies by how well attention predicts them.

    python experiments/run_alignment.py                      # offline quick preset on the testbed
    python experiments/run_alignment.py --grid paper         # all 54 rows of the paper, 8 CNNs each
    python experiments/run_alignment.py --model EleutherAI/pythia-12b-deduped --data semantic-filters:12b-deduped \
        --grid paper --device cuda --dtype bf16    # the paper's experiment (needs the hub)
    torchrun --nproc-per-node 2 experiments/run_alignment.py --grid paper   # the same on two GPUs

Writes into --out: alignment.csv / alignment.md (the paper's columns plus 95% bootstrap
intervals), min_f1.png, confusion_best.png, confusion_worst.png, the trained CNNs (cnns/), the
feature store (features/), per-row results (rows/) and the run's config (config.json). An
interrupted run resumes from --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)

PRESETS = {  # grid: (rows, CNN configs, train per class, eval per class, training seeds)
    "quick": ("quick", "quick", 300, 150, 3),
    "paper": ("paper", "paper", 4000, 2000, 1),
}


def parse_args(argv=None):
    from mechmem.cnn import INPUT_SCALINGS, PRECISIONS, PROTOCOLS

    p = cli.Parser("run_alignment", __doc__)
    p.add_argument("--grid", choices=sorted(PRESETS), default="quick",
                   help="quick: 5 rows, 2 CNNs, 3 seeds, 300+150 samples a class; paper: 54 rows, 8 CNNs, 1 seed, 4000+2000")
    p.add_argument("--model", default="testbed", help="'testbed', a local HF folder, or a hub name")
    p.add_argument("--revision", default=None, help="hub revision, e.g. step143000 for Pythia")
    p.add_argument("--relabel", action="store_true",
                   help="recompute memorization_score and free generation with this model (needed when the "
                        "table was labelled by another model or checkpoint: mechmem.tables)")
    p.add_argument("--data", default="testbed",
                   help="'testbed', a parquet/jsonl file, or semantic-filters:SIZE[-deduped]")
    p.add_argument("--taxonomies", nargs="+", help="paper ids or display names (default: the grid's rows)")
    p.add_argument("--duplicates-thresholds", nargs="+", type=int,
                   help="thresholds t for ids given in --taxonomies (default 5)")
    p.add_argument("--rouge", choices=["either", "L", "3"], default="either")
    p.add_argument("--rouge-threshold", type=float, default=0.5)
    p.add_argument("--rouge-sweep", action="store_true",
                   help="also run the paper's ROUGE sweep (Table 4) on the same features: rouge_sweep.csv")
    p.add_argument("--configs", nargs="+", help="'quick', 'paper', or CNN names like k6_c10_mean")
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--eval-per-class", type=int)
    p.add_argument("--training", choices=PROTOCOLS, default="converged",
                   help="converged: standardized inputs, validation part, early stopping (default); "
                        "paper: the paper's exact recipe (raw attention, 3 epochs), for replication")
    p.add_argument("--epochs", type=int, default=None,
                   help="paper: the number of epochs (3); converged: the cap (60)")
    p.add_argument("--input-scaling", choices=INPUT_SCALINGS, default=None,
                   help="how attention is shown to the CNN (default: the protocol's; paper: raw, converged: log-pixel)")
    p.add_argument("--patience", type=int, default=None,
                   help="converged: epochs without a better validation loss before stopping (4)")
    p.add_argument("--no-controls", action="store_true",
                   help="skip the shuffled-label control CNNs (the permutation null is always computed)")
    p.add_argument("--control-seeds", type=int, default=1,
                   help="shuffled-label controls a row, the k-th trained with seed k's epoch counts (<= --cnn-seeds)")
    p.add_argument("--null-permutations", type=int, default=1000,
                   help="label permutations of the permutation null of min F1 (>= 100)")
    p.add_argument("--no-probe", action="store_true", help="skip the attention-statistics probe")
    p.add_argument("--probe-fit", choices=["cnn-fit", "train"], default="cnn-fit",
                   help="what the probe fits on: the CNNs' fit part of the training split (default: equal data), "
                        "or the whole training split")
    p.add_argument("--cnn-precision", choices=PRECISIONS, default="float32",
                   help="bf16: train the CNNs under bfloat16 autocast (faster on a GPU; float32 is the paper's)")
    p.add_argument("--cnn-conv", choices=["auto", "fft", "direct"], default="auto",
                   help="the fused CNNs' convolutions: through the FFT (auto: on a GPU; the same function to float "
                        "rounding, faster) or direct (cuDNN's, as the paper's code)")
    p.add_argument("--cnn-seeds", type=int, default=None,
                   help="train every CNN config with this many seeds (quick: 3, paper: 1): the score averages "
                        "over them and min_f1_seed_sd reports how far training noise moves it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bf16, fp16")
    p.add_argument("--no-compatibility-mode", action="store_true",
                   help="load without TransformerLens's weight processing (same hook names and patterns up "
                        "to bf16 rounding; skips the processing's time and memory)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="feature-extraction batch size (default: the largest that fits in free GPU memory; 64 on cpu)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="samples per feature-store chunk: the unit of resume, and of work between torchrun ranks")
    p.add_argument("--split", choices=["shared", "paper"], default="shared",
                   help="shared: every taxonomy draws from one seeded ranking, so one small feature "
                        "extraction serves all (default); paper: the paper's per-class draws")
    p.add_argument("--match-source", action="store_true",
                   help="draw Non-Memo with the memorized classes' mix of the table's source column, so that "
                        "the kind of text no longer tells the classes apart (tables with a source column)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/alignment-GRID)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _configs(names, grid):
    from mechmem.cnn import PAPER_GRID, QUICK_GRID, CNNConfig

    if not names:
        return QUICK_GRID if grid == "quick" else PAPER_GRID
    if names in (["quick"], ["paper"]):
        return QUICK_GRID if names == ["quick"] else PAPER_GRID
    out = []
    for name in names:
        try:
            out.append(CNNConfig.from_name(name))
        except ValueError:
            raise cli.CliError(f"unknown CNN config {name!r}; use e.g. k6_c10_mean, 'quick' or 'paper'") from None
    return tuple(out)


def _rows(args, grid_rows):
    from mechmem import alignment as al
    from mechmem import taxonomy as tx

    if not 0 < args.rouge_threshold <= 1:
        raise cli.CliError(f"--rouge-threshold must be in (0, 1], got {args.rouge_threshold}")
    if not args.taxonomies:
        make = al.quick_rows if grid_rows == "quick" else al.paper_rows
        return make(args.rouge, args.rouge_threshold)
    thresholds = args.duplicates_thresholds or [5]
    for t in thresholds:
        if t < 0:
            raise cli.CliError(f"--duplicates-thresholds must be >= 0, got {t}")
    rows = []
    for name in args.taxonomies:
        if name in tx.TAXONOMY_IDS:
            rows += [al.Row(name, t, args.rouge, args.rouge_threshold) for t in thresholds]
            continue
        try:
            tax_id, t = tx.parse_name(name)
        except ValueError as err:
            raise cli.CliError(f"unknown taxonomy {name!r}: {err}") from None
        rows.append(al.Row(tax_id, t, args.rouge, args.rouge_threshold))
    return tuple(dict.fromkeys(rows))


def _check_inputs(args) -> None:
    """Bad input that would otherwise fail late or with a traceback: found before any work."""
    from mechmem.cnn import feature_side
    from mechmem.data import SEQ_LEN
    from mechmem.models import _resolve_dtype

    cli.check_device(args.device)
    _resolve_dtype(args.dtype)
    cli.check_out_dir(args.out)
    cli.check_positive(args, "train_per_class", "eval_per_class")  # 0 would silently mean the preset's
    for config in _configs(args.configs, PRESETS[args.grid][1]):  # else found after generation and extraction
        try:
            feature_side(SEQ_LEN, config.kernel_size)
        except ValueError as err:
            raise cli.CliError(f"CNN config {config.name}: {err}") from None


def main(argv=None) -> int:
    return cli.main("run_alignment", parse_args, run, argv)


def run(args) -> int:
    from mechmem import alignment as al
    from mechmem.cnn import TrainConfig
    from mechmem.data import SOURCE, check_vocab, load_memorization_data
    from mechmem.distributed import init_from_env, shutdown
    from mechmem.models import load_model
    from mechmem.run import RunFolder
    from mechmem.tables.relabel import check_labels

    _check_inputs(args)
    grid_rows, grid_configs, train_pc, eval_pc, seeds = PRESETS[args.grid]
    seeds = args.cnn_seeds if args.cnn_seeds is not None else seeds
    rows = _rows(args, grid_rows)
    configs = _configs(args.configs, grid_configs)
    train_pc = args.train_per_class or train_pc
    eval_pc = args.eval_per_class or eval_pc
    if train_pc < 1 or eval_pc < 1:
        raise cli.CliError("--train-per-class and --eval-per-class must be >= 1")
    if (args.epochs is not None and args.epochs < 1) or (args.batch_size is not None and args.batch_size < 1) \
            or args.n_boot < 1 or args.chunk_size < 1 or seeds < 1:
        raise cli.CliError("--epochs, --batch-size, --chunk-size, --n-boot and --cnn-seeds must be >= 1")
    if args.patience is not None and args.patience < 0:
        raise cli.CliError(f"--patience must be >= 0, got {args.patience}")
    out = args.out or ROOT / "runs" / f"alignment-{args.grid}"

    dist = init_from_env()  # one process per GPU under torchrun; Dist() otherwise
    if dist.world_size > 1 and args.device not in (None, "cpu", "cuda"):
        raise cli.CliError(f"under torchrun each rank takes GPU LOCAL_RANK: use --device cuda, not {args.device}")
    say = print if dist.is_main else (lambda *a, **k: None)
    cfg = al.AlignmentConfig(
        rows=rows, train_per_class=train_pc, eval_per_class=eval_pc, configs=configs,
        train=TrainConfig(protocol=args.training, epochs=args.epochs, input_scaling=args.input_scaling,
                          patience=args.patience, seed=args.seed, device=args.device, precision=args.cnn_precision,
                          fft={"auto": None, "fft": True, "direct": False}[args.cnn_conv]),
        extraction_batch_size=args.batch_size, chunk_size=args.chunk_size, n_boot=args.n_boot, seed=args.seed,
        split=args.split, match_source=args.match_source, cnn_seeds=seeds, controls=not args.no_controls,
        control_seeds=args.control_seeds,
        null_permutations=args.null_permutations, probe=not args.no_probe, probe_fit=args.probe_fit,
        sweep=al.sweep_rows() if args.rouge_sweep else (),
    )
    al.check_resume(out, cfg)  # before config.json is rewritten: a refused resume changes nothing
    df = load_memorization_data(args.data)
    if args.match_source and SOURCE not in df.columns:
        raise cli.CliError(f"--match-source needs a {SOURCE!r} column; {args.data} has none")
    model = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision,
                       compatibility_mode=not args.no_compatibility_mode)
    check_vocab(df, model.cfg.d_vocab)
    df = check_labels(df, model, args.model, args.revision, relabel=args.relabel, device=args.device,
                      progress=not args.quiet and dist.is_main)  # never one checkpoint's attention, another's labels
    if dist.is_main:
        RunFolder(out).write_config(args.model, args.data, cfg, revision=args.revision, argv=sys.argv[1:],
                                    compatibility_mode=not args.no_compatibility_mode, world_size=dist.world_size)
    say(f"{len(df)} samples from {args.data}; {len(rows)} taxonomy rows; {len(configs)} CNNs a row x {seeds} "
        f"seed(s), {args.training} training; {train_pc}+{eval_pc} samples a class; {dist.world_size} process(es); "
        f"writing to {out}")
    table = al.run_alignment(model, df, cfg, out, progress=not args.quiet, dist=dist)
    say("")
    say(al.ranking_text(table))
    say(f"\nwrote {out / 'alignment.csv'}, alignment.md, min_f1.png, confusion_best.png, confusion_worst.png")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
