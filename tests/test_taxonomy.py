"""Taxonomies: METHOD.md's priority rules for every paper id, names as in the paper's tables, splits."""

import csv
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechmem import taxonomy as tx

FIXTURES = Path(__file__).parent / "fixtures"


def paper_names() -> list[tuple[str, int]]:
    """(display name, number of classes) of the 54 rows of the paper's tables."""
    lines = [l for l in (FIXTURES / "paper_taxonomy_names.csv").read_text().splitlines() if not l.startswith("#")]
    return [(r["tax_name"], int(r["num_classes"])) for r in csv.DictReader(lines)]


def grid_frame() -> pd.DataFrame:
    """Every combination of the facts a category reads, around the thresholds used below."""
    values = dict(
        memorization_score=[0.5, 1.0, np.nan],
        sequence_duplicates=[0, 5, 6, 50, 51, 1000, 1001],
        is_repeating=[False, True],
        is_incrementing=[False, True],
        is_code=[False, True],
        rouge_L_prefix_to_suffix=[0.0, 0.5, 0.65],
        rouge_3_prefix_to_suffix=[0.1, 0.6],
    )
    rows = list(itertools.product(*values.values()))
    return pd.DataFrame(rows, columns=list(values))


def reference_label(row, tax_id: str, t: int, rho: float, rouge: str) -> int:
    """METHOD.md sections 2-3 written out row by row, independently of the module."""
    if not row.memorization_score < 1 and not row.memorization_score == 1:
        return -1
    if row.memorization_score < 1:
        return 0
    pattern = row.is_repeating or row.is_incrementing
    close = {"either": max(row.rouge_L_prefix_to_suffix, row.rouge_3_prefix_to_suffix),
             "L": row.rouge_L_prefix_to_suffix, "3": row.rouge_3_prefix_to_suffix}[rouge] >= rho
    member = {"recite": row.sequence_duplicates > t, "recollect": row.sequence_duplicates <= t,
              "reconstruct": pattern, "guess": pattern or close, "code": row.is_code, "memo": True}
    merge = 0
    if tax_id.startswith("merge_"):
        merge, tax_id = int(tax_id[6]), tax_id[8:]
    a, b, c = tax_id.split("_")[1:]
    first = next((k for k, cat in enumerate((a, b, c)) if member[cat]), None)
    if first is None:
        return -1
    return [[1, 2, 3], [1, 1, 2], [1, 2, 2]][merge][first]


def test_twenty_ids():
    assert len(tx.TAXONOMY_IDS) == len(set(tx.TAXONOMY_IDS)) == 20
    assert tx.PROPOSED in tx.TAXONOMY_IDS
    assert tx.display_name(tx.PROPOSED) == tx.PROPOSED_NAME == "Non-Memo, Guess, Others"
    for tax_id in tx.TAXONOMY_IDS:
        merge, cats = tx.parse_id(tax_id)
        assert len(tx.class_names(tax_id)) == (4 if merge == 0 else 3)


@pytest.mark.parametrize("tax_id", tx.TAXONOMY_IDS)
def test_assign_categories_follows_priority_rules(tax_id):
    df = grid_frame()
    for t, (rouge, rho) in itertools.product((5, 50, 1000), [("either", 0.5), ("L", 0.6), ("3", 0.55)]):
        got = tx.assign_categories(df, tax_id, duplicates_threshold=t, rouge_threshold=rho, rouge=rouge)
        expected = np.array([reference_label(r, tax_id, t, rho, rouge) for r in df.itertuples()])
        np.testing.assert_array_equal(got, expected, err_msg=f"{tax_id} t={t} rouge={rouge} rho={rho}")
        assert got.dtype.kind == "i"
        # every paper id covers all samples with a score: only the NaN rows are in no class
        np.testing.assert_array_equal(got == -1, df["memorization_score"].isna().to_numpy())


def test_hand_checked_rows():
    df = pd.DataFrame(dict(
        memorization_score=[0.9, 1.0, 1.0, 1.0, 1.0, np.nan],
        sequence_duplicates=[100, 100, 5, 6, 2, 1],
        is_repeating=[True, False, False, False, True, False],
        is_incrementing=[False] * 6,
        is_code=[True, False, True, False, False, False],
        rouge_L_prefix_to_suffix=[1.0, 0.5, 0.1, 0.49, 0.0, 0.0],
        rouge_3_prefix_to_suffix=[1.0, 0.0, 0.0, 0.2, 0.0, 0.0],
    ))
    # proposed: Non-Memo / Guess (pattern or ROUGE >= 0.5) / Others (recall)
    assert tx.assign_categories(df, "Non-Memo, Guess, Others").tolist() == [0, 1, 2, 2, 1, -1]
    # recite (dups > 5) wins over guess; the 5-duplicate row recollects (<= t)
    assert tx.assign_categories(df, "Non-Memo, Recite[5], Guess, Others").tolist() == [0, 1, 3, 1, 2, -1]
    assert tx.assign_categories(df, "Non-Memo, Guess, Recite[5], Others").tolist() == [0, 1, 3, 2, 1, -1]
    # ROUGE-3 only: 0.5 on ROUGE-L no longer guesses
    assert tx.assign_categories(df, tx.PROPOSED, rouge="3").tolist() == [0, 2, 2, 2, 1, -1]
    assert tx.assign_categories(df, "Non-Memo, Code, Others").tolist() == [0, 2, 1, 2, 2, -1]


def test_generic_ids_leave_unclaimed_rows_out():
    df = pd.DataFrame(dict(memorization_score=[1.0, 1.0], sequence_duplicates=[0, 0], is_repeating=[False, True],
                           is_incrementing=[False, False], is_code=[False, False],
                           rouge_L_prefix_to_suffix=[0.0, 0.0], rouge_3_prefix_to_suffix=[0.0, 0.0]))
    assert tx.assign_categories(df, "other_reconstruct_code_recite").tolist() == [-1, 1]
    assert tx.class_names("other_reconstruct_code_recite", 50) == ["Non-Memo", "Reconstruct", "Code", "Others"]


def test_only_needed_columns_are_required():
    df = pd.DataFrame(dict(memorization_score=[1.0, 0.2], sequence_duplicates=[10, 1]))
    assert tx.assign_categories(df, "other_recite_recollect_memo").tolist() == [1, 0]
    with pytest.raises(ValueError, match="'is_code'"):
        tx.assign_categories(df, "Non-Memo, Code, Others")
    with pytest.raises(ValueError, match="'is_repeating'"):
        tx.assign_categories(df, tx.PROPOSED)
    bad = df.assign(is_code=[True, None])
    with pytest.raises(ValueError, match="'is_code' has a missing value at row 1"):
        tx.assign_categories(bad, "Non-Memo, Code, Others")


def test_argument_errors():
    df = grid_frame()
    with pytest.raises(ValueError, match="rouge must be"):
        tx.assign_categories(df, tx.PROPOSED, rouge="2")
    with pytest.raises(ValueError, match="unpack_rouge_threshold"):
        tx.assign_categories(df, tx.PROPOSED, rouge_threshold=1.5)
    with pytest.raises(ValueError, match="unknown taxonomy id"):
        tx.assign_categories(df, "other_recite_guess")
    with pytest.raises(ValueError, match="unknown taxonomy name"):
        tx.assign_categories(df, "Non-Memo, Banana, Others")
    with pytest.raises(ValueError, match="threshold"):
        tx.assign_categories(df, "Non-Memo, Recite[5], Others", duplicates_threshold=50)
    with pytest.raises(ValueError, match="non-negative"):
        tx.display_name(tx.PROPOSED, -1)


# --------------------------------------------------------------------------- names
def test_paper_rows_are_the_54_table_rows():
    names = paper_names()
    assert len(names) == 54 and len(tx.PAPER_ROWS) == 54
    ours = [tx.display_name(i, t) for i, t in tx.PAPER_ROWS]
    assert len(set(ours)) == 54
    assert set(ours) == {n for n, _ in names}


@pytest.mark.parametrize("name,n_classes", paper_names())
def test_names_map_to_ids_and_back(name, n_classes):
    tax_id, t = tx.parse_name(name)
    assert tax_id in tx.TAXONOMY_IDS
    assert tx.display_name(tax_id, t) == name
    assert ", ".join(tx.class_names(name)) == name
    assert len(tx.class_names(tax_id, t)) == n_classes
    assert (tax_id, t) in tx.PAPER_ROWS


def test_name_examples():
    assert tx.display_name("merge_1_other_guess_recollect_recite", 50) == "Non-Memo, Guess-or-Recollect[50], Others"
    assert tx.display_name("other_recite_guess_recollect", 5) == "Non-Memo, Recite[5], Guess, Others"
    assert tx.display_name("other_recollect_code_recite", 1000) == "Non-Memo, Recollect[1k], Code, Others"
    assert tx.parse_name("Non-Memo, Guess, Others") == (tx.PROPOSED, 5)
    assert tx.parse_name(" Non-Memo ,Recite[1000], Others") == ("merge_2_other_recite_reconstruct_recollect", 1000)
    assert tx.parse_name(tx.PROPOSED) == (tx.PROPOSED, 5)
    assert tx.class_names(tx.PROPOSED) == ["Non-Memo", "Guess", "Others"]
    assert tx.class_names("Non-Memo, Recite[50], Guess, Others") == ["Non-Memo", "Recite[50]", "Guess", "Others"]


def test_display_name_threshold_is_used():
    df = pd.DataFrame(dict(memorization_score=[1.0, 1.0], sequence_duplicates=[10, 100], is_repeating=[False] * 2,
                           is_incrementing=[False] * 2))
    assert tx.assign_categories(df, "Non-Memo, Recite[50], Others").tolist() == [2, 1]
    assert tx.assign_categories(df, "Non-Memo, Recite[5], Others").tolist() == [1, 1]
    assert tx.assign_categories(df, "merge_2_other_recite_reconstruct_recollect",
                                duplicates_threshold=50).tolist() == [2, 1]


# --------------------------------------------------------------------------- packed ROUGE threshold
def test_rouge_threshold_packing():
    for k, rouge in enumerate(("either", "L", "3")):
        for tenth in range(1, 11):
            rho = tenth / 10
            packed = round(k + rho, 1)
            assert tx.unpack_rouge_threshold(packed) == (rouge, rho)
            assert tx.pack_rouge_threshold(rouge, rho) == packed
    for bad in (0.0, -1, 3.01):
        with pytest.raises(ValueError, match=r"\(0, 3\]"):
            tx.unpack_rouge_threshold(bad)
    with pytest.raises(ValueError, match="rho"):
        tx.pack_rouge_threshold("L", 1.2)
    with pytest.raises(ValueError, match="rouge must be"):
        tx.pack_rouge_threshold("2", 0.5)


def test_packed_values_select_the_paper_rows():
    """Unpacking then assigning equals the paper's rule for the packed value, on the grid."""
    df = grid_frame()
    memorized = df["memorization_score"].to_numpy() == 1
    pattern = (df["is_repeating"] | df["is_incrementing"]).to_numpy()
    for packed in (0.5, 1.6, 2.55):
        rouge, rho = tx.unpack_rouge_threshold(packed)
        got = tx.primary_category(df, "guess", rouge_threshold=rho, rouge=rouge)
        rl, r3 = df["rouge_L_prefix_to_suffix"].to_numpy(), df["rouge_3_prefix_to_suffix"].to_numpy()
        close = {0.5: (rl >= 0.5) | (r3 >= 0.5), 1.6: rl >= 0.6, 2.55: r3 >= 0.55}[packed]
        np.testing.assert_array_equal(got, memorized & (pattern | close))


# --------------------------------------------------------------------------- splits
def test_balanced_split():
    labels = np.array([0] * 30 + [1] * 12 + [2] * 20 + [-1] * 5)
    tr, ev = tx.balanced_split(labels, 3, train_per_class=6, eval_per_class=4, seed=3)
    assert len(tr) == 18 and len(ev) == 12
    assert not set(tr) & set(ev)
    assert np.bincount(labels[tr], minlength=3).tolist() == [6, 6, 6]
    assert np.bincount(labels[ev], minlength=3).tolist() == [4, 4, 4]
    assert (labels[np.concatenate([tr, ev])] >= 0).all()
    tr2, ev2 = tx.balanced_split(labels, 3, 6, 4, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(ev, ev2)
    tr3, _ = tx.balanced_split(labels, 3, 6, 4, seed=4)
    assert not np.array_equal(tr, tr3)
    # the paper's scheme: one RandomState(seed), classes in order, first draws train
    first = np.random.RandomState(3).choice(np.flatnonzero(labels == 0), size=10, replace=False)
    np.testing.assert_array_equal(tr[:6], first[:6])
    np.testing.assert_array_equal(ev[:4], first[6:])


def test_balanced_split_not_enough_samples():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 20)
    with pytest.raises(tx.NotEnoughSamples, match=r"class 1 \('Guess'\) has 7") as err:
        tx.balanced_split(labels, 3, 6, 4, seed=0, class_names=["Non-Memo", "Guess", "Others"])
    assert "6 train + 4 eval" in str(err.value) and "[30, 7, 20]" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(tx.NotEnoughSamples, match="class 3 has 0"):
        tx.balanced_split(labels, 4, 1, 1, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        tx.balanced_split(labels, 2, 1, 1, seed=0)
    with pytest.raises(ValueError, match="not both 0"):
        tx.balanced_split(labels, 3, 0, 0, seed=0)


def test_class_counts():
    assert tx.class_counts([0, 2, 2, -1, 2], 4).tolist() == [1, 0, 3, 0]
    assert tx.class_counts([], 2).tolist() == [0, 0]


def test_shared_split_draws_one_ranking_across_taxonomies():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, size=3000)
    b = np.where(a == 0, 0, rng.integers(1, 3, size=3000))  # same class 0, memorized samples relabelled
    balanced_split = tx.balanced_split
    tr_a, ev_a = balanced_split(a, 3, 40, 20, seed=0, scheme="shared")
    tr_b, ev_b = balanced_split(b, 3, 40, 20, seed=0, scheme="shared")
    for labels, tr, ev in ((a, tr_a, ev_a), (b, tr_b, ev_b)):
        assert np.bincount(labels[tr], minlength=3).tolist() == [40, 40, 40]
        assert np.bincount(labels[ev], minlength=3).tolist() == [20, 20, 20]
        assert not set(tr) & set(ev)
    used_a, used_b = set(tr_a) | set(ev_a), set(tr_b) | set(ev_b)
    # Class 0 is identical in both, and the memorized draws overlap far beyond chance (~6%).
    assert {i for i in used_a if a[i] == 0} == {i for i in used_b if b[i] == 0}
    memo_a, memo_b = {i for i in used_a if a[i]}, {i for i in used_b if b[i]}
    assert len(memo_a & memo_b) / len(memo_a) > 0.3
    paper_a = balanced_split(a, 3, 40, 20, seed=0)
    assert not np.array_equal(np.sort(paper_a[0]), np.sort(tr_a))
    with pytest.raises(ValueError, match="scheme"):
        balanced_split(a, 3, 40, 20, seed=0, scheme="nested")


@pytest.mark.parametrize("scheme", ["shared", "paper"])
def test_a_matched_split_draws_non_memo_with_the_memorized_classes_source_mix(scheme):
    """match=: Non-Memo (class 0) takes the pooled source mix of the other classes' draws (largest
    remainder), a short source's shortfall from the rest; train and eval both get every source; the
    other classes are drawn as without it; no sample twice."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(600, int), np.ones(200, int), np.full(200, 2)]
    source = np.r_[np.where(rng.random(600) < 0.9, "natural", "pattern"),  # Non-Memo: mostly natural
                   np.where(rng.random(200) < 0.8, "pattern", "natural"),  # class 1: mostly pattern
                   np.array(["planted"] * 30 + ["natural"] * 170)]          # class 2: some planted (Non-Memo has none)
    tr, ev = tx.balanced_split(labels, 3, 40, 20, seed=1, scheme=scheme, match=source)
    assert len(set(tr) | set(ev)) == len(tr) + len(ev) == 180
    non_memo = np.r_[tr[:40], ev[:20]]
    others = np.r_[tr[40:], ev[20:]]
    assert (labels[non_memo] == 0).all() and (labels[others] > 0).all()
    want = {g: int(n) for g, n in zip(*np.unique(source[others], return_counts=True))}
    got = {g: int(n) for g, n in zip(*np.unique(source[non_memo], return_counts=True))}
    # pattern and natural as the memorized classes have them; planted's share (Non-Memo has none) goes
    # to the others by priority
    assert "planted" not in got and sum(got.values()) == 60
    for g in ("pattern", "natural"):  # at least its quota: 60 x its share among the 120 memorized
        assert got[g] >= 60 * want[g] // 120
    assert got["pattern"] + got["natural"] - 60 * (want["pattern"] + want["natural"]) // 120 <= want["planted"] // 2 + 1
    unmatched_tr, _ = tx.balanced_split(labels, 3, 40, 20, seed=1, scheme=scheme)
    assert (np.mean(source[unmatched_tr[:40]] == "pattern") < 0.3) and (np.mean(source[tr[:40]] == "pattern") > 0.3)
    assert {"natural", "pattern"} <= set(source[ev[:20]])  # the eval part is not one source's leftovers
    if scheme == "shared":  # the memorized classes are drawn as without matching
        np.testing.assert_array_equal(np.sort(tr[40:]), np.sort(unmatched_tr[40:]))
