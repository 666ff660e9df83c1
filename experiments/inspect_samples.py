"""Inspection pages: a few samples' tokens, attention by layer and head, labels, CNN verdicts, decisive regions.

    python experiments/inspect_samples.py                          # offline: testbed, 3 samples a class
    python experiments/inspect_samples.py --ids 1203 4410 --out runs/inspect-mine
    python experiments/inspect_samples.py --run runs/alignment-paper --localization runs/localize-paper

Samples default to --per-class of each class of --taxonomy (the paper's proposed "Non-Memo, Guess,
Others"), drawn from the CNNs' held-out split when there is a run. The CNNs (and the tokens the model
was shown) come from a run_alignment folder (--run, default runs/alignment-quick, else the run the
localization was computed from), the class maps and the head ranking from an experiments/localize.py
folder (--localization, default runs/localize); a page says what it lacks when they are not there.

Writes into --out (default runs/inspect): index.html (samples by class), sample_{id}.html (one page
each: self-contained, opens from disk with no network), sample_{id}.png (the attention grid for
reports) and samples.csv. --check opens every page in headless chromium with the network unplugged
and fails unless every attention view draws and nothing is requested off the machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)

DEFAULT_RUN = ROOT / "runs" / "alignment-quick"
DEFAULT_LOCALIZATION = ROOT / "runs" / "localize"
DEFAULT_OUT = ROOT / "runs" / "inspect"


def parse_args(argv=None):
    from mechmem.viz import PROPOSED_TAXONOMY

    p = cli.Parser("inspect_samples", __doc__)
    p.add_argument("--ids", type=int, nargs="+", help="sequence ids to inspect (default: --per-class of each class)")
    p.add_argument("--per-class", type=int, default=3, help="samples a class when no --ids are given")
    p.add_argument("--taxonomy", default=PROPOSED_TAXONOMY, help="display name, e.g. 'Non-Memo, Recite[5], Others'")
    p.add_argument("--model", default="testbed", help="'testbed', a local HF folder, or a hub name")
    p.add_argument("--revision", default=None, help="hub revision, e.g. step143000 for Pythia")
    p.add_argument("--data", default="testbed", help="'testbed', a parquet/jsonl file, or semantic-filters:SIZE")
    p.add_argument("--run", default=None,
                   help=f"run_alignment folder, or 'none' (default {DEFAULT_RUN.relative_to(ROOT)})")
    p.add_argument("--localization", default=None,
                   help=f"experiments/localize.py folder, or 'none' (default {DEFAULT_LOCALIZATION.relative_to(ROOT)})")
    p.add_argument("--top-heads", type=int, default=8, help="ranked heads shown and marked per page")
    p.add_argument("--decimals", type=int, default=3, help="attention values are rounded to this in the pages")
    p.add_argument("--seed", type=int, default=0, help="which samples are drawn")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-png", action="store_true", help="skip the matplotlib attention grids")
    p.add_argument("--check", action="store_true", help="open every page offline in headless chromium and verify it")
    p.add_argument("--screenshot", type=Path, help="save a screenshot of the first page (headless chromium) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _folder(value: str | None, default: Path) -> tuple[Path | None, bool]:
    """(folder or None, whether it was asked for explicitly)."""
    if value is None:
        return default, False
    return (None, True) if value.lower() == "none" else (Path(value), True)


def _localizations_run(loc_dir: Path) -> Path | None:
    """The run_alignment folder a localization was computed from (experiments/localize.py records it)."""
    info = loc_dir / "localization.json"
    if not info.is_file():
        return None
    run = json.loads(info.read_text()).get("meta", {}).get("run")
    from mechmem.run import RunFolder

    found = [p for p in (Path(run), ROOT / run) if RunFolder(p).rows_dir.is_dir()] if run else []
    return found[0] if found else None


def _check_inputs(args) -> None:
    """Bad input that would otherwise fail late or with a traceback: found before any work."""
    from mechmem import taxonomy as tx

    cli.check_device(args.device)
    cli.check_out_dir(args.out)
    if args.per_class < 1 or args.top_heads < 0 or not 0 <= args.decimals <= 6:
        raise cli.CliError("--per-class must be >= 1, --top-heads >= 0 and --decimals in [0, 6]")
    tx.parse_name(args.taxonomy)
    if args.screenshot is not None:
        if args.screenshot.suffix.lower() != ".png":
            raise cli.CliError(f"--screenshot {args.screenshot}: the screenshot is a PNG, name it *.png")
        if args.screenshot.is_dir():
            raise cli.CliError(f"--screenshot {args.screenshot} is a folder; name a .png file")
        above = next((p for p in args.screenshot.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise cli.CliError(f"--screenshot {args.screenshot}: {above} is a file, not a folder")
    if args.check or args.screenshot is not None:
        from mechmem.viz import browser_missing

        if (missing := browser_missing()) is not None:
            raise cli.CliError(f"{'--check' if args.check else '--screenshot'} needs a browser: {missing}")


def main(argv=None) -> int:
    return cli.main("inspect_samples", parse_args, run, argv)


def run(args) -> int:
    from mechmem import viz
    from mechmem.atomic import atomic_json
    from mechmem.data import check_vocab, load_memorization_data
    from mechmem.models import load_model

    _check_inputs(args)
    t0 = time.time()
    run_dir, run_asked = _folder(args.run, DEFAULT_RUN)
    loc_dir, loc_asked = _folder(args.localization, DEFAULT_LOCALIZATION)
    for folder, asked, what in ((run_dir, run_asked, "--run"), (loc_dir, loc_asked, "--localization")):
        if asked and folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")

    if not run_asked and (run_dir is None or not run_dir.is_dir()) and loc_dir is not None:
        run_dir = _localizations_run(loc_dir) or run_dir  # the run whose CNNs localization used

    df = load_memorization_data(args.data, progress=not args.quiet)
    model = load_model(args.model, device=args.device, revision=args.revision)
    check_vocab(df, model.cfg.d_vocab)
    notes = []
    if run_dir is not None and not run_asked:
        try:  # the default run is used only if this model made it
            viz.read_run(run_dir, args.taxonomy, model)
        except ValueError as err:
            notes.append(f"CNN probabilities: not using {run_dir}: {err}")
            run_dir = None
    cfg = viz.InspectConfig(taxonomy=args.taxonomy, per_class=args.per_class, top_heads=args.top_heads,
                            decimals=args.decimals, seed=args.seed)
    views = viz.inspect_run(model, df, args.ids, cfg, run_dir=run_dir, localization=loc_dir,
                            progress=not args.quiet)
    for v in views:
        v.missing = notes + v.missing
    index = viz.write_pages(views, args.out, decimals=args.decimals, pngs=not args.no_png,
                            title=f"mechmem · {len(views)} samples of {args.taxonomy}")
    atomic_json(args.out / "config.json",
                {"argv": sys.argv[1:], "model": args.model, "revision": args.revision, "data": args.data,
                 "run": str(run_dir) if run_dir else None, "localization": str(loc_dir) if loc_dir else None,
                 "config": vars(cfg)})

    by_class: dict[str | None, list[int]] = {}
    for v in views:
        by_class.setdefault(v.class_name, []).append(v.sequence_id)
    for name, ids in by_class.items():
        print(f"{name:>12}: {', '.join(map(str, ids))}")
    for note in dict.fromkeys(m for v in views for m in v.missing):
        print(f"missing: {note}")
    pages = f"{len(views)} page{'s' * (len(views) != 1)}"
    print(f"wrote {pages} to {args.out} ({time.time() - t0:.0f} s); open {index.resolve().as_uri()}")

    if args.screenshot is not None:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        viz.check_page(args.out / f"{views[0].stem}.html", screenshot=args.screenshot, window=(1280, 2200))
        print(f"screenshot of {views[0].stem}.html: {args.screenshot}")
    if args.check:
        failed = 0
        for page in [index, *(args.out / f"{v.stem}.html" for v in views)]:
            check = viz.check_page(page, wait_s=120)
            ok = (check.drawn or not check.views) and not check.offsite
            failed += not ok
            print(f"{'ok' if ok else 'FAILED'}: {page.name}: {sum(v['coloured'] > 0 for v in check.views)}/"
                  f"{len(check.views)} views drawn offline, {len(check.offsite)} requests off the machine"
                  + (f" ({', '.join(check.offsite)})" if check.offsite else ""))
        if failed:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
