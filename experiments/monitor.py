"""Regurgitation monitor: generate after prompts and flag the stretches the model recites, by class.

    python experiments/monitor.py                                    # offline: testbed, built-in prompts
    python experiments/monitor.py --prompt "def read_values(base, key):" --max-new-tokens 96
    python experiments/monitor.py --prompts-file prompts.jsonl --sample --temperature 0.8 --out runs/monitor-mine
    python experiments/monitor.py --run runs/alignment-paper --taxonomy "Non-Memo, Recite[5], Guess, Others"

Every --stride generated tokens, a 32-token stretch of the output is read with the 32 tokens before
it by the trained CNNs of one alignment row (--taxonomy, default the paper's proposed "Non-Memo,
Guess, Others") of a run_alignment output folder (--run, default runs/alignment-quick); a stretch
whose most probable class is not Non-Memo is flagged (mechmem.monitor). --model defaults to the
run's model: the CNNs read that model's attention.

Prompts: --prompt TEXT (repeatable), or --prompts-file FILE: plain text with one prompt a line, or,
for prompts with newlines, a .jsonl file with one {"prompt": "..."} object a line; empty lines are
skipped. Prompts are tokenized without special tokens (no BOS). Without either, four built-in
testbed prompts: two planted passages (copied 2000 and 772 times into the testbed's training data),
a counting pattern that was never trained on, and held-out code.

Prints each generated text with its flagged stretches marked (in colour on a terminal; --no-color
or NO_COLOR for [[Class› ... ‹]] markers) and writes into --out (default runs/monitor):
monitor.html (one self-contained page: hover a stretch for its probabilities), spans.jsonl (one
record a stretch) and config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)

DEFAULT_OUT = ROOT / "runs" / "monitor"
DEFAULT_RUN = ROOT / "runs" / "alignment-quick"
QUICK_COMMAND = "python experiments/run_alignment.py --grid quick --out runs/alignment-quick"

# The first 32 tokens of testbed windows (mechmem.data.load_memorization_data("testbed")), as text;
# each re-tokenizes to the same 32 tokens. On the quick run's CNNs (CPU, docs/results/testbed_quick)
# both stretches of the first two come out Others, of the third Guess, of the fourth Non-Memo.
DEFAULT_PROMPTS = (
    # planted passage, 2000 copies in training (source "planted")
    "        # children, but that's all we needed from the base class.\n        elem = self.ownerElement\n"
    "        if elem is not None:\n            del elem",
    # planted passage, 772 copies
    '"""Support for remote Python debugging.\n\nSome ASCII art to describe the structure:\n\n'
    "       IN PYTHON SUBPROCESS          #             IN IDLE",
    # a counting pattern never trained on (source "heldout_pattern"): only guessable
    "Data = [\n    0; 1; 2; 3; 4; 5; 6; 7; 8; 9;\n    10; 11; 12; 13",
    # held-out standard-library code, never trained on (source "heldout")
    'def read_values(base, key):\n    """Return dict of registry keys and values.\n\n'
    '    All names are converted to lowercase.\n    """\n    try',
)


def parse_args(argv=None):
    from mechmem.viz import PROPOSED_TAXONOMY

    p = cli.Parser("monitor", __doc__)
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for more)")
    given.add_argument("--prompts-file", type=Path, metavar="FILE",
                       help='one prompt a line; or .jsonl with one {"prompt": ...} a line')
    p.add_argument("--run", type=Path, help="run_alignment output folder with the CNNs (default runs/alignment-quick)")
    p.add_argument("--taxonomy", default=PROPOSED_TAXONOMY, help="the row: display name or row slug")
    p.add_argument("--seeds", choices=["first", "all"], default="first",
                   help="the CNNs of the first training seed, or of every seed the run trained (averaged)")
    p.add_argument("--model", default=None, help="'testbed', a local HF folder or a hub name (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated after each prompt")
    p.add_argument("--stride", type=int, default=32, help="a stretch starts every this many generated tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="with --sample: draw from the k most probable tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated, windows re-encoded at a time")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-color", action="store_true", help="mark flagged stretches with [[Class› ... ‹]], not colour")
    args = p.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    return args


def read_prompts_file(path: Path) -> list[str]:
    """Prompts of a --prompts-file: .jsonl, one {"prompt": ...} a line; else one prompt a line."""
    if not path.exists():
        raise cli.CliError(f"--prompts-file {path} does not exist")
    if path.is_dir():
        raise cli.CliError(f"--prompts-file {path} is a folder, not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise cli.CliError(f"--prompts-file {path} is not UTF-8 text") from None
    prompts = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise cli.CliError(f'--prompts-file {path} line {number}: not a JSON object with a "prompt" string')
        prompts.append(record["prompt"])
    if not prompts:
        raise cli.CliError(f"--prompts-file {path} has no prompts (every line is empty)")
    return prompts


def _prompts(args) -> list[str]:
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
        where = lambda i: f"prompt {i + 1} of --prompts-file {args.prompts_file}"
    elif args.prompt is not None:
        prompts, where = list(args.prompt), lambda i: f"--prompt {i + 1}"
    else:
        return list(DEFAULT_PROMPTS)
    for i, text in enumerate(prompts):
        if text == "":
            raise cli.CliError(f"{where(i)} is empty")
    return prompts


def _check_inputs(args) -> None:
    """Bad input that would otherwise fail late or with a traceback: found before any work."""
    from mechmem import taxonomy as tx
    from mechmem.monitor import STRETCH

    cli.check_device(args.device)
    cli.check_out_dir(args.out)
    cli.check_positive(args, "max_new_tokens", "stride", "batch_size", "top_k")
    if args.max_new_tokens < STRETCH:
        raise cli.CliError(f"--max-new-tokens {args.max_new_tokens} is too few: a stretch is {STRETCH} generated "
                           "tokens")
    if not args.sample and (args.temperature is not None or args.top_k is not None):
        raise cli.CliError("--temperature and --top-k apply only with --sample (decoding is greedy without it)")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise cli.CliError(f"--temperature must be a positive number, got {args.temperature}")
    if not re.fullmatch(r"[a-z0-9_]+", args.taxonomy):  # a row slug is looked up in the run as it is
        tx.parse_name(args.taxonomy)
    if args.run is not None:
        if not args.run.exists():
            raise cli.CliError(f"--run folder {args.run} does not exist")
        if not args.run.is_dir():
            raise cli.CliError(f"--run {args.run} is a file, not a run_alignment output folder")
    args.prompt_texts = _prompts(args)


def _run_dir(args) -> Path:
    """The run whose row holds the CNNs: --run, else runs/alignment-quick when it trained the row."""
    from mechmem.run import RunFolder

    if args.run is not None:
        run = RunFolder(args.run)
        if not run.rows_dir.is_dir():
            raise cli.CliError(f"--run {args.run} is not a run_alignment output folder (no {run.rows_dir.name}/)")
        return args.run
    try:
        RunFolder(DEFAULT_RUN).find_row(args.taxonomy)
    except (FileNotFoundError, ValueError):
        raise cli.CliError(f"no trained CNNs for {args.taxonomy!r} in {_shown(DEFAULT_RUN)}: run `{QUICK_COMMAND}` "
                           "first, or pass --run") from None
    return DEFAULT_RUN


def _load_model(args, run_dir: Path):
    from transformers.utils import logging as hf_logging

    from mechmem.models import load_model
    from mechmem.run import RunFolder

    if args.model is None:
        try:
            name, revision = RunFolder(run_dir).model_name()
        except FileNotFoundError:
            raise cli.CliError(f"{run_dir} has no config.json naming its model: pass --model") from None
    else:
        name, revision = args.model, None
    bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        model = load_model(name, device=args.device, revision=revision)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, name, revision


def tokenize(args, model, texts: list[str]) -> list[list[int]]:
    """Each prompt's token ids (no special tokens), checked: not empty, one whole stretch fits, and
    prompt plus generation within the model's context."""
    from mechmem.monitor import CONTEXT, STRETCH, stretch_starts

    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise cli.CliError("this model has no tokenizer: text prompts cannot be encoded")
    n_ctx = int(model.cfg.n_ctx)
    out = []
    for i, text in enumerate(texts):
        ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
        if not ids:
            raise cli.CliError(f"prompt {i + 1} ({text!r}) encodes to no tokens")
        if not stretch_starts(len(ids), len(ids) + args.max_new_tokens, args.stride):
            need = STRETCH + max(0, CONTEXT - len(ids))
            raise cli.CliError(f"--max-new-tokens {args.max_new_tokens} leaves no whole {STRETCH}-token stretch after "
                               f"prompt {i + 1} ({len(ids)} tokens): it needs {need} ({CONTEXT} tokens of context, "
                               f"then {STRETCH})")
        if len(ids) + args.max_new_tokens > n_ctx:
            raise cli.CliError(f"prompt {i + 1} has {len(ids)} tokens: with --max-new-tokens {args.max_new_tokens} "
                               f"that is more than the model's context of {n_ctx}")
        out.append(ids)
    return out


def use_color(no_color: bool, stream=None, environ=None) -> bool:
    """Colour only on a terminal, and unless --no-color or NO_COLOR (https://no-color.org) says otherwise."""
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return not no_color and not environ.get("NO_COLOR") and callable(isatty) and bool(isatty())


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    return cli.main("monitor", parse_args, run, argv)


def run(args) -> int:
    from dataclasses import asdict

    from mechmem import viz
    from mechmem.atomic import atomic_json, atomic_text
    from mechmem.monitor import MonitorConfig, SpanClassifier, monitor

    _check_inputs(args)
    t0 = time.time()
    run_dir = _run_dir(args)
    cfg = MonitorConfig(max_new_tokens=args.max_new_tokens, stride=args.stride, sample=args.sample,
                        temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                        seed=args.seed, batch_size=args.batch_size)
    classifier = SpanClassifier.from_run(run_dir, args.taxonomy, seeds=args.seeds)
    model, model_name, revision = _load_model(args, run_dir)
    prompts = tokenize(args, model, args.prompt_texts)
    tokenizer = model.tokenizer
    if args.prompt is None and args.prompts_file is None:
        print(f"no --prompt or --prompts-file: the {len(prompts)} built-in testbed prompts")
    print(f"monitoring {len(prompts)} prompt{'s' * (len(prompts) != 1)} with {model_name}: "
          f"{len(classifier.cnns)} CNNs of {classifier.name!r} from {_shown(run_dir)}")
    result = monitor(model, prompts, classifier, cfg, tokenizer=tokenizer, progress=not args.quiet)

    args.out.mkdir(parents=True, exist_ok=True)
    model_label = model_name + (f"@{revision}" if revision else "")
    atomic_text(args.out / "monitor.html", viz.monitor_html(result, tokenizer, model_name=model_label,
                                                            run=_shown(run_dir)))
    records = viz.span_records(result)
    atomic_text(args.out / "spans.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_json(args.out / "config.json", {
        "argv": args.argv, "model": model_name, "revision": revision, "run": str(run_dir),
        "taxonomy": classifier.name, "class_names": classifier.class_names, "seeds": args.seeds,
        "n_cnns": len(classifier.cnns), "device": str(next(model.parameters()).device), "config": asdict(cfg),
        "prompts": args.prompt_texts}, default=str)

    print()
    print(viz.terminal_marked(result, tokenizer, use_color(args.no_color)))
    flagged = viz.flag_counts(result)
    by_class = ", ".join(f"{c} {flagged[c]}" for c in result.class_names if flagged[c])
    print(f"\n{len(result.spans)} stretches in {len(prompts)} prompts, {sum(flagged.values())} flagged"
          + (f" ({by_class})" if by_class else ""))
    print(f"wrote {args.out}/monitor.html, spans.jsonl, config.json ({time.time() - t0:.0f} s); "
          f"open {(args.out / 'monitor.html').resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
