"""Ground truth for the regurgitation monitor: does a stretch occur verbatim in the testbed's training data?

The testbed's whole training data is one token stream (7.0M tokens). It is not shipped: the
package would double in size. The corpus stage rebuilds it from the running Python's standard
library with the shipped tokenizer in about a minute, byte for byte on the Python the manifest
names; the stream's hash is checked against the manifest, and the rebuilt corpus is cached
(`MECHMEM_CACHE`, default `~/.cache/mechmem`). The index over its 32-token windows is rebuilt in
memory in seconds (`duplicates.WindowIndex`) and answers exactly: hash hits are confirmed token by
token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mechmem.testbed import MANIFEST_FILE, MODEL_DIR
from mechmem.testbed.corpus import Corpus, CorpusConfig, build_corpus
from mechmem.testbed.duplicates import WindowIndex

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("MECHMEM_CACHE", Path.home() / ".cache" / "mechmem")) / "testbed-corpus"


def corpus_config(manifest: dict) -> CorpusConfig:
    """The CorpusConfig a manifest records (JSON lists back into the tuples the dataclass holds)."""
    raw = manifest["corpus"]["config"]
    values: dict[str, Any] = {k: tuple(tuple(x) for x in v) if k in ("passage_tiers", "duplicated_tiers") else
                              (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()}
    return CorpusConfig(**values)


def _stream_sha(corpus: Corpus) -> str:
    return hashlib.sha256(corpus.train_stream.tobytes()).hexdigest()


def training_corpus(cache: Path | None = None, manifest_file: Path = MANIFEST_FILE) -> Corpus:
    """The corpus the shipped testbed model was trained on: from the cache, else rebuilt and cached.

    Raises ValueError, in one line, where it cannot be rebuilt as it was (another Python's standard
    library gives another stream)."""
    manifest = json.loads(Path(manifest_file).read_text())
    want = manifest["corpus"]["train_stream_sha256"]
    cache = Path(cache) if cache is not None else cache_dir()
    if (cache / "train_stream.npy").is_file():
        corpus = Corpus.load(cache)
        if _stream_sha(corpus) == want:
            return corpus
        logger.warning(f"the cached corpus in {cache} is not the testbed's; rebuilding it")
    built_with, here = manifest["corpus"]["python"], sys.version.split()[0]
    if built_with != here:
        raise ValueError(f"the testbed's training stream can be rebuilt only on Python {built_with} "
                         f"(its standard library is the corpus); this is Python {here}")
    from tokenizers import Tokenizer

    logger.info("rebuilding the testbed's training corpus (about a minute)")
    corpus, _ = build_corpus(corpus_config(manifest), tokenizer=Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")))
    if _stream_sha(corpus) != want:
        raise ValueError(f"the rebuilt training stream differs from the testbed's (standard library at "
                         f"{corpus.manifest['stdlib_dir']} is not the one the manifest lists)")
    corpus.save(cache)
    return corpus


def testbed_corpus(name: str = "testbed") -> Corpus:
    """The training corpus of a testbed, by the name `load_model` takes: the first testbed's, rebuilt
    (`training_corpus`); the second's (`testbed-pile[@stepN]`), as its build saved it (same layout)."""
    from mechmem.testbed import BUILD_COMMAND, PILE_NAMES, testbed_dir

    base = name.partition("@")[0]
    if base in PILE_NAMES:
        folder = testbed_dir(base) / "work" / "corpus"
        if not (folder / "train_stream.npy").is_file():
            raise FileNotFoundError(f"no corpus of {base} at {folder}: build it with `{BUILD_COMMAND}`")
        return Corpus.load(folder)
    if name != "testbed":
        raise ValueError(f"{name!r} is not a testbed ('testbed', {', '.join(PILE_NAMES)}): no corpus to read")
    return training_corpus()


def membership_index(corpus: Corpus | None = None, width: int = 32) -> WindowIndex:
    """Every `width`-token window of the training stream (default: the testbed's rebuilt corpus)."""
    corpus = corpus if corpus is not None else training_corpus()
    return WindowIndex(corpus.train_stream, width)

