"""Choosing and gathering what an inspection page shows: samples, their attention, CNN verdicts, maps.

`inspect_run` picks samples (a few a class, from the CNNs' held-out split when there is a run),
shows the model the tokens it was shown in training the CNNs, extracts every head's attention, and
collects from a run_alignment folder and a localization whatever they hold about each sample into
one `SampleView` per page. A missing part is noted in the view, never an error: pages say what
they lack.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from mechmem.taxonomy import PROPOSED_NAME

if TYPE_CHECKING:  # loaded lazily: inspection without a run needs no feature store
    from mechmem.features import FeatureStore

PROPOSED_TAXONOMY = PROPOSED_NAME
RANKING_COLUMNS = ("class", "layer", "head", "hook_name", "score", "rank")


@dataclass(frozen=True)
class InspectConfig:
    """Which samples to show and how much of each."""

    taxonomy: str = PROPOSED_TAXONOMY
    per_class: int = 3  # samples per class when no ids are given
    top_heads: int = 8  # ranked heads shown (and marked) per page
    decimals: int = 3  # attention values are rounded to this many decimals in the pages
    seed: int = 0
    batch_size: int = 16  # attention extraction batch


@dataclass
class SampleView:
    """Everything one page shows; None means the part is missing (the reason goes in `missing`)."""

    sequence_id: int
    tokens: list[str]  # the 64 tokens the model saw, as text
    token_ids: list[int]
    attention: Float[np.ndarray, "layer head query key"]
    prefix_len: int = 32
    taxonomy: str = PROPOSED_TAXONOMY
    class_names: list[str] = field(default_factory=list)
    label: int | None = None  # index into class_names
    memorization_score: float | None = None
    sequence_duplicates: int | None = None
    split: str | None = None  # "train" / "eval" of the CNNs that scored it, or None
    probabilities: dict[str, list[float]] | None = None  # CNN name -> per-class probability
    region_map: Float[np.ndarray, "layer query key"] | None = None  # the class's decisive regions
    region_info: str | None = None  # what the class map was averaged over
    sample_region_map: Float[np.ndarray, "layer query key"] | None = None  # the same, this sample only
    top_heads: pd.DataFrame | None = None  # localization's ranking rows for this class, best first
    original_suffix: list[str] | None = None  # when the model saw its own greedy suffix instead
    missing: list[str] = field(default_factory=list)
    model_name: str = ""

    @property
    def class_name(self) -> str | None:
        return None if self.label is None else self.class_names[self.label]

    @property
    def mean_probabilities(self) -> np.ndarray | None:
        if not self.probabilities:
            return None
        return np.mean([np.asarray(p) for p in self.probabilities.values()], axis=0)

    @property
    def predicted(self) -> str | None:
        p = self.mean_probabilities
        return None if p is None else self.class_names[int(np.argmax(p))]

    @property
    def stem(self) -> str:
        return f"sample_{self.sequence_id}"

    @property
    def rank_marks(self) -> dict[tuple[int, int], int]:
        """(layer, head) -> rank, for the heads localization ranked highest for this sample's class."""
        if self.top_heads is None:
            return {}
        return {(int(r.layer), int(r.head)): int(r.rank) for r in self.top_heads.itertuples()}


# --------------------------------------------------------------------------------------------
# Composing views from a model, a memorization table and (optionally) an alignment run
# --------------------------------------------------------------------------------------------
def token_strings(token_ids: Sequence[int], tokenizer=None) -> list[str]:
    """One string per token (`tokenizer.decode([id])`), or "<id>" where there is no tokenizer or no text."""
    if tokenizer is None:
        return [f"<{int(t)}>" for t in token_ids]
    return [tokenizer.decode([int(t)]) or f"<{int(t)}>" for t in token_ids]  # unknown ids decode to ""


def cnn_input(attention: Float[Tensor, "sample layer head query key"], pooling: str
              ) -> Float[Tensor, "sample layer query key"]:
    """What a CNN reads: heads pooled as the feature store pools them, rounded through its float16."""
    if pooling not in ("mean", "max"):
        raise ValueError(f"unknown head pooling {pooling!r}; use 'mean' or 'max'")
    return reduce(attention, "s l h q k -> s l q k", pooling).half().float()


@torch.no_grad()
def cnn_probabilities(cnns, attention: Float[Tensor, "sample layer head query key"]
                      ) -> dict[str, Float[np.ndarray, "sample class"]]:
    """Softmax output of each trained CNN (`mechmem.cnn.TrainedCNN`) on these samples."""
    attention = torch.as_tensor(attention)
    out = {}
    for trained in cnns:
        model = trained.model
        if model.n_layers != attention.shape[1] or model.seq_len != attention.shape[-1]:
            raise ValueError(
                f"CNN {trained.config.name} reads {model.n_layers} layers of {model.seq_len} tokens, "
                f"but the attention has {attention.shape[1]} layers of {attention.shape[-1]}: another model?"
            )
        device = next(model.parameters()).device
        x = cnn_input(attention, trained.config.pooling).to(device)
        out[trained.config.name] = torch.softmax(model.eval()(x), dim=-1).cpu().numpy()
    return out


def check_ranking(ranking: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RANKING_COLUMNS if c not in ranking.columns]
    if missing:
        raise ValueError(f"head ranking lacks columns {missing}; expected {list(RANKING_COLUMNS)}")
    return ranking


def heads_for_class(ranking: pd.DataFrame | None, class_names: Sequence[str], label: int, top: int
                    ) -> pd.DataFrame | None:
    """The `top` best-ranked heads of one class; the ranking's `class` may be a name or an index."""
    if ranking is None or top < 1:
        return None
    check_ranking(ranking)
    cls = ranking["class"]
    mine = ranking[(cls.astype(str) == str(class_names[label])) | (cls.astype(str) == str(label))]
    if mine.empty:
        return None
    return mine.sort_values("rank").head(top).reset_index(drop=True)


def class_map(region_maps: Mapping | None, class_names: Sequence[str], label: int) -> np.ndarray | None:
    """The decisive-region map [layer, q, k] of a class, keyed by class name or index."""
    if not region_maps:
        return None
    for key in (class_names[label], label, str(label)):
        if key in region_maps:
            return np.asarray(region_maps[key], dtype=np.float32)
    return None


def pick_samples(labels: npt.ArrayLike, sequence_ids: npt.ArrayLike, n_classes: int, per_class: int,
                 seed: int = 0, among: Sequence[int] | None = None) -> dict[int, list[int]]:
    """A few sequence ids per class (seeded), drawn from `among` (e.g. the CNNs' eval split) when given."""
    labels, ids = np.asarray(labels), np.asarray(sequence_ids)
    if among is not None:
        keep = np.isin(ids, np.asarray(among))
        labels, ids = labels[keep], ids[keep]
    rng = np.random.default_rng(seed)
    picked = {}
    for c in range(n_classes):
        pool = ids[labels == c]
        picked[c] = sorted(int(i) for i in rng.choice(pool, size=min(per_class, len(pool)), replace=False))
    return picked


def sample_views(
    attention: Float[Tensor, "sample layer head query key"],
    token_ids: np.ndarray,
    facts: pd.DataFrame,
    *,
    tokenizer=None,
    taxonomy: str = PROPOSED_TAXONOMY,
    class_names: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    cnns=None,
    ranking: pd.DataFrame | None = None,
    region_maps: Mapping | None = None,
    region_info: Mapping[str, str] | None = None,
    sample_region_maps: np.ndarray | None = None,
    splits: Mapping[int, str] | None = None,
    original_tokens: np.ndarray | None = None,
    top_heads: int = 8,
    prefix_len: int = 32,
    missing: Sequence[str] = (),
    model_name: str = "",
) -> list[SampleView]:
    """One view per row of `facts` (a frame with sequence_id, memorization_score, sequence_duplicates).

    `token_ids` are what the model saw; `original_tokens`, when given, the table's tokens: a suffix that
    differs (non-memorized samples are shown the model's own greedy continuation) is noted on the page.
    """
    attention = torch.as_tensor(attention)
    n = len(facts)
    if attention.ndim != 5 or attention.shape[0] != n or len(token_ids) != n:
        raise ValueError(f"need attention [sample, layer, head, q, k] and tokens for {n} samples, "
                         f"got {tuple(attention.shape)} and {len(token_ids)}")
    if labels is not None and not class_names:
        raise ValueError("labels were given without class_names")
    if ranking is not None:
        check_ranking(ranking)
    probs = cnn_probabilities(cnns, attention) if cnns else None
    views = []
    for i, row in enumerate(facts.itertuples(index=False)):
        sid = int(row.sequence_id)
        ids = [int(t) for t in token_ids[i]]
        label = None if labels is None else int(labels[i])
        notes = list(missing)
        view = SampleView(
            sequence_id=sid, tokens=token_strings(ids, tokenizer), token_ids=ids,
            attention=attention[i].float().numpy(), prefix_len=prefix_len, taxonomy=taxonomy,
            class_names=list(class_names), label=label,
            memorization_score=_maybe(row, "memorization_score", float),
            sequence_duplicates=_maybe(row, "sequence_duplicates", int),
            split=(splits or {}).get(sid), model_name=model_name,
            probabilities=None if probs is None else {k: v[i].tolist() for k, v in probs.items()},
        )
        if original_tokens is not None and list(map(int, original_tokens[i][prefix_len:])) != ids[prefix_len:]:
            view.original_suffix = token_strings(original_tokens[i][prefix_len:], tokenizer)
        if label is not None:
            view.region_map = class_map(region_maps, class_names, label)
            view.region_info = (region_info or {}).get(class_names[label])
            view.top_heads = heads_for_class(ranking, class_names, label, top_heads)
            if region_maps and view.region_map is None:
                notes.append(f"decisive-region map: localization has no map for class {class_names[label]!r}")
            if ranking is not None and top_heads > 0 and view.top_heads is None:
                notes.append(f"head ranking: localization ranked no heads for class {class_names[label]!r}")
        if sample_region_maps is not None:
            view.sample_region_map = np.asarray(sample_region_maps[i], dtype=np.float32)
        view.missing = notes
        views.append(view)
    return views


def _maybe(row, name, cast):
    value = getattr(row, name, None)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else cast(value)


# --------------------------------------------------------------------------------------------
# From an alignment run folder (experiments/run_alignment.py --out)
# --------------------------------------------------------------------------------------------
@dataclass
class RunOutputs:
    """What a run_alignment folder holds for one taxonomy row (any part may be absent)."""

    folder: Path
    result: dict | None = None  # rows/{slug}.json
    slug: str | None = None
    cnns: list | None = None
    store: FeatureStore | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def eval_ids(self) -> list[int] | None:
        return None if self.result is None else self.result["eval_sequence_ids"]

    def splits(self) -> dict[int, str]:
        if self.result is None:
            return {}
        out = {int(i): "train" for i in self.result.get("train_sequence_ids", [])}
        return out | {int(i): "eval" for i in self.result["eval_sequence_ids"]}


def read_run(folder: str | os.PathLike | None, taxonomy: str, model=None) -> RunOutputs:
    """The row of `taxonomy` in a run_alignment folder: its result, CNNs and feature store.

    A missing folder or part is not an error (pages say what is missing); a store made by another
    model than `model` is, since its CNNs would be judging attention they were not trained on.
    """
    from mechmem.models import model_identity
    from mechmem.run import RunFolder

    if folder is None:
        return RunOutputs(Path("."), missing=["CNN probabilities: no run_alignment folder was given"])
    folder = Path(folder)
    run = RunOutputs(folder)
    if not folder.is_dir():
        run.missing.append(f"CNN probabilities: no run_alignment output at {folder} "
                           "(make one with `python experiments/run_alignment.py`)")
        return run
    saved = RunFolder(folder)
    try:
        run.slug, run.result = saved.find_row(taxonomy, trained=False)
    except ValueError:
        run.missing.append(f"CNN probabilities: {folder} has no row for {taxonomy!r}")
    if run.slug is not None and saved.cnn_folder(run.slug).is_dir():
        run.cnns = saved.load_cnns(run.slug)
    elif run.slug is not None:
        run.missing.append(f"CNN probabilities: {saved.cnn_folder(run.slug)} is missing")
    if saved.has_features():
        run.store = saved.feature_store()
        made_by = run.store.manifest["model"]
        if model is not None and made_by.get("weights") != model_identity(model)["weights"]:
            raise ValueError(f"{folder} was made with model {made_by.get('name')!r}, not the one given "
                             f"({model_identity(model)['name']!r}): pass the run's model or another --run")
    return run


def lookup_model_view(model, df: pd.DataFrame, positions: np.ndarray, store=None) -> np.ndarray:
    """The tokens the model is shown: the run's store holds them for its samples; for any other
    non-memorized sample the suffix is the model's own greedy continuation, as alignment does it."""
    from mechmem.memorization import free_generation

    tokens = np.stack([np.asarray(t, dtype=np.int64) for t in df["tokens"].iloc[positions]])
    ids = df["sequence_id"].to_numpy()[positions]
    todo = np.ones(len(ids), dtype=bool)
    if store is not None:
        in_store = np.isin(ids, store.sequence_ids)
        if in_store.any():
            tokens[in_store] = store.tokens[store.index(ids[in_store])]
            todo &= ~in_store
    if todo.any():
        scores = df["memorization_score"].to_numpy()[positions][todo]
        tokens[todo] = np.asarray(free_generation(model, torch.from_numpy(tokens[todo]), scores))
    return tokens


def load_localization(source, taxonomy: str, class_names: Sequence[str]):
    """A `mechmem.localize.Localization` (or the folder experiments/localize.py wrote) if it is about
    this taxonomy; else None and the reason, for the pages to show."""
    from mechmem.localize import Localization

    if source is None:
        return None, ["class decisive-region map and head ranking: no localization was given "
                      "(make one with `python experiments/localize.py`)"]
    if not isinstance(source, Localization):
        if not (Path(source) / Localization.ARRAYS).is_file():
            return None, [f"class decisive-region map and head ranking: no localization at {source} "
                          "(make one with `python experiments/localize.py`)"]
        source = Localization.load(source)
    about = source.meta.get("tax_name")
    if (about is not None and about != taxonomy) or list(source.class_names) != list(class_names):
        return None, [f"class decisive-region map and head ranking: the localization given is about "
                      f"{about or source.class_names}, not {taxonomy!r}"]
    return source, []


def sample_decisive_maps(cnns, attention: Float[Tensor, "sample layer head query key"], labels: Sequence[int]
                         ) -> Float[np.ndarray, "sample layer query key"]:
    """One sample's term of localization's Delta map for its own class: the decisive region D (guided
    backprop through each CNN) times the attention, max over heads, averaged over the CNNs."""
    from mechmem.localize import decisive_region, guided_gradients, pool_heads, weighted_by_heads

    attention = torch.as_tensor(attention).float()
    origin = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    total = torch.zeros(attention.shape[0], *attention.shape[1:2], *attention.shape[3:])
    for trained in cnns:
        grads = guided_gradients(trained.model, pool_heads(attention, trained.config.pooling)).cpu()
        total += weighted_by_heads(decisive_region(grads, origin), attention)
    return (total / len(cnns)).numpy()


def inspect_run(model, df: pd.DataFrame, sequence_ids: Sequence[int] | None, cfg: InspectConfig = InspectConfig(),
                *, run_dir: str | os.PathLike | None = None, localization=None, progress: bool = False
                ) -> list[SampleView]:
    """Views of the chosen samples (default: `cfg.per_class` per class of `cfg.taxonomy`, from the CNNs'
    eval split when there is a run) with whatever the run folder and the localization provide.

    `localization` is a `mechmem.localize.Localization` or the folder experiments/localize.py wrote.
    """
    from mechmem import taxonomy as tx
    from mechmem.features import extract_attention

    tax_id, threshold = tx.parse_name(cfg.taxonomy)
    run = read_run(run_dir, cfg.taxonomy, model)
    labels_all = (_row_labels(run.result["row"], df) if run.result
                  else np.asarray(tx.assign_categories(df, tax_id, duplicates_threshold=threshold)))
    class_names = run.result["class_names"] if run.result else list(tx.class_names(tax_id, threshold))
    all_ids = df["sequence_id"].to_numpy()
    if sequence_ids is None:
        picked = pick_samples(labels_all, all_ids, len(class_names), cfg.per_class, cfg.seed, among=run.eval_ids)
        sequence_ids = [i for c in sorted(picked) for i in picked[c]]
    positions = _positions(all_ids, sequence_ids)
    labels = labels_all[positions]
    tokens = lookup_model_view(model, df, positions, run.store)
    attention = extract_attention(model, torch.from_numpy(tokens), per_head=True, batch_size=cfg.batch_size,
                                  progress=progress)
    loc, notes = load_localization(localization, cfg.taxonomy, class_names)
    info = None
    if loc is not None:
        source = f" of {loc.meta['run']}" if loc.meta.get("run") else ""
        info = {n: f"mean over the {int(loc.n_samples[c])} samples of the class that localization used and "
                   f"the CNNs {', '.join(loc.cnn_names)}{source}" for c, n in enumerate(loc.class_names)}
    if run.cnns:
        sample_maps = sample_decisive_maps(run.cnns, attention, labels)
    else:
        sample_maps = None
        notes.append("this sample's decisive-region map: needs the run's trained CNNs")
    return sample_views(
        attention, tokens, df.iloc[positions], tokenizer=getattr(model, "tokenizer", None), taxonomy=cfg.taxonomy,
        class_names=class_names, labels=labels, cnns=run.cnns,
        ranking=None if loc is None else loc.head_table(),
        region_maps=None if loc is None else {n: loc.delta[c] for c, n in enumerate(loc.class_names)},
        region_info=info, sample_region_maps=sample_maps, splits=run.splits(), top_heads=cfg.top_heads,
        original_tokens=np.stack([np.asarray(t) for t in df["tokens"].iloc[positions]]),
        missing=run.missing + notes, model_name=str(getattr(model, "mechmem_name", "")),
    )


def _row_labels(row: dict, df: pd.DataFrame) -> np.ndarray:
    from mechmem import taxonomy as tx

    return np.asarray(tx.assign_categories(df, row["tax_id"], duplicates_threshold=row["threshold"],
                                           rouge_threshold=row["rouge_threshold"], rouge=row["rouge"]))


def _positions(all_ids: np.ndarray, wanted: Sequence[int]) -> np.ndarray:
    where = {int(s): i for i, s in enumerate(all_ids)}
    absent = [int(s) for s in wanted if int(s) not in where]
    if absent:
        raise ValueError(f"sequence_id {absent[0]} is not in the memorization data ({len(absent)} ids absent)")
    if not len(wanted):
        raise ValueError("no samples to inspect")
    return np.array([where[int(s)] for s in wanted])
