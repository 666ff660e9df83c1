"""Build `snippets.jsonl`, the labelled code/prose set that measures `heuristics.is_code`.

Run once on the development machine (`python mechmem/code_samples/build.py`); the output is
shipped, this script documents where each snippet came from. Snippets are 200-300-character
windows cut at random offsets (about 64 tokens, cut anywhere, as the Pile's samples are) from:

- code: Python sources (docstrings and comments masked out), C/C++ headers, JavaScript,
  CSS, HTML markup, SQL, shell, Go, Perl and PHP files found on disk, Rust listings of the
  Rust book, plus `handwritten.CODE` (LaTeX, SQL, shell, config files, Java, Ruby, R, asm);
- prose: paragraphs of Python's documentation topics and docstrings, license texts, Debian
  READMEs, IDLE's NEWS, Perl POD, the Rust book, plus `handwritten.PROSE` (news, fiction,
  abstracts, legal, forum posts, numbers and lists, French/German/Spanish, LaTeX bodies, ...).

A code window is kept only when at most 35% of it is comment or docstring; a prose window only
when it comes from paragraphs without indented (verbatim) lines and with >= 80% letters or
spaces. Labels come from the origin, not from any classifier.

Two splits: `dev` (seed 0, half the hand-written snippets) is what `is_code` was tuned on;
`test` (seed 1, the other half) was drawn after its weights were frozen and is the estimate.
Paths missing on another machine are skipped, so a rebuild elsewhere differs.
"""

from __future__ import annotations

import ast
import glob
import html
import io
import json
import re
import sys
import tokenize
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "snippets.jsonl"
PY = "/root/.pyenv/versions/3.11.7/lib/python3.11"
RUST_BOOK = "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book"
MIN_CHARS, MAX_CHARS = 200, 300


def read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def windows(text: str, mask: np.ndarray | None, n: int, rng, *, max_masked: float = 0.35, tries: int = 40) -> list[str]:
    """Up to `n` random windows of `text` with at most `max_masked` of their chars under `mask`."""
    out: list[str] = []
    for _ in range(tries):
        if len(out) >= n or len(text) < MAX_CHARS + 10:
            break
        size = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
        start = int(rng.integers(0, len(text) - size))
        w = text[start:start + size]
        if mask is not None and mask[start:start + size].mean() > max_masked:
            continue
        if len(w.strip()) < MIN_CHARS * 0.8 or any(w[:100] in o or o[:100] in w for o in out):
            continue
        out.append(w)
    return out


# ---------------------------------------------------------------- comment masks (code side)
def python_mask(src: str) -> np.ndarray:
    """True on comments and docstrings (string statements), the prose inside Python files."""
    mask = np.zeros(len(src), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum([len(l) for l in src.splitlines(keepends=True)])])
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return np.ones(len(src), dtype=bool)
    prev = None
    for tok in tokens:
        is_doc = tok.type == tokenize.STRING and (prev is None or prev.type in (tokenize.NEWLINE, tokenize.INDENT,
                                                                                 tokenize.DEDENT, tokenize.NL))
        if tok.type == tokenize.COMMENT or is_doc:
            a = offsets[tok.start[0] - 1] + tok.start[1]
            b = offsets[tok.end[0] - 1] + tok.end[1]
            mask[a:b] = True
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok
    return mask


def regex_mask(src: str, pattern: str) -> np.ndarray:
    mask = np.zeros(len(src), dtype=bool)
    for m in re.finditer(pattern, src, flags=re.S | re.M):
        mask[m.start():m.end()] = True
    return mask


C_COMMENTS = r"/\*.*?\*/|(?<![:\"'])//[^\n]*"
HASH_COMMENTS = r"^\s*#(?!!)[^\n]*"
SQL_COMMENTS = r"/\*.*?\*/|--[^\n]*"
PERL_COMMENTS = r"^=\w+.*?^=cut\b|^\s*#[^\n]*|/\*.*?\*/"


def html_text_mask(src: str) -> np.ndarray:
    """True outside tags: HTML windows count as code only when mostly markup (SVG path data is text)."""
    mask = np.ones(len(src), dtype=bool)
    for m in re.finditer(r"<[^>]{0,200}>", src):
        mask[m.start():m.end()] = False
    return mask


# ---------------------------------------------------------------- prose extraction
def clean_paragraphs(text: str) -> str:
    """Paragraphs without indented/verbatim lines or doctest prompts; line breaks kept, indentation not."""
    keep = []
    for para in re.split(r"\n\s*\n", text):
        lines = [l for l in para.splitlines() if l.strip()]
        if not lines or any(l.startswith(("   ", "\t", ">>>", "$ ", "=", "|", "+")) for l in lines):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters / max(len(para), 1) < 0.8 or len(para) < 80:
            continue
        keep.append("\n".join(l.strip() for l in lines))
    return "\n\n".join(keep)


def prose_blocks(text: str) -> str:
    """Like `clean_paragraphs` but keeps each line as found (docstrings are indented in their file)."""
    keep = []
    for para in re.split(r"\n\s*\n", text):
        lines = [l for l in para.splitlines() if l.strip()]
        if not lines or any(l.lstrip().startswith((">>>", "$ ", "*", "-", "=", "|", "+")) for l in lines):
            continue
        indents = {len(l) - len(l.lstrip()) for l in lines[1:]}
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if len(indents) > 1 or letters / max(len(para), 1) < 0.8 or len(para) < 80:
            continue
        keep.append("\n".join(lines))
    return "\n\n".join(keep)


def docstrings(src: str) -> str:
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return ""
    docs = [ast.get_docstring(n, clean=False) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return prose_blocks("\n\n".join(d for d in docs if d))


class _Blocks(HTMLParser):
    """Collects <p> text and <code class="language-rust"> listings of an mdBook page."""

    def __init__(self):
        super().__init__()
        self.paras, self.rust, self._buf, self._mode = [], [], [], None

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        if tag == "p" and self._mode is None:
            self._mode, self._buf = "p", []
        elif tag == "code" and "language-rust" in cls:
            self._mode, self._buf = "rust", []

    def handle_endtag(self, tag):
        if (tag == "p" and self._mode == "p") or (tag == "code" and self._mode == "rust"):
            (self.paras if self._mode == "p" else self.rust).append("".join(self._buf))
            self._mode = None

    def handle_data(self, data):
        if self._mode:
            self._buf.append(data)


def rust_book() -> tuple[str, str]:
    paras, rust = [], []
    for f in sorted(glob.glob(f"{RUST_BOOK}/ch*.html")):
        p = _Blocks()
        p.feed(read(f))
        paras += [" ".join(x.split()) for x in p.paras if len(x) > 120]
        rust += [x for x in p.rust if x.count("\n") >= 3]
    return "\n\n".join(paras), "\n\n".join(html.unescape(r) for r in rust)


def files(pattern: str, limit: int, rng) -> list[str]:
    found = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if len(found) > limit:
        found = [found[i] for i in sorted(rng.choice(len(found), limit, replace=False))]
    return found


def from_files(pattern, n_files, per_file, rng, mask_fn=None, text_fn=None, max_masked=0.35):
    out = []
    for f in files(pattern, n_files, rng):
        text = read(f)
        if text_fn is not None:
            text = text_fn(text)
        if not text:
            continue
        mask = mask_fn(text) if mask_fn is not None else None
        out += [(f, w) for w in windows(text, mask, per_file, rng, max_masked=max_masked)]
    return out


def collect(seed: int, scale: float) -> list[dict]:
    """Windows from the disk sources, `scale` times the base counts, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = []

    def add(label, kind, items, n):
        n = max(1, round(n * scale))
        items = [items[i] for i in sorted(rng.choice(len(items), min(n, len(items)), replace=False))]
        rows.extend({"label": label, "kind": kind, "source": src.replace("/root/.pyenv/versions/", "pyenv:"),
                     "text": text} for src, text in items)

    # ---- code
    add("code", "python", from_files(f"{PY}/[a-z]*/[a-z]*.py", 200, 1, rng, python_mask), 55)
    add("code", "c", from_files("/usr/include/**/*.h", 300, 1, rng, lambda s: regex_mask(s, C_COMMENTS)), 20)
    add("code", "cpp", from_files("/usr/include/c++/12/bits/*.h", 80, 1, rng, lambda s: regex_mask(s, C_COMMENTS)), 12)
    add("code", "javascript", from_files(f"{PY}/site-packages/**/*.js", 60, 2, rng,
                                         lambda s: regex_mask(s, C_COMMENTS)), 20)
    add("code", "css", from_files(f"{PY}/site-packages/**/*.css", 40, 2, rng, lambda s: regex_mask(s, C_COMMENTS)), 10)
    add("code", "html", from_files(f"{RUST_BOOK}/ch*.html", 40, 2, rng, html_text_mask, max_masked=0.4), 12)
    add("code", "sql", from_files("/usr/share/postgresql/15/**/*.sql", 60, 1, rng,
                                  lambda s: regex_mask(s, SQL_COMMENTS)), 12)
    add("code", "shell", from_files("/usr/share/doc/git/contrib/**/*.sh", 40, 1, rng,
                                    lambda s: regex_mask(s, HASH_COMMENTS)), 12)
    add("code", "go", from_files("/usr/share/doc/git/contrib/**/*.go", 10, 3, rng,
                                 lambda s: regex_mask(s, C_COMMENTS)), 6)
    add("code", "perl", from_files("/usr/share/perl/5.36.0/**/*.pm", 60, 1, rng,
                                   lambda s: regex_mask(s, PERL_COMMENTS)), 10)
    add("code", "php", from_files("/usr/lib/google-cloud-sdk/**/*.php", 40, 1, rng,
                                  lambda s: regex_mask(s, C_COMMENTS + "|" + HASH_COMMENTS)), 10)
    book_prose, book_rust = rust_book()
    add("code", "rust", [("rust-book", w) for w in windows(book_rust, None, 12, rng, tries=200)], 12)

    # ---- prose
    sys.path.insert(0, PY)
    from pydoc_data.topics import topics  # noqa: E402

    topic_items = [(f"pydoc_data.topics:{k}", w) for k in sorted(topics)
                   for w in windows(clean_paragraphs(topics[k]), None, 1, rng)]
    add("prose", "python-docs", topic_items, 45)
    add("prose", "docstring", from_files(f"{PY}/[a-z]*.py", 150, 1, rng, text_fn=docstrings), 35)
    add("prose", "license", from_files("/usr/share/common-licenses/*", 20, 2, rng, text_fn=clean_paragraphs)
        + from_files(f"{PY}/LICENSE.txt", 1, 4, rng, text_fn=clean_paragraphs), 30)
    add("prose", "readme", from_files("/usr/share/doc/*/README*", 80, 1, rng, text_fn=clean_paragraphs), 20)
    add("prose", "changelog", from_files(f"{PY}/idlelib/[CHN]*.txt", 10, 3, rng, text_fn=clean_paragraphs), 12)
    add("prose", "perl-pod", from_files("/usr/share/perl/5.36.0/**/*.pod", 60, 1, rng, text_fn=clean_paragraphs), 15)
    add("prose", "rust-book", [("rust-book", w) for w in windows(book_prose, None, 25, rng, tries=300)], 25)
    return rows


def handwritten(half: int) -> list[dict]:
    """Every other hand-written snippet of each kind (`half` 0 or 1), so both splits get each kind."""
    rows = []
    for label, groups in (("code", HANDWRITTEN.CODE), ("prose", HANDWRITTEN.PROSE)):
        for kind, snippets in groups.items():
            rows += [{"label": label, "kind": kind, "source": "handwritten", "text": t} for t in snippets[half::2]]
    return rows


def build() -> list[dict]:
    """dev: what `is_code` was tuned on; test: drawn afterwards with another seed, held out."""
    dev = collect(seed=0, scale=0.5) + handwritten(0)
    seen = {r["text"][:80] for r in dev}
    test = [r for r in collect(seed=1, scale=0.6) + handwritten(1) if r["text"][:80] not in seen]
    return [dict(r, split="dev") for r in dev] + [dict(r, split="test") for r in test]


sys.path.insert(0, str(HERE))
import handwritten as HANDWRITTEN  # noqa: E402


if __name__ == "__main__":
    rows = build()
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    by: dict[tuple[str, str], tuple[int, int]] = {}
    for r in rows:
        key = (r["label"], r["kind"])
        by[key] = by.get(key, (0, 0))
        by[key] = (by[key][0] + (r["split"] == "dev"), by[key][1] + (r["split"] == "test"))
    print(f"{len(rows)} snippets, {OUT.stat().st_size / 1024:.0f} KiB -> {OUT}")
    for k, v in sorted(by.items()):
        print(f"  {k[0]:5s} {k[1]:12s} dev {v[0]:3d}  test {v[1]:3d}")
