"""The monitor's views (mechmem.viz.spans): token pieces, the HTML page, marked terminal text, records.

Results are made by hand with a byte-level tokenizer (one token a byte), so every expected string
is known exactly; the command line (tests/test_monitor_cli.py) runs them on a real model."""

import html
import json
import re

import numpy as np
import pytest

from mechmem import viz
from mechmem.monitor import MonitorResult, Span
from mechmem.viz.spans import CLOSE_MARKER, open_marker

CLASSES = ["Non-Memo", "Guess", "Others"]


class ByteTokenizer:
    """One token a UTF-8 byte: a character of several bytes is split over several tokens."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CleanupTokenizer:
    """Decodes like a tokenizer that cleans up spaces: " ." becomes "." (a later token rewrites text)."""

    vocab = {0: "a", 1: " ", 2: ".", 3: "b"}

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in ids).replace(" .", ".")


TOK = ByteTokenizer()


def _bytes32(text: str) -> list[int]:
    """`text` as exactly 32 byte tokens (padded with dots)."""
    b = text.encode("utf-8")
    assert len(b) <= 32, text
    return list(b + b"." * (32 - len(b)))


def _span(prompt, start, end, label, outputs, probs, logprob=-0.5, reused=False):
    p = dict(zip(CLASSES, probs))
    return Span(prompt, start, end, label, label != "Non-Memo", p, logprob, reused,
                TOK.decode(outputs[prompt, start:end].tolist()))


def hand_result() -> MonitorResult:
    """Four prompts: flagged then unflagged; two adjacent flagged (with HTML, an escape sequence and a
    character split over the stretch boundary); overlapping stretches of stride 16; a short prompt,
    whose stretch has unscored text before and after it."""
    out0 = _bytes32("<script>alert('gen')</script>") + _bytes32("plain text, not flagged")
    # "é" is the bytes C3 A9: C3 ends the first stretch, A9 begins the second
    first = list(b"x\x1b[2J & https://example.com/") + [0x2E] * 30
    out1 = (first[:31] + [0xC3]) + ([0xA9] + list(b" second <b>stretch</b>") + [0x2E] * 9)
    out2 = _bytes32("overlap one two three four five") + _bytes32("six seven eight nine ten eleven")
    # a 5-token prompt: its first stretch starts at generated token 27 (32 tokens of context)
    out3 = list(b"<u>context & more</u>".ljust(27, b"-")) + _bytes32("scored stretch") + list(b"<em>!")
    outputs = np.array([out0, out1[:64], out2, out3], dtype=np.int64)
    prompts = [TOK.encode("The prompt <i>& more</i>"), TOK.encode("p" * 32), TOK.encode("p" * 40),
               TOK.encode("short")]
    spans = [
        _span(0, 0, 32, "Guess", outputs, [0.2, 0.7, 0.1], -0.125, reused=True),
        _span(0, 32, 64, "Non-Memo", outputs, [0.6, 0.1, 0.3], -2.25),
        _span(1, 0, 32, "Others", outputs, [0.1, 0.2, 0.7]),
        _span(1, 32, 64, "Others", outputs, [0.05, 0.15, 0.8]),
        _span(2, 0, 32, "Guess", outputs, [0.3, 0.6, 0.1]),
        _span(2, 16, 48, "Non-Memo", outputs, [0.5, 0.25, 0.25]),
        _span(2, 32, 64, "Others", outputs, [0.2, 0.3, 0.5]),
        _span(3, 27, 59, "Others", outputs, [0.1, 0.1, 0.8]),
    ]
    config = {"max_new_tokens": 64, "stride": 32, "sample": False, "temperature": 1.0, "top_k": None, "seed": 0}
    return MonitorResult(prompts, outputs, np.full(outputs.shape, -0.5, dtype=np.float32), spans, CLASSES,
                         "Non-Memo, Guess, Others", config)


@pytest.fixture(scope="module")
def result():
    return hand_result()


@pytest.fixture(scope="module")
def page(result):
    return viz.monitor_html(result, TOK, model_name="tiny <model>", run="runs/x")


# ============================================================================ token pieces


def test_pieces_join_to_the_decoded_text_and_keep_split_characters_whole():
    text = "naïve 🙂 é<b>"
    ids = TOK.encode(text)
    pieces = viz.token_pieces(ids, TOK)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" in "".join(TOK.decode([i]) for i in ids)  # decoding token by token would break them
    assert "\ufffd" not in "".join(pieces)
    # each character goes to the token that completes it; the tokens before it get ""
    emoji = ids.index(0xF0)
    assert pieces[emoji:emoji + 4] == ["", "", "", "🙂"]
    assert pieces[ids.index(0xC3)] == "" and "ï" in pieces


def test_pieces_with_the_testbed_tokenizer():
    from transformers import AutoTokenizer

    from mechmem.testbed import MODEL_DIR

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "    # 'д': 'ᲁ' 🙂 naïve\n<|endoftext|>def f():"
    ids = tok.encode(text, add_special_tokens=False)
    alone = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in a for a in alone)  # the testbed's BPE does split characters
    pieces = viz.token_pieces(ids, tok)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) and "ᲁ" in pieces and "🙂" in pieces
    for k in range(1, len(ids)):  # pieces of a prefix: the same as the prefix's own pieces
        assert "".join(pieces[:k]) == tok.decode(ids[:k]).rstrip("\ufffd")


def test_pieces_take_back_text_a_later_token_rewrites():
    tok = CleanupTokenizer()
    ids = [0, 1, 2, 1, 3]  # "a", " ", "." -> "a." ; then " b"
    pieces = viz.token_pieces(ids, tok)
    assert "".join(pieces) == tok.decode(ids) == "a. b"
    assert pieces == ["a", "", ".", " ", "b"]
    # bytes that no later token completes: "\ufffd", in the token that holds them
    assert viz.token_pieces([0xC3, 0x61, 0xE2, 0x82], TOK) == ["\ufffd", "a", "\ufffd", ""]
    assert viz.token_pieces([], tok) == []


# ============================================================================ the HTML page


def _tag(page: str, element_id: str) -> str:
    found = re.findall(rf"<span [^>]*id='{element_id}'[^>]*>", page)
    assert len(found) == 1, element_id
    return found[0]


def _attr(tag: str, name: str) -> str:
    return html.unescape(re.search(rf"{name}='([^']*)'", tag).group(1))


def test_page_has_every_stretch_with_its_probabilities(result, page):
    for i in range(len(result.prompts)):
        for j, s in enumerate(sorted(result.spans_of(i), key=lambda s: s.start)):
            tag = _tag(page, f"stretch-{i}-{j}")
            title = _attr(tag, "title")
            for c in CLASSES:
                assert f"{c} {s.probs[c]:.3f}" in title
            assert f"mean log-prob {s.mean_logprob:.3f}" in title
            assert f"generated tokens {s.start}–{s.end - 1}" in title
            start = len(result.prompts[i]) + s.start
            assert f"sequence positions {start}–{start + 31}" in title
            assert _attr(tag, "data-label") == s.label
            assert ("flagged" in _attr(tag, "class").split()) == s.flagged
            assert (_attr(tag, "data-start"), _attr(tag, "data-end")) == (str(s.start), str(s.end))
            row = re.search(rf"<tr data-stretch='stretch-{i}-{j}'>(.*?)</tr>", page).group(1)
            assert [f"{s.probs[c]:.3f}" for c in CLASSES] == re.findall(r"<td class='num[^']*'>([\d.]+)</td>", row)
            assert f"{s.mean_logprob:.3f}" in row
    assert page.count("class='stretch c") == len(result.spans) + len(CLASSES)  # stretches and the legend
    assert "captured" in page and "re-encoded" in page


def test_page_header_counts_flagged_stretches_by_class(page):
    summary = re.search(r"<td id='flagged-summary'>(.*?)</td>", page).group(1)
    assert summary == "<b>6</b> of 8 stretches in 4 prompts: Guess 2, Others 4"
    assert "tiny &lt;model&gt;" in page and "Non-Memo, Guess, Others" in page and "greedy decoding" in page
    assert "64 new tokens a prompt" in page


def test_page_text_is_the_decoded_text_escaped(result, page):
    texts = re.findall(r"<div class='text'>(.*?)</div>", page, flags=re.S)
    assert len(texts) == 4
    for i, div in enumerate(texts):
        prompt = re.search(r"<span class='prompt-text'>(.*?)</span>", div, flags=re.S).group(1)
        assert html.unescape(prompt) == TOK.decode(result.prompts[i])
        generated = re.search(r"<span class='generated'>(.*)</span>$", div, flags=re.S).group(1)
        assert html.unescape(re.sub(r"<[^>]+>", "", generated)) == TOK.decode(result.outputs[i].tolist())
    # "é" straddles two stretches: it is shown once, whole, in the second
    assert _attr(_tag(page, "stretch-1-0"), "title") and "\ufffd" not in page
    assert re.search(r"id='stretch-1-1'[^>]*>é second", page)


def test_page_escapes_text_and_loads_nothing(page):
    assert "<script" not in page.lower() and "<i>" not in page and "<b>stretch" not in page
    assert "&lt;script&gt;alert(&#x27;gen&#x27;)&lt;/script&gt;" in page
    assert "The prompt &lt;i&gt;&amp; more&lt;/i&gt;" in page
    tags = re.findall(r"<[a-zA-Z][^>]*>", page)
    assert not [t for t in tags if re.search(r"\s(src|href|srcset|action)\s*=", t)]
    assert not [t for t in tags if re.match(r"<(link|img|iframe|object|embed|base)\b", t)]
    style = "".join(re.findall(r"<style>(.*?)</style>", page, flags=re.S))
    assert "url(" not in style and "@import" not in style and "//" not in style
    assert "https://example.com/" in page  # generated text, shown as text
    assert "&lt;u&gt;context &amp; more&lt;/u&gt;" in page and "&lt;em&gt;!" in page  # unscored text too


def test_overlapping_stretches_are_shown_from_start_to_the_next_start(result, page):
    owned = {j: _attr(_tag(page, f"stretch-2-{j}"), "data-label") for j in range(3)}
    assert owned == {0: "Guess", 1: "Non-Memo", 2: "Others"}
    shown = {j: html.unescape(re.search(rf"id='stretch-2-{j}'[^>]*>([^<]*)</span>", page).group(1)) for j in range(3)}
    text = TOK.decode(result.outputs[2].tolist())
    assert shown == {0: text[:16], 1: text[16:32], 2: text[32:]}


def test_class_colours_are_fixed_distinct_and_none_for_non_memo():
    colours = viz.class_colours(["Non-Memo", "Guess", "Others"])
    assert colours["Non-Memo"] is None and colours["Guess"] != colours["Others"]
    assert viz.class_colours(["Non-Memo", "Others", "Guess"])["Guess"] == colours["Guess"]  # by name, not place
    merged = viz.class_colours(["Non-Memo", "Recite[5]-or-Guess", "Others"])
    assert merged["Recite[5]-or-Guess"] == viz.class_colours(["Non-Memo", "Recite[5]"])["Recite[5]"] is not None
    odd = viz.class_colours(["Non-Memo", "Alpha", "Beta", "Gamma", "Guess"])
    assert len({odd[c] for c in ["Alpha", "Beta", "Gamma", "Guess"]}) == 4 and odd["Guess"] == colours["Guess"]
    assert viz.class_colours(["Quiet", "Loud"])["Quiet"] is None  # no Non-Memo: the first class is not flagged


# ============================================================================ the terminal


def test_markers_are_exactly_around_flagged_stretches(result):
    text = viz.terminal_marked(result, TOK, color=False)
    lines = text.split("\n")
    g0 = TOK.decode(result.outputs[0].tolist())
    assert f"{open_marker('Guess')}{g0[:32]}{CLOSE_MARKER}{g0[32:]}\n" in text  # the Non-Memo half unmarked
    g1 = TOK.decode(result.outputs[1].tolist()).replace("\x1b", "\\x1b")
    split = g1.index("é")
    assert (f"{open_marker('Others')}{g1[:split]}{CLOSE_MARKER}{open_marker('Others')}{g1[split:]}"
            f"{CLOSE_MARKER}\n") in text
    g2 = TOK.decode(result.outputs[2].tolist())
    assert f"{open_marker('Guess')}{g2[:16]}{CLOSE_MARKER}{g2[16:32]}{open_marker('Others')}{g2[32:]}{CLOSE_MARKER}" in text
    g3 = TOK.decode(result.outputs[3].tolist())
    assert f"\n{g3[:27]}{open_marker('Others')}{g3[27:59]}{CLOSE_MARKER}{g3[59:]}\n" in text
    body = "\n".join(lines[:-1])
    assert body.count("[[") == body.count(CLOSE_MARKER) == 6 and "Non-Memo›" not in text
    assert lines[0] == "prompt 1 (24 tokens): The prompt <i>& more</i>"
    assert lines[-1] == "legend: [[Guess› … ‹]] Guess, [[Others› … ‹]] Others; unmarked: Non-Memo or not scored"
    assert "\x1b" not in text and "x\\x1b[2J & https" in text  # an escape sequence is shown, not obeyed


def test_colour_marks_flagged_stretches_only(result):
    text = viz.terminal_marked(result, TOK, color=True)
    colours = viz.class_colours(CLASSES)
    guess, others = (f"\x1b[{colours[c][1]}m" for c in ("Guess", "Others"))
    g0 = TOK.decode(result.outputs[0].tolist())
    assert f"{guess}{g0[:32]}\x1b[0m{g0[32:]}\n" in text
    assert "[[" not in text and text.count(others) == 2 + 1 + 1 + 1  # two stretches, one of prompt 3, one of 4, the legend
    assert "\x1b[2J" not in text  # the generated escape sequence is defused in colour mode too
    assert text.splitlines()[0].startswith("\x1b[2mprompt 1")


# ============================================================================ records


def test_records_round_trip_through_json(result):
    records = viz.span_records(result)
    assert len(records) == len(result.spans)
    back = [json.loads(line) for line in "".join(json.dumps(r) + "\n" for r in records).splitlines()]
    assert back == records
    for r, s in zip(back, result.spans):
        assert (r["prompt"], r["start"], r["end"], r["label"], r["flagged"], r["reused"]) == \
            (s.prompt, s.start, s.end, s.label, s.flagged, s.reused)
        assert r["probs"] == pytest.approx(s.probs) and r["mean_logprob"] == pytest.approx(s.mean_logprob)
        assert r["text"] == s.text and r["taxonomy"] == "Non-Memo, Guess, Others"
        assert r["tokens"] == result.outputs[s.prompt, s.start:s.end].tolist()
    assert {r["label"] for r in back if r["flagged"]} == {"Guess", "Others"}
