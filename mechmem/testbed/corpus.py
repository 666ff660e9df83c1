"""The testbed's corpus: Python's standard library plus planted duplicates and patterns.

Everything is built from text every Python install carries, in a fixed order, so the corpus is
the same wherever the project is installed with the same Python:

- **stdlib**: the standard library's text files (code, docstrings, comments, license texts),
  sorted by path. Natural duplicates and patterned text stay in. Each file gets one role from a
  hash of its path: trained on, held out (never trained on), or a *pool* that only supplies
  planted passages.
- **planted**: passages cut from pool files and inserted a known number of times, log-spread
  over tiers from 1 to 2000 copies, so recite/recollect at thresholds 5, 50 and 1000 are
  populated.
- **pattern**: fresh incrementing/repeating documents (`patterns.py`), 1-5 copies each, plus
  held-out instances the model never sees.

Documents are tokenized one by one, shuffled with a seed, and joined with EOS into the training
token stream (the model's whole training data). Candidate windows (64 tokens) are picked here
too, as positions in that stream or in the held-out stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechmem.testbed.patterns import make_patterns

EOS = "<|endoftext|>"
WINDOW = 64
TEXT_SUFFIXES = {".py", ".pyw", ".txt", ".rst", ".html", ".css", ".def", ".cfg", ".bat", ".ps1", ".fish",
                 ".csh", ""}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
# Source codes used in window tables ("duplicated": natural text trained on, picked for its copies).
SOURCES = ("stdlib", "planted", "pattern", "heldout", "heldout_pattern", "duplicated")


@dataclass
class CorpusConfig:
    seed: int = 0
    vocab_size: int = 8192
    heldout_frac: float = 0.05          # stdlib files never trained on
    pool_frac: float = 0.04             # stdlib files that only supply planted passages
    # (fewest copies, most copies, passages): counts log-spaced inside each tier.
    passage_tiers: tuple = ((1, 5, 60), (6, 50, 40), (51, 1000, 24), (1001, 2000, 6))
    passage_chars: int = 500
    n_patterns: int = 6000              # planted pattern instances
    n_heldout_patterns: int = 1500      # never trained on
    pattern_copies: tuple = (0.6, 0.2, 0.1, 0.05, 0.05)   # P(1..5 copies)
    n_stdlib_windows: int = 60000       # candidate windows, uniform over trained stdlib text
    n_heldout_windows: int = 10000      # uniform over held-out stdlib text
    pattern_offsets: int = 3            # windows per pattern instance (one at its start)
    passage_stride: int = 2             # planted passages: a window every `stride` tokens
    max_files: int | None = None        # only for dry runs: the first files in path order
    tokenizer_chars: int | None = None  # train the BPE on about this much natural text (None: all of it)
    # Natural windows the stream repeats: (fewest copies, most copies, windows) per tier; none by default.
    duplicated_tiers: tuple = ()
    duplicated_per_doc: int = 256       # at most this many of them from one document in each tier

    @classmethod
    def tiny(cls) -> "CorpusConfig":
        """A minute-long dry run of the whole pipeline."""
        return cls(vocab_size=1024, max_files=80, passage_tiers=((1, 5, 6), (6, 50, 4), (51, 200, 2)),
                   n_patterns=300, n_heldout_patterns=60, n_stdlib_windows=1500, n_heldout_windows=300,
                   heldout_frac=0.1, pool_frac=0.1)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by a string: roles survive files being added elsewhere."""
    return int(_sha(f"{seed}:{key}")[:12], 16) / 16**12


def stdlib_files(root: Path | None = None, max_files: int | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's UTF-8 text files, sorted by path.

    Left out: test suites (some installs strip them), installed packages, compiled and
    build-specific files, so the list depends on the Python version only.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"no standard library folder at {root}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix not in TEXT_SUFFIXES or name.startswith("_sysconfigdata") or path.is_symlink():
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip() and "\x00" not in text:
                found.append(((rel_dir / name).as_posix(), text))
    found.sort()
    return found[:max_files] if max_files else found


def file_role(rel_path: str, cfg: CorpusConfig) -> str:
    u = _unit(rel_path, cfg.seed)
    if u < cfg.heldout_frac:
        return "heldout"
    if u < cfg.heldout_frac + cfg.pool_frac:
        return "pool"
    return "stdlib"


def tier_counts(tiers) -> list[int]:
    """Copies per planted passage: log-spaced from the tier's fewest to most copies."""
    counts = []
    for lo, hi, n in tiers:
        counts += [int(round(lo * (hi / lo) ** (k / max(n - 1, 1)))) for k in range(n)]
    return counts


def cut_passages(pool: list[tuple[str, str]], cfg: CorpusConfig) -> list[dict]:
    """Line-aligned passages of about `passage_chars` characters from the pool files."""
    candidates = []
    for path, text in pool:
        start = 0
        while start < len(text):
            end = text.find("\n", start + cfg.passage_chars)
            end = len(text) if end < 0 else end + 1
            chunk = text[start:end]
            if len(chunk) >= cfg.passage_chars and len(set(chunk.split())) >= 20:
                candidates.append({"file": path, "start": start, "end": end})
            start = end
    counts = tier_counts(cfg.passage_tiers)
    if len(candidates) < len(counts):
        raise ValueError(f"only {len(candidates)} passage candidates for {len(counts)} planted passages")
    rng = np.random.default_rng(cfg.seed + 1)
    picked = sorted(rng.choice(len(candidates), size=len(counts), replace=False))
    order = rng.permutation(len(counts))  # which passage gets which count
    texts = dict(pool)
    passages = []
    for i, j in enumerate(picked):
        c = dict(candidates[j])
        c["count"] = counts[order[i]]
        c["sha256"] = _sha(texts[c["file"]][c["start"]:c["end"]])
        passages.append(c)
    return passages


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-NeoX style) trained on the natural training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


@dataclass
class Corpus:
    """What the later stages need: token streams, candidate windows, and what went in."""
    train_stream: np.ndarray            # uint16 [n_tokens]: the model's whole training data
    heldout_stream: np.ndarray          # uint16: text the model never trains on
    windows: dict[str, np.ndarray]      # stream (0 train / 1 heldout), position, source, planted_count, family
    manifest: dict = field(default_factory=dict)

    def window_tokens(self) -> np.ndarray:
        """[n_windows, 64] token ids of every candidate window."""
        out = np.empty((len(self.windows["position"]), WINDOW), dtype=np.int64)
        for s, stream in enumerate([self.train_stream, self.heldout_stream]):
            rows = np.flatnonzero(self.windows["stream"] == s)
            pos = self.windows["position"][rows]
            out[rows] = stream[pos[:, None] + np.arange(WINDOW)]
        return out

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "train_stream.npy", self.train_stream)
        np.save(folder / "heldout_stream.npy", self.heldout_stream)
        np.savez_compressed(folder / "windows.npz", **self.windows)  # type: ignore[arg-type]  # (numpy stub: allow_pickle)
        (folder / "corpus.json").write_text(json.dumps(self.manifest, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Corpus":
        folder = Path(folder)
        if not (folder / "train_stream.npy").exists():
            raise FileNotFoundError(f"no corpus in {folder}: run the corpus stage first")
        w = np.load(folder / "windows.npz")
        return cls(np.load(folder / "train_stream.npy"), np.load(folder / "heldout_stream.npy"),
                   {k: w[k] for k in w.files}, json.loads((folder / "corpus.json").read_text()))


def encode(tokenizer, texts: list[str], chunk: int = 2048) -> list[np.ndarray]:
    """Token ids of each text (uint16), encoded in chunks: a full Encoding per document (tokens,
    offsets, masks) of a 100M-token corpus would take tens of GB. `encode_batch_fast` skips the
    offsets: the same ids, a fifth less time."""
    out = []
    for a in range(0, len(texts), chunk):
        out += [np.asarray(e.ids, dtype=np.uint16) for e in tokenizer.encode_batch_fast(texts[a:a + chunk])]
    return out


def _join(docs: list[np.ndarray], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents, each followed by EOS; return the stream and each doc's start."""
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream = np.empty(int(lengths.sum()), dtype=np.uint16)
    for d, s in zip(docs, starts):
        stream[s:s + len(d)] = d
        stream[s + len(d)] = eos
    return stream, starts


def _doc_windows(rng, starts, lengths, n):
    """`n` distinct window positions uniform over the documents' valid starts."""
    room = np.maximum(lengths - WINDOW + 1, 0)
    total = int(room.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.sort(rng.choice(total, size=min(n, total), replace=False))
    cum = np.cumsum(room)
    doc = np.searchsorted(cum, flat, side="right")
    return starts[doc] + flat - (cum[doc] - room[doc])


def duplicated_windows(rng, stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, tiers,
                       per_doc: int) -> np.ndarray:
    """Positions of natural-text windows that the stream repeats: for each (fewest, most copies,
    windows) of `tiers`, up to that many distinct windows with that many copies in the whole stream,
    at most `per_doc` of them from one document, each at the first document (of `starts`, `lengths`)
    that holds it. The cap holds within each tier: capped over all tiers, a document's slots went
    mostly to its 2-5-copy windows, which that tier's budget then discarded (the third pile-regime
    build: 98,030 windows at 6-50 copies of the stream's 183,162).

    In one pass a model memorizes only what the data repeats, and a uniform sample of natural text
    holds too few such windows to fill the memorized classes (the first pile-regime build: 189
    "Others" of 96,996 windows). Copies are counted by hash here, only to pick the tier; the label
    stage counts them exactly.
    """
    from mechmem.testbed.duplicates import WindowIndex

    index = WindowIndex(stream, WINDOW)  # every window hashed and sorted once
    run = np.cumsum(np.r_[True, index.sorted_hashes[1:] != index.sorted_hashes[:-1]]) - 1
    content = np.empty(len(run), dtype=np.int64)  # each position's window, as a number per distinct hash
    content[index.order] = run
    copies = np.bincount(run)[content]
    inside = np.zeros(len(content), dtype=bool)  # window starts inside one of the documents
    for a, length in zip(starts, lengths):
        inside[a:a + max(length - WINDOW + 1, 0)] = True
    cand = np.flatnonzero(inside & (copies >= 2))
    _, first = np.unique(content[cand], return_index=True)  # one position per distinct window
    cand = cand[np.sort(first)]
    by_start = np.argsort(starts, kind="stable")
    doc = np.searchsorted(starts[by_start], cand, side="right") - 1
    shuffled = rng.permutation(len(cand))
    cand, doc = cand[shuffled], doc[shuffled]
    c = copies[cand]
    picked = []
    for lo, hi, n in tiers:  # each tier's first `per_doc` of a document in the shuffled order, then its first n
        inside_tier = (c >= lo) & (c <= hi)
        tier, d = cand[inside_tier], doc[inside_tier]
        grouped = np.argsort(d, kind="stable")
        rank = np.empty(len(tier), dtype=np.int64)
        rank[grouped] = np.arange(len(tier)) - np.searchsorted(d[grouped], d[grouped], side="left")
        picked.append(tier[rank < per_doc][:n])
    return np.sort(np.concatenate(picked))


def tokenizer_texts(files: list[tuple[str, str]], cfg: CorpusConfig) -> list[str]:
    """The natural text the BPE is trained on: all of it, or files in an order fixed by a hash of
    their paths until `tokenizer_chars` (a large corpus's tokenizer needs no more)."""
    texts = [t for _, t in files]
    if cfg.tokenizer_chars is None:
        return texts
    order = sorted(range(len(files)), key=lambda i: _unit("tokenizer:" + files[i][0], cfg.seed))
    picked, total = [], 0
    for i in order:
        if total >= cfg.tokenizer_chars:
            break
        picked.append(texts[i])
        total += len(texts[i])
    return picked


def build_corpus(cfg: CorpusConfig, tokenizer=None, root: Path | None = None,
                 files: list[tuple[str, str]] | None = None) -> tuple[Corpus, Any]:
    """Gather, tokenize and join the corpus; pick candidate windows. Returns (corpus, tokenizer).

    The natural text is the standard library under `root` (default: the running Python's), or
    `files` ((path, text) pairs, e.g. `sources.unpack`'s) when given; either way it is labelled
    source "stdlib" in the windows, the role of natural text trained on.
    """
    from_stdlib = files is None
    files = stdlib_files(root, cfg.max_files) if files is None else sorted(files)[:cfg.max_files]
    roles = {path: file_role(path, cfg) for path, _ in files}
    by_role = {r: [(p, t) for p, t in files if roles[p] == r] for r in ("stdlib", "heldout", "pool")}
    passages = cut_passages(by_role["pool"], cfg)
    texts = dict(files)
    patterns = make_patterns(cfg.n_patterns + cfg.n_heldout_patterns, cfg.seed + 2)
    train_patterns, heldout_patterns = patterns[:cfg.n_patterns], patterns[cfg.n_patterns:]
    rng = np.random.default_rng(cfg.seed + 3)
    pattern_counts = rng.choice(np.arange(1, len(cfg.pattern_copies) + 1), size=len(train_patterns),
                                p=np.array(cfg.pattern_copies) / sum(cfg.pattern_copies))

    if tokenizer is None:
        tokenizer = train_tokenizer(tokenizer_texts(by_role["stdlib"], cfg), cfg.vocab_size)
    eos = tokenizer.token_to_id(EOS)

    # Unique training documents, with source, planted count, family and copies.
    docs = [(t, "stdlib", 0, "", 1) for _, t in by_role["stdlib"]]
    docs += [(texts[p["file"]][p["start"]:p["end"]], "planted", p["count"], "", p["count"]) for p in passages]
    docs += [(p.text, "pattern", int(c), p.family, int(c)) for p, c in zip(train_patterns, pattern_counts)]
    ids = encode(tokenizer, [d[0] for d in docs])
    copies = np.repeat(np.arange(len(docs)), [d[4] for d in docs])
    order = copies[rng.permutation(len(copies))]
    stream, starts = _join([ids[i] for i in order], eos)
    first = np.full(len(docs), -1, dtype=np.int64)
    for k in range(len(order) - 1, -1, -1):  # first copy of each unique document
        first[order[k]] = starts[k]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)

    held_docs = [t for _, t in by_role["heldout"]] + [p.text for p in heldout_patterns]
    held_ids = encode(tokenizer, held_docs)
    held_stream, held_starts = _join(held_ids, eos)
    held_lengths = np.array([len(x) for x in held_ids], dtype=np.int64)
    n_held_std = len(by_role["heldout"])

    # Candidate windows.
    rows = []  # (stream, position, source, planted_count, family)
    kind = np.array([d[1] for d in docs])
    std = np.flatnonzero(kind == "stdlib")
    for p in _doc_windows(rng, first[std], lengths[std], cfg.n_stdlib_windows):
        rows.append((0, p, "stdlib", 0, ""))
    for d in np.flatnonzero(kind == "planted"):
        for off in range(0, lengths[d] - WINDOW + 1, cfg.passage_stride):
            rows.append((0, first[d] + off, "planted", docs[d][2], ""))

    def pattern_rows(stream_id, starts_, lengths_, counts, families, source):
        for s, n, c, fam in zip(starts_, lengths_, counts, families):
            if n < WINDOW:
                continue
            offs = {0} | set(rng.integers(1, n - WINDOW + 1, size=cfg.pattern_offsets - 1).tolist()) \
                if n > WINDOW else {0}
            rows.extend((stream_id, s + o, source, c, fam) for o in sorted(offs))

    pat = np.flatnonzero(kind == "pattern")
    pattern_rows(0, first[pat], lengths[pat], [docs[d][2] for d in pat], [docs[d][3] for d in pat], "pattern")
    for p in _doc_windows(rng, held_starts[:n_held_std], held_lengths[:n_held_std], cfg.n_heldout_windows):
        rows.append((1, p, "heldout", 0, ""))
    pattern_rows(1, held_starts[n_held_std:], held_lengths[n_held_std:], [0] * len(heldout_patterns),
                 [p.family for p in heldout_patterns], "heldout_pattern")
    if cfg.duplicated_tiers:  # its own generator: the other windows stay as they were
        taken = {(r[0], r[1]) for r in rows}
        dup = duplicated_windows(np.random.default_rng(cfg.seed + 5), stream, first[std], lengths[std],
                                 cfg.duplicated_tiers, cfg.duplicated_per_doc)
        rows.extend((0, int(p), "duplicated", 0, "") for p in dup if (0, int(p)) not in taken)
    rows = sorted(set(rows), key=lambda r: (r[0], r[1]))
    seen, unique = set(), []
    for r in rows:  # one row per (stream, position)
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            unique.append(r)
    windows: dict[str, np.ndarray] = {
        "stream": np.array([r[0] for r in unique], dtype=np.int8),
        "position": np.array([r[1] for r in unique], dtype=np.int64),
        "source": np.array([r[2] for r in unique]),
        "planted_count": np.array([r[3] for r in unique], dtype=np.int64),
        "family": np.array([r[4] for r in unique]),
    }

    manifest = {
        "config": asdict(cfg),
        "python": sys.version.split()[0],
        "stdlib_dir": str(root or stdlib_dir()) if from_stdlib else None,
        "files": [{"path": p, "sha256": _sha(t), "role": roles[p]} for p, t in files],
        "files_sha256": _sha("".join(f"{p}\0{_sha(t)}\n" for p, t in files)),
        "passages": passages,
        "patterns": {
            "seed": cfg.seed + 2, "n_train": len(train_patterns), "n_heldout": len(heldout_patterns),
            "copies_histogram": {int(c): int((pattern_counts == c).sum()) for c in np.unique(pattern_counts)},
            "sha256": _sha("\0".join(p.text for p in patterns)),
        },
        "tokenizer_sha256": _sha(tokenizer.to_str()),
        "train_tokens": int(len(stream)),
        "train_tokens_by_source": {s: int(sum((lengths[i] + 1) * docs[i][4] for i in np.flatnonzero(kind == s)))
                                   for s in ("stdlib", "planted", "pattern")},
        "heldout_tokens": int(len(held_stream)),
        "train_stream_sha256": _sha(stream.tobytes()),
        "heldout_stream_sha256": _sha(held_stream.tobytes()),
        "n_windows": {s: int((windows["source"] == s).sum()) for s in SOURCES},
    }
    return Corpus(stream, held_stream, windows, manifest), tokenizer
