"""Memorization taxonomies: primary categories, the paper's taxonomy ids and names, balanced splits.

Primary categories (METHOD.md section 2; memorized = `memorization_score == 1.0`, t = duplicates
threshold, rho = ROUGE threshold):

    other        memorization_score < 1                              display "Non-Memo"
    recite       memorized and sequence_duplicates >  t              "Recite[t]"
    recollect    memorized and sequence_duplicates <= t              "Recollect[t]"
    reconstruct  memorized and (is_repeating or is_incrementing)     "Reconstruct"
    guess        memorized and (reconstruct or ROUGE >= rho)         "Guess"
    code         memorized and is_code                               "Code"
    memo         memorized                                           "Memo"

A taxonomy id names "other" and three categories A, B, C in priority order; a memorized sample
goes to the first that claims it (A, then B minus A, then C minus both):

    other_A_B_C           4 classes: Non-Memo, A, B, C
    merge_1_other_A_B_C   3 classes: Non-Memo, A-or-B, C
    merge_2_other_A_B_C   3 classes: Non-Memo, A, B-or-C

The paper's display names write the last class "Others" (in every id it benchmarked, C together
with recite/recollect covers all memorized samples, so it is "everything else") and give
recite/recollect their threshold ("Recollect[1k]" for t = 1000). The 20 ids it benchmarked and
how they read (t = 5 shown):

    other_recite_reconstruct_recollect           Non-Memo, Recite[5], Reconstruct, Others
    other_reconstruct_recite_recollect           Non-Memo, Reconstruct, Recite[5], Others
    other_recollect_reconstruct_recite           Non-Memo, Recollect[5], Reconstruct, Others
    merge_1_other_recite_reconstruct_recollect   Non-Memo, Recite[5]-or-Reconstruct, Others
    merge_1_other_reconstruct_recollect_recite   Non-Memo, Reconstruct-or-Recollect[5], Others
    merge_2_other_recite_reconstruct_recollect   Non-Memo, Recite[5], Others
    merge_2_other_recollect_recite_reconstruct   Non-Memo, Recollect[5], Others
    merge_2_other_reconstruct_recollect_recite   Non-Memo, Reconstruct, Others
    other_recite_guess_recollect                 Non-Memo, Recite[5], Guess, Others
    other_guess_recite_recollect                 Non-Memo, Guess, Recite[5], Others
    other_recollect_guess_recite                 Non-Memo, Recollect[5], Guess, Others
    merge_1_other_recite_guess_recollect         Non-Memo, Recite[5]-or-Guess, Others
    merge_1_other_guess_recollect_recite         Non-Memo, Guess-or-Recollect[5], Others
    merge_2_other_guess_recollect_recite         Non-Memo, Guess, Others   (proposed; Others = Recall)
    other_recite_code_recollect                  Non-Memo, Recite[5], Code, Others
    other_code_recite_recollect                  Non-Memo, Code, Recite[5], Others
    other_recollect_code_recite                  Non-Memo, Recollect[5], Code, Others
    merge_1_other_recite_code_recollect          Non-Memo, Recite[5]-or-Code, Others
    merge_1_other_code_recollect_recite          Non-Memo, Code-or-Recollect[5], Others
    merge_2_other_code_recollect_recite          Non-Memo, Code, Others

The three merge_2 ids without recite/recollect in their name do not depend on t, so the paper's
tables hold them once: 17 ids x 3 thresholds + 3 = the 54 rows of `PAPER_ROWS` (t reported as 5).
`merge_2_other_recite_reconstruct_recollect` stands for "Non-Memo, Recite[t], Others", which
merge_2 of the guess or code variants would give too (the paper ran one of them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

CATEGORIES = ("other", "recite", "recollect", "reconstruct", "guess", "code", "memo")
ROUGE_CHOICES = ("either", "L", "3")
PAPER_THRESHOLDS = (5, 50, 1000)
DEFAULT_THRESHOLD = 5

TAXONOMY_IDS: tuple[str, ...] = (
    "other_recite_reconstruct_recollect",
    "other_reconstruct_recite_recollect",
    "other_recollect_reconstruct_recite",
    "merge_1_other_recite_reconstruct_recollect",
    "merge_1_other_reconstruct_recollect_recite",
    "merge_2_other_recite_reconstruct_recollect",
    "merge_2_other_recollect_recite_reconstruct",
    "merge_2_other_reconstruct_recollect_recite",
    "other_recite_guess_recollect",
    "other_guess_recite_recollect",
    "other_recollect_guess_recite",
    "merge_1_other_recite_guess_recollect",
    "merge_1_other_guess_recollect_recite",
    "merge_2_other_guess_recollect_recite",
    "other_recite_code_recollect",
    "other_code_recite_recollect",
    "other_recollect_code_recite",
    "merge_1_other_recite_code_recollect",
    "merge_1_other_code_recollect_recite",
    "merge_2_other_code_recollect_recite",
)
PROPOSED = "merge_2_other_guess_recollect_recite"  # "Non-Memo, Guess, Others"
PROPOSED_NAME = "Non-Memo, Guess, Others"  # its display name (Others = Recall): the default of every stage

_DISPLAY = {"other": "Non-Memo", "recite": "Recite", "recollect": "Recollect", "reconstruct": "Reconstruct",
            "guess": "Guess", "code": "Code", "memo": "Memo"}
_THRESHOLDED = ("recite", "recollect")


class NotEnoughSamples(ValueError):
    """A class of a taxonomy has fewer samples than the split asks for."""


# --------------------------------------------------------------------------- ids and names
def parse_id(tax_id: str) -> tuple[int, tuple[str, str, str]]:
    """'merge_1_other_guess_recollect_recite' -> (1, ('guess', 'recollect', 'recite')); merge 0 = none."""
    merge = 0
    m = re.fullmatch(r"merge_([12])_(.*)", tax_id)
    if m:
        merge, tax_id = int(m.group(1)), m.group(2)
    parts = tax_id.split("_")
    if len(parts) != 4 or parts[0] != "other" or not all(p in CATEGORIES[1:] for p in parts[1:]):
        raise ValueError(f"unknown taxonomy id {tax_id!r}: expected [merge_1_|merge_2_]other_A_B_C with A, B, C "
                         f"among {', '.join(CATEGORIES[1:])}")
    return merge, (parts[1], parts[2], parts[3])


def _fmt_threshold(t: int) -> str:
    return f"{t // 1000}k" if t >= 1000 and t % 1000 == 0 else str(t)


def _category_name(cat: str, t) -> str:
    return f"{_DISPLAY[cat]}[{_fmt_threshold(t) if isinstance(t, int) else t}]" if cat in _THRESHOLDED \
        else _DISPLAY[cat]


def _check_threshold(t) -> int:
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"duplicates threshold must be a non-negative integer, got {t!r}")
    return int(t)


def class_names(taxonomy: str, duplicates_threshold: int = DEFAULT_THRESHOLD) -> list[str]:
    """Display names of the classes, in label order: ['Non-Memo', 'Guess', 'Others']."""
    tax_id, t = _resolve(taxonomy, duplicates_threshold)
    return _class_names(tax_id, t)


def _class_names(tax_id: str, t) -> list[str]:
    merge, (a, b, _) = parse_id(tax_id)
    if merge == 0:
        return ["Non-Memo", _category_name(a, t), _category_name(b, t), "Others"]
    if merge == 1:
        return ["Non-Memo", f"{_category_name(a, t)}-or-{_category_name(b, t)}", "Others"]
    return ["Non-Memo", _category_name(a, t), "Others"]


def display_name(tax_id: str, t: int = DEFAULT_THRESHOLD) -> str:
    """The paper's table name: display_name('merge_1_other_guess_recollect_recite', 50) ==
    'Non-Memo, Guess-or-Recollect[50], Others'."""
    return ", ".join(_class_names(tax_id, _check_threshold(t)))


def _name_key(name: str) -> str:
    return re.sub(r"\s*,\s*", ", ", re.sub(r"\[[^\]]*\]", "[t]", name.strip()))


_BY_NAME = {_name_key(", ".join(_class_names(i, "t"))): i for i in TAXONOMY_IDS}
assert len(_BY_NAME) == len(TAXONOMY_IDS), "two paper ids share a display name"


def _parse_threshold(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m:
        raise ValueError(f"bad duplicates threshold [{text}] in taxonomy name: expected e.g. [5], [50], [1k]")
    return int(m.group(1)) * (1000 if m.group(2) else 1)


def parse_name(display: str) -> tuple[str, int]:
    """'Non-Memo, Recite[50], Guess, Others' -> ('other_recite_guess_recollect', 50).

    Names without a threshold do not depend on it and parse with t = 5. A taxonomy id parses too
    (t = 5). Only the 20 paper ids have names: merged names do not identify an id in general.
    """
    if not isinstance(display, str):
        raise ValueError(f"taxonomy name must be a string, got {display!r}")
    name = display.strip()
    if re.fullmatch(r"(merge_[12]_)?other(_[a-z]+){3}", name):
        parse_id(name)
        return name, DEFAULT_THRESHOLD
    tax_id = _BY_NAME.get(_name_key(name))
    if tax_id is None:
        raise ValueError(f"unknown taxonomy name {display!r}: expected a name from the paper's tables such as "
                         f"'Non-Memo, Guess, Others' or 'Non-Memo, Recite[5], Guess, Others'")
    ts = {_parse_threshold(x) for x in re.findall(r"\[([^\]]*)\]", name)}
    if len(ts) > 1:
        raise ValueError(f"taxonomy name {display!r} carries two different thresholds")
    return tax_id, ts.pop() if ts else DEFAULT_THRESHOLD


def _resolve(taxonomy: str, duplicates_threshold: int) -> tuple[str, int]:
    """(id, t) from an id plus threshold, or from a display name (whose own threshold wins)."""
    t = _check_threshold(duplicates_threshold)
    if not isinstance(taxonomy, str):
        raise ValueError(f"taxonomy must be an id or a display name, got {taxonomy!r}")
    if "," not in taxonomy:
        parse_id(taxonomy.strip())
        return taxonomy.strip(), t
    tax_id, t_name = parse_name(taxonomy)
    if "[" in taxonomy:
        if t not in (DEFAULT_THRESHOLD, t_name):
            raise ValueError(f"taxonomy {taxonomy!r} carries threshold {t_name} but duplicates_threshold={t} "
                             f"was passed; pass the id with the threshold, or the name alone")
        t = t_name
    return tax_id, t


def _paper_rows() -> list[tuple[str, int]]:
    rows, seen = [], set()
    for tax_id in TAXONOMY_IDS:
        for t in PAPER_THRESHOLDS:
            name = display_name(tax_id, t)
            if name not in seen:
                seen.add(name)
                rows.append((tax_id, t if "[" in name else DEFAULT_THRESHOLD))
    return rows


PAPER_ROWS: list[tuple[str, int]] = _paper_rows()  # the 54 (id, t) rows of the paper's tables


# --------------------------------------------------------------------------- ROUGE threshold
def unpack_rouge_threshold(x: float) -> tuple[str, float]:
    """The paper's packed ROUGE threshold -> (rouge, rho): (0, 1] either ROUGE at x, (1, 2] ROUGE-L
    at x - 1, (2, 3] ROUGE-3 at x - 2. Rounded to 12 decimals so 1.3 gives 0.3, not 0.30000000000000004."""
    x = float(x)
    for k, rouge in enumerate(ROUGE_CHOICES):
        if k < x <= k + 1:
            return rouge, round(x - k, 12)
    raise ValueError(f"packed ROUGE threshold must be in (0, 3], got {x}")


def pack_rouge_threshold(rouge: str, rho: float) -> float:
    """Inverse of `unpack_rouge_threshold`: pack_rouge_threshold('L', 0.6) == 1.6."""
    if rouge not in ROUGE_CHOICES:
        raise ValueError(f"rouge must be one of {ROUGE_CHOICES}, got {rouge!r}")
    if not 0 < rho <= 1:
        raise ValueError(f"ROUGE threshold rho must be in (0, 1], got {rho}")
    return round(ROUGE_CHOICES.index(rouge) + float(rho), 12)


# --------------------------------------------------------------------------- categories
def _column(df: pd.DataFrame, name: str, why: str) -> np.ndarray:
    """A column as numpy; flags (is_*) must be complete booleans, numbers may hold NaN."""
    if name not in df.columns:
        raise ValueError(f"column {name!r} is missing: the {why} category needs it")
    col = df[name]
    if not name.startswith("is_"):
        return col.to_numpy(dtype=float)
    missing = pd.isna(col).to_numpy()
    if missing.any():
        raise ValueError(f"column {name!r} has a missing value at row {int(np.flatnonzero(missing)[0])}")
    return col.to_numpy().astype(bool)


def primary_category(df: pd.DataFrame, category: str, *, duplicates_threshold: int = DEFAULT_THRESHOLD,
                     rouge_threshold: float = 0.5, rouge: str = "either") -> np.ndarray:
    """Boolean mask of the rows in one primary category (METHOD.md section 2)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    t = _check_threshold(duplicates_threshold)
    score = _column(df, "memorization_score", category)
    if category == "other":
        return score < 1
    memorized = score == 1
    if category == "memo":
        return memorized
    if category in ("recite", "recollect"):
        dup = _column(df, "sequence_duplicates", category)
        return memorized & ((dup > t) if category == "recite" else (dup <= t))
    if category == "code":
        return memorized & _column(df, "is_code", category)
    pattern = _column(df, "is_repeating", category) | _column(df, "is_incrementing", category)
    if category == "reconstruct":
        return memorized & pattern
    if rouge not in ROUGE_CHOICES:
        raise ValueError(f"rouge must be one of {ROUGE_CHOICES}, got {rouge!r}")
    if not 0 < rouge_threshold <= 1:
        raise ValueError(f"rouge_threshold must be in (0, 1], got {rouge_threshold}; a packed paper value "
                         f"goes through unpack_rouge_threshold first")
    close = np.zeros(len(df), dtype=bool)
    if rouge in ("either", "L"):
        close |= _column(df, "rouge_L_prefix_to_suffix", category) >= rouge_threshold
    if rouge in ("either", "3"):
        close |= _column(df, "rouge_3_prefix_to_suffix", category) >= rouge_threshold
    return memorized & (pattern | close)


def assign_categories(df: pd.DataFrame, taxonomy: str, *, duplicates_threshold: int = DEFAULT_THRESHOLD,
                      rouge_threshold: float = 0.5, rouge: str = "either") -> np.ndarray:
    """Class index per row of `df` under `taxonomy` (an id or a display name), -1 for rows in no
    class (e.g. a missing memorization score). A display name's own threshold ("Recite[50]") wins
    over `duplicates_threshold`."""
    tax_id, t = _resolve(taxonomy, duplicates_threshold)
    merge, cats = parse_id(tax_id)
    kw: dict[str, Any] = dict(duplicates_threshold=t, rouge_threshold=rouge_threshold, rouge=rouge)
    labels = np.full(len(df), -1, dtype=np.int64)
    labels[primary_category(df, "other", **kw)] = 0
    classes = {0: (1, 2, 3), 1: (1, 1, 2), 2: (1, 2, 2)}[merge]  # class of A, B, C
    claimed = np.zeros(len(df), dtype=bool)
    for cat, cls in zip(cats, classes):
        mask = primary_category(df, cat, **kw) & ~claimed
        labels[mask] = cls
        claimed |= mask
    return labels


# --------------------------------------------------------------------------- splits
def class_counts(labels: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """Samples per class (rows labelled -1 are in no class and not counted)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"label {int(labels.max())} out of range for {n_classes} classes")
    return np.bincount(labels[labels >= 0], minlength=n_classes)


def balanced_split(labels: npt.ArrayLike, n_classes: int, train_per_class: int, eval_per_class: int, seed: int = 0,
                   *, class_names: Sequence[str] | None = None, scheme: str = "paper",
                   match: npt.ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced draw without replacement: per class, `train_per_class` +
    `eval_per_class` positions, the first ones for training. Same scheme as the paper (one
    `RandomState(seed)`, classes in order), so the same frame gives the same samples.

    `scheme="shared"` instead ranks all samples once by a seeded random priority and gives each
    class its highest-ranked members: taxonomies over the same table then draw largely the same
    samples, so one feature extraction serves them all (what the alignment runner uses).

    `match` (one group per sample, e.g. each window's source): the first class (Non-Memo in every
    paper row) is drawn last, with the pooled group mix of the other classes' draws (quotas by largest
    remainder; a group with too few members gives its shortfall to the others, by the same ranking),
    so that the kind of text no longer tells it from the memorized classes.

    Returns (train_idx, eval_idx), positions into `labels`, grouped by class. Raises
    NotEnoughSamples naming every class that is too small.
    """
    if train_per_class < 0 or eval_per_class < 0 or train_per_class + eval_per_class == 0:
        raise ValueError(f"train_per_class and eval_per_class must be >= 0 and not both 0, "
                         f"got {train_per_class} and {eval_per_class}")
    labels = np.asarray(labels, dtype=np.int64)
    counts = class_counts(labels, n_classes)
    need = train_per_class + eval_per_class
    short = [c for c in range(n_classes) if counts[c] < need]
    if short:
        names = [f"class {c}" + (f" ({class_names[c]!r})" if class_names is not None else "") for c in short]
        detail = "; ".join(f"{n} has {counts[c]}" for n, c in zip(names, short))
        raise NotEnoughSamples(f"not enough samples for {train_per_class} train + {eval_per_class} eval per class: "
                               f"{detail} (counts per class: {counts.tolist()})")
    if scheme not in ("paper", "shared"):
        raise ValueError(f"unknown split scheme {scheme!r}; use 'paper' or 'shared'")
    rng = np.random.RandomState(seed)
    priority = rng.permutation(len(labels)) if scheme == "shared" else None
    chosen: dict[int, np.ndarray] = {}
    for c in (list(range(1, n_classes)) + [0]) if match is not None else range(n_classes):
        members = np.flatnonzero(labels == c)
        if match is not None and c == 0:
            chosen[c] = _matched(members, np.asarray(match), np.concatenate([chosen[k] for k in range(1, n_classes)]),
                                 need, priority if priority is not None else rng.permutation(len(labels)))
        elif priority is None:
            chosen[c] = rng.choice(members, size=need, replace=False)
        else:  # the class's highest-priority members: every taxonomy draws from one ranking
            chosen[c] = members[np.argsort(priority[members], kind="stable")[:need]]
    train = [chosen[c][:train_per_class] for c in range(n_classes)]
    evals = [chosen[c][train_per_class:] for c in range(n_classes)]
    return np.concatenate(train), np.concatenate(evals)


def _matched(members: np.ndarray, groups: np.ndarray, target: np.ndarray, need: int, priority: np.ndarray) -> np.ndarray:
    """`need` of `members` with the group mix of `target` (largest-remainder quotas, each group's
    highest-priority members; a short group's shortfall filled from the rest by priority), each
    group spread evenly through the order, so that the train/eval cut takes every group alike."""
    names, counts = np.unique(groups[target], return_counts=True)
    exact = need * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[:need - quota.sum()]] += 1
    ranked = members[np.argsort(priority[members], kind="stable")]
    parts = [ranked[groups[ranked] == g][:q] for g, q in zip(names, quota)]
    taken = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    parts.append(ranked[~np.isin(ranked, taken)][:need - len(taken)])
    out = np.concatenate(parts)
    place = np.concatenate([(np.arange(len(part)) + 0.5) / max(len(part), 1) for part in parts])  # each group's j-th of n at (j + 0.5) / n
    return out[np.argsort(place, kind="stable")]
