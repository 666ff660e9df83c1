"""Build a memorization table for any model, checkpoint and training corpus (mechmem.tables).

    python experiments/build_table.py --model testbed --corpus testbed --samples-from testbed --out runs/table-testbed
    python experiments/build_table.py --model EleutherAI/pythia-1b-deduped --revision step64000 \
        --corpus /data/pile/document.idx --samples 100000 --device cuda --out runs/table-1b-step64000
    python experiments/build_table.py --model ./my-finetune --corpus data/*.jsonl --samples 20000 \
        --scheduler tcp://HOST:8786 --out runs/table-mine       # duplicate counts on a running Dask cluster
    torchrun --nproc-per-node 4 experiments/build_table.py ...   # greedy extraction over 4 GPUs

--corpus: Megatron .bin/.idx (a pair, its prefix, or a folder), .npy token streams, .txt or .jsonl
files (tokenized with the model's tokenizer), or 'testbed' (the testbed's rebuilt training stream).
Samples: --samples N windows drawn from the corpus (seeded; --sampling positions or documents) or
--samples-from TABLE (relabel its sequences). Writes --out/memorization.parquet (the columns
load_memorization_data reads, greedy_suffix, label_model/label_revision/label_weights) and
--out/manifest.json. A killed build resumes from --out/work.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem import cli  # noqa: E402  (after the path: runs from a checkout too)


def parse_args(argv=None):
    from mechmem.tables.count import SCOPES
    from mechmem.tables.samples import SAMPLINGS

    p = cli.Parser("build_table", __doc__)
    p.add_argument("--model", default="testbed", help="'testbed', a local HF folder, or a hub name")
    p.add_argument("--revision", default=None, help="hub revision, e.g. step64000 for Pythia")
    p.add_argument("--corpus", nargs="+", required=True, help="corpus files or folders, or 'testbed'")
    p.add_argument("--samples", type=int, default=None, help="draw N 64-token windows from the corpus")
    p.add_argument("--samples-from", default=None, help="relabel this table's sequences ('testbed', parquet, jsonl)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="positions",
                   help="positions: uniform over window starts; documents: a document, then a start inside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scope", choices=SCOPES, default="stream",
                   help="count windows of the whole stream (default) or only windows inside one document")
    p.add_argument("--scheduler", default="local",
                   help="'local' (start a Dask LocalCluster, default), 'synchronous' (no cluster), or tcp://HOST:8786")
    p.add_argument("--workers", type=int, default=None, help="local cluster: worker processes (default: all cores)")
    p.add_argument("--tokens-per-shard", type=int, default=1 << 24, help="window starts a counting task")
    p.add_argument("--no-corpus-hash", action="store_true", help="skip the corpus files' SHA-256 in the manifest")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bf16, fp16")
    p.add_argument("--batch-size", type=int, default=256, help="greedy decoding batch")
    p.add_argument("--chunk", type=int, default=4096, help="samples a greedy chunk (the unit of resume)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli.main("build_table", parse_args, run, argv)


def run(args) -> int:
    from mechmem.distributed import init_from_env, shutdown
    from mechmem.models import _resolve_dtype, load_model
    from mechmem.tables import samples as S
    from mechmem.tables.build import BuildConfig, build_table, corpus_paths, prepare_samples
    from mechmem.tables.corpus import Corpus
    from mechmem.tables.count import CountConfig
    from mechmem.tables.relabel import check_available, model_vocab

    cfg = BuildConfig(samples=args.samples, samples_from=args.samples_from, sampling=args.sampling, seed=args.seed,
                      batch_size=args.batch_size, chunk=args.chunk, hash_corpus=not args.no_corpus_hash,
                      count=CountConfig(scope=args.scope, tokens_per_shard=args.tokens_per_shard,
                                        scheduler=args.scheduler, workers=args.workers))
    cfg.check()
    cli.check_device(args.device)
    _resolve_dtype(args.dtype)
    cli.check_out_dir(args.out)
    check_available(args.model, args.revision)
    corpus = Corpus.open(corpus_paths(args.corpus), tokenizer=args.model)
    if cfg.samples is not None and cfg.samples > S.available(corpus, cfg.sampling):
        S.draw(corpus, cfg.samples, sampling=cfg.sampling)  # raises the one-line error
    d_vocab = model_vocab(args.model, args.revision)
    top = corpus.probe_max_token()
    if top >= d_vocab:
        raise cli.CliError(f"the corpus holds token id {top}, outside the model's vocabulary (ids 0-{d_vocab - 1}): "
                           "was it tokenized with another tokenizer?")
    dist = init_from_env()
    say = print if dist.is_main else (lambda *a, **k: None)
    if dist.is_main:
        prepare_samples(corpus, cfg, args.out / "work", d_vocab)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    dist.barrier()
    say(f"{corpus.n_tokens:,} corpus tokens in {len(corpus.files)} file(s); labelling with {model.mechmem_name}; "
        f"counting on {args.scheduler}; writing to {args.out}")
    built = build_table(model, args.model, args.revision, corpus, cfg, args.out, dist=dist, device=args.device,
                        progress=not args.quiet)
    if built is not None:
        c = built.manifest["counts"]
        say(f"{c['samples']} samples, {c['extractable']} extractable, {c['in_corpus']} found in the corpus "
            f"({c['windows_scanned']:,} windows in {c['shards']} shards); timings {built.manifest['timings']}")
        say(f"wrote {args.out / 'memorization.parquet'} and manifest.json")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
