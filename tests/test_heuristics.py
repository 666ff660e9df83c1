"""Heuristics: patterns, ROUGE against the rouge-score package, the offline code classifier."""

import itertools
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer

from mechmem import heuristics as h


# --------------------------------------------------------------------------- is_incrementing
@pytest.mark.parametrize("text", [
    "128.\n129.\n130.",
    "0x01, 0x02, 0x03",
    "Item 1\nItem 2\nItem 3",
    "- 128.\n- 129.\n- 130.\n- 131.\n- 132.",
    "12.8. 12.9. 13.0. 13.1. 13.2. 13.3.",                 # decimals
    "1.5 2.0 2.5 3.0 3.5",
    "0x0E, 0x0F, 0x10, 0x11",                              # hex across a digit boundary
    "\\x7d\\x7e\\x7f\\x80",
    "10, 8, 6, 4, 2, 0",                                   # a constant negative step
    "x1 = 0x01;\nx2 = 0x02;\nx3 = 0x03;\nx4 = 0x04;",      # two numbers per record
    "A.1 , A.2 , A.3 , A.4, B.1 , B.2, B.3, C.1",          # numbering that restarts
    "1.1 Scope\n1.2 Scope\n1.3 Scope\n2.1 Scope\n2.2 Scope\n2.3 Scope\n",
    "0123456789",
    "(0123456789)",                                      # a digit run standing on its own
    "ers = [\n    100, 104, 108, 112,\n    116, 120, 124,\n    128, 132",  # wrapped list, cut window
])
def test_is_incrementing_true(text):
    assert h.is_incrementing(text)


@pytest.mark.parametrize("text", [
    "",
    "no numbers in this text at all",
    "0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144",       # Fibonacci
    "2, 4, 8, 16, 32, 64, 128",                          # geometric
    "1, 1, 1, 1, 1, 1",                                  # constant: repeating, not incrementing
    "1, 2",                                              # two terms are no progression
    "In 2019, 2020 and 2021 the company grew quickly.",  # the text between numbers changes
    "The meeting is in room 12 at 3 pm on the 4th floor of building 5.",
    "Section 1: cats. Section 2: dogs and their owners. Section 3: birds.",
    "See figures 1, 2, 3 for the details of the approach, which we describe in the next section of "
    "this paper; the appendix gives the proofs and the experimental setup in full.",
    "abcabcabc",
    "1A2345678901234",                                   # a serial number: digits glued to a letter
    "Serial no. 1A23456789, lot 7",
    "SN23456789X",
    "token_0123456789",                                  # an identifier
])
def test_is_incrementing_false(text):
    assert not h.is_incrementing(text)


# --------------------------------------------------------------------------- is_repeating
@pytest.mark.parametrize("text", [
    "abcabcabc", "the the the", "=======", "bcabcabcab",       # cut at both ends
    "----\n----\n----\n", "x = 1\nx = 1\nx = 1\n", "x = 1\n  x = 1\n\tx = 1",  # whitespace counts once
    "aa", "ab ab ab ab a",
    "<><><><><><><><><><><><><><><><><><><><>\n<><><><><><><><><><><><><", # odd width: lines restart
    "#=#=#=#=#=#=#\n#=#=#=#=#=#=#=#=#=#=#=#=#=#=#=#=#=#=#",                # two cut lines
])
def test_is_repeating_true(text):
    assert h.is_repeating(text)


@pytest.mark.parametrize("text", [
    "", "a", "ab", "abcabcabd and then something else entirely",
    "Item 1\nItem 2\nItem 3\nItem 4", "0x01, 0x02, 0x03",
    "the the the cat sat on the mat and looked around the room",
    "The quick brown fox jumps over the lazy dog.",
    "=====\nabcde\n=====", "Item 1\nItem 1 and more\nItem 1",
])
def test_is_repeating_false(text):
    assert not h.is_repeating(text)


def _repeating_brute_force(s: str) -> bool:
    """Some substring of >= 80% of s has a period q with at least two full periods in it."""
    n = len(s)
    need = math.ceil(0.8 * n)
    for i in range(n):
        for j in range(i + need, n + 1):
            sub = s[i:j]
            if any(all(sub[k] == sub[k + q] for k in range(len(sub) - q)) for q in range(1, len(sub) // 2 + 1)):
                return True
    return False


def test_is_repeating_matches_brute_force_on_random_strings():
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(2, 24))
        if rng.random() < 0.5:  # a periodic core with random edges, else random
            chunk = "".join(rng.choice(list("ab"), int(rng.integers(1, 5))))
            core = (chunk * n)[:n]
            s = "".join(rng.choice(list("abc"), int(rng.integers(0, 3)))) + core
        else:
            s = "".join(rng.choice(list("ab"), n))
        assert h.is_repeating(s) == _repeating_brute_force(s), s


# --------------------------------------------------------------------------- ROUGE
SCORER = rouge_scorer.RougeScorer(["rougeL", "rouge1", "rouge2", "rouge3", "rouge4"], use_stemmer=False)


def _reference(ref, cand):
    return SCORER.score(" ".join(map(str, ref)), " ".join(map(str, cand)))


def _random_ids(rng, n):
    vocab = int(rng.choice([2, 3, 5, 20, 50_000]))  # small vocabularies give overlaps
    return rng.integers(0, vocab, n).tolist()


def test_rouge_single_pairs_equal_rouge_score():
    rng = np.random.default_rng(0)
    for _ in range(500):
        ref, cand = _random_ids(rng, int(rng.integers(0, 70))), _random_ids(rng, int(rng.integers(0, 70)))
        expected = _reference(ref, cand)
        assert h.rouge_l(ref, cand) == expected["rougeL"].fmeasure
        for n in (1, 2, 3, 4):
            assert h.rouge_n(ref, cand, n) == expected[f"rouge{n}"].fmeasure, (ref, cand, n)


def test_rouge_columns_equal_rouge_score():
    rng = np.random.default_rng(1)
    tokens = np.array([_random_ids(rng, 64) for _ in range(400)])
    tokens[0, 32:] = tokens[0, :32]                      # suffix == prefix
    tokens[1, 32:] = tokens[1, :32][::-1]
    rouge_l, rouge_3 = h.rouge_columns(tokens, batch_size=64)   # several batches
    for i, row in enumerate(tokens.tolist()):
        expected = _reference(row[:32], row[32:])
        assert rouge_l[i] == expected["rougeL"].fmeasure
        assert rouge_3[i] == expected["rouge3"].fmeasure
    assert rouge_l[0] == rouge_3[0] == 1.0


def test_rouge_batches_other_shapes():
    rng = np.random.default_rng(2)
    for a, b in [(1, 5), (5, 1), (10, 3), (64, 64), (70, 20)]:  # 70 > 64 takes the per-row path
        ref = rng.integers(0, 4, (30, a))
        cand = rng.integers(0, 4, (30, b))
        got_l, got_2 = h.rouge_l_batch(ref, cand), h.rouge_n_batch(ref, cand, 2)
        for i in range(30):
            expected = _reference(ref[i].tolist(), cand[i].tolist())
            assert got_l[i] == expected["rougeL"].fmeasure
            assert got_2[i] == expected["rouge2"].fmeasure


def test_rouge_edge_cases():
    assert h.rouge_l([], [1, 2]) == h.rouge_l([1, 2], []) == 0.0
    assert h.rouge_n([1, 2], [1, 2], 3) == 0.0          # shorter than n: no n-grams
    assert h.rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert h.rouge_n([7, 7, 7, 7], [7, 7, 7], 3) == pytest.approx(2 * 1 * 0.5 / 1.5)  # clipped counts
    with pytest.raises(ValueError, match="n >= 1"):
        h.rouge_n([1], [1], 0)
    with pytest.raises(ValueError, match="prefix_len"):
        h.rouge_columns(np.zeros((3, 64), dtype=int), prefix_len=64)
    rl, r3 = h.rouge_columns(np.zeros((0, 64), dtype=int))
    assert rl.shape == r3.shape == (0,)


# --------------------------------------------------------------------------- is_code
@pytest.mark.parametrize("text,expected", [
    ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n", True),
    ("for (int i = 0; i < n; i++) {\n    sum += a[i];\n}\nreturn sum;", True),
    ("SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;", True),
    ("<div class=\"nav\"><a href=\"/home\">Home</a></div>\n<ul><li>one</li></ul>", True),
    ("%% just a preamble\n\\usepackage{amsmath}", True),  # the paper's LaTeX rule
    ("The committee met on Tuesday and agreed that the budget should be reviewed before the end of "
     "the year. Several members raised concerns about the cost of the new building.", False),
    ("She opened the window and looked out at the garden, where the rain had stopped and the birds "
     "were singing again in the old apple tree.", False),
])
def test_is_code_examples(text, expected):
    assert h.is_code(text) is expected


def test_labelled_set_is_small_and_balanced():
    assert h.SNIPPETS_FILE.stat().st_size < 300 * 1024
    rows = h.load_code_snippets()
    labels = {r["label"] for r in rows}
    assert labels == {"code", "prose"} and {r["split"] for r in rows} == {"dev", "test"}
    n_code = sum(r["label"] == "code" for r in rows)
    assert len(rows) >= 400 and 0.4 < n_code / len(rows) < 0.6
    assert len({r["kind"] for r in rows if r["label"] == "code"}) >= 10  # many languages
    assert len({r["text"] for r in rows}) == len(rows)


def test_is_code_accuracy_on_labelled_set():
    # Measured: test 0.969 (n=257, 95% CI 0.940-0.984), dev 0.987 (n=233). Bounds: minus ~4 points.
    test = h.code_accuracy("test")
    assert test["n"] > 200
    assert test["accuracy"] >= 0.93, test
    assert test["precision"] >= 0.90 and test["recall"] >= 0.90, test
    assert h.code_accuracy("dev")["accuracy"] >= 0.95


def test_code_accuracy_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        h.code_accuracy("train")
    with pytest.raises(FileNotFoundError):
        h.load_code_snippets(tmp_path / "nope.jsonl")


def test_code_features_are_rates():
    """Doubling a window does not change its features (so window length does not decide)."""
    text = "x = compute(a, b);\nif (x >= 0) { y = x; }\n"
    f1, f2 = h.code_features(text), h.code_features(text * 2)
    for k in f1:
        assert f1[k] == pytest.approx(f2[k], rel=0.05, abs=1e-3)
    assert set(itertools.chain(f1)) == set(h._CODE_WEIGHTS)
