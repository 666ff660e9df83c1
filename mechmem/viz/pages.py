"""HTML inspection pages: one self-contained page per sample, and an index of the samples by class.

Pages open offline, from disk: circuitsvis's browser bundle, shipped in its wheel as
`dist/cdn/iife.js`, is inlined once per page. circuitsvis's own `render()` is not used: it inlines
the 1.3 MB bundle once per view, and its notebook path probes google.com to pick the CDN. Each
view's data sits in the page as rounded JSON and draws when scrolled into sight.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mechmem.atomic import atomic_text, atomic_write
from mechmem.hooks import pattern_hook
from mechmem.viz.grids import attention_grid_png
from mechmem.viz.samples import SampleView

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


class _Page:
    """Collects the circuitsvis views of one page: containers in the body, render calls at the end."""

    def __init__(self, decimals: int):
        self.decimals, self.calls = decimals, list[str]()

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
    mean = v.mean_probabilities
    if mean is None:
        return "<p class='placeholder'>No CNN predictions (see “missing” below).</p>"
    best = int(np.argmax(mean))
    head = "".join(f"<th>{html.escape(c)}{' ✓' if i == v.label else ''}</th>" for i, c in enumerate(v.class_names))
    rows = []
    table: list[tuple[str, Sequence[float]]] = [*(v.probabilities or {}).items(), ("mean over CNNs", list(mean))]
    for name, probs in table:
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
    if t is None:
        return ""
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
    marks = v.rank_marks
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
            pred = "—" if p is None else f"{html.escape(str(v.predicted))} ({p.max():.2f})"
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


def write_pages(views: Sequence[SampleView], out: str | os.PathLike, *, decimals: int = 3, pngs: bool = True,
                notes: Sequence[str] = (), title: str = "mechmem · inspected samples") -> Path:
    """index.html, sample_{id}.html (and sample_{id}.png) in `out`; returns the index page's path."""
    if not views:
        raise ValueError("no samples to write pages for")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for v in views:
        atomic_text(out / f"{v.stem}.html", sample_page(v, decimals=decimals))
        if pngs:
            attention_grid_png(v, out / f"{v.stem}.png")
    summary = pd.DataFrame([{"sequence_id": v.sequence_id, "class": v.class_name, "memorization_score":
                             v.memorization_score, "sequence_duplicates": v.sequence_duplicates, "split": v.split,
                             "predicted": v.predicted, "page": f"{v.stem}.html"} for v in views])
    atomic_write(out / "samples.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_text(out / "index.html", index_page(views, title=title, notes=notes))
    return out / "index.html"


