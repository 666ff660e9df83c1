"""Which model labelled a table, and relabelling it with another: one checkpoint's attention is never
read against another checkpoint's memorization labels.

A table built here names its labeller in three columns (`label_model`, `label_revision`,
`label_weights`: the name as given, the revision, `models.weights_fingerprint`). Older sources say
it otherwise: the testbed's table was labelled by `load_model("testbed")`, the published
`semantic-filters:SIZE[-deduped]` data by the final Pythia checkpoint of that size. A table that
says nothing is taken as it is (with a warning): nothing can be checked.

`check_labels` is the benchmark's gate: same model and revision -> the table as it is (its
`greedy_suffix` reused for free generation); another -> relabelled when asked (`relabel_table`:
greedy extraction with the loaded model gives `memorization_score` and `greedy_suffix`), else a
one-line ValueError pointing at `--relabel`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mechmem.data import PREFIX_LEN, parse_published, tokens_array

logger = logging.getLogger(__name__)
LABEL_COLUMNS = ("label_model", "label_revision", "label_weights")
PYTHIA_FINAL = "step143000"


@dataclass(frozen=True)
class Labeller:
    """The model (name as given to load_model) and revision whose greedy decoding labelled a table."""

    model: str
    revision: str | None = None
    weights: str | None = None

    def __str__(self) -> str:
        return self.model + (f"@{self.revision}" if self.revision else "")


def model_key(name: str | os.PathLike) -> str:
    """A model's name in one spelling: local folders by absolute path, others as given."""
    text = os.fspath(name)
    if text == "testbed":
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def revision_key(model: str, revision: str | None) -> str | None:
    """None for the default branch; Pythia's final checkpoint is its default branch."""
    if revision in (None, "", "main"):
        return None
    if "pythia" in model.lower() and revision == PYTHIA_FINAL:
        return None
    return revision


def same_labeller(a: Labeller, b: Labeller) -> bool:
    if a.weights and b.weights and a.weights == b.weights:
        return True  # the same weights under two names (a local copy of a hub checkpoint)
    return (model_key(a.model), revision_key(a.model, a.revision)) == \
        (model_key(b.model), revision_key(b.model, b.revision))


def table_labeller(df: pd.DataFrame) -> Labeller | None:
    """Who labelled `df`: its label columns, else what its source implies, else None."""
    if "label_model" in df.columns and len(df):
        models = df["label_model"].dropna().unique()
        if len(models) > 1:
            raise ValueError(f"the table mixes labels of {len(models)} models ({', '.join(map(str, models[:3]))}); "
                             "relabel it with one model (experiments/build_table.py --samples-from)")
        if len(models) == 1:
            first = df.iloc[0]
            revision = first.get("label_revision")
            weights = first.get("label_weights")
            return Labeller(str(models[0]), None if pd.isna(revision) else str(revision),
                            None if pd.isna(weights) else str(weights))
    greedy = df.attrs.get("greedy_model")  # a table shipped or built with its model's labels: "testbed",
    if isinstance(greedy, str):           # "testbed-pile@step512" (load_model's name @ revision)
        name, _, revision = greedy.partition("@")
        return Labeller(name, revision or None)
    source = df.attrs.get("source")
    published = parse_published(source) if isinstance(source, str) else None
    if published is not None:
        scheme, size = published
        return Labeller(f"EleutherAI/pythia-{size}{'-deduped' if scheme == 'deduped' else ''}")
    return None


def loaded_labeller(model, name: str | os.PathLike, revision: str | None) -> Labeller:
    """Who `load_model(name, revision=)` is: by the name it resolved to where it says one
    ("testbed-pile" loads "testbed-pile@step1680", its final checkpoint), else as asked for."""
    from mechmem.models import weights_fingerprint

    resolved = getattr(model, "mechmem_name", None)
    if isinstance(resolved, str) and "@" in resolved and revision is None:
        base, _, at = resolved.partition("@")
        if base == os.fspath(name).partition("@")[0]:
            return Labeller(base, at, weights_fingerprint(model))
    return Labeller(os.fspath(name), revision, weights_fingerprint(model))


def relabel_table(df: pd.DataFrame, model, labeller: Labeller, *, batch_size: int = 256,
                  device: str | torch.device | None = None, progress: bool = True) -> pd.DataFrame:
    """`df` with `memorization_score`, `greedy_suffix` and the label columns from `model`'s greedy
    decoding; every other column as it was. Free generation then reuses the new `greedy_suffix`."""
    from mechmem.memorization import memorization_score_and_continuation

    tokens = torch.from_numpy(tokens_array(df))
    scores, continuation = memorization_score_and_continuation(model, tokens, prefix_len=PREFIX_LEN,
                                                               batch_size=batch_size, device=device,
                                                               progress=progress)
    out = df.copy()
    out["memorization_score"] = scores
    out["greedy_suffix"] = list(continuation.numpy().astype(np.int64))
    out["label_model"] = labeller.model
    out["label_revision"] = labeller.revision
    out["label_weights"] = labeller.weights
    out.attrs = dict(df.attrs) | {"greedy_model": getattr(model, "mechmem_name", None), "relabelled": str(labeller)}
    return out


def check_labels(df: pd.DataFrame, model, name: str | os.PathLike, revision: str | None, *, relabel: bool = False,
                 batch_size: int = 256, device=None, progress: bool = True) -> pd.DataFrame:
    """The table to benchmark `model` on: `df` itself when `model` labelled it, relabelled by `model`
    when `relabel`, else ValueError (one line) naming both and the flag."""
    have = table_labeller(df)
    loaded = loaded_labeller(model, name, revision)
    if relabel:
        logger.info(f"relabelling {len(df)} samples with {loaded} (was {have or 'unknown'})")
        return relabel_table(df, model, loaded, batch_size=batch_size, device=device, progress=progress)
    if have is None:
        logger.warning(f"the table does not say which model labelled it: its labels are taken as {loaded}'s "
                       "(--relabel recomputes them)")
        return df
    if not same_labeller(have, loaded):
        raise ValueError(f"the table's memorization labels are {have}'s, the model is {loaded}: pass --relabel to "
                         f"recompute memorization_score and free generation with this model")
    if "greedy_suffix" in df.columns:
        df.attrs["greedy_model"] = getattr(model, "mechmem_name", None)  # decoded by this model: reuse it
    return df


# ------------------------------------------------------------------------------------------ models
def check_available(name: str | os.PathLike, revision: str | None = None) -> None:
    """Fail in one line, before any work, where `load_model(name, revision=)` cannot load offline:
    no testbed, a folder without config.json, a hub name (at that revision) neither cached nor
    reachable."""
    from mechmem import models
    from mechmem.testbed import PILE_NAMES, checkpoint_folder

    text = os.fspath(name)
    if text == "testbed":
        from mechmem.testbed import MODEL_DIR

        if not (MODEL_DIR / "config.json").exists():
            raise models.ModelNotFound("the testbed model is not built; build it with `python -m mechmem.testbed.build`")
        if revision is not None:
            raise models.ModelNotFound("the testbed ships only its final weights: no --revision; pass a local "
                                       "checkpoint folder as --model instead")
        return
    if text.partition("@")[0] in PILE_NAMES:  # the second testbed, by name: its checkpoint must be built
        try:
            checkpoint_folder(text, revision)
        except (FileNotFoundError, ValueError) as err:
            raise models.ModelNotFound(str(err)) from None
        return
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise models.ModelNotFound(f"{path} is not a Hugging Face model folder (no config.json)")
        if revision is not None:
            raise models.ModelNotFound(f"--revision {revision}: a local folder is one checkpoint; pass the "
                                       "checkpoint's own folder as --model")
        return
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise models.ModelNotFound(f"model {text!r} not found: not a local folder, not 'testbed', not a hub name")
    if revision is not None and text.startswith("EleutherAI/pythia") and revision not in models.PYTHIA_REVISIONS:
        raise models.ModelNotFound(f"unknown Pythia revision {revision!r}; e.g. step143000 (final)")
    if not models._in_hub_cache(text, revision) and not models._hub_reachable():
        raise models.ModelNotFound(models.not_cached(text, revision))


def model_vocab(name: str | os.PathLike, revision: str | None = None) -> int:
    """The model's vocabulary size from its config alone (offline): token ids are checked against it
    before the weights are loaded."""
    from transformers import AutoConfig

    text = os.fspath(name)
    if text == "testbed":
        from mechmem.testbed import MODEL_DIR

        text = str(MODEL_DIR)
    try:
        return int(AutoConfig.from_pretrained(text, revision=revision, local_files_only=True).vocab_size)
    except (OSError, ValueError) as err:
        raise ValueError(f"no config for {text} available offline ({str(err).splitlines()[0][:100]})") from None


def load_tokenizer(name: str | os.PathLike, revision: str | None = None):
    """The model's tokenizer (decodes `text`, tokenizes text corpora), offline; at `revision` where
    only that revision of a hub model is cached."""
    from transformers import AutoTokenizer

    text = os.fspath(name)
    if text == "testbed":
        from mechmem.testbed import MODEL_DIR

        text = str(MODEL_DIR)
    try:
        return AutoTokenizer.from_pretrained(text, revision=revision, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer for {text} available offline ({str(err).splitlines()[0][:100]})") from None
