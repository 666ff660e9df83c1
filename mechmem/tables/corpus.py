"""Training corpora as token streams: Megatron indexed datasets, folders of .npy, text and JSON lines.

A corpus is a sorted list of files; each file is one token stream (documents joined as they are
stored, which is what packed training reads) with its documents' start positions where the format
has them. Counting work is cut into *shards*: token ranges of one file, small enough that a
worker's memory is bounded by a shard, not by the corpus.

- Megatron (`NAME.idx` + `NAME.bin`, the format Pythia's training data is published in): the index
  holds each sequence's size and each document's first sequence; the `.bin` is read memory-mapped.
- `.npy`: a 1-D integer array, one stream (and one document) a file, read memory-mapped.
- `.txt` (one document a file) and `.jsonl` (one document a line: a JSON string or an object with a
  "text" field): tokenized with the model's tokenizer, each document followed by its EOS token
  (as GPT-NeoX's preprocessing `--append-eod` does). A text file is one shard (it must be tokenized
  whole); convert large text corpora to Megatron or .npy first.

A position in the corpus is a global token offset: the files in sorted order, end to end. A
sample's `sequence_id` is the global offset of its first token, so a row can be traced to its file.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Int

from mechmem.atomic import atomic_write

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
# Megatron-LM / GPT-NeoX's `indexed_dataset` dtype codes.
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
                   8: np.uint16}
TEXT_SUFFIXES = (".txt", ".jsonl")
FORMATS = "Megatron .bin/.idx pairs, .npy token streams, .txt or .jsonl files"


# --------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class CorpusFile:
    """One token stream. `n_tokens` is None for text until it is tokenized."""

    path: str
    kind: str                      # "megatron" (path: the .bin), "npy", "text" or "jsonl"
    n_tokens: int | None = None
    idx_path: str | None = None    # megatron: the .idx


@dataclass(frozen=True)
class Shard:
    """Window starts [start, stop) of one file (stop None: to the file's end)."""

    file: CorpusFile
    start: int = 0
    stop: int | None = None

    @property
    def key(self) -> str:
        """A name unique in the corpus, safe as a file name: the unit of resume."""
        path = Path(self.file.path).resolve()
        st = path.stat()  # the file's place, size and time: a rewritten file is never resumed from old counts
        where = hashlib.sha1(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
        return f"{Path(self.file.path).name}.{where}.{self.start}-{'end' if self.stop is None else self.stop}"


def read_megatron_index(idx_path: str | os.PathLike) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sizes, pointers, doc_idx) of a Megatron `.idx` (MMapIndexedDataset, version 1), the
    arrays memory-mapped: the Pile's index is gigabytes, and a shard needs a few entries of it.

    Raises ValueError in one line for a wrong header or a truncated index."""
    idx_path = Path(idx_path)
    head = len(MEGATRON_MAGIC) + 8 + 1 + 8 + 8
    with open(idx_path, "rb") as f:
        raw = f.read(head)
    if len(raw) < head or raw[:len(MEGATRON_MAGIC)] != MEGATRON_MAGIC:
        raise ValueError(f"{idx_path} is not a Megatron index: its header is not {MEGATRON_MAGIC!r}")
    pos = len(MEGATRON_MAGIC)
    (version,) = struct.unpack_from("<Q", raw, pos)
    (code,) = struct.unpack_from("<B", raw, pos + 8)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, pos + 9)
    if version != 1 or code not in MEGATRON_DTYPES or MEGATRON_DTYPES[code] == np.float64:
        raise ValueError(f"{idx_path}: unsupported Megatron index (version {version}, dtype code {code})")
    need = head + n_seq * (4 + 8) + n_doc * 8
    if idx_path.stat().st_size < need:
        raise ValueError(f"{idx_path} is truncated: {idx_path.stat().st_size} bytes, the header promises {need}")

    def view(dtype, count: int, offset: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(idx_path, dtype=dtype, mode="r", shape=(count,), offset=offset)

    sizes = view(np.int32, n_seq, head)
    pointers = view(np.int64, n_seq, head + 4 * n_seq)
    doc_idx = view(np.int64, n_doc, head + 12 * n_seq)
    return np.dtype(MEGATRON_DTYPES[code]), sizes, pointers, doc_idx


def write_megatron(prefix: str | os.PathLike, documents: list[np.ndarray], dtype=np.uint16) -> Path:
    """Write documents as a Megatron indexed dataset `prefix.bin` + `prefix.idx` (one sequence a
    document, as GPT-NeoX's preprocessing writes them). Returns the `.bin` path."""
    prefix = Path(prefix)
    dtype = np.dtype(dtype)
    code = {np.dtype(v): k for k, v in MEGATRON_DTYPES.items() if v != np.float64}[dtype]
    sizes = np.array([len(d) for d in documents], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes.astype(np.int64) * dtype.itemsize)[:-1]]).astype(np.int64)
    def write_bin(path: Path) -> None:
        with open(path, "wb") as f:
            for d in documents:
                f.write(np.asarray(d, dtype=dtype).tobytes())

    def write_idx(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(MEGATRON_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code))
            f.write(struct.pack("<QQ", len(sizes), len(sizes) + 1))
            f.write(sizes.tobytes() + pointers.tobytes() + np.arange(len(sizes) + 1, dtype=np.int64).tobytes())

    atomic_write(prefix.with_suffix(".bin"), write_bin)
    atomic_write(prefix.with_suffix(".idx"), write_idx)
    return prefix.with_suffix(".bin")


def _megatron_file(bin_path: Path) -> CorpusFile:
    idx_path = bin_path.with_suffix(".idx")
    if not idx_path.is_file():
        raise FileNotFoundError(f"{bin_path} has no index {idx_path.name} beside it")
    dtype, sizes, pointers, _ = read_megatron_index(idx_path)
    # Sequences stored end to end (as GPT-NeoX writes them): the last one ends where the file does.
    n_bytes = int(pointers[-1]) + int(sizes[-1]) * dtype.itemsize if len(sizes) else 0
    if len(sizes) and int(pointers[0]) != 0:
        raise ValueError(f"{idx_path}: its first sequence does not start at the beginning of {bin_path.name}")
    if bin_path.stat().st_size != n_bytes:
        raise ValueError(f"{bin_path} holds {bin_path.stat().st_size} bytes; its index {idx_path.name} "
                         f"describes {n_bytes // dtype.itemsize} tokens of {dtype} ({n_bytes} bytes)")
    return CorpusFile(str(bin_path), "megatron", n_bytes // dtype.itemsize, str(idx_path))


def _npy_file(path: Path) -> CorpusFile:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable .npy file ({err})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{path} is not a 1-D integer token stream (shape {arr.shape}, dtype {arr.dtype})")
    return CorpusFile(str(path), "npy", int(arr.shape[0]))


def _file(path: Path) -> CorpusFile | None:
    """The corpus file at `path`, or None for a file of no corpus format (skipped in folders)."""
    if path.suffix == ".idx":
        if not path.with_suffix(".bin").is_file():
            raise FileNotFoundError(f"{path} has no data file {path.with_suffix('.bin').name} beside it")
        return None  # read through its .bin
    if path.suffix == ".bin":
        return _megatron_file(path)
    if path.suffix == ".npy":
        return _npy_file(path)
    if path.suffix == ".txt":
        return CorpusFile(str(path), "text")
    if path.suffix == ".jsonl":
        return CorpusFile(str(path), "jsonl")
    return None


# --------------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from mechmem.tables.relabel import load_tokenizer

    return load_tokenizer(name)


def _text_documents(path: Path, kind: str) -> list[str]:
    if kind == "text":
        return [path.read_text(encoding="utf-8")]
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {n}: not JSON") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise ValueError(f"{path}, line {n}: expected a string or an object with a 'text' string")
            docs.append(text)
    return docs


@functools.lru_cache(maxsize=16)
def tokenize_text(path: str, kind: str, tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    """(stream, document starts) of a text or JSON-lines file: each document, then its EOS."""
    tok = _tokenizer(tokenizer)
    docs = _text_documents(Path(path), kind)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs] if docs else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    lengths = np.array([len(x) + len(eos) for x in ids], dtype=np.int64)
    stream = np.fromiter((t for x in ids for t in (*x, *eos)), dtype=np.int64, count=int(lengths.sum()))
    return stream, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(ids) else np.zeros(0, int)


def read_tokens(file: CorpusFile, start: int, stop: int, tokenizer: str | None = None) -> Int[np.ndarray, " n"]:
    """Tokens [start, stop) of a file as int64 (memory-mapped formats read only that range)."""
    arr: np.ndarray
    if file.kind == "megatron":
        dtype = read_megatron_index(file.idx_path)[0]  # type: ignore[arg-type]
        arr = np.memmap(file.path, dtype=dtype, mode="r")
    elif file.kind == "npy":
        arr = np.load(file.path, mmap_mode="r")
    else:
        if tokenizer is None:
            raise ValueError(f"{file.path}: a text corpus needs the model's tokenizer")
        arr = tokenize_text(file.path, file.kind, tokenizer)[0]
    return np.asarray(arr[start:stop], dtype=np.int64)


def document_starts(file: CorpusFile, tokenizer: str | None = None, start: int = 0,
                    stop: int | None = None) -> Int[np.ndarray, " docs"]:
    """Token offsets where the file's documents start, those in [start, stop) (one document for .npy).

    Megatron: found by bisection in the memory-mapped index, so a shard reads only its own entries."""
    end = int(file.n_tokens or 0) if stop is None else stop
    if file.kind == "megatron":
        dtype, _, pointers, doc_idx = read_megatron_index(file.idx_path)  # type: ignore[arg-type]
        n_docs = max(len(doc_idx) - 1, 0)
        if n_docs == 0:
            return np.zeros(1, dtype=np.int64) if start == 0 else np.zeros(0, dtype=np.int64)
        first = lambda k: int(pointers[int(doc_idx[k])]) // dtype.itemsize  # noqa: E731
        a = bisect.bisect_left(range(n_docs), start, key=first)
        b = bisect.bisect_left(range(n_docs), end, key=first)
        return (np.asarray(pointers[np.asarray(doc_idx[a:b])], dtype=np.int64) // dtype.itemsize).astype(np.int64)
    if file.kind == "npy":
        whole = np.zeros(1, dtype=np.int64)
    else:
        whole = tokenize_text(file.path, file.kind, tokenizer)[1]
    return whole[(whole >= start) & (whole < end)]


# --------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """The files of a training corpus, sorted by path, with their token counts."""

    files: list[CorpusFile]
    tokenizer: str | None = None   # the model name/folder whose tokenizer reads text files
    paths: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer: str | None = None) -> "Corpus":
        """Every corpus file under `paths` (files or folders, searched recursively).

        Raises, in one line, for a path that does not exist, an `.idx` without its `.bin` (or the
        reverse), a bad index header, or no readable file at all."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        found: dict[str, CorpusFile] = {}
        for p in map(Path, paths):
            p = p.expanduser()
            if not p.exists() and Path(f"{p}.idx").exists():  # a Megatron prefix, as GPT-NeoX names them
                p = Path(f"{p}.idx")
            if not p.exists():
                raise FileNotFoundError(f"corpus path {p} does not exist")
            candidates = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) \
                if p.is_dir() else [p]  # hidden files (a writer's temporary ones) are no part of a corpus
            for q in candidates:
                if q.suffix == ".bin" and not q.with_suffix(".idx").is_file():
                    if p.is_dir():
                        raise FileNotFoundError(f"{q} has no index {q.with_suffix('.idx').name} beside it")
                f = _file(q)
                if f is None and q == p and q.suffix == ".idx":
                    f = _file(q.with_suffix(".bin"))
                if f is not None:
                    found[str(q.resolve() if q.suffix != ".idx" else q.with_suffix(".bin").resolve())] = f
        if not found:
            raise ValueError(f"no readable corpus file in {', '.join(map(str, paths))}: expected {FORMATS}")
        files = [found[k] for k in sorted(found)]
        if any(f.kind in ("text", "jsonl") for f in files) and tokenizer is None:
            raise ValueError("a text or JSON-lines corpus is tokenized with the model's tokenizer: none was given")
        # Text is tokenized here, once, for its length (text corpora are small; see the docstring).
        files = [f if f.n_tokens is not None else
                 CorpusFile(f.path, f.kind, len(tokenize_text(f.path, f.kind, tokenizer)[0]))
                 for f in files]
        return cls(files, tokenizer, [str(p) for p in paths])

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths())

    def lengths(self) -> list[int]:
        return [int(f.n_tokens or 0) for f in self.files]

    def offsets(self) -> np.ndarray:
        """Global offset of each file's first token."""
        return np.concatenate([[0], np.cumsum(self.lengths())[:-1]]).astype(np.int64)

    def shards(self, tokens_per_shard: int = 1 << 26) -> list[Shard]:
        """Token ranges of at most `tokens_per_shard` window starts (text files: one shard each)."""
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
        out = []
        for f in self.files:
            if f.kind in ("text", "jsonl"):
                out.append(Shard(f, 0, f.n_tokens))
                continue
            n = f.n_tokens or 0
            for a in range(0, n, tokens_per_shard):
                out.append(Shard(f, a, min(a + tokens_per_shard, n)))
        return out

    def describe(self) -> list[dict]:
        """What a manifest records of each file: path, format, tokens, size, modification time."""
        out = []
        for f in self.files:
            st = os.stat(f.path)
            out.append({"path": f.path, "format": f.kind, "tokens": f.n_tokens, "bytes": st.st_size,
                        "mtime": int(st.st_mtime)})
        return out

    def probe_max_token(self, n: int = 1 << 16) -> int:
        """The largest token id among each file's first and last `n` tokens: a cheap check that the
        corpus was made with the model's tokenizer (reading it all is the count's job)."""
        top = 0
        for f in self.files:
            size = f.n_tokens or 0
            for a, b in ((0, min(n, size)), (max(size - n, 0), size)):
                part = read_tokens(f, a, b, self.tokenizer)
                if len(part):
                    top = max(top, int(part.max()))
        return top
