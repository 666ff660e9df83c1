"""Memorization tables: read, validate, and complete them with the derived columns.

One row is a 64-token training sample (32-token prefix, 32-token suffix) and what is known about
it (METHOD.md section 1). Sources:

- ``"semantic-filters:12b"`` (Pythia trained on the duplicated Pile; ``-duped`` says it too) or
  ``"semantic-filters:12b-deduped"``: the published data, Hugging Face dataset
  ``usvsnsp/semantic-filters``, splits ``pile_{duped|deduped}_{size}`` (random samples) and
  ``memories_{duped|deduped}_{size}`` (memorized ones), concatenated pile first and de-duplicated
  on ``sequence_id`` (the first row wins, as in the paper). With ``local_dir=`` the same splits are
  read from downloaded parquet/json-lines files named after the split instead of the hub.
- a parquet or JSON-lines file, or a folder of them (all concatenated, de-duplicated).
- ``"testbed"``: the table shipped with the offline testbed (`mechmem.testbed.DATA_FILE`).
- ``"testbed-pile"``: the second testbed's final checkpoint's table, built into the cache
  (`mechmem.testbed.pile_regime`); ``"testbed-pile@step512"`` a checkpoint's own.

Derived columns are computed when missing: ``rouge_L_prefix_to_suffix`` and
``rouge_3_prefix_to_suffix`` (prefix vs suffix token ids) and ``is_code`` (from the text).
Everything else a source carries (perplexities, ``huffman_coding_length``, ``in_training``, ...)
is kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Int
from tqdm.auto import tqdm

from mechmem import heuristics
from mechmem.testbed import PILE_NAMES

SEQ_LEN, PREFIX_LEN = 64, 32
HUB_DATASET = "usvsnsp/semantic-filters"
PYTHIA_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
REQUIRED = ("sequence_id", "tokens", "text", "memorization_score", "sequence_duplicates", "is_incrementing",
            "is_repeating")
DERIVED = ("rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix", "is_code")
FLAGS = ("is_incrementing", "is_repeating", "is_code")
# Optional: each sample's source document, where a table knows it (the second testbed's do): the
# alignment intervals then resample documents, the independent unit, not overlapping windows.
DOCUMENT = "document"
# Optional: the kind of text a sample comes from (the testbeds': planted, pattern, stdlib, ...): each
# row then breaks its confusion down by it (`alignment.source_confusion`), a check that the CNN
# separates memorization, not the kind of text each class is made of.
SOURCE = "source"
UNIT_INTERVAL = ("memorization_score", "rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")


# --------------------------------------------------------------------------- validation
def _where(df: pd.DataFrame, pos: int) -> str:
    sid = ""
    if "sequence_id" in df.columns:
        try:
            sid = f" (sequence_id {df['sequence_id'].iloc[pos]})"
        except (IndexError, TypeError):
            pass
    return f"row {pos}{sid}"


def _show(value) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)[:60]


def _bad(column: str, df: pd.DataFrame, pos: int, what: str) -> ValueError:
    return ValueError(f"column {column!r}: {_where(df, pos)} {what}")


def _as_tokens(df: pd.DataFrame) -> list[np.ndarray]:
    out = []
    for pos, row in enumerate(df["tokens"].to_numpy()):
        try:
            arr = np.asarray(row)
        except (TypeError, ValueError):
            raise _bad("tokens", df, pos, f"is not a sequence of token ids: {row!r:.60}") from None
        if arr.ndim != 1 or len(arr) != SEQ_LEN:
            raise _bad("tokens", df, pos, f"has {arr.size if arr.ndim else 'no'} tokens, expected {SEQ_LEN}")
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise _bad("tokens", df, pos, f"holds non-integer token ids (dtype {arr.dtype})")
        if arr.min() < 0:
            raise _bad("tokens", df, pos, f"holds a negative token id {int(arr.min())}")
        out.append(arr.astype(np.int64, copy=False))
    return out


def _as_unit_float(df: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    bad = ~((values >= 0) & (values <= 1))  # NaN fails too
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise _bad(column, df, pos, f"is {_show(df[column].iloc[pos])}, outside [0, 1]")
    return values


def _as_int(df: pd.DataFrame, column: str, *, minimum: int | None = None) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if minimum is not None:
        bad |= values < minimum
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        need = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise _bad(column, df, pos, f"is {_show(df[column].iloc[pos])}, expected {need}")
    return df[column].to_numpy().astype(np.int64)


def _as_flag(df: pd.DataFrame, column: str) -> np.ndarray:
    values = df[column].to_numpy()
    if values.dtype.kind == "b":
        return values
    ok = np.array([isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer, float, np.floating))
                                                       and v in (0, 1)) for v in values], dtype=bool)
    if not ok.all():
        pos = int(np.flatnonzero(~ok)[0])
        raise _bad(column, df, pos, f"is {_show(values[pos])}, expected a boolean")
    return values.astype(bool)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check the published schema and return a copy with normalised dtypes.

    Required: REQUIRED; checked when present: DERIVED. Raises ValueError naming the column and the
    first bad row: a missing column, a duplicate `sequence_id`, token rows not of 64 non-negative
    integers, a non-string text, scores or ROUGE outside [0, 1], non-boolean flags.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    for column in REQUIRED:
        if column not in df.columns:
            raise ValueError(f"column {column!r} is missing; a memorization table needs {', '.join(REQUIRED)}")
    out = df.reset_index(drop=True).copy()
    out["sequence_id"] = _as_int(out, "sequence_id")
    dup = out["sequence_id"].duplicated().to_numpy()
    if dup.any():
        raise _bad("sequence_id", out, int(np.flatnonzero(dup)[0]), "repeats an earlier sequence_id")
    out["tokens"] = pd.Series(_as_tokens(out), index=out.index, dtype=object)
    not_str = ~out["text"].map(lambda x: isinstance(x, str)).to_numpy(dtype=bool)
    if not_str.any():
        pos = int(np.flatnonzero(not_str)[0])
        raise _bad("text", out, pos, f"is {_show(out['text'].iloc[pos])}, expected a string")
    out["sequence_duplicates"] = _as_int(out, "sequence_duplicates", minimum=0)
    for column in UNIT_INTERVAL:
        if column in out.columns:
            out[column] = _as_unit_float(out, column)
    for column in FLAGS:
        if column in out.columns:
            out[column] = _as_flag(out, column)
    return out


def tokens_array(df: pd.DataFrame) -> Int[np.ndarray, "n 64"]:
    """The `tokens` column as one int64 array [n, 64]."""
    if "tokens" not in df.columns:
        raise ValueError("column 'tokens' is missing")
    if len(df) == 0:
        return np.zeros((0, SEQ_LEN), dtype=np.int64)
    return np.stack(_as_tokens(df.reset_index(drop=True)))


def check_vocab(df: pd.DataFrame, d_vocab: int) -> None:
    """Every token id fits a model's vocabulary [0, d_vocab). A table made with another tokenizer
    would otherwise fail deep inside the embedding; this names its first bad row and id."""
    tokens = tokens_array(df)
    bad = tokens >= d_vocab
    if bad.any():
        pos = int(np.flatnonzero(bad.any(axis=1))[0])
        raise _bad("tokens", df.reset_index(drop=True), pos,
                   f"holds token id {int(tokens[pos][bad[pos]][0])}, outside the model's vocabulary "
                   f"(ids 0-{d_vocab - 1}): was the table made with another tokenizer?")


def add_derived_columns(df: pd.DataFrame, *, progress: bool = True) -> pd.DataFrame:
    """Compute the ROUGE columns and `is_code` where the table lacks them (in place; returned)."""
    if not all(c in df.columns for c in ("rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix")):
        rouge_l, rouge_3 = heuristics.rouge_columns(tokens_array(df), PREFIX_LEN)
        df["rouge_L_prefix_to_suffix"] = rouge_l
        df["rouge_3_prefix_to_suffix"] = rouge_3
    if "is_code" not in df.columns:
        texts = tqdm(df["text"].tolist(), desc="is_code", disable=not progress or len(df) < 10_000)
        df["is_code"] = np.fromiter((heuristics.is_code(t) for t in texts), dtype=bool, count=len(df))
    return df


# --------------------------------------------------------------------------- sources
KINDS = {".parquet": "parquet", ".jsonl": "JSON-lines", ".json": "JSON or JSON-lines"}


def _read_table(path: Path, *, folder: Path | None = None) -> pd.DataFrame:
    """One table file, as it is. One that does not parse is a ValueError that names the file and
    what was expected; `folder`: the folder it was found in (the message says how it was chosen)."""
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"unsupported table file {path}: expected one of {', '.join(TABLE_SUFFIXES)}")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        try:
            return pd.read_json(path, lines=True)
        except ValueError:
            return pd.read_json(path)
    except (ValueError, OSError, NotImplementedError) as err:  # pandas' and pyarrow's: "position 17" alone
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a {KINDS[path.suffix]} memorization table ({first}); expected rows with "
                         f"columns {', '.join(REQUIRED)}{_found_in(folder)}") from None


def _found_in(folder: Path | None) -> str:
    if folder is None:
        return ""
    return (f" (every {'/'.join(TABLE_SUFFIXES)} file under {folder} is read as one: pass the table file, "
            f"or a folder of tables only)")


def _table_file(path: Path, *, folder: Path | None = None) -> pd.DataFrame:
    """`_read_table`, and a file with rows but without a required column is named (in a folder,
    a stray config.json would otherwise surface as a NaN sequence_id of the concatenation)."""
    df = _read_table(path, folder=folder)
    missing = [c for c in REQUIRED if c not in df.columns]
    if len(df) and missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: column {missing[0]!r} is missing{more}; a memorization table needs "
                         f"{', '.join(REQUIRED)}{_found_in(folder)}")
    return df


def _concat_dedup(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate, keep the first row of each sequence_id (pile before memories, as the paper)."""
    frames = [f for f in frames if len(f)] or frames[:1]
    df = pd.concat(frames, ignore_index=True)
    if "sequence_id" in df.columns:
        df = df.drop_duplicates(subset="sequence_id", keep="first").reset_index(drop=True)
    return df


def _table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)


def parse_published(source: str) -> tuple[str, str] | None:
    """'semantic-filters:12b-deduped' -> ('deduped', '12b'); None when `source` is not of that form."""
    m = re.fullmatch(r"(?:usvsnsp/)?semantic-filters:([\w.]+?)(?:-(duped|deduped))?", source.strip())
    if not m:
        return None
    size, scheme = m.group(1), m.group(2) or "duped"
    if size not in PYTHIA_SIZES:
        raise ValueError(f"unknown Pythia size {size!r} in {source!r}; expected one of {', '.join(PYTHIA_SIZES)}")
    return scheme, size


def published_splits(scheme: str, size: str) -> tuple[str, str]:
    """The two splits of the published dataset for a model, in concatenation order."""
    return f"pile_{scheme}_{size}", f"memories_{scheme}_{size}"


def _split_from_dir(folder: Path, split: str) -> pd.DataFrame:
    files = [p for p in _table_files(folder) if re.match(rf"{re.escape(split)}([-_.]|$)", p.stem + ".")]
    if not files:
        raise FileNotFoundError(f"no file for split {split!r} in {folder} (expected e.g. {split}.parquet or "
                                f"{split}-00000-of-00001.parquet)")
    return _concat_dedup([_table_file(p, folder=folder) for p in files])


def _split_from_hub(split: str, source: str) -> pd.DataFrame:
    hint = (f"download the {split} parquet files of https://huggingface.co/datasets/{HUB_DATASET} and pass "
            f"their folder: load_memorization_data({source!r}, local_dir=FOLDER)")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {source!r} from the hub needs the `datasets` package (pip install datasets); "
                          f"or {hint}") from None
    try:
        ds = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # offline, no such split, hub error: all end the same way for the user
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise ConnectionError(f"could not load {HUB_DATASET} split {split} from the Hugging Face hub "
                              f"({type(err).__name__}: {first}); {hint}") from None
    return ds.to_pandas()


def _testbed_table() -> pd.DataFrame:
    from mechmem.testbed import DATA_FILE

    if not Path(DATA_FILE).is_file():
        raise FileNotFoundError(f"the testbed assets are not built ({DATA_FILE} is missing); build them with "
                                f"`python -m mechmem.testbed.build`")
    return pd.read_parquet(DATA_FILE)


def load_memorization_data(source: str | os.PathLike, *, local_dir: str | os.PathLike | None = None,
                           progress: bool = True) -> pd.DataFrame:
    """A validated memorization table with the derived columns (see the module docstring).

    `source`: "testbed", "semantic-filters:{size}[-duped|-deduped]", or a parquet/JSON-lines file
    or folder. `local_dir`: read the published splits from this folder instead of the hub.
    """
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str):
        raise ValueError(f"source must be a string or path, got {type(source).__name__}")
    published = parse_published(text) if not isinstance(source, os.PathLike) else None
    if local_dir is not None and published is None:
        raise ValueError(f"local_dir only applies to published sources like 'semantic-filters:12b', not {text!r}")
    if text == "testbed":
        df = _testbed_table()
        df.attrs["greedy_model"] = "testbed"  # its greedy_suffix column was decoded by load_model("testbed")
    elif text.partition("@")[0] in PILE_NAMES:
        from mechmem.testbed import TABLE_FILE, checkpoint_folder

        folder = checkpoint_folder(text)
        df = pd.read_parquet(folder / TABLE_FILE)
        df.attrs["greedy_model"] = f"{text.partition('@')[0]}@{folder.name}"  # load_model's name for it
    elif published is not None:
        splits = published_splits(*published)
        if local_dir is not None:
            folder = Path(local_dir).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"local_dir {folder} is not a folder")
            df = _concat_dedup([_split_from_dir(folder, s) for s in splits])
        else:
            df = _concat_dedup([_split_from_hub(s, text) for s in splits])
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            files = _table_files(path)
            if not files:
                raise FileNotFoundError(f"no {'/'.join(TABLE_SUFFIXES)} files in {path}")
            df = _concat_dedup([_table_file(p, folder=path) for p in files])
        elif path.is_file():
            df = _table_file(path)
        else:
            raise FileNotFoundError(f"memorization data {text!r} not found: expected 'testbed', "
                                    f"'semantic-filters:SIZE[-deduped]', or a parquet/JSON-lines file or folder")
    df = validate(df)
    df = validate(add_derived_columns(df, progress=progress))
    df.attrs["source"] = text
    return df
