"""Text and token heuristics behind the primary categories: patterns, ROUGE, code.

- `is_incrementing` / `is_repeating`: the "reconstruct" signals of Prashanth et al. (2024), text
  a model can continue from a rule rather than from memory.
- `rouge_l` / `rouge_n`: prefix-to-suffix overlap on token ids (the "guess" signal), equal to the
  `rouge-score` package on the ids joined by spaces; `rouge_columns` does a whole table at once
  with a bit-parallel LCS, because pure-python ROUGE on millions of rows takes hours.
- `is_code`: an offline stand-in for the paper's fastText code classifier, a handful of
  interpretable features whose accuracy is measured on the shipped labelled set
  (`code_samples/snippets.jsonl`, see `code_accuracy`).

Pure numpy and `re`: no model, no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

SNIPPETS_FILE = Path(__file__).resolve().parent / "code_samples" / "snippets.jsonl"

# --------------------------------------------------------------------------- incrementing
# Numbers as they appear in text: hex (0x1f, \x1f), then decimals, then integers. Decimals are
# tried with and without the "." reading, since "1.\n2.\n3." and "12.8, 12.9" both occur.
_HEX = r"0[xX][0-9a-fA-F]+|\\x[0-9a-fA-F]{2}"
_NUMBER_RES = (re.compile(rf"{_HEX}|\d+\.\d+|\d+"), re.compile(rf"{_HEX}|\d+"))
_MIN_TERMS = 3          # a progression needs at least three terms
_MIN_COVERAGE = 0.5     # ... and its records must span half of the (stripped) text
_MAX_PERIOD = 4         # numbers per record: "x1 = 0x01;" has two, "{#f5.123}" two, "v1.2.3" three


def _value(token: str) -> Decimal:
    if token[:2] in ("0x", "0X", "\\x"):
        return Decimal(int(token[2:], 16))
    return Decimal(token)


def _numbers(text: str, pattern: re.Pattern) -> list[tuple[Decimal, int, int]]:
    out = []
    for m in pattern.finditer(text):
        try:
            out.append((_value(m.group()), m.start(), m.end()))
        except (InvalidOperation, ValueError):
            continue
    return out


def _progression_mask(text: str, nums: list[tuple[Decimal, int, int]]) -> np.ndarray:
    """Characters covered by arithmetic runs: some column of the numbers (one in every `p`) steps by
    a constant non-zero amount while the text between successive terms stays the same (whitespace
    aside)."""
    covered = np.zeros(len(text), dtype=bool)
    seps = [re.sub(r"\s+", "", text[a[2]:b[1]]) for a, b in zip(nums, nums[1:])]  # text between numbers
    for p in range(1, _MAX_PERIOD + 1):
        for r in range(p):
            idx = range(r, len(nums), p)
            steps = [(nums[j][0] - nums[i][0], tuple(seps[i:j])) for i, j in zip(idx, idx[1:])]
            i = 0
            while i < len(steps):
                j = i
                while j + 1 < len(steps) and steps[j + 1] == steps[i]:
                    j += 1
                if steps[i][0] != 0 and j - i + 2 >= _MIN_TERMS:
                    covered[nums[idx[i]][1]:nums[idx[j + 1]][2]] = True
                i = j + 1
    return covered


# A run of >= 5 digits standing as a number of its own: not part of a word, as in a serial number
# or an identifier ("1A2345678", "SN23456789X", "v_234567"), whose digits are no sequence of numbers.
_DIGIT_RUN = re.compile(r"(?<!\w)\d{5,}(?!\w)")


def _digit_runs_mask(text: str) -> np.ndarray:
    """'123456789', '0123456789': digits counting up by one inside one number."""
    covered = np.zeros(len(text), dtype=bool)
    for m in _DIGIT_RUN.finditer(text):
        d = [int(c) for c in m.group()]
        if all((b - a) % 10 == 1 for a, b in zip(d, d[1:])):
            covered[m.start():m.end()] = True
    return covered


def is_incrementing(text: str) -> bool:
    """Numbers (integers, decimals, hex) in arithmetic progression, possibly interleaved with
    constant text: '128.\\n129.\\n130.', '0x01, 0x02, 0x03', 'Item 1\\nItem 2\\nItem 3'.

    A run counts when >= 3 terms step by the same non-zero amount with the same text between
    terms (whitespace aside); runs must cover half the stripped text, so a list inside prose
    ('see figures 1, 2, 3 and the appendix ...') or a Fibonacci prefix does not count.
    """
    text = text.strip()
    if not any(c.isdigit() for c in text):
        return False
    for pattern in _NUMBER_RES:
        nums = _numbers(text, pattern)
        if len(nums) < _MIN_TERMS and not _DIGIT_RUN.search(text):
            continue
        covered = _progression_mask(text, nums) | _digit_runs_mask(text)
        if covered.mean() >= _MIN_COVERAGE:
            return True
    return False


# --------------------------------------------------------------------------- repeating
_MIN_REPEAT_COVERAGE = 0.8  # the repeated stretch must be (almost) the whole text


def _periodic_cover(codes: np.ndarray, min_len: int) -> bool:
    """Is there a stretch of >= `min_len` chars equal to itself shifted by some period q, with at
    least two full periods in it? Candidate periods are where the k-gram at the 20% mark recurs
    (it lies inside any stretch covering 80%), which keeps prose fast."""
    n = len(codes)
    i0, k = -(-n // 5), max(1, min(8, n // 10))
    windows = np.lib.stride_tricks.sliding_window_view(codes, k)       # [n - k + 1, k]
    qs = np.arange(1, n // 2 + 1)
    fits = i0 + qs + k <= n                                              # probe comparable
    hit = np.ones(len(qs), dtype=bool)
    hit[fits] = (windows[i0 + qs[fits]] == codes[i0:i0 + k]).all(axis=1)
    for q in qs[hit]:
        same = np.concatenate([[False], codes[q:] == codes[:-q], [False]])
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        runs = edges[1::2] - edges[0::2]
        if len(runs) and (runs >= max(q, min_len - q)).any():
            return True
    return False


def _is_periodic(text: str) -> bool:
    """Exact rule on `text` as given: a stretch of >= 80% of it repeats one chunk, twice in full."""
    if len(text) < 2:
        return False
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _periodic_cover(codes, int(np.ceil(_MIN_REPEAT_COVERAGE * len(codes))))


def _smallest_period(s: str) -> int:
    """Smallest q with s[i] == s[i + q] for all i (KMP failure function); len(s) if none shorter."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return len(s) - fail[-1] if s else 0


def _repeated_motif_lines(text: str) -> bool:
    """Every line is a piece of one motif repeated, and the longest line holds it twice: rules
    wrapped at a width the motif does not divide ('<><>…<' lines restart the motif)."""
    lines = [l.strip() for l in text.strip().split("\n")]
    if len(lines) < 2 or not all(lines):
        return False
    longest = max(lines, key=len)
    q = _smallest_period(longest)
    if 2 * q > len(longest):
        return False
    ring = longest[:q] * (len(longest) // q + 2)
    return all(l in ring for l in lines)


def is_repeating(text: str) -> bool:
    """The text is one chunk repeated: 'abcabcabc', 'the the the', '======='.

    Checked with whitespace runs as one space and with whitespace removed, so that re-indented
    repeats and rules wrapped over lines ('=====\\n=====') both count, and line by line for rules
    whose lines restart the motif. The window may cut the chunk at both ends; up to 20% of the
    text may be a stray head or tail (a 64-token window rarely starts on a chunk boundary), but
    the chunk must appear twice in full.
    """
    collapsed = re.sub(r"\s+", " ", text).strip()
    return _is_periodic(collapsed) or _is_periodic(collapsed.replace(" ", "")) or _repeated_motif_lines(text)


# --------------------------------------------------------------------------- ROUGE
def _fmeasure(precision, recall):
    """rouge-score's F1, same operation order so the floats match bit for bit."""
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _lcs_length(a: Sequence, b: Sequence) -> int:
    """LCS length, bit-parallel (Hyyrö 2004): one big-int word over `a` per symbol of `b`."""
    if not a or not b:
        return 0
    match: dict = {}
    for i, x in enumerate(a):
        match[x] = match.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & match.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(reference_ids: Sequence[int], candidate_ids: Sequence[int]) -> float:
    """ROUGE-L F-measure of `candidate_ids` against `reference_ids`, ids treated as words."""
    ref, cand = list(reference_ids), list(candidate_ids)
    if not ref or not cand:
        return 0.0
    lcs = _lcs_length(ref, cand)
    return _fmeasure(lcs / len(cand), lcs / len(ref))


def rouge_n(reference_ids: Sequence[int], candidate_ids: Sequence[int], n: int = 3) -> float:
    """ROUGE-N F-measure (clipped n-gram overlap), ids treated as words."""
    if n < 1:
        raise ValueError(f"rouge_n needs n >= 1, got {n}")
    ref, cand = list(reference_ids), list(candidate_ids)
    ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    cand_grams = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
    overlap = sum(min(c, cand_grams[g]) for g, c in ref_grams.items())
    return _fmeasure(overlap / max(sum(cand_grams.values()), 1), overlap / max(sum(ref_grams.values()), 1))


def _f_columns(hits: np.ndarray, n_cand: int, n_ref: int) -> np.ndarray:
    """Vectorised `_fmeasure(hits / n_cand, hits / n_ref)` with rouge-score's exact arithmetic."""
    p = hits / max(n_cand, 1)
    r = hits / max(n_ref, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = 2 * p * r / (p + r)
    return np.where(p + r > 0, f, 0.0)


def rouge_l_batch(ref: Int[np.ndarray, "rows a"], cand: Int[np.ndarray, "rows b"]) -> Float[np.ndarray, " rows"]:
    """Row-wise `rouge_l`: the same bit-parallel LCS, one uint64 word per row (a <= 64)."""
    ref, cand = np.asarray(ref), np.asarray(cand)
    (rows, a), b = ref.shape, cand.shape[1]
    if a == 0 or b == 0:
        return np.zeros(rows)
    if a > 64:
        return np.array([rouge_l(x, y) for x, y in zip(ref.tolist(), cand.tolist())])
    eq = cand[:, :, None] == ref[:, None, :]                        # [rows, b, a]: cand j == ref i
    match = np.packbits(eq, axis=-1, bitorder="little")             # [rows, b, ceil(a / 8)] bytes
    match = np.pad(match, ((0, 0), (0, 0), (0, 8 - match.shape[-1]))).view("<u8")[..., 0]  # [rows, b] words
    full = np.uint64((1 << a) - 1) if a < 64 else np.uint64(2**64 - 1)
    v = np.full(rows, full, dtype=np.uint64)
    for j in range(b):
        u = v & match[:, j]
        v = ((v + u) | (v - u)) & full
    lcs = a - np.bitwise_count(v).astype(np.int64)
    return _f_columns(lcs, b, a)


def rouge_n_batch(ref: Int[np.ndarray, "rows a"], cand: Int[np.ndarray, "rows b"],
                  n: int = 3) -> Float[np.ndarray, " rows"]:
    """Row-wise `rouge_n` from n-gram equality matrices: the clipped overlap sum_g min(c_ref, c_cand)
    is sum over candidate positions of min(c_ref, c_cand) / c_cand."""
    if n < 1:
        raise ValueError(f"rouge_n needs n >= 1, got {n}")
    ref, cand = np.asarray(ref), np.asarray(cand)
    rows, a, b = ref.shape[0], ref.shape[1] - n + 1, cand.shape[1] - n + 1
    if a <= 0 or b <= 0:
        return np.zeros(rows)

    def gram_eq(x, y, nx, ny):  # [rows, nx, ny]: n-gram i of x equals n-gram j of y
        eq = x[:, :, None] == y[:, None, :]
        out = eq[:, :nx, :ny].copy()
        for k in range(1, n):
            out &= eq[:, k:k + nx, k:k + ny]
        return out

    c_ref = gram_eq(cand, ref, b, a).sum(-1)                                     # [rows, b]
    c_cand = gram_eq(cand, cand, b, b).sum(-1)                                   # [rows, b], >= 1
    hits = np.rint((np.minimum(c_ref, c_cand) / c_cand).sum(-1))
    return _f_columns(hits, b, a)


def rouge_columns(tokens: Int[np.ndarray, "rows seq"], prefix_len: int = 32, *, n: int = 3,
                  batch_size: int = 16384) -> tuple[Float[np.ndarray, " rows"], Float[np.ndarray, " rows"]]:
    """(ROUGE-L, ROUGE-n) of prefix (reference, first `prefix_len` tokens) vs suffix (candidate,
    the rest), per row: the `rouge_L_prefix_to_suffix` / `rouge_3_prefix_to_suffix` columns."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not 0 < prefix_len < tokens.shape[1]:
        raise ValueError(f"rouge_columns needs a 2-d token array longer than prefix_len={prefix_len}, "
                         f"got shape {tokens.shape}")
    rl, rn = np.zeros(len(tokens)), np.zeros(len(tokens))
    for s in range(0, len(tokens), batch_size):
        chunk = tokens[s:s + batch_size]
        ref, cand = chunk[:, :prefix_len], chunk[:, prefix_len:]
        rl[s:s + batch_size] = rouge_l_batch(ref, cand)
        rn[s:s + batch_size] = rouge_n_batch(ref, cand, n)
    return rl, rn


# --------------------------------------------------------------------------- code
_STOPWORDS = frozenset(
    "the of and to a in is that for it with as was on be by this are or an at from not which have has "
    "you we they but can will if their its may should would there been were also these than when all "
    "one into such other more any some only no so he she his her them our your who what".split())
_SYMBOLS = "{}[];=<>\\#$&|^~@%"  # brackets, not parentheses: prose has those
_DROP_SYMBOLS = str.maketrans("", "", _SYMBOLS)
_CODE_PATTERNS = tuple(re.compile(p) for p in (
    r"\w\(",                                            # call: f(, printf(
    r"==|!=|<=|>=|=>|->|::|&&|\|\||\+\+|\+=|-=|:=|<<",  # operators prose does not use
    r"[a-z]_[a-z]|[a-z][A-Z]",                           # snake_case, camelCase joints
    r"\\[a-zA-Z]",                                       # LaTeX commands
    r"</?[a-zA-Z][\w-]*[^<>]{0,80}>",                   # markup tags
))  # one regex each: scanning for a literal start is much faster than one alternation
_CODE_LINE_END = tuple(";{}[]:\\>")  # not ',' or ')': wrapped prose ends lines with those
_SENTENCE = re.compile(r"[a-z][.!?]\s+[A-Z]")
_WORD = re.compile(r"[a-z]+")


def code_features(text: str) -> dict[str, float]:
    """The evidence `is_code` weighs, each a rate so that window length does not matter."""
    n = max(len(text), 1)
    words = _WORD.findall(text.lower())
    lines = [l.rstrip() for l in text.split("\n") if l.strip()]
    return {
        "symbols": (len(text) - len(text.translate(_DROP_SYMBOLS))) / n,   # per char
        "patterns": 100 * sum(len(p.findall(text)) for p in _CODE_PATTERNS) / n,  # per 100 chars
        "line_ends": sum(l.endswith(_CODE_LINE_END) for l in lines) / max(len(lines), 1),
        "stopwords": sum(w in _STOPWORDS for w in words) / max(len(words), 1),
        "sentences": 100 * len(_SENTENCE.findall(text)) / n,               # per 100 chars
    }


# A logistic regression on the dev half of the labelled set (5-fold CV accuracy 0.98) chose these
# weights; they are rounded and frozen. The test half was drawn afterwards and is the estimate.
_CODE_WEIGHTS = {"symbols": 3.5, "patterns": 0.1, "line_ends": 0.5, "stopwords": -1.0, "sentences": -0.35}
_CODE_BIAS = 0.1


def code_score(text: str) -> float:
    """> 0 means code: weighted code evidence minus the density of English function words."""
    f = code_features(text)
    return _CODE_BIAS + sum(_CODE_WEIGHTS[k] * v for k, v in f.items())


def is_code(text: str) -> bool:
    """Source code (or markup, LaTeX, config) rather than natural language; offline.

    The paper or'ed a fastText classifier with the presence of `\\usepackage{`; here the classifier
    is `code_score` (see `code_accuracy` for how well it does on the shipped labelled set).
    """
    return "\\usepackage{" in text or code_score(text) > 0


def load_code_snippets(path: str | Path = SNIPPETS_FILE) -> list[dict]:
    """The labelled set: dicts with `text`, `label` ('code'/'prose'), `kind`, `source`, `split`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled code/prose set not found at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def code_accuracy(split: str = "test", path: str | Path = SNIPPETS_FILE) -> dict:
    """Accuracy, precision and recall (code = positive) of `is_code` on the labelled set.

    `split`: 'dev' (the half the weights were tuned on), 'test' (held out) or 'all'. Also lists
    the mistakes, by kind, for inspection.
    """
    if split not in ("dev", "test", "all"):
        raise ValueError(f"split must be 'dev', 'test' or 'all', got {split!r}")
    rows = [r for r in load_code_snippets(path) if split == "all" or r["split"] == split]
    truth = np.array([r["label"] == "code" for r in rows])
    pred = np.array([is_code(r["text"]) for r in rows])
    tp = int((truth & pred).sum())
    return {
        "n": len(rows), "n_code": int(truth.sum()),
        "accuracy": float((truth == pred).mean()),
        "precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(truth.sum()), 1),
        "errors": Counter(f"{r['label']}:{r['kind']}" for r, t, p in zip(rows, truth, pred) if t != p),
    }
