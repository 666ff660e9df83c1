"""Build the testbed's shipped assets: `python -m mechmem.testbed.build [--device cuda]`.

`--preset pile-regime` builds the second testbed instead (Pythia's regime, cached, not shipped):
see `mechmem.testbed.pile_regime`.

Stages (all by default; `--stages` picks some, each reads the previous ones' outputs in `--work`):

  corpus  stdlib + planted passages + patterns -> tokenizer, token streams, candidate windows (CPU)
  train   a Pythia-architecture GPT-NeoX on the training stream; weights rounded to float16
  score   greedy 32-token continuation of every candidate window, float32, TF32 off
  table   exact duplicate counts, heuristics, the shipped parquet; assembles the model folder
  report  manifest.json (what went in, config, steps, loss curve, hashes) and the figure

The corpus stage reads the running Python's standard library: the shipped assets were built
with the Python named in the manifest, and only that Python reproduces them byte for byte.
`--export DIR` copies what the train/score stages produced into DIR (weights split in files
under 16 MB) and `--import DIR` brings such an export back, so training can run on another
machine than the corpus and table stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mechmem.atomic import json_default, sha256_file
from mechmem.testbed import ASSETS, DATA_FILE, MANIFEST_FILE, MODEL_DIR
from mechmem.testbed.corpus import EOS, Corpus, CorpusConfig, build_corpus
from mechmem.testbed.train import TrainConfig

STAGES = ("corpus", "train", "score", "table", "report")
FIGURE = Path(__file__).resolve().parents[2] / "docs" / "testbed_memorization.png"
logger = logging.getLogger(__name__)


def _tokenizer(work: Path):
    from tokenizers import Tokenizer

    path = work / "corpus" / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: run the corpus stage first")
    return Tokenizer.from_file(str(path))


def stage_corpus(work: Path, cfg: CorpusConfig) -> None:
    corpus, tokenizer = build_corpus(cfg)
    corpus.save(work / "corpus")
    tokenizer.save(str(work / "corpus" / "tokenizer.json"))
    logger.info(f"corpus: {corpus.manifest['train_tokens']:,} training tokens, "
                f"{len(corpus.windows['position']):,} candidate windows")


def stage_train(work: Path, cfg: TrainConfig, device: str) -> None:
    from mechmem.testbed.train import save_fp16, train, write_log

    corpus = Corpus.load(work / "corpus")
    tok = _tokenizer(work)
    model, log = train(corpus.train_stream, tok.get_vocab_size(), cfg, device=device, eos_id=tok.token_to_id(EOS))
    if (work / "model").exists():
        shutil.rmtree(work / "model")
    save_fp16(model, work / "model")
    log["argv"] = sys.argv[1:]
    write_log(log, work / "train_log.json")
    logger.info(f"train: {log['steps']} steps, {log['epochs']} epochs, {log['seconds']} s, "
                f"final loss {log['final_loss']}")


def stage_score(work: Path, device: str, batch_size: int, max_windows: int | None = None) -> None:
    import torch

    from mechmem.memorization import PREFIX_LEN, greedy_continuation
    from mechmem.testbed.train import load_fp32

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    corpus = Corpus.load(work / "corpus")
    model = load_fp32(work / "model", device)
    tokens = torch.as_tensor(corpus.window_tokens())[:max_windows]
    t0 = time.time()
    greedy = greedy_continuation(model, tokens[:, :PREFIX_LEN], tokens.shape[1] - PREFIX_LEN,
                                 batch_size=batch_size, device=device)
    np.save(work / "greedy.npy", greedy.numpy().astype(np.uint16))
    scores = (greedy == tokens[:, PREFIX_LEN:]).float().mean(1)
    log = {"windows": len(tokens), "seconds": round(time.time() - t0, 1), "device": device,
           "extractable": int((scores == 1).sum()), "dtype": "float32", "tf32": False}
    (work / "score_log.json").write_text(json.dumps(log, indent=1))
    logger.info(f"score: {log}")


def stage_table(work: Path, out: Path) -> None:
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from mechmem.testbed.table import TableConfig, add_text_columns, score_candidates, select_rows, write_table

    corpus = Corpus.load(work / "corpus")
    tok = _tokenizer(work)
    candidates = score_candidates(corpus, np.load(work / "greedy.npy"))
    candidates.drop(columns=["tokens", "greedy_suffix"]).to_parquet(work / "candidates.parquet")
    table = add_text_columns(select_rows(candidates, TableConfig()), tok)
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / DATA_FILE.name)

    # The model folder as any local checkpoint: config, float16 weights (one file), tokenizer.
    model_dir = out / MODEL_DIR.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model = GPTNeoXForCausalLM.from_pretrained(work / "model", dtype="auto")
    model.save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                            pad_token=EOS).save_pretrained(model_dir)
    logger.info(f"table: {len(table):,} rows of {len(candidates):,} candidates -> {out / DATA_FILE.name}")


def stage_report(work: Path, out: Path, figure: Path, argv: list[str]) -> dict:
    import pandas as pd

    from mechmem.testbed.report import class_counts, rate_by_duplicates, rate_by_source, rate_figure

    candidates = pd.read_parquet(work / "candidates.parquet")
    table = pd.read_parquet(out / DATA_FILE.name)
    corpus_manifest = json.loads((work / "corpus" / "corpus.json").read_text())
    train_log = json.loads((work / "train_log.json").read_text())
    score_log = json.loads((work / "score_log.json").read_text())
    rate_figure(candidates, figure)
    memo = candidates["memorization_score"] == 1
    never = memo & (candidates["sequence_duplicates"] == 0)
    assets = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE.name)
    manifest = {
        "command": "python -m mechmem.testbed.build " + " ".join(argv),
        # One command rebuilds everything with the recorded step count (the corpus stage needs the
        # Python named in corpus.python; GPU kernels may change the weights' last bits).
        "reproduce": f"python -m mechmem.testbed.build --device cuda --seed {train_log['config']['seed']} "
                     f"--steps {train_log['steps']}",
        "corpus": corpus_manifest,
        "training": train_log,
        "scoring": score_log,
        "results": {
            "candidates": int(len(candidates)),
            "extractable": int(memo.sum()),
            "extractable_never_in_training": int(never.sum()),
            "never_in_training": int((candidates["sequence_duplicates"] == 0).sum()),
            "rate_by_duplicates": rate_by_duplicates(candidates).to_dict("records"),
            "rate_by_source": rate_by_source(candidates).reset_index().to_dict("records"),
            "table_rows": int(len(table)),
            "class_counts": class_counts(table),
        },
        "assets": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in assets},
    }
    (out / MANIFEST_FILE.name).write_text(json.dumps(manifest, indent=1, default=json_default))
    logger.info(json.dumps(manifest["results"], indent=1, default=json_default))
    return manifest



def export(work: Path, dest: Path) -> None:
    """Copy the train/score outputs, weights split in two files (transfer limits of 16 MB)."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    state = load_file(work / "model" / "model.safetensors")
    keys = sorted(state)
    first = [k for k in keys if "embed_out" not in k]
    save_file({k: state[k] for k in first}, dest / "weights-0.safetensors", metadata={"format": "pt"})
    save_file({k: state[k] for k in keys if k not in first}, dest / "weights-1.safetensors", metadata={"format": "pt"})
    for name in ("train_log.json", "score_log.json", "greedy.npy"):
        if (work / name).exists():
            shutil.copy(work / name, dest / name)
    shutil.copy(work / "model" / "config.json", dest / "config.json")


def import_(src: Path, work: Path) -> None:
    from safetensors.torch import load_file, save_file

    (work / "model").mkdir(parents=True, exist_ok=True)
    state = {**load_file(src / "weights-0.safetensors"), **load_file(src / "weights-1.safetensors")}
    save_file(state, work / "model" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", work / "model" / "config.json")
    for name in ("train_log.json", "score_log.json", "greedy.npy"):
        if (src / name).exists():
            shutil.copy(src / name, work / name)


def main(argv: list[str] | None = None) -> None:
    from mechmem.cli import show_library_messages

    show_library_messages()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--preset" or a.startswith("--preset=") for a in argv):
        from mechmem.testbed import pile_regime

        raise SystemExit(pile_regime.main(argv))
    p = argparse.ArgumentParser(prog="python -m mechmem.testbed.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS, help="asset folder (default: the package's)")
    p.add_argument("--work", type=Path, default=Path("build/testbed"), help="intermediate files")
    p.add_argument("--figure", type=Path, default=None, help="report PNG (default docs/testbed_memorization.png "
                   "for the package's assets, else OUT/testbed_memorization.png)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="a minutes-long dry run of every stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="exact step count (reproduces a manifest)")
    p.add_argument("--max-seconds", type=float, default=None, help="cap on training time")
    p.add_argument("--batch-size", type=int, default=None, help="training chunks per step")
    p.add_argument("--score-batch-size", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (dry runs)")
    p.add_argument("--export", type=Path, default=None)
    p.add_argument("--import", dest="import_from", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.tiny and args.out.resolve() == ASSETS and {"table", "report"} & set(stages):
        raise SystemExit("--tiny would overwrite the shipped assets: pass --out DIR (and --work DIR)")
    ccfg = CorpusConfig.tiny() if args.tiny else CorpusConfig()
    tcfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    ccfg.seed = tcfg.seed = args.seed
    for name in ("epochs", "steps", "max_seconds", "batch_size"):
        if getattr(args, name) is not None:
            setattr(tcfg, name, getattr(args, name))
    in_checkout = FIGURE.parent.is_dir() and args.out.resolve() == ASSETS
    figure = args.figure or (FIGURE if in_checkout else args.out / "testbed_memorization.png")
    args.work.mkdir(parents=True, exist_ok=True)

    if args.import_from:
        import_(args.import_from, args.work)
    try:
        for stage in stages:
            t0 = time.time()
            logger.info(f"== {stage}")
            if stage == "corpus":
                stage_corpus(args.work, ccfg)
            elif stage == "train":
                stage_train(args.work, tcfg, device)
            elif stage == "score":
                stage_score(args.work, device, args.score_batch_size, args.max_windows)
            elif stage == "table":
                stage_table(args.work, args.out)
            elif stage == "report":
                stage_report(args.work, args.out, figure, argv)
            logger.info(f"== {stage} done in {time.time() - t0:.0f} s")
    finally:  # a failed later stage must not lose a finished training run
        if args.export and (args.work / "model" / "model.safetensors").exists():
            export(args.work, args.export)

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
