"""The second testbed, in Pythia's regime: `python -m mechmem.testbed.build --preset pile-regime`.

The first testbed trains 40 epochs over 7M tokens; Pythia saw its data about once and memorized
only what the Pile repeats. Here a Pythia-160m-shaped model (12 layers, 12 heads, d_model 768)
reads over 100M tokens of real text and code (pinned PyPI and Debian packages, `sources.py`)
exactly once, in order; memorization can come only from repetition: the corpus's natural
duplicates, and the first testbed's planted passages (1 to 2000 copies) and patterns, built by the
same code (`corpus.build_corpus`). Checkpoints are saved at log-spaced steps (0, 1, 2, 4, ...,
final; in the preset also 3 evenly spaced after the last power of two) as ordinary Hugging Face
folders, each with its own memorization table: greedy extraction by that checkpoint, and duplicates
counted in the part of the stream it had trained on.

Stages (all by default; each reads the previous ones' outputs, and reruns resume):

  corpus  unpack the corpus pack (every file checked against its manifest), tokenizer, streams
  train   bf16 on one GPU; checkpoints under OUT/checkpoints/step<N>/; resumable (--stop-after)
  label   one memorization.parquet per checkpoint (`label_checkpoint`)
  report  OUT/manifest.json (sources, file hashes, stream hashes, config, loss curve, per-checkpoint
          extraction by copy count and class counts), OUT/summary.md (the figures as Markdown),
          OUT/testbed_memorization.png (final checkpoint), OUT/checkpoints.png (loss, extraction)

Everything lives under `$MECHMEM_CACHE/testbed-pile/` (`--tiny`: `testbed-pile-tiny`), never in git;
`load_model("testbed-pile", revision="step512")` and `load_memorization_data("testbed-pile@step512")`
read it by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mechmem.atomic import atomic_json, atomic_text, atomic_write
from mechmem.testbed import (BUILD_COMMAND, MANIFEST, PILE_NAMES, TABLE_FILE, cache_root,  # noqa: F401  (re-exported)
                             checkpoint_folder, checkpoints, step_dir, testbed_dir)
from mechmem.testbed.corpus import EOS, WINDOW, Corpus, CorpusConfig, build_corpus, stdlib_files
from mechmem.testbed.train import TrainConfig

logger = logging.getLogger(__name__)

NAME, TINY_NAME = PILE_NAMES
STAGES = ("corpus", "train", "label", "report")
EXIT_STOPPED = 75  # training stopped for time (EX_TEMPFAIL): the same command resumes it


@dataclass
class PileConfig:
    name: str = NAME
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label_dtype: str = "float32"     # the labels' numerics (float32, TF32 off, as the first testbed's)
    label_batch_size: int = 1024
    label_from: int = 0              # checkpoints before it get no table (the first build: none extractable before 128)
    late_checkpoints: int = 0        # more checkpoints, evenly spaced after the last power of two (`checkpoint_steps`)
    tiny_pack_bytes: int = 0         # --tiny: pack this much of the running Python's standard library


def preset(name: str) -> PileConfig:
    """'pile-regime' (the GPU build) or 'tiny' (the same path on a CPU in seconds)."""
    tiers = ((1, 5, 60), (6, 50, 40), (51, 1000, 24), (1001, 2000, 6))  # the first testbed's
    if name == "pile-regime":
        return PileConfig(
            NAME,
            CorpusConfig(vocab_size=16384, heldout_frac=0.05, pool_frac=0.01, passage_tiers=tiers,
                         n_patterns=6000, n_heldout_patterns=1500, n_stdlib_windows=60000,
                         n_heldout_windows=10000, tokenizer_chars=80_000_000,
                         # Extraction after one pass (the 2026-12-06 builds): 0.2% at 2-5 copies, 1.9% at
                         # 6-50, 13% at 51-1000, 22% above. The natural text holds 183,162 distinct windows
                         # at 6-50 copies (1,316 documents), 8,107 at 51-1000 (88) and 370 above (6). The
                         # second build's memorized classes: Guess 83% pattern windows, Others 80%
                         # "duplicated" natural text. The third took 10 windows a pattern document (3
                         # before) and up to 2,048 "duplicated" windows a document over all tiers: 2,451
                         # Guess, 1,586 Others. The cap now holds within each tier and the 6-50 tier takes
                         # all there are under it (140,429; 5,397 at 51-1000) to reach 2,000 Others (1000 +
                         # 500, a quarter held out). The stream is unchanged.
                         pattern_offsets=10, duplicated_per_doc=2048,
                         duplicated_tiers=((2, 5, 5000), (6, 50, 170000), (51, 1000, 15000), (1001, 10**9, 5000))),
            # Pythia-160m's shape; one pass in order; Pythia's LR, warmup about 1% of the steps.
            TrainConfig(n_layers=12, d_model=768, n_heads=12, ctx=1024, n_positions=2048, batch_size=64,
                        epochs=1.0, lr=6e-4, min_lr_frac=0.1, warmup_steps=20, weight_decay=0.01,
                        shuffle_chunks=False, max_seconds=840),
            label_batch_size=4096,  # decoding is bound by steps, not arithmetic: 4x fewer steps than 1024
            late_checkpoints=3,     # 1188, 1352, 1516 of 1680: where the memorized classes grow
        )
    if name == "tiny":
        return PileConfig(
            TINY_NAME,
            CorpusConfig(vocab_size=512, heldout_frac=0.15, pool_frac=0.2,
                         passage_tiers=((1, 5, 3), (6, 50, 3), (51, 200, 2)), passage_chars=300,
                         n_patterns=40, n_heldout_patterns=12, n_stdlib_windows=120, n_heldout_windows=40,
                         pattern_offsets=2, duplicated_tiers=((2, 5, 100), (6, 10**9, 100))),
            TrainConfig(n_layers=2, d_model=64, n_heads=4, ctx=128, n_positions=256, batch_size=4, epochs=1.0,
                        lr=3e-3, warmup_steps=10, shuffle_chunks=False),
            label_batch_size=1024, tiny_pack_bytes=60_000, late_checkpoints=2,
        )
    raise ValueError(f"unknown preset {name!r}: pile-regime or tiny")


def log_steps(total: int) -> list[int]:
    """Pythia's early checkpoint steps: 0, 1, 2, 4, ... below `total`, then `total`."""
    return [0] + [2**i for i in range(int(math.log2(max(total, 1))) + 1) if 2**i < total] + [total]


def checkpoint_steps(total: int, late: int = 0) -> list[int]:
    """`log_steps`, and `late` steps evenly spaced between the last power of two and `total` (as
    Pythia's later checkpoints are evenly spaced). In one pass memorization appears late: the
    builds of 2026-12-06/07 found no Others window at step 512 and 48 at step 1024 of 1680, so
    log-spaced steps alone leave one or two checkpoints where every class exists."""
    steps = log_steps(total)
    if late and len(steps) > 2:
        start = steps[-2]
        steps[-1:-1] = sorted({round(start + (total - start) * j / (late + 1)) for j in range(1, late + 1)}
                              - {start, total})
    return steps


# --------------------------------------------------------------------------- corpus
def tiny_pack(folder: Path, max_bytes: int) -> dict:
    """A pack of the running Python's standard library, about `max_bytes`: --tiny's corpus, which
    then takes the full build's path (unpack, checks, build_corpus)."""
    from mechmem.testbed.sources import write_pack

    files, total = [], 0
    for path, text in stdlib_files():
        if total >= max_bytes:
            break
        if len(text) <= 8_000:  # many small files: every role gets some
            files.append((f"stdlib/python-{sys.version.split()[0]}/{path}", text))
            total += len(text.encode())
    record = {"kind": "stdlib", "name": "python", "version": sys.version.split()[0]}
    return write_pack(iter([(record, files)]), folder, preset=6)


def stage_corpus(work: Path, cfg: PileConfig, pack_dir: Path, tiny: bool) -> None:
    from mechmem.testbed.sources import unpack

    for stale in ("train_log.json", "train_state.pt", "windows.parquet"):  # made from an older corpus
        (work / stale).unlink(missing_ok=True)
    if tiny:
        tiny_pack(pack_dir, cfg.tiny_pack_bytes)
    files, meta = unpack(pack_dir, expected=None if tiny else "shipped")
    corpus, tokenizer = build_corpus(cfg.corpus, files=files)
    corpus.manifest["pack"] = meta
    corpus.save(work / "corpus")
    tokenizer.save(str(work / "corpus" / "tokenizer.json"))
    m = corpus.manifest
    logger.info(f"corpus: {len(files):,} files, {m['train_tokens']:,} training tokens, "
                f"{m['heldout_tokens']:,} held out, {len(corpus.windows['position']):,} candidate windows")


def _tokenizer(work: Path):
    from tokenizers import Tokenizer

    path = work / "corpus" / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run the corpus stage first")
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            pad_token=EOS).save_pretrained(folder)


# --------------------------------------------------------------------------- training
def stage_train(work: Path, out: Path, cfg: PileConfig, device: str, stop_after: float | None) -> bool:
    """Train with checkpoints; False when stopped for time (state saved, the same call resumes)."""
    from mechmem.testbed.train import Stopped, save_checkpoint, seen_tokens, train, write_log

    corpus = Corpus.load(work / "corpus")
    tok = _tokenizer(work)
    n = len(corpus.train_stream)
    tcfg = cfg.train
    planned = tcfg.steps or max(1, math.ceil(tcfg.epochs * n / (tcfg.batch_size * tcfg.ctx)))
    state = work / "train_state.pt"
    if (work / "train_log.json").exists() and not state.exists():
        logger.info(f"train: already done ({work / 'train_log.json'}); the corpus stage starts a new run")
        return True
    if not state.exists() and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")  # a fresh run: no checkpoint of an older one may stay

    hf_tokenizer = work / "hf_tokenizer"
    save_tokenizer(tok, hf_tokenizer)

    def on_checkpoint(step: int, model) -> None:
        folder = step_dir(out, step)
        save_checkpoint(model, folder)
        for f in hf_tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
        (folder / TABLE_FILE).unlink(missing_ok=True)  # labels of older weights, if any

    try:
        model, log = train(corpus.train_stream, tok.get_vocab_size(), tcfg, device=device,
                           eos_id=tok.token_to_id(EOS), checkpoint_steps=set(checkpoint_steps(planned, cfg.late_checkpoints)),
                           on_checkpoint=on_checkpoint, resume_from=state, stop_after=stop_after)
    except Stopped as stop:
        logger.info(str(stop))
        return False
    done = log["steps"]
    keep = {s for s in checkpoint_steps(planned, cfg.late_checkpoints) if s < done} | {done}
    for step, folder in checkpoints(out):  # a run cut by max_seconds drops the planned steps past its end
        if step not in keep:
            shutil.rmtree(folder)
    log["checkpoints"] = {f"step{s}": {"tokens_seen": n if seen_tokens(s, tcfg, n) is None else seen_tokens(s, tcfg, n)}
                          for s in sorted(keep)}
    log["argv"] = sys.argv[1:]
    write_log(log, work / "train_log.json")
    state.unlink(missing_ok=True)
    logger.info(f"train: {log['steps']} steps, {log['epochs']} epochs, {log['seconds']} s, "
                f"final loss {log['final_loss']}, {len(keep)} checkpoints")
    return True


# --------------------------------------------------------------------------- labels
def window_identities(corpus: Corpus, eos: int) -> pd.DataFrame:
    """Each candidate window's sequence_id, document and source, as its tables carry them."""
    from mechmem.data import DOCUMENT, SOURCE
    from mechmem.testbed.table import HELDOUT_ID_OFFSET, document_ids

    w = corpus.windows
    sequence_ids = w["position"] + HELDOUT_ID_OFFSET * w["stream"].astype(np.int64)
    return pd.DataFrame({"sequence_id": sequence_ids,
                         DOCUMENT: document_ids(sequence_ids, (corpus.train_stream, corpus.heldout_stream), eos),
                         SOURCE: w["source"]})


def window_table(corpus: Corpus, tokenizer) -> pd.DataFrame:
    """What every checkpoint's table shares: the windows, their document, text and heuristics columns."""
    from mechmem.data import DOCUMENT
    from mechmem.testbed.table import add_text_columns

    w, ids = corpus.windows, window_identities(corpus, tokenizer.token_to_id(EOS))
    base = pd.DataFrame({
        "sequence_id": ids["sequence_id"], DOCUMENT: ids[DOCUMENT], "tokens": list(corpus.window_tokens()),
        "planted_count": w["planted_count"], "source": w["source"], "family": w["family"],
    })
    return add_text_columns(base, tokenizer)


def label_checkpoint(folder: Path, base: pd.DataFrame, occurrences: tuple[np.ndarray, np.ndarray], *,
                     before: int | None, device: str, dtype: str = "float32", batch_size: int = 1024) -> pd.DataFrame:
    """One checkpoint's memorization table, written to folder/memorization.parquet.

    `memorization_score` and `greedy_suffix`: the checkpoint's own greedy 32-token continuation;
    `sequence_duplicates`: occurrences in the data it had trained on (stream positions before
    `before`; None: the whole stream), `stream_duplicates`: in the whole training stream.
    `occurrences`: where each window of `base` occurs in the stream (`WindowIndex.occurrences`),
    found once for every checkpoint.
    The one place labels are made: switching to `mechmem.tables` (issue 22) changes this body only.
    """
    import torch
    from mechmem.memorization import PREFIX_LEN, greedy_continuation
    from mechmem.testbed.duplicates import counts_before
    from mechmem.testbed.table import write_table
    from mechmem.testbed.train import load_fp32

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_fp32(folder, device)  # eager attention: the labels' reference numerics
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    tokens = np.stack(base["tokens"].to_numpy())
    greedy = greedy_continuation(model, torch.as_tensor(tokens[:, :PREFIX_LEN]), tokens.shape[1] - PREFIX_LEN,
                                 batch_size=batch_size, device=device).numpy()
    table = base.copy()
    table["greedy_suffix"] = list(greedy.astype(np.int64))
    table["memorization_score"] = (greedy == tokens[:, PREFIX_LEN:]).mean(axis=1)
    table["stream_duplicates"] = counts_before(*occurrences, len(table))
    table["sequence_duplicates"] = counts_before(*occurrences, len(table), before)
    table["in_training"] = table["sequence_duplicates"].to_numpy() > 0
    atomic_write(folder / TABLE_FILE, lambda p: write_table(table, p, compression_level=3))  # no half table if killed
    return table


def labelled_checkpoints(out: Path, cfg: PileConfig) -> tuple[list[tuple[int, Path]], list[int]]:
    """The (step, folder) of the checkpoints that get a table, and the steps before `--label-from`
    that keep their weights only."""
    every = checkpoints(out)
    return [(s, f) for s, f in every if s >= cfg.label_from], [s for s, _ in every if s < cfg.label_from]


def stage_label(work: Path, out: Path, cfg: PileConfig, device: str) -> None:
    from mechmem.testbed.duplicates import WindowIndex

    corpus = Corpus.load(work / "corpus")
    log = json.loads((work / "train_log.json").read_text())
    todo = [(s, f) for s, f in labelled_checkpoints(out, cfg)[0] if not (f / TABLE_FILE).exists()]
    if not todo:
        logger.info("label: every checkpoint has its table")
        return
    base_file = work / "windows.parquet"
    if base_file.exists():
        base = pd.read_parquet(base_file)
        base["tokens"] = [np.asarray(t, dtype=np.int64) for t in base["tokens"]]
    else:
        base = window_table(corpus, _tokenizer(work))
        base.to_parquet(base_file)
    t0 = time.time()
    occurrences = WindowIndex(corpus.train_stream, WINDOW).occurrences(np.stack(base["tokens"].to_numpy()))
    logger.info(f"label: {len(occurrences[0]):,} occurrences of the {len(base):,} windows in the stream "
                f"({time.time() - t0:.0f} s)")
    for step, folder in todo:
        t0 = time.time()
        seen = log["checkpoints"].get(f"step{step}", {}).get("tokens_seen")
        before = None if seen is None or seen >= len(corpus.train_stream) else max(0, seen - WINDOW + 1)
        table = label_checkpoint(folder, base, occurrences, before=before, device=device,
                                 dtype=cfg.label_dtype, batch_size=cfg.label_batch_size)
        logger.info(f"label step{step}: {int((table['memorization_score'] == 1).sum()):,} of {len(table):,} "
                    f"windows extractable ({time.time() - t0:.0f} s)")


# --------------------------------------------------------------------------- report
def stage_report(work: Path, out: Path, cfg: PileConfig, argv: list[str]) -> dict:
    from mechmem.atomic import json_default, sha256_file
    from mechmem.testbed.report import class_counts, rate_by_duplicates, rate_by_source, rate_figure

    log = json.loads((work / "train_log.json").read_text())
    corpus_manifest = json.loads((work / "corpus" / "corpus.json").read_text())
    per_step = {}
    final = None
    labelled, unlabelled = labelled_checkpoints(out, cfg)
    for step, folder in labelled:
        if not (folder / TABLE_FILE).exists():
            raise FileNotFoundError(f"{folder} has no {TABLE_FILE}: run the label stage first")
        table = pd.read_parquet(folder / TABLE_FILE)
        memo = table["memorization_score"] == 1
        per_step[f"step{step}"] = {
            "tokens_seen": log["checkpoints"].get(f"step{step}", {}).get("tokens_seen"),
            "extractable": int(memo.sum()), "windows": int(len(table)),
            "extractable_never_in_training": int((memo & (table["sequence_duplicates"] == 0)).sum()),
            "rate_by_duplicates": rate_by_duplicates(table).to_dict("records"),
            "rate_by_source": rate_by_source(table).reset_index().to_dict("records"),
            "class_counts": class_counts(table),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(folder.iterdir()) if p.is_file()},
        }
        final = (step, table)
    if final is None:
        raise FileNotFoundError(f"no checkpoints in {out / 'checkpoints'}: run the train stage first")
    rate_figure(final[1], out / "testbed_memorization.png")
    manifest = {
        "name": cfg.name,
        "command": "python -m mechmem.testbed.build " + " ".join(argv),
        "reproduce": f"{BUILD_COMMAND} --seed {cfg.train.seed} --steps {log['steps']}",
        "final": f"step{final[0]}",
        "config": {"corpus": asdict(cfg.corpus), "train": asdict(cfg.train), "label_dtype": cfg.label_dtype,
                   "label_from": cfg.label_from, "late_checkpoints": cfg.late_checkpoints},
        "corpus": corpus_manifest,
        "training": log,
        "checkpoints": per_step,
        "unlabelled_checkpoints": [f"step{s}" for s in unlabelled],  # before --label-from: kept, no table
    }
    manifest = json.loads(json.dumps(manifest, default=json_default))  # NaN rates and numpy scalars as JSON has them
    atomic_json(out / MANIFEST, manifest)
    atomic_text(out / "summary.md", summary(manifest))
    checkpoint_figure(manifest, out / "checkpoints.png")
    logger.info(json.dumps({"final": manifest["final"], "tokens": corpus_manifest["train_tokens"],
                            "epochs": log["epochs"], "n_params": log["n_params"], "seconds": log["seconds"],
                            "extractable_by_duplicates": per_step[manifest["final"]]["rate_by_duplicates"]},
                           indent=1, default=json_default))
    return manifest


def summary(manifest: dict) -> str:
    """The build's figures as Markdown, straight from the manifest (README's full-build lines)."""
    log, corpus = manifest["training"], manifest["corpus"]
    lines = [
        f"- training stream: {corpus['train_tokens']:,} tokens (SHA-256 {corpus['train_stream_sha256'][:12]}...), "
        f"{corpus['heldout_tokens']:,} held out; {len(corpus['files']):,} files",
        f"- model: {log['n_params']:,} parameters; {log['steps']:,} steps of {log['tokens_per_step']:,} tokens, "
        f"{log['epochs']} epochs; {log['seconds'] / 60:.1f} minutes on {log['device']} "
        f"({log['tokens_per_second']:,} tokens/s); final loss {log['final_loss']}",
        "",
        "| checkpoint | tokens seen | " + " | ".join(r["duplicates"] for r in
                                                     manifest["checkpoints"][manifest["final"]]["rate_by_duplicates"]) + " |",
        "|---|---|" + "---|" * len(manifest["checkpoints"][manifest["final"]]["rate_by_duplicates"]),
    ]
    for step, info in manifest["checkpoints"].items():
        cells = [f"{100 * r['rate']:.1f}% of {r['windows']:,}" if r["windows"] else "-" for r in info["rate_by_duplicates"]]
        seen = info["tokens_seen"]
        lines.append(f"| {step} | {seen:,} | " + " | ".join(cells) + " |" if seen is not None else
                     f"| {step} | all | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def checkpoint_figure(manifest: dict, path: Path) -> None:
    """Loss curve, and the extractable share per copy-count bucket across checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    curve = np.array(manifest["training"]["loss_curve"])
    a.plot(curve[:, 0], curve[:, 1])
    a.set_xscale("log")
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title(f"{manifest['name']}: one pass, {manifest['training']['steps']:,} steps")
    a.grid(alpha=0.3)
    steps = [int(k[4:]) for k in manifest["checkpoints"]]
    buckets = [r["duplicates"] for r in next(iter(manifest["checkpoints"].values()))["rate_by_duplicates"]]
    for k, name in enumerate(buckets):
        rates = [100 * (info["rate_by_duplicates"][k]["rate"] or 0) for info in manifest["checkpoints"].values()]
        b.plot([max(s, 0.5) for s in steps], rates, "o-", ms=3, label=f"{name} copies")
    b.set_xscale("log")
    b.set_xlabel("checkpoint step (step0 drawn at 0.5)")
    b.set_ylabel("extractable (score = 1), %")
    b.set_ylim(-5, 105)
    b.set_title("Extraction by copies in the data seen so far")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the study's sizes
def study_sizes(manifest: dict) -> dict:
    """What the labels allow the study (`benchmarks/pile_device.sh`), from the manifest's class counts
    of the headline taxonomy: the grid at 1000 + 500 a class where its smallest class holds 2,000
    windows, else a half and a quarter of it (the last quarter stays held out for the ablation); the
    checkpoint study at the quick preset's 300 + 150 where the first of the last three checkpoints
    with 60 windows in every class allows it, else two thirds and a third of that checkpoint's
    smallest class, on the last six checkpoints that hold that many (two or more, where the
    second-last has 60)."""
    from mechmem.alignment import HEADLINE_ROW

    steps = manifest["checkpoints"]

    def smallest(info: dict) -> int:
        counts = next(v for k, v in info["class_counts"].items() if k.startswith(HEADLINE_ROW))
        return min(counts.values())

    sizes = [smallest(info) for info in steps.values()]
    final = sizes[-1]
    grid = (1000, 500) if final >= 2000 else (final // 2, final // 4)
    n = next((k for k in sizes[-3:] if k >= 60), final)
    ck = (300, 150) if n >= 450 else (2 * (n // 3), n // 3)
    revisions = [step for step, info in steps.items() if smallest(info) >= sum(ck)][-6:]
    return {"grid": grid, "checkpoints": ck, "revisions": revisions}


# --------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    from mechmem.cli import Parser

    p = Parser("python -m mechmem.testbed.build --preset pile-regime", __doc__.split("\n")[0])
    p.add_argument("--preset", choices=["pile-regime"], default="pile-regime")
    p.add_argument("--tiny", action="store_true", help="the same path at toy size, on a CPU in about a minute")
    p.add_argument("--out", type=Path, default=None, help="default $MECHMEM_CACHE/testbed-pile[-tiny]")
    p.add_argument("--work", type=Path, default=None, help="intermediate files (default OUT/work)")
    p.add_argument("--pack", type=Path, default=Path("build/pile-pack"),
                   help="the corpus pack (`python -m mechmem.testbed.sources pack`; --tiny makes its own)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="exact step count (reproduces a manifest)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the stream (at most 1.5)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="cap on training time (default 840)")
    p.add_argument("--stop-after", type=float, default=None,
                   help="stop training after this many seconds of this call, saving its state; rerun to resume")
    p.add_argument("--label-dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--label-batch-size", type=int, default=None)
    p.add_argument("--label-from", type=int, default=None, metavar="STEP",
                   help="label only checkpoints from this step on (saves ~30 GPU s a checkpoint; default all)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        p.error(f"unknown stages {sorted(set(stages) - set(STAGES))}; choose from {', '.join(STAGES)}")
    if args.epochs is not None and not 0 < args.epochs <= 1.5:
        p.error(f"--epochs {args.epochs}: Pythia's regime is one pass, at most 1.5 epochs")
    args.stage_list = stages
    return args


def run(args: argparse.Namespace) -> int:
    """The stages `args` asks for; bad input (CliError) is found before any work."""
    import torch

    from mechmem.cli import CliError, check_device

    check_device(args.device)
    cfg = preset("tiny" if args.tiny else "pile-regime")
    cfg.corpus.seed = cfg.train.seed = args.seed
    for name in ("steps", "epochs", "batch_size", "max_seconds"):
        if getattr(args, name) is not None:
            setattr(cfg.train, name, getattr(args, name))
    cfg.label_dtype = args.label_dtype or cfg.label_dtype
    cfg.label_batch_size = args.label_batch_size or cfg.label_batch_size
    cfg.label_from = args.label_from if args.label_from is not None else cfg.label_from
    out = args.out or testbed_dir(cfg.name)
    work = args.work or out / "work"
    pack_dir = work / "pack" if args.tiny else args.pack
    if "corpus" in args.stage_list and not args.tiny and not (pack_dir / "pack.json").is_file():
        raise CliError(f"no corpus pack in {pack_dir}: make it with `python -m mechmem.testbed.sources fetch` "
                       f"then `... pack`, or pass --pack DIR")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work.mkdir(parents=True, exist_ok=True)
    for stage in args.stage_list:
        t0 = time.time()
        logger.info(f"== {stage}")
        if stage == "corpus":
            stage_corpus(work, cfg, pack_dir, args.tiny)
        elif stage == "train":
            if not stage_train(work, out, cfg, device, args.stop_after):
                return EXIT_STOPPED
        elif stage == "label":
            stage_label(work, out, cfg, device)
        elif stage == "report":
            stage_report(work, out, cfg, args.argv)
        logger.info(f"== {stage} done in {time.time() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mechmem.testbed.build --preset pile-regime ...`: bad input is one line, exit 2."""
    from mechmem import cli

    argv = list(sys.argv[1:] if argv is None else argv)

    def parse(a):
        args = parse_args(a)
        args.argv = a
        return args
    return cli.main("python -m mechmem.testbed.build", parse, run, argv)
