"""What the regurgitation monitor found, shown: a self-contained HTML page, marked terminal text, JSON records.

`mechmem.monitor.monitor` scores 32-token stretches of what a model generated; here each stretch is
drawn over the generated text in its class's colour (a fixed colour per class; Non-Memo, the class
that is not flagged, stays uncoloured). A stretch is shown from its first token to where the next
stretch begins (with the default stride of 32, all of it): stretches never overlap on screen, and
each one keeps its full token range, probabilities and mean log-probability in its hover text, the
page's table and its record.

Text comes from `token_pieces`: the text of each token, cut so that the pieces join to exactly what
the tokenizer decodes (a character whose bytes span two tokens belongs to the token that completes it).
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mechmem.monitor import MonitorResult, Span

NON_MEMO = "Non-Memo"  # as mechmem.monitor.NON_MEMO; not imported, so that this module needs no torch

# A fixed colour per class, by the class name's first word (merged classes such as "Recite[5]-or-Guess"
# take their first part's): an HTML background and an ANSI foreground;background pair.
_CLASS_COLOURS: dict[str, tuple[str, str]] = {
    "Guess": ("#fde68a", "30;43"),  # amber / yellow
    "Others": ("#fca5a5", "97;41"),  # red
    "Recite": ("#f9a8d4", "97;45"),  # pink / magenta
    "Recollect": ("#93c5fd", "97;44"),  # blue
    "Reconstruct": ("#c4b5fd", "30;46"),  # violet / cyan
    "Code": ("#86efac", "30;42"),  # green
    "Memo": ("#fdba74", "30;103"),  # orange / bright yellow
}
_SPARE_COLOURS = [("#a5f3fc", "30;106"), ("#d9f99d", "30;102"), ("#e9d5ff", "30;105"), ("#fed7aa", "30;101"),
                  ("#bae6fd", "30;104")]
ANSI_RESET = "\x1b[0m"
ANSI_DIM = "\x1b[2m"


def class_colours(class_names: Sequence[str]) -> dict[str, tuple[str, str] | None]:
    """{class: (HTML colour, ANSI SGR codes)}; None for the class that is never flagged (Non-Memo, else
    the first, as `mechmem.monitor.SpanClassifier` decides). Two classes never share a colour."""
    out: dict[str, tuple[str, str] | None] = {}
    used: set[tuple[str, str]] = set()
    spare = iter(_SPARE_COLOURS * (1 + len(class_names)))
    negative = NON_MEMO if NON_MEMO in class_names else (class_names[0] if class_names else None)
    for name in class_names:
        if name == negative:
            out[name] = None
            continue
        word = re.match(r"[A-Za-z]+", name)
        colour = _CLASS_COLOURS.get(word.group() if word else "")
        while colour is None or colour in used:
            colour = next(spare)
        used.add(colour)
        out[name] = colour
    return out


def token_pieces(tokens: Sequence[int], tokenizer) -> list[str]:
    """The text of each token, such that ''.join(pieces) == tokenizer.decode(tokens).

    Each piece is what decoding one more token of the sequence adds to the text of the tokens
    before it; text that a later token rewrites is taken back from the pieces it was in. So a
    character whose bytes are split over several tokens goes, whole, to the token that completes
    it (the tokens before it get ""; bytes no later token completes stay "\ufffd" in their own
    token), and a tokenizer's clean-up of spaces moves text to the token that caused it.
    """
    ids = [int(t) for t in tokens]
    pieces: list[str] = []
    emitted = ""  # always ''.join(pieces)
    for i in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:i])
        if not text.startswith(emitted):  # e.g. "\ufffd" for bytes of a character, now complete
            keep = 0
            while keep < min(len(text), len(emitted)) and text[keep] == emitted[keep]:
                keep += 1
            cut, j = len(emitted) - keep, len(pieces) - 1
            while cut > 0:
                take = min(cut, len(pieces[j]))
                pieces[j] = pieces[j][:len(pieces[j]) - take]
                cut, j = cut - take, j - 1
            emitted = emitted[:keep]
        pieces.append(text[len(emitted):])
        emitted = text
    return pieces


# ----------------------------------------------------------------------------- shared layout
def _layout(result: MonitorResult, prompt: int, tokenizer
            ) -> tuple[str, list[tuple[Span | None, int, int, str]], list[str]]:
    """(prompt text, segments of the generated text, pieces of the generated tokens): each segment
    (span or None, first generated token, end, text); a span's segment runs from its start to the
    next span's start or its end."""
    prompt_tokens = result.prompts[prompt]
    pieces = token_pieces([*prompt_tokens, *result.outputs[prompt].tolist()], tokenizer)
    p = len(prompt_tokens)
    generated = pieces[p:]
    spans = sorted(result.spans_of(prompt), key=lambda s: s.start)
    owner: list[Span | None] = [None] * len(generated)
    for k, span in enumerate(spans):
        stop = min(span.end, spans[k + 1].start) if k + 1 < len(spans) else span.end
        for t in range(span.start, min(stop, len(generated))):
            owner[t] = span
    segments: list[tuple[Span | None, int, int, str]] = []
    t = 0
    while t < len(generated):
        u = t
        while u < len(generated) and owner[u] is owner[t]:
            u += 1
        segments.append((owner[t], t, u, "".join(generated[t:u])))
        t = u
    return "".join(pieces[:p]), segments, generated


def _probs_text(span: Span, sep: str = " · ") -> str:
    return sep.join(f"{c} {p:.3f}" for c, p in span.probs.items())


def _span_title(span: Span, prompt_len: int) -> str:
    how = "captured during generation" if span.reused else "re-encoded"
    return (f"{span.label}{' (flagged)' if span.flagged else ''}\n"
            f"generated tokens {span.start}–{span.end - 1} (sequence positions {prompt_len + span.start}–"
            f"{prompt_len + span.end - 1})\n"
            f"P: {_probs_text(span)}\n"
            f"mean log-prob {span.mean_logprob:.3f}\n"
            f"attention {how}")


def _config_text(config: dict) -> str:
    if config.get("sample"):
        decoding = f"sampling (temperature {config.get('temperature')}, top-k {config.get('top_k') or 'all'}, " \
                   f"seed {config.get('seed')})"
    else:
        decoding = "greedy decoding"
    return (f"{config.get('max_new_tokens')} new tokens a prompt, {decoding}; a 32-token stretch every "
            f"{config.get('stride')} generated tokens, read with the 32 tokens before it")


def flag_counts(result: MonitorResult) -> Counter:
    """Flagged stretches by class."""
    return Counter(s.label for s in result.spans if s.flagged)


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em auto;max-width:1100px;padding:0 1em;
  color:#222}
h1{font-size:1.35em} h2{font-size:1.1em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0} td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f6f6f6} .num{text-align:right;font-variant-numeric:tabular-nums} small{color:#666}
.text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.9em;white-space:pre-wrap;
  overflow-wrap:anywhere;border:1px solid #ddd;border-radius:4px;padding:.6em .8em;line-height:1.6}
.prompt-text{color:#8a8a8a}
.generated{border-left:2px solid #444;padding-left:1px}
.stretch{border-radius:3px;padding:1px 0;cursor:help}
.stretch:hover{outline:2px solid #222}
.stretch.plain{border-bottom:1px dotted #b5b5b5}
.generated .stretch+.stretch{border-left:2px solid #fff}
.legend .stretch{display:inline-block;padding:0 .5em;margin-right:.6em;font-family:ui-monospace,monospace}
td.snippet{font-family:ui-monospace,monospace;font-size:.85em;max-width:22em;overflow:hidden;text-overflow:ellipsis;
  white-space:nowrap}
.stretches td:nth-child(2){white-space:nowrap}
.pred{font-weight:bold}
"""


def _class_css(colours: dict[str, tuple[str, str] | None], class_names: Sequence[str]) -> str:
    rules = []
    for k, name in enumerate(class_names):
        colour = colours[name]
        if colour is not None:
            rules.append(f".stretch.c{k}{{background:{colour[0]}}}")
    return "\n".join(rules)


def _inline(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "⇥")


def monitor_html(result: MonitorResult, tokenizer, *, title: str = "mechmem · regurgitation monitor",
                 model_name: str | None = None, run: str | None = None) -> str:
    """One self-contained HTML page (inline CSS, no script, no URL) of a monitor result.

    Per prompt: the prompt in grey, then the generated text with each scored stretch coloured by
    its class (hover for its probabilities, mean log-probability and token positions), and a
    table of the stretches. The header names the model, taxonomy and settings and counts the
    flagged stretches by class."""
    names = list(result.class_names)
    index = {c: k for k, c in enumerate(names)}
    colours = class_colours(names)
    e = html.escape
    labelled = Counter(s.label for s in result.spans)
    flagged = flag_counts(result)
    n_flagged = sum(flagged.values())
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{_CSS}{_class_css(colours, names)}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        "<table class='meta'>"
        f"<tr><th>model</th><td>{e(model_name or '—')}</td></tr>"
        f"<tr><th>taxonomy</th><td>{e(result.taxonomy or ', '.join(names))}"
        + (f" <small>(CNNs of {e(str(run))})</small>" if run else "") + "</td></tr>"
        f"<tr><th>settings</th><td>{e(_config_text(result.config))}</td></tr>"
        f"<tr><th>flagged</th><td id='flagged-summary'><b>{n_flagged}</b> of {len(result.spans)} stretches in "
        f"{len(result.prompts)} prompt{'s' * (len(result.prompts) != 1)}"
        + (": " + ", ".join(f"{e(c)} {flagged[c]}" for c in names if flagged[c]) if n_flagged else "")
        + "</td></tr></table>",
        "<p>A stretch is flagged when its most probable class is not Non-Memo. Hover a stretch for its class "
        "probabilities (mean over the CNNs), the model's mean log-probability of its tokens and its token "
        "positions.</p>",
        "<p class='legend'>" + "".join(
            f"<span class='stretch c{k}{'' if colours[c] else ' plain'}' data-class='{e(c)}'>{e(c)} "
            f"<small>{labelled[c]}</small></span>" for k, c in enumerate(names))
        + "<small>(the number of stretches of each class)</small></p>",
    ]
    for i, prompt in enumerate(result.prompts):
        prompt_text, segments, generated = _layout(result, i, tokenizer)
        spans = sorted(result.spans_of(i), key=lambda s: s.start)
        number = {id(s): j for j, s in enumerate(spans)}
        mine = Counter(s.label for s in spans if s.flagged)
        about = (f"{len(prompt)} prompt tokens, {len(result.outputs[i])} generated; {len(spans)} stretch"
                 f"{'es' * (len(spans) != 1)}, {sum(mine.values())} flagged"
                 + (" (" + ", ".join(f"{c} {n}" for c, n in mine.items()) + ")" if mine else ""))
        parts.append(f"<section class='prompt' id='prompt-{i}'><h2>Prompt {i + 1} <small>{e(about)}</small></h2>")
        body = []
        for span, _, _, text in segments:
            if span is None:
                body.append(e(text))
                continue
            k = index[span.label]
            plain = "" if colours[span.label] else " plain"
            body.append(f"<span class='stretch c{k}{plain}{' flagged' if span.flagged else ''}' "
                        f"id='stretch-{i}-{number[id(span)]}' data-label='{e(span.label)}' "
                        f"data-start='{span.start}' data-end='{span.end}' "
                        f"title='{e(_span_title(span, len(prompt)))}'>{e(text)}</span>")
        parts.append(f"<div class='text'><span class='prompt-text'>{e(prompt_text)}</span>"
                     f"<span class='generated'>{''.join(body)}</span></div>")
        if not spans:
            parts.append("<p><small>No whole stretch fits in this output.</small></p>")
        else:
            head = "".join(f"<th>P({e(c)})</th>" for c in names)
            rows = []
            for j, s in enumerate(spans):
                cells = "".join(f"<td class='num{' pred' if c == s.label else ''}'>{s.probs[c]:.3f}</td>"
                                for c in names)
                rows.append(f"<tr data-stretch='stretch-{i}-{j}'><td class='num'>{s.start}–{s.end - 1}</td>"
                            f"<td>{e(s.label)}{' ⚑' if s.flagged else ''}</td>{cells}"
                            f"<td class='num'>{s.mean_logprob:.3f}</td>"
                            f"<td>{'captured' if s.reused else 're-encoded'}</td>"
                            f"<td class='snippet'>{e(_inline(''.join(generated[s.start:s.end])))}</td></tr>")
            parts.append("<table class='stretches'><tr><th>tokens</th><th>class</th>" + head
                         + "<th>mean log-prob</th><th>attention</th><th>text</th></tr>" + "".join(rows) + "</table>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(text: str) -> str:
    """Generated text as a terminal shows it harmlessly: control characters (an escape sequence
    could recolour or clear the screen) written as \\xNN; newlines and tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def open_marker(label: str) -> str:
    return f"[[{label}›"


CLOSE_MARKER = "‹]]"


def _coloured(text: str, sgr: str) -> str:
    # re-applied after each newline: some pagers (less -R) reset attributes at line ends
    return f"\x1b[{sgr}m" + text.replace("\n", f"{ANSI_RESET}\n\x1b[{sgr}m") + ANSI_RESET


def terminal_marked(result: MonitorResult, tokenizer, color: bool = False, *, prompt_chars: int = 100) -> str:
    """Each prompt (one line, shortened) and its generated text, flagged stretches marked: in their
    class's ANSI colour with `color`, else between [[Class› and ‹]]. A one-line legend closes it."""
    colours = class_colours(result.class_names)
    out = []
    for i, prompt in enumerate(result.prompts):
        prompt_text, segments, _ = _layout(result, i, tokenizer)
        shown = _safe(_inline(prompt_text))
        if len(shown) > prompt_chars:
            shown = "…" + shown[-(prompt_chars - 1):]  # its end: what the generation continues
        head = f"prompt {i + 1} ({len(prompt)} tokens): {shown}"
        out.append(f"{ANSI_DIM}{head}{ANSI_RESET}" if color else head)
        body = []
        for span, _, _, text in segments:
            text = _safe(text)
            if span is None or not span.flagged:
                body.append(text)
            elif color:
                colour = colours.get(span.label)
                body.append(_coloured(text, colour[1]) if colour else text)
            else:
                body.append(f"{open_marker(span.label)}{text}{CLOSE_MARKER}")
        out.append("".join(body))
        out.append("")
    flaggable = [(c, colour[1]) for c, colour in colours.items() if colour is not None]
    if color:
        marks = ", ".join(_coloured(f" {c} ", sgr) for c, sgr in flaggable)
    else:
        marks = ", ".join(f"{open_marker(c)} … {CLOSE_MARKER} {c}" for c, _ in flaggable)
    negative = [c for c, colour in colours.items() if colour is None]
    out.append(f"legend: {marks}; unmarked: {negative[0] if negative else NON_MEMO} or not scored")
    return "\n".join(out)


# ----------------------------------------------------------------------------- records
def span_records(result: MonitorResult) -> list[dict]:
    """One JSON-able dict per stretch: prompt index, start/end (generated tokens, end exclusive),
    text, label, flagged, probs, mean_logprob, reused, taxonomy, and the stretch's token ids."""
    out = []
    for s in result.spans:
        out.append({
            "prompt": int(s.prompt), "start": int(s.start), "end": int(s.end), "text": s.text, "label": s.label,
            "flagged": bool(s.flagged), "probs": {c: float(p) for c, p in s.probs.items()},
            "mean_logprob": float(s.mean_logprob), "reused": bool(s.reused), "taxonomy": result.taxonomy,
            "tokens": [int(t) for t in result.outputs[s.prompt, s.start:s.end]],
        })
    return out
