"""Patterned documents: incrementing tables and repeated chunks, fresh for every instance.

The taxonomy's "guess" and "reconstruct" classes need samples the model can continue without
having memorized them. Natural text holds too few, so the corpus adds thousands of small
documents drawn from a handful of families with random parameters (start, step, format,
words). Each instance is planted once or a few times: the model learns the *families* and
then continues instances it saw once, or never (held-out instances).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Words to fill templates; Python-flavoured so the patterns blend with the corpus.
WORDS = (
    "value item key node entry index name data field line row col token chunk block page record "
    "state flag mode level step frame slot cell unit part tag code bit byte word char size count "
    "alpha beta gamma delta omega north south east west red green blue black white left right "
    "start stop open close read write send recv load save push pop get set add del run test"
).split()
SYMBOLS = ["=", "-", "*", "#", "~", "+", "_", ".", "=-", "-=", "*-", "<>", "/\\", "+-", "#=", ". "]


@dataclass(frozen=True)
class Pattern:
    family: str      # e.g. "inc_lines", "rep_words"
    kind: str        # "incrementing" or "repeating"
    text: str


def _word(rng: np.random.Generator) -> str:
    return WORDS[rng.integers(len(WORDS))]


def _ident(rng: np.random.Generator) -> str:
    parts = [_word(rng) for _ in range(rng.integers(1, 3))]
    return "_".join(parts) if rng.random() < 0.7 else "".join(p.capitalize() for p in parts)


def _start_step(rng: np.random.Generator) -> tuple[int, int]:
    step = int(rng.choice([1, 1, 1, 1, 2, 2, 3, 4, 5, 8, 10, 16, 100]))
    start = int(rng.choice([0, 1, int(rng.integers(0, 100)), int(rng.integers(0, 1000)), int(rng.integers(0, 50000))]))
    return start, step


def inc_lines(rng, n_chars):
    """One number per line with constant text around it: '12. item', '- 13) item', ..."""
    start, step = _start_step(rng)
    lead = rng.choice(["", "- ", "* ", "# ", "    ", "| ", ">>> "])
    trail = rng.choice([".", ")", ":", "", ",", " |"])
    word = "" if rng.random() < 0.4 else " " + " ".join(_word(rng) for _ in range(rng.integers(1, 4)))
    lines: list[str] = []
    n = start
    while sum(map(len, lines)) < n_chars:
        lines.append(f"{lead}{n}{trail}{word}\n")
        n += step
    return "".join(lines)


def inc_list(rng, n_chars):
    """A bracketed, comma-separated arithmetic progression, wrapped every few items."""
    start, step = _start_step(rng)
    per_line = int(rng.integers(4, 13))
    sep = rng.choice([", ", ",", " ", "; "])
    name = _ident(rng)
    items: list[int] = []
    n = start
    while sum(len(str(i)) + 2 for i in items) < n_chars:
        items.append(n)
        n += step
    rows = [sep.join(str(i) for i in items[k:k + per_line]) for k in range(0, len(items), per_line)]
    return f"{name} = [\n    " + (sep.rstrip() + "\n    ").join(rows) + "\n]\n"


def inc_decimal(rng, n_chars):
    """Decimals in arithmetic progression: '0.5, 1.0, 1.5', one or several per line."""
    step = float(rng.choice([0.1, 0.2, 0.25, 0.5, 1.5, 0.05]))
    start = float(rng.integers(0, 200)) * step
    digits = 2 if step in (0.25, 0.05) else 1
    per_line = int(rng.choice([1, 4, 6, 8]))
    sep = rng.choice([", ", " "])
    vals: list[str] = []
    x = start
    while sum(len(v) + 2 for v in vals) < n_chars:
        vals.append(f"{x:.{digits}f}")
        x += step
    return "\n".join(sep.join(vals[k:k + per_line]) for k in range(0, len(vals), per_line)) + "\n"


def inc_table(rng, n_chars):
    """A table of codes: 'NAME_12 = 12', '    0x41: 'x',', 'case 7: return 7'."""
    start, step = _start_step(rng)
    name, word = _ident(rng).upper(), _word(rng)
    style = int(rng.integers(4))
    lines: list[str] = []
    n = start
    while sum(map(len, lines)) < n_chars:
        lines.append([f"{name}_{n} = {n}\n", f"    0x{n:04x}: '{word}',\n", f"    {n}: '{word}',\n",
                      f"        case {n}:\n            return '{word}'\n"][style])
        n += step
    return "".join(lines)


def inc_sections(rng, n_chars):
    """Two-level numbering: '3.1 word', '3.2 word', ..., '4.1 word'."""
    major, per = int(rng.integers(1, 30)), int(rng.integers(3, 7))
    word = " ".join(_word(rng) for _ in range(rng.integers(1, 3))).capitalize()
    lines: list[str] = []
    minor = 1
    while sum(map(len, lines)) < n_chars:
        lines.append(f"{major}.{minor} {word}\n")
        minor += 1
        if minor > per:
            major, minor = major + 1, 1
    return "".join(lines)


def rep_words(rng, n_chars):
    """A chunk of 1-6 random words repeated with a fixed separator."""
    chunk = " ".join(_word(rng) for _ in range(rng.integers(1, 7)))
    sep = rng.choice([" ", "\n", ", ", " | ", "; ", " -- "])
    reps = n_chars // (len(chunk) + len(sep)) + 1
    return sep.join([chunk] * reps) + "\n"


def rep_code(rng, n_chars):
    """One line of code repeated: '    self.load_value()', 'x = x + 1', ..."""
    a, b = _ident(rng), _ident(rng)
    line = [f"    self.{a}()\n", f"{a} = {a} + {b}\n", f"    {a}.append({b})\n", f"assert {a} == {b}\n",
            f"    pass  # {b}\n", f"print('{a}', {b})\n"][int(rng.integers(6))]
    return line * (n_chars // len(line) + 1)


def rep_symbols(rng, n_chars):
    """Rules and separators: a short symbol string repeated, wrapped at a fixed width."""
    sym = SYMBOLS[rng.integers(len(SYMBOLS))] * int(rng.integers(1, 3))
    width = int(rng.choice([40, 60, 70, 72, 79]))
    line = (sym * (width // len(sym) + 1))[:width] + "\n"
    return line * (n_chars // len(line) + 1)


def rep_block(rng, n_chars):
    """A small multi-line block (random words) repeated verbatim: the period spans lines."""
    lines = [" ".join(_word(rng) for _ in range(rng.integers(1, 4))) for _ in range(rng.integers(2, 4))]
    block = "\n".join(lines) + "\n"
    return block * (n_chars // len(block) + 1)


FAMILIES = {
    "inc_lines": ("incrementing", inc_lines),
    "inc_list": ("incrementing", inc_list),
    "inc_decimal": ("incrementing", inc_decimal),
    "inc_table": ("incrementing", inc_table),
    "inc_sections": ("incrementing", inc_sections),
    "rep_words": ("repeating", rep_words),
    "rep_code": ("repeating", rep_code),
    "rep_symbols": ("repeating", rep_symbols),
    "rep_block": ("repeating", rep_block),
}


# Characters per family scaled so that instances have about the same number of tokens
# (numbers cost more tokens per character than words); about 150 tokens with the testbed's BPE.
CHAR_SCALE = {"inc_lines": 0.6, "inc_list": 0.55, "inc_decimal": 0.5, "inc_table": 0.75, "inc_sections": 0.6,
              "rep_words": 1.1, "rep_code": 0.9, "rep_symbols": 0.6, "rep_block": 0.9}


def make_patterns(n: int, seed: int, *, min_chars: int = 350, max_chars: int = 550) -> list[Pattern]:
    """`n` fresh instances, families in turn, parameters from one seeded generator."""
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    out = []
    for i in range(n):
        family = names[i % len(names)]
        kind, make = FAMILIES[family]
        n_chars = int(rng.integers(min_chars, max_chars + 1) * CHAR_SCALE.get(family, 1.0))
        out.append(Pattern(family, kind, make(rng, n_chars)))
    return out
