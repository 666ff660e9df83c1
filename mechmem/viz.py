"""Inspection pages: look at a sample's attention before believing a number about it.

Per sample, one HTML page shows the 64 tokens (prefix | suffix), every head's attention pattern as
circuitsvis views, the sample's memorization facts and taxonomy class, what the trained CNNs
predict for it, and its class's decisive-region map with the heads localization ranked highest.
An index page lists the samples by class. A matplotlib grid per sample (layers x heads, the paper's
way of laying out attention) sits beside each page for reports.

Pages are self-contained and offline: circuitsvis's browser bundle, shipped in its wheel as
`dist/cdn/iife.js`, is inlined once per page. circuitsvis's own `render()` is not used: it inlines
the 1.3 MB bundle once per view, and its notebook path probes google.com to pick the CDN.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from mechmem.hooks import pattern_hook

PROPOSED_TAXONOMY = "Non-Memo, Guess, Others"
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


# ============================================================================================
# Composing views from a model, a memorization table and (optionally) an alignment run
# ============================================================================================
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


def pick_samples(labels: Sequence[int], sequence_ids: Sequence[int], n_classes: int, per_class: int,
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
    store: object | None = None  # FeatureStore
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
    from mechmem.cnn import load_cnns
    from mechmem.features import FeatureStore
    from mechmem.models import model_identity

    if folder is None:
        return RunOutputs(Path("."), missing=["CNN probabilities: no run_alignment folder was given"])
    folder = Path(folder)
    run = RunOutputs(folder)
    if not folder.is_dir():
        run.missing.append(f"CNN probabilities: no run_alignment output at {folder} "
                           "(make one with `python experiments/run_alignment.py`)")
        return run
    for path in sorted((folder / "rows").glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("tax_name") == taxonomy:
            run.result, run.slug = result, path.stem
            break
    if run.result is None:
        run.missing.append(f"CNN probabilities: {folder} has no row for {taxonomy!r}")
    elif (folder / "cnns" / run.slug).is_dir():
        run.cnns = load_cnns(folder / "cnns" / run.slug)
    else:
        run.missing.append(f"CNN probabilities: {folder / 'cnns' / run.slug} is missing")
    if (folder / "features" / "manifest.json").exists():
        run.store = FeatureStore.load(folder / "features")
        made_by = run.store.manifest["model"]
        if model is not None and made_by.get("weights") != model_identity(model)["weights"]:
            raise ValueError(f"{folder} was made with model {made_by.get('name')!r}, not the one given "
                             f"({model_identity(model)['name']!r}): pass the run's model or another --run")
    return run


def model_view_tokens(model, df: pd.DataFrame, positions: np.ndarray, store=None) -> np.ndarray:
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
    tokens = model_view_tokens(model, df, positions, run.store)
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


# ============================================================================================
# HTML
# ============================================================================================
@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle, made safe to inline in a <script> element."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(f"circuitsvis ships no browser bundle at {path}; reinstall circuitsvis>=1.43")
    js = path.read_text(encoding="utf-8")
    # "</script" or "<!--" inside the code would end or confuse the element; \x3C is "<" in strings and regexes.
    return re.sub(r"<(/script|!--)", r"\\x3C\1", js, flags=re.IGNORECASE)


def _js(obj) -> str:
    """JSON that is safe inside <script>: '<' only occurs within strings, where \\u003c is the same."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def _num_array(a: np.ndarray, decimals: int) -> str:
    """A nested JSON array with `decimals` places and no trailing zeros (the page's bulk)."""
    a = np.round(np.asarray(a, dtype=np.float64), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    if not np.isfinite(a).all():
        raise ValueError("cannot show non-finite values (nan or inf) in an attention view")
    flat = [f"{v:.{decimals}f}".rstrip("0").rstrip(".") for v in a.ravel().tolist()]

    def nest(lo: int, dims: tuple[int, ...]) -> str:
        if len(dims) == 1:
            return "[" + ",".join(flat[lo:lo + dims[0]]) + "]"
        step = math.prod(dims[1:])
        return "[" + ",".join(nest(lo + i * step, dims[1:]) for i in range(dims[0])) + "]"

    return nest(0, a.shape)


def _visible(token: str) -> str:
    """A token as an axis label: newlines and tabs escaped, a blank token shown as ␣ (∅ when empty)."""
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    return token if token.strip() else "␣" * len(token) or "∅"


def _inline(token: str) -> str:
    """A token on one line of text: newlines as ↵, tabs as ⇥, an empty token as ∅."""
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _rank_marks(view: SampleView) -> dict[tuple[int, int], int]:
    if view.top_heads is None:
        return {}
    return {(int(r.layer), int(r.head)): int(r.rank) for r in view.top_heads.itertuples()}


class _Page:
    """Collects the circuitsvis views of one page: containers in the body, render calls at the end."""

    def __init__(self, decimals: int):
        self.decimals, self.calls = decimals, []

    def view(self, view_id: str, component: str, attention: np.ndarray, tokens: list[str], *, kind: str,
             **props) -> str:
        props = {"tokens": tokens, "maskUpperTri": True} | {k: v for k, v in props.items() if v is not None}
        props_js = _js(props)[:-1] + f',"attention":{_num_array(attention, self.decimals)}}}'  # the bulk, compact
        self.calls.append(f"{_js(view_id)}:[{_js(component)},{props_js}]")
        return (f'<div class="cv-view" id="{view_id}" data-kind="{kind}"><p class="placeholder">Not drawn yet: '
                f'a view draws when scrolled into sight (this page needs JavaScript).</p></div>')

    def script(self) -> str:
        return (f"<script>{circuitsvis_bundle()}</script>\n<script>\n"
                "const VIEWS = {\n" + ",\n".join(self.calls) + "\n};\n" + _RENDER_JS + "</script>")


# Views draw when they come near the screen: a chart of 64 x 64 cells costs the browser ~0.5 s, and
# a large model's page holds thousands of them. `mechmemDrawAll()` (the "draw all" button) forces it.
_RENDER_JS = """
function draw(id) {
  const el = document.getElementById(id);
  if (el.dataset.rendered) return;
  const [component, props] = VIEWS[id];
  try { CircuitsVis.render(id, CircuitsVis[component], props); el.dataset.rendered = "1"; }
  catch (err) { el.textContent = "circuitsvis could not draw this view: " + err; el.dataset.rendered = "error"; }
}
window.mechmemDrawAll = () => Object.keys(VIEWS).forEach(draw);
if ("IntersectionObserver" in window) {
  const near = new IntersectionObserver((entries) => entries.forEach((e) => {
    if (e.isIntersecting) { near.unobserve(e.target); draw(e.target.id); }
  }), {rootMargin: "800px 0px"});
  Object.keys(VIEWS).forEach((id) => near.observe(document.getElementById(id)));
} else mechmemDrawAll();
"""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em auto;max-width:1100px;padding:0 1em;
  color:#222}
h1{font-size:1.35em} h2{font-size:1.1em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0} td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums}
.tok{display:inline-block;white-space:pre;font-family:ui-monospace,monospace;font-size:.9em;margin:1px;padding:0 2px;
  border-radius:3px}
.prefix{background:#dbeafe} .suffix{background:#ffedd5} .greedy{outline:1px dashed #c2410c}
.bar{display:inline-block;height:.8em;background:#2563eb;vertical-align:middle}
.pred{font-weight:bold} .missing{color:#92400e;background:#fffbeb;border:1px solid #fcd34d;padding:.5em 1em}
.ranked{color:#b91c1c;font-weight:bold} .placeholder{color:#888} small{color:#666}
.cv-view:not([data-rendered]){min-height:850px}
a{color:#1d4ed8}
"""


def _head(title: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n")


def _fmt(value, spec: str = "") -> str:
    return "—" if value is None else html.escape(format(value, spec))


def _facts_html(v: SampleView) -> str:
    rows = [
        ("sequence_id", _fmt(v.sequence_id)),
        ("memorization score", _fmt(v.memorization_score, ".3f") + " <small>(fraction of the 32 suffix tokens "
                                                                  "greedy decoding reproduces)</small>"),
        ("duplicates in the training data", _fmt(v.sequence_duplicates)),
        (f"class in <i>{html.escape(v.taxonomy)}</i>", f"<b>{_fmt(v.class_name)}</b>"),
        ("CNN split", _fmt(v.split) + (" <small>(held out: the CNNs never trained on it)</small>"
                                       if v.split == "eval" else "")),
        ("model", _fmt(v.model_name or None)),
    ]
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{val}</td></tr>" for k, val in rows) + "</table>"


def _probabilities_html(v: SampleView) -> str:
    if not v.probabilities:
        return "<p class='placeholder'>No CNN predictions (see “missing” below).</p>"
    mean = v.mean_probabilities
    best = int(np.argmax(mean))
    head = "".join(f"<th>{html.escape(c)}{' ✓' if i == v.label else ''}</th>" for i, c in enumerate(v.class_names))
    rows = []
    for name, probs in [*v.probabilities.items(), ("mean over CNNs", mean)]:
        cells = "".join(
            f"<td class='num{' pred' if name.startswith('mean') and i == best else ''}'>{p:.3f} "
            f"<span class='bar' style='width:{60 * p:.0f}px'></span></td>" for i, p in enumerate(probs))
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    verdict = "right" if best == v.label else "wrong"
    return (f"<table><tr><th>CNN</th>{head}</tr>{''.join(rows)}</table>"
            f"<p>Predicted <b>{html.escape(v.class_names[best])}</b> ({verdict}; ✓ marks the true class).</p>")


def _tokens_html(v: SampleView) -> str:
    def spans(tokens, start, cls):
        return "".join(f'<span class="tok {cls}" title="position {start + i}, id {v.token_ids[start + i]}">'
                       f"{html.escape(_inline(t))}</span>" for i, t in enumerate(tokens))

    greedy = " greedy" if v.original_suffix is not None else ""
    out = (f"<p><span class='tok prefix'>prefix</span> tokens 0–{v.prefix_len - 1}, "
           f"<span class='tok suffix'>suffix</span> tokens {v.prefix_len}–{len(v.tokens) - 1}. "
           "Hover a token for its position and id.</p>"
           f"<div>{spans(v.tokens[:v.prefix_len], 0, 'prefix')}<b> ‖ </b>"
           f"{spans(v.tokens[v.prefix_len:], v.prefix_len, 'suffix' + greedy)}</div>")
    if v.original_suffix is not None:
        original = "".join(f"<span class='tok'>{html.escape(_inline(t))}</span>" for t in v.original_suffix)
        out += ("<p><small>Not memorized: as in training the CNNs, the suffix shown (dashed) and fed to the model "
                "is the model's own greedy continuation of the prefix. The data's suffix was:</small></p>"
                f"<div>{original}</div>")
    return out


def _ranking_html(v: SampleView) -> str:
    t = v.top_heads
    has_ci = {"ci_low", "ci_high"} <= set(t.columns)

    def ci(r) -> str:
        return f"<td class='num'>[{float(r.ci_low):.3g}, {float(r.ci_high):.3g}]</td>" if has_ci else ""

    rows = "".join(f"<tr><td class='num'>{int(r.rank)}</td><td>{head_label(int(r.layer), int(r.head))}</td>"
                   f"<td><code>{html.escape(str(r.hook_name))}</code>, head {int(r.head)}</td>"
                   f"<td class='num'>{float(r.score):.3g}</td>{ci(r)}</tr>" for r in t.itertuples())
    return ("<table><tr><th>rank</th><th>head</th><th>hook</th><th>score</th>"
            + ("<th>95% interval</th>" if has_ci else "") + f"</tr>{rows}</table>")


def _regions_html(v: SampleView, page: _Page, tokens: list[str]) -> list[str]:
    n_layers, n_heads = v.attention.shape[:2]
    parts = [f"<h2 id='regions'>Decisive regions for class {_fmt(v.class_name)}</h2>"]
    maps = [("class", "The class's map", v.region_info or "mean over the class's samples", v.region_map),
            ("sample", "This sample's map", "its own term of the class map, through the run's CNNs",
             v.sample_region_map)]
    if all(m is None for *_, m in maps):
        parts.append("<p class='placeholder'>No decisive-region map (see “missing” below).</p>")
    else:
        parts.append("<p>Where attention decides for this class, one panel per layer: localization's guided-"
                     "backpropagation region D (what pushes the CNNs to this class rather than the others) times "
                     "the attention pattern, max over heads. A panel's sum says how much its layer matters.</p>")
    for key, name, about, m in maps:
        if m is None:
            continue
        sums = m.reshape(m.shape[0], -1).sum(1)
        parts.append(f"<h3>{name} <small>({html.escape(about)})</small></h3><p><small>layer sums: "
                     + ", ".join(f"L{l} {s:.3g}" for l, s in enumerate(sums)) + "</small></p>")
        parts.append(page.view(f"regions-{key}", "AttentionHeads", m, tokens, kind=f"regions-{key}",
                               attentionHeadNames=[f"layer {l}" for l in range(m.shape[0])],
                               maxValue=float(m.max()) or 1.0, minValue=0.0))
    if v.top_heads is not None:
        ranked = [(int(r.layer), int(r.head), int(r.rank)) for r in v.top_heads.itertuples()
                  if int(r.layer) < n_layers and int(r.head) < n_heads]
        parts.append(f"<h3 id='ranked-heads'>Heads localization ranks highest for {_fmt(v.class_name)}</h3>"
                     "<p><small>score: the share of a sample's decisive region that the head's attention covers, "
                     "mean over the class's samples.</small></p>" + _ranking_html(v)
                     + "<p>This sample's patterns at those heads, best first:</p>")
        parts.append(page.view("top-heads", "AttentionHeads", np.stack([v.attention[l, h] for l, h, _ in ranked]),
                               tokens, kind="top-heads",
                               attentionHeadNames=[f"#{r} {head_label(l, h)}" for l, h, r in ranked]))
    return parts


def sample_page(v: SampleView, *, decimals: int = 3, index_href: str | None = "index.html") -> str:
    """The HTML of one sample's page (self-contained: the circuitsvis bundle is inlined)."""
    n_layers, n_heads = v.attention.shape[:2]
    page = _Page(decimals)
    tokens = [_visible(t) for t in v.tokens]
    marks = _rank_marks(v)
    parts = [_head(f"mechmem · sample {v.sequence_id} · {v.class_name or 'unlabelled'}")]
    if index_href:
        parts.append(f'<p><a href="{html.escape(index_href)}">← all samples</a></p>')
    parts += [f"<h1>Sample {v.sequence_id}: <span class='pred'>{_fmt(v.class_name)}</span></h1>",
              "<p><small>On this page: <a href='#cnn'>CNN predictions</a> · <a href='#tokens'>tokens</a> · "
              "<a href='#regions'>decisive regions and top heads</a> · <a href='#attention'>attention by layer "
              "and head</a>" + (" · <a href='#missing'>missing</a>" if v.missing else "") + "</small></p>",
              _facts_html(v), "<h2 id='cnn'>CNN predicted probabilities</h2>", _probabilities_html(v),
              "<h2 id='tokens'>The 64 tokens</h2>", _tokens_html(v), *_regions_html(v, page, tokens)]

    parts.append(f"<h2 id='attention'>Attention patterns: {n_layers} layers × {n_heads} heads</h2>"
                 "<p>Hover a head to view it, click to lock. Rows are query (destination) tokens, columns "
                 "the key (source) tokens they attend to. "
                 + ("<span class='ranked'>★#r</span> marks the heads localization ranked highest for this class. "
                    if marks else "") + "Views draw as they scroll into sight; "
                 "<button type='button' onclick='mechmemDrawAll()'>draw all now</button></p>")
    for layer in range(n_layers):
        names = [head_label(layer, h) + (f" ★#{marks[(layer, h)]}" if (layer, h) in marks else "")
                 for h in range(n_heads)]
        ranked_here = ", ".join(n for n in names if "★" in n)
        parts.append(f"<h3>Layer {layer} <small><code>{html.escape(pattern_hook(layer))}</code></small>"
                     + (f" <span class='ranked'>{html.escape(ranked_here)}</span>" if ranked_here else "") + "</h3>")
        parts.append(page.view(f"attn-l{layer}", "AttentionHeads", v.attention[layer], tokens, kind="attention",
                               attentionHeadNames=names))

    if v.missing:
        parts.append("<h2 id='missing'>Missing on this page</h2><ul class='missing'>"
                     + "".join(f"<li>{html.escape(m)}</li>" for m in v.missing) + "</ul>")
    parts.append(f'<p><small>Figure for reports: <a href="{v.stem}.png">{v.stem}.png</a></small></p>')
    parts.append(page.script())
    parts.append("</body></html>\n")
    return "\n".join(parts)


def index_page(views: Sequence[SampleView], *, title: str = "mechmem · inspected samples",
               notes: Sequence[str] = ()) -> str:
    """Samples grouped by class, each linking to its page."""
    parts = [_head(title), f"<h1>{html.escape(title)}</h1>"]
    if views:
        parts.append(f"<p>Taxonomy <i>{html.escape(views[0].taxonomy)}</i>; model {_fmt(views[0].model_name or None)}."
                     " Each page opens offline, from disk.</p>")
    order = list(dict.fromkeys(views[0].class_names)) if views and views[0].class_names else []
    groups: dict[str, list[SampleView]] = {c: [] for c in order}
    for v in views:
        groups.setdefault(v.class_name or "unlabelled", []).append(v)
    for cls, members in groups.items():
        parts.append(f"<h2 id='class-{html.escape(cls)}'>{html.escape(cls)} ({len(members)})</h2>")
        if not members:
            parts.append("<p class='placeholder'>No sample of this class was inspected.</p>")
            continue
        rows = []
        for v in members:
            p = v.mean_probabilities
            pred = "—" if p is None else f"{html.escape(v.predicted)} ({p.max():.2f})"
            text = html.escape("".join(v.tokens)[:90])
            rows.append(f"<tr><td><a href='{v.stem}.html'>{v.sequence_id}</a></td>"
                        f"<td class='num'>{_fmt(v.memorization_score, '.3f')}</td>"
                        f"<td class='num'>{_fmt(v.sequence_duplicates)}</td><td>{_fmt(v.split)}</td>"
                        f"<td>{pred}</td><td><small>{text}</small></td></tr>")
        parts.append("<table><tr><th>sequence_id</th><th>memorization score</th><th>duplicates</th>"
                     "<th>CNN split</th><th>CNN prediction</th><th>text</th></tr>" + "".join(rows) + "</table>")
    notes = list(dict.fromkeys([*notes, *(m for v in views for m in v.missing)]))
    if notes:
        parts.append("<h2>Missing</h2><ul class='missing'>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ============================================================================================
# Matplotlib: the attention grid for reports
# ============================================================================================
def attention_grid_png(v: SampleView, path: str | os.PathLike, *, gamma: float = 0.5) -> Path:
    """Layers as rows, heads as columns (then the class's decisive regions), prefix/suffix split dashed,
    localization's top heads framed in red. A power norm keeps the first-token sink from hiding the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    n_layers, n_heads, seq, _ = v.attention.shape
    region = v.sample_region_map if v.sample_region_map is not None else v.region_map
    region_of = "this sample" if v.sample_region_map is not None else "class mean"
    cols = n_heads + (region is not None)
    fig, axes = plt.subplots(n_layers, cols, figsize=(1.15 * cols + 0.6, 1.15 * n_layers + 0.9), squeeze=False)
    marks = _rank_marks(v)
    norm = PowerNorm(gamma, vmin=0.0, vmax=1.0)
    for l in range(n_layers):
        for c in range(cols):
            ax = axes[l, c]
            if c < n_heads:
                ax.imshow(v.attention[l, c], cmap="Blues", norm=norm, interpolation="nearest")
                if (l, c) in marks:
                    for side in ax.spines.values():
                        side.set(color="tab:red", linewidth=2.5)
                    ax.text(seq - 2, 2, f"#{marks[(l, c)]}", color="tab:red", ha="right", va="top", fontsize=7)
            else:
                ax.imshow(region[l], cmap="Reds", vmin=0, vmax=float(region.max()) or 1.0, interpolation="nearest")
            ax.axhline(v.prefix_len - 0.5, color="tab:orange", lw=0.6, ls="--")
            ax.axvline(v.prefix_len - 0.5, color="tab:orange", lw=0.6, ls="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if l == 0:
                ax.set_title(f"head {c}" if c < n_heads else f"decisive regions\n({region_of})", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    facts = f"score {_fmt(v.memorization_score, '.2f')}, duplicates {_fmt(v.sequence_duplicates)}"
    pred = f", CNN: {v.predicted} ({v.mean_probabilities.max():.2f})" if v.probabilities else ""
    fig.suptitle(f"sample {v.sequence_id} · {v.class_name or 'unlabelled'} · {facts}{pred}", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.75 / fig.get_figheight(),
                        wspace=0.06, hspace=0.06)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_pages(views: Sequence[SampleView], out: str | os.PathLike, *, decimals: int = 3, pngs: bool = True,
                notes: Sequence[str] = (), title: str = "mechmem · inspected samples") -> Path:
    """index.html, sample_{id}.html (and sample_{id}.png) in `out`; returns the index page's path."""
    if not views:
        raise ValueError("no samples to write pages for")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for v in views:
        (out / f"{v.stem}.html").write_text(sample_page(v, decimals=decimals), encoding="utf-8")
        if pngs:
            attention_grid_png(v, out / f"{v.stem}.png")
    summary = pd.DataFrame([{"sequence_id": v.sequence_id, "class": v.class_name, "memorization_score":
                             v.memorization_score, "sequence_duplicates": v.sequence_duplicates, "split": v.split,
                             "predicted": v.predicted, "page": f"{v.stem}.html"} for v in views])
    summary.to_csv(out / "samples.csv", index=False)
    (out / "index.html").write_text(index_page(views, title=title, notes=notes), encoding="utf-8")
    return out / "index.html"


# ============================================================================================
# Headless chromium: screenshots, and proof that a page renders with no network
# ============================================================================================
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")


def find_chromium() -> str:
    """The chromium binary ($MECHMEM_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH)."""
    import shutil

    for name in (os.environ.get("MECHMEM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    raise FileNotFoundError("no chromium found: install it (`apt-get install chromium`) or set MECHMEM_CHROMIUM")


class Chromium:
    """Headless chromium with the network unplugged, driven over the DevTools protocol on a pipe.

    Every request goes to a dead local proxy, so a page that needs the network shows it. The pipe
    (fds 3 and 4, NUL-separated JSON) needs no websocket library; waiting is in real time, since
    chromium's virtual time replays every animation frame of circuitsvis's charts (30 s a page).
    `net_log` also records every request at the network layer, for `offsite_requests`.
    """

    def __init__(self, *, window: tuple[int, int] = (1280, 2000), net_log: str | os.PathLike | None = None,
                 timeout: float = 60):
        import fcntl
        import subprocess
        import sys
        import tempfile

        self.timeout, self.events, self._id, self._buffer = timeout, [], 0, b""
        self._profile = tempfile.TemporaryDirectory(prefix="mechmem-chromium-")
        self._stderr = tempfile.TemporaryFile()
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--hide-scrollbars", "--remote-debugging-pipe",
               # a headless tab counts as hidden: without these it may stop producing frames, and
               # views (drawn when an IntersectionObserver sees them) would never draw
               "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
               "--disable-background-timer-throttling",
               f"--user-data-dir={self._profile.name}", "--proxy-server=127.0.0.1:9",
               "--proxy-bypass-list=<-loopback>", f"--window-size={window[0]},{window[1]}"]
        if net_log is not None:
            cmd.append(f"--log-net-log={Path(net_log).resolve()}")
        to_chrome, self._to = os.pipe()
        self._from, from_chrome = os.pipe()
        # The child's ends go on fds 3 (commands in) and 4 (replies out) through a small Python
        # trampoline (a preexec_fn is unsafe with torch's threads). They first move above fd 4 so
        # that placing one cannot clobber the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (to_chrome, from_chrome)]
        for fd in (to_chrome, from_chrome):
            os.close(fd)
        trampoline = ("import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); "
                      "os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, *map(str, ends), *cmd, "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, pass_fds=ends)
        for fd in ends:
            os.close(fd)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stderr.close()
        self._profile.cleanup()

    def _message(self, deadline: float) -> dict:
        import select
        import time

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise RuntimeError("chromium did not answer in time")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                self._stderr.seek(0)
                tail = " | ".join(self._stderr.read().decode(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"chromium exited ({self.proc.poll()}): {tail}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """One DevTools command; events that arrive meanwhile are kept in `self.events`."""
        import time

        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._message(deadline)
            if reply.get("id") != self._id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"chromium {method}: {reply['error'].get('message')}")
            else:
                return reply.get("result", {})

    def open(self, page: str | os.PathLike) -> str:
        """Load a page from disk in a new tab; returns the tab's session once its load event fired."""
        import time

        path = Path(page).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no page at {path}")
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.bringToFront", session=session)  # a background tab gets no frames: nothing would draw
        self.send("Page.navigate", {"url": path.as_uri()}, session)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                      for e in self.events):
            self.events.append(self._message(deadline))
        return session

    def evaluate(self, session: str, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session, timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, session: str, path: str | os.PathLike, *, full_page: bool = False) -> Path:
        import base64

        params = {"format": "png"}
        if full_page:
            size = self.evaluate(session, "[document.documentElement.scrollWidth, "
                                          "document.documentElement.scrollHeight]")
            params |= {"captureBeyondViewport": True,
                       "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}}
        data = self.send("Page.captureScreenshot", params, session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def requests(self, session: str) -> list[str]:
        """Every URL the tab asked for (its own page included)."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]


# The views' report: per circuitsvis container, its canvases and how many of their pixels carry
# colour (drawn attention cells; the masked triangle is grey, the background white).
_VIEWS_REPORT_JS = """
(() => {
  const coloured = (canvas) => {
    const ctx = canvas.width && canvas.height ? canvas.getContext("2d") : null;
    if (!ctx) return 0;
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4)
      if (d[i + 3] > 0 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) n++;
    return n;
  };
  return [...document.querySelectorAll(".cv-view")].map((el) => ({
    id: el.id, kind: el.dataset.kind, rendered: el.dataset.rendered || "",
    canvases: el.querySelectorAll("canvas").length,
    coloured: [...el.querySelectorAll("canvas")].reduce((n, c) => n + coloured(c), 0),
  }));
})()"""


@dataclass
class PageCheck:
    """What a page did in a browser with no network."""

    views: list[dict]  # per circuitsvis view: id, kind, rendered ("1" / "error" / ""), canvases, coloured pixels
    requests: list[str]  # every URL the page requested, itself included
    offsite: list[str]  # those that would leave the machine

    @property
    def drawn(self) -> bool:
        return bool(self.views) and all(v["rendered"] == "1" and v["coloured"] > 0 for v in self.views)


def check_page(page: str | os.PathLike, *, screenshot: str | os.PathLike | None = None, full_page: bool = False,
               window: tuple[int, int] = (1280, 2000), wait_s: float = 20, net_log: str | os.PathLike | None = None
               ) -> PageCheck:
    """Open a page offline in headless chromium, wait (up to `wait_s`) until its attention views have
    drawn, and report them with every request it made; optionally save a screenshot."""
    wait_ms = int(wait_s * 1000)
    with Chromium(window=window, net_log=net_log, timeout=wait_s + 60) as browser:
        session = browser.open(page)
        # Scroll to each view as a reader would (views draw on sight), wait until it has drawn.
        views = browser.evaluate(session, f"""(async () => {{
            const t0 = performance.now();
            const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
            for (const el of document.querySelectorAll(".cv-view")) {{
              // again and again: views above it that draw meanwhile grow and push it out of sight
              while (!el.dataset.rendered && performance.now() - t0 < {wait_ms}) {{
                el.scrollIntoView();
                await sleep(100);
              }}
            }}
            let before = "";
            for (;;) {{  // until every view has painted and two looks 300 ms apart agree
              const views = {_VIEWS_REPORT_JS};
              const now = JSON.stringify(views);
              const painted = views.every((v) => v.rendered === "error" || (v.canvases > 0 && v.coloured > 0));
              if ((painted && now === before) || performance.now() - t0 > {wait_ms}) return views;
              before = now;
              await sleep(300);
            }}
          }})()""", timeout=wait_s + 30)
        if screenshot is not None:
            browser.evaluate(session, "window.scrollTo(0, 0); new Promise((r) => setTimeout(r, 1500))")
            browser.screenshot(session, screenshot, full_page=full_page)
        requests = browser.requests(session)
    offsite = {u for u in requests if not u.startswith(LOCAL_SCHEMES)}
    if net_log is not None:
        offsite |= set(offsite_requests(net_log))
    return PageCheck(views, requests, sorted(offsite))


def offsite_requests(net_log: str | os.PathLike) -> list[str]:
    """URLs the page asked for that are not on this machine, from a chromium `--log-net-log` file.

    Requests chromium makes for itself (update checks, sign-in probes) carry no initiator and are
    not the page's doing; every request a page makes carries its origin ("null" for file://) and
    the page's site in its network isolation key.
    """
    text = Path(net_log).read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # chromium killed before closing the file
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if names.get(event["type"]) != "URL_REQUEST_START_JOB" or "url" not in params:
            continue
        browsers_own = params.get("initiator") == "not an origin" and "file://" not in params.get(
            "network_isolation_key", "")
        if not browsers_own and not params["url"].startswith(LOCAL_SCHEMES):
            urls.append(params["url"])
    return sorted(set(urls))
