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
    """One string per token (`tokenizer.decode([id])`), or "<id>" when there is no tokenizer."""
    if tokenizer is None:
        return [f"<{int(t)}>" for t in token_ids]
    return [tokenizer.decode([int(t)]) for t in token_ids]


def pool_heads(attention: Float[Tensor, "sample layer head query key"], pooling: str
               ) -> Float[Tensor, "sample layer query key"]:
    """The CNN's input: heads pooled as the feature store pools them, rounded through float16 as stored."""
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
        x = pool_heads(attention, trained.config.pooling).to(device)
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
    if ranking is None:
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
            view.top_heads = heads_for_class(ranking, class_names, label, top_heads)
            if region_maps and view.region_map is None:
                notes.append(f"decisive-region map: localization has no map for class {class_names[label]!r}")
            if ranking is not None and view.top_heads is None:
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


def model_view_tokens(model, df: pd.DataFrame, positions: np.ndarray, store=None) -> tuple[np.ndarray, list[str]]:
    """The tokens the model is shown (greedy suffix for non-memorized samples), from the run's store
    when it holds the sample, else computed as alignment computes them."""
    tokens = np.stack([np.asarray(t, dtype=np.int64) for t in df["tokens"].iloc[positions]])
    notes = []
    ids = df["sequence_id"].to_numpy()[positions]
    todo = np.ones(len(ids), dtype=bool)
    if store is not None:
        in_store = np.isin(ids, store.sequence_ids)
        if in_store.any():
            tokens[in_store] = store.tokens[store.index(ids[in_store])]
            todo &= ~in_store
    needs_greedy = todo & (df["memorization_score"].to_numpy()[positions] < 1)
    if needs_greedy.any():
        try:
            from mechmem.alignment import model_view_tokens as greedy_view
        except ImportError as err:  # mechmem.memorization not there: show the table's tokens, say so
            notes.append(f"model view: shown with the table's suffix, not the model's greedy one ({err})")
        else:
            tokens[needs_greedy] = greedy_view(model, df, positions[needs_greedy])
    return tokens, notes


def localization_for(run: RunOutputs, ranking: pd.DataFrame | None, region_maps: Mapping | None
                     ) -> tuple[pd.DataFrame | None, Mapping | None, list[str]]:
    """Localization outputs: the ones given, else what mechmem.localize wrote into the run folder."""
    notes = []
    if ranking is None or region_maps is None:
        found_ranking, found_maps = _read_localization(run)
        ranking = ranking if ranking is not None else found_ranking
        region_maps = region_maps if region_maps is not None else found_maps
    if ranking is None:
        notes.append("head ranking: no localization output was given or found in the run folder")
    if region_maps is None:
        notes.append("decisive-region map: no localization output was given or found in the run folder")
    return ranking, region_maps, notes


def _read_localization(run: RunOutputs) -> tuple[pd.DataFrame | None, dict | None]:
    """`localization/{slug}/head_ranking.csv` and `region_maps.npz` (one array per class name)."""
    if run.slug is None:
        return None, None
    folder = run.folder / "localization" / run.slug
    ranking = pd.read_csv(folder / "head_ranking.csv") if (folder / "head_ranking.csv").exists() else None
    maps = None
    if (folder / "region_maps.npz").exists():
        with np.load(folder / "region_maps.npz") as npz:
            maps = {k: npz[k] for k in npz.files}
    return ranking, maps


def inspect_run(model, df: pd.DataFrame, sequence_ids: Sequence[int] | None, cfg: InspectConfig = InspectConfig(),
                *, run_dir: str | os.PathLike | None = None, ranking: pd.DataFrame | None = None,
                region_maps: Mapping | None = None, progress: bool = False) -> list[SampleView]:
    """Views of the chosen samples (default: `cfg.per_class` per class of `cfg.taxonomy`, taken from the
    run's eval split when there is a run) with everything the run and localization provide."""
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
    tokens, notes = model_view_tokens(model, df, positions, run.store)
    attention = extract_attention(model, torch.from_numpy(tokens), per_head=True, batch_size=cfg.batch_size,
                                  progress=progress)
    ranking, region_maps, loc_notes = localization_for(run, ranking, region_maps)
    return sample_views(
        attention, tokens, df.iloc[positions], tokenizer=getattr(model, "tokenizer", None), taxonomy=cfg.taxonomy,
        class_names=class_names, labels=labels_all[positions], cnns=run.cnns, ranking=ranking,
        region_maps=region_maps, splits=run.splits(), top_heads=cfg.top_heads,
        original_tokens=np.stack([np.asarray(t) for t in df["tokens"].iloc[positions]]),
        missing=run.missing + notes + loc_notes, model_name=str(getattr(model, "mechmem_name", "")),
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
        call = f"[{_js(view_id)},{_js(component)},{_js(props)[:-1]},\"attention\":{_num_array(attention, self.decimals)}}}]"
        self.calls.append(call)
        return (f'<div class="cv-view" id="{view_id}" data-kind="{kind}">'
                f'<p class="placeholder">Attention view not drawn: this page needs JavaScript.</p></div>')

    def script(self) -> str:
        return (f"<script>{circuitsvis_bundle()}</script>\n<script>\n"
                "const VIEWS = [\n" + ",\n".join(self.calls) + "\n];\n" + _RENDER_JS + "</script>")


_RENDER_JS = """
for (const [id, component, props] of VIEWS) {
  const el = document.getElementById(id);
  try { CircuitsVis.render(id, CircuitsVis[component], props); el.dataset.rendered = "1"; }
  catch (err) { el.textContent = "circuitsvis could not draw this view: " + err; el.dataset.rendered = "error"; }
}
"""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.35em} h2{font-size:1.1em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0} td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums}
.tok{display:inline-block;white-space:pre;font-family:ui-monospace,monospace;font-size:.9em;margin:1px;padding:0 2px;border-radius:3px}
.prefix{background:#dbeafe} .suffix{background:#ffedd5} .greedy{outline:1px dashed #c2410c}
.bar{display:inline-block;height:.8em;background:#2563eb;vertical-align:middle}
.pred{font-weight:bold} .missing{color:#92400e;background:#fffbeb;border:1px solid #fcd34d;padding:.5em 1em}
.ranked{color:#b91c1c;font-weight:bold} .placeholder{color:#888} small{color:#666}
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
                       f"{html.escape(t)}</span>" for i, t in enumerate(tokens))

    greedy = " greedy" if v.original_suffix is not None else ""
    out = (f"<p><span class='tok prefix'>prefix</span> tokens 0–{v.prefix_len - 1}, "
           f"<span class='tok suffix'>suffix</span> tokens {v.prefix_len}–{len(v.tokens) - 1}. "
           "Hover a token for its position and id.</p>"
           f"<div>{spans(v.tokens[:v.prefix_len], 0, 'prefix')}<b> ‖ </b>"
           f"{spans(v.tokens[v.prefix_len:], v.prefix_len, 'suffix' + greedy)}</div>")
    if v.original_suffix is not None:
        original = "".join(f"<span class='tok'>{html.escape(t)}</span>" for t in v.original_suffix)
        out += ("<p><small>Not memorized: as in training the CNNs, the suffix shown (dashed) and fed to the model "
                f"is the model's own greedy continuation of the prefix. The data's suffix was:</small></p><div>{original}</div>")
    return out


def _ranking_html(v: SampleView) -> str:
    t = v.top_heads
    rows = "".join(f"<tr><td class='num'>{int(r.rank)}</td><td>{head_label(int(r.layer), int(r.head))}</td>"
                   f"<td><code>{html.escape(str(r.hook_name))}</code>, head {int(r.head)}</td>"
                   f"<td class='num'>{float(r.score):.4g}</td></tr>" for r in t.itertuples())
    return f"<table><tr><th>rank</th><th>head</th><th>hook</th><th>score</th></tr>{rows}</table>"


def sample_page(v: SampleView, *, decimals: int = 3, index_href: str | None = "index.html") -> str:
    """The HTML of one sample's page (self-contained: the circuitsvis bundle is inlined)."""
    n_layers, n_heads = v.attention.shape[:2]
    page = _Page(decimals)
    tokens = [_visible(t) for t in v.tokens]
    marks = _rank_marks(v)
    title = f"sample {v.sequence_id} · {v.class_name or 'unlabelled'}"
    parts = [_head(f"mechmem · {title}")]
    if index_href:
        parts.append(f'<p><a href="{html.escape(index_href)}">← all samples</a></p>')
    parts += [f"<h1>Sample {v.sequence_id}: <span class='pred'>{_fmt(v.class_name)}</span></h1>",
              _facts_html(v), "<h2 id='cnn'>CNN predicted probabilities</h2>", _probabilities_html(v),
              "<h2 id='tokens'>The 64 tokens</h2>", _tokens_html(v)]

    parts.append(f"<h2 id='regions'>Decisive regions for class {_fmt(v.class_name)}</h2>")
    if v.region_map is not None or v.sample_region_map is not None:
        parts.append("<p>Localization's map of the attention regions that decide for this class (guided "
                     "backpropagation × attention, max over heads), one panel per layer. "
                     "The sum over a panel says how much its layer matters.</p>")
        for key, name, m in (("class", "class map, averaged over the class's samples", v.region_map),
                             ("sample", "this sample's map", v.sample_region_map)):
            if m is None:
                continue
            sums = m.reshape(m.shape[0], -1).sum(1)
            parts.append(f"<h3>{name}</h3><p><small>layer sums: "
                         + ", ".join(f"L{l} {s:.3g}" for l, s in enumerate(sums)) + "</small></p>")
            parts.append(page.view(f"regions-{key}", "AttentionHeads", m, tokens, kind=f"regions-{key}",
                                   attentionHeadNames=[f"layer {l}" for l in range(m.shape[0])],
                                   maxValue=float(m.max()) or 1.0, minValue=0.0))
    else:
        parts.append("<p class='placeholder'>No decisive-region map (see “missing” below).</p>")
    if v.top_heads is not None:
        parts.append(f"<h3>Heads localization ranks highest for {_fmt(v.class_name)}</h3>"
                     + _ranking_html(v) + "<p>This sample's patterns at those heads, best first:</p>")
        ranked = [(int(r.layer), int(r.head), int(r.rank)) for r in v.top_heads.itertuples()
                  if int(r.layer) < n_layers and int(r.head) < n_heads]
        parts.append(page.view("top-heads", "AttentionHeads", np.stack([v.attention[l, h] for l, h, _ in ranked]),
                               tokens, kind="top-heads",
                               attentionHeadNames=[f"#{r} {head_label(l, h)}" for l, h, r in ranked]))

    parts.append(f"<h2 id='attention'>Attention patterns: {n_layers} layers × {n_heads} heads</h2>"
                 "<p>Hover a head to view it, click to lock. Rows are query (destination) tokens, columns "
                 "the key (source) tokens they attend to. "
                 + ("<span class='ranked'>★</span> marks the heads localization ranked highest for this class."
                    if marks else "") + "</p>")
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
                ax.set_title(f"head {c}" if c < n_heads else "decisive\nregions", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
    facts = f"score {_fmt(v.memorization_score, '.2f')}, duplicates {_fmt(v.sequence_duplicates)}"
    pred = f", CNN: {v.predicted} ({v.mean_probabilities.max():.2f})" if v.probabilities else ""
    fig.suptitle(f"sample {v.sequence_id} · {v.class_name or 'unlabelled'} · {facts}{pred}", fontsize=9)
    fig.tight_layout()
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
