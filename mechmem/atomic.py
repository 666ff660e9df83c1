"""Files that are never half-written: write a temporary file beside the target, then rename it over.

A reader (or a resumed run after a crash) sees the old file or the new one, never a torn one: the
feature store's manifest, saved CNNs, per-row results, figures. The temporary file sits in the
target's folder (a rename is atomic only within one file system), is hidden (leading dot), carries
the process id (torchrun ranks never share one) and keeps the target's suffix (numpy and matplotlib
pick the format from it). A writer that fails leaves the old file as it was and no temporary file.
`sha256_file` is the one way a file's content is fingerprinted (feature stores, manifests, corpora).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Callable


def temporary_path(path: str | os.PathLike) -> Path:
    """Where `atomic_write` writes before renaming: `.{stem}.tmp{pid}{suffix}` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """write(temporary path), then rename it over `path`; the temporary file never outlives the call."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding=encoding))


def atomic_json(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False,
                default: Callable | None = None) -> Path:
    """`obj` as JSON (the text is made before anything is written: an unserialisable `obj` touches
    nothing). `default` is json.dumps's, e.g. str for a record holding paths."""
    return atomic_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default))


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """The SHA-256 of a file's bytes, read in blocks (files of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def json_default(x: Any) -> Any:
    """json.dumps's `default` for numpy scalars (manifests built from numpy results)."""
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")
