"""The monitor's evaluation on the testbed: held-out prompts, ground truth, metrics."""

import numpy as np
import pandas as pd
import pytest

from mechmem.monitor import MonitorResult, Span
from mechmem.monitor_eval import (EvalConfig, TrainingOverlap, at_same_rate, by_source, detection_metrics, evaluate,
                                  grouped_bootstrap, guessable, heldout_prompts, overlapping_prompts, stretch_table,
                                  stretch_windows)
from mechmem.testbed.corpus import Corpus
from mechmem.testbed.duplicates import WindowIndex

EOS = 99


@pytest.fixture
def corpus():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 90, 3000).astype(np.uint16)
    train[1000] = EOS  # a document boundary
    held = rng.integers(0, 90, 1000).astype(np.uint16)
    positions = [0, 100, 950, 2000, 10, 400]
    windows = {"stream": np.array([0, 0, 0, 0, 1, 1], np.int8), "position": np.array(positions, np.int64),
               "source": np.array(["planted", "planted", "planted", "stdlib", "heldout", "heldout_pattern"]),
               "planted_count": np.array([3, 1500, 20, 0, 0, 0]), "family": np.array(["", "", "", "", "", "inc"])}
    return Corpus(train, held, windows, {})


def test_heldout_prompts_skip_training_overlaps_and_document_ends(corpus):
    train = corpus.train_stream.astype(np.int64)
    rows = np.stack([train[101:165],  # the planted[1001-2000] candidate shifted by one: a training sample
                     train[2066:2130]])  # shares 31 tokens with the stdlib candidate's true text: allowed
    prompts, skipped = heldout_prompts(corpus, TrainingOverlap(rows, 32), EOS, EvalConfig(prompts_per_source=5))
    # 950+1 crosses the EOS at 1000 (not a skip of the rule); 100+1 overlaps a training sample
    assert sorted(prompts["position"]) == [1, 11, 401, 2001]
    assert skipped["planted[1001-2000]"] == 1 and sum(skipped.values()) == 1
    assert set(prompts["source"]) == {"planted[1-5]", "stdlib", "heldout", "heldout_pattern"}
    row = prompts[prompts["position"] == 2001].iloc[0]
    np.testing.assert_array_equal(row["prompt"], train[2001:2033])
    np.testing.assert_array_equal(row["true_continuation"], train[2033:2065])
    # the document: "stream:first token", after the EOS at 1000 for the stdlib prompt
    assert dict(zip(prompts["position"], prompts["source_id"])) == {1: "0:0", 2001: "0:1001", 11: "1:0", 401: "1:0"}
    # one token more of overlap and the stdlib candidate goes too
    rows2 = np.concatenate([rows, train[None, 2065:2129]])
    prompts2, skipped2 = heldout_prompts(corpus, TrainingOverlap(rows2, 32), EOS, EvalConfig(prompts_per_source=5))
    assert 2001 not in set(prompts2["position"]) and skipped2["stdlib"] == 1


def test_training_overlap_catches_shifts_not_unrelated_windows():
    rng = np.random.default_rng(3)
    text = rng.integers(0, 500, 400)
    rows = np.stack([text[0:64], text[200:264]])
    overlap = TrainingOverlap(rows, 32)
    windows = np.stack([
        text[1:65],  # a one-token shift of a training row: 63 tokens shared
        text[32:96],  # shares exactly its first 32 tokens with row 0's last 32
        text[33:97],  # 31 tokens shared
        rng.integers(500, 1000, 64),  # unrelated
        np.concatenate([text[48:64], text[200:216], rng.integers(500, 1000, 32)]),  # 16 + 16 across two rows
    ])
    assert overlap.hits(windows).tolist() == [True, True, False, False, False]
    # a brute-force scan agrees on random shifts
    starts = rng.integers(0, 336, 40)
    brute = [any(np.array_equal(text[s + j:s + j + 32], r[i:i + 32]) for r in rows for i in range(33)
                 for j in range(33)) for s in starts]
    assert overlap.hits(np.stack([text[s:s + 64] for s in starts])).tolist() == brute
    with pytest.raises(ValueError, match="width >= 32"):
        overlap.hits(np.zeros((1, 31), dtype=np.int64))


def test_grouped_bootstrap_resamples_groups_not_rows():
    rng = np.random.default_rng(0)
    # 10 groups of 20 identical rows: a group's members are perfectly correlated
    group_values = rng.normal(size=10)
    values, groups = np.repeat(group_values, 20), np.repeat(np.arange(10), 20)
    mean = lambda r: float(values[r].mean())  # noqa: E731
    lo_g, hi_g = grouped_bootstrap(groups, mean, 500, seed=0)
    lo_r, hi_r = grouped_bootstrap(np.arange(len(values)), mean, 500, seed=0)  # each row its own group
    assert lo_g < values.mean() < hi_g and lo_r < values.mean() < hi_r
    # 10 independent draws, not 200: the grouped interval is about sqrt(20) times as wide
    assert (hi_g - lo_g) > 3 * (hi_r - lo_r)
    # one group: every resample is the whole data
    assert grouped_bootstrap(np.zeros(5), lambda r: float(len(r)), 20, 0) == (5.0, 5.0)
    assert np.isnan(grouped_bootstrap(groups, lambda r: float("nan"), 20, 0)).all()


class _Tok:
    def batch_decode(self, rows):
        return [" ".join(f"w{t}" for t in r) for r in rows]


def test_guessable_is_the_taxonomys_pattern_or_rouge_condition():
    rng = np.random.default_rng(0)
    fresh = rng.integers(0, 10_000, 64)
    copied = np.concatenate([fresh[:32], fresh[:32]])  # the stretch repeats its context: ROUGE 1
    flags = guessable(np.stack([fresh, copied]), _Tok())
    assert flags.tolist() == [False, True]


def result_of(prompts, outputs, starts, probs):
    spans = [Span(i, a, a + 32, "Non-Memo", p[0] < 0.5, dict(zip(["Non-Memo", "Guess", "Others"], p)), -1.0, a == 0)
             for (i, a), p in zip(starts, probs)]
    return MonitorResult([list(p) for p in prompts], np.asarray(outputs), np.zeros(np.shape(outputs)), spans,
                         ["Non-Memo", "Guess", "Others"])


def test_stretch_table_truth_comes_from_the_index():
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 1000, 500)
    prompts = [stream[:32], rng.integers(1000, 2000, 40)]
    outputs = [stream[32:96], rng.integers(1000, 2000, 64)]
    starts = [(0, 0), (0, 32), (1, 0), (1, 32)]
    res = result_of(prompts, outputs, starts, [[0.1, 0.2, 0.7]] * 4)
    windows = stretch_windows(res)
    np.testing.assert_array_equal(windows[1], stream[32:96])  # 32 before the stretch, then the stretch
    np.testing.assert_array_equal(windows[2], np.concatenate([prompts[1][8:], outputs[1][:32]]))
    df = stretch_table(res, pd.DataFrame({"source": ["a", "b"], "source_id": ["0:0", "1:5"]}),
                       WindowIndex(stream, 32), _Tok())
    assert df["recited"].tolist() == [True, True, False, False]
    assert df["source_id"].tolist() == ["0:0", "0:0", "1:5", "1:5"]
    assert df["source"].tolist() == ["a", "a", "b", "b"] and df["reused"].tolist() == [True, False, True, False]


def test_overlapping_prompts_read_every_window_of_the_output():
    rng = np.random.default_rng(2)
    stream = rng.integers(0, 1000, 500)
    prompts = [rng.integers(1000, 2000, 32), rng.integers(1000, 2000, 32), stream[:32]]
    outputs = [rng.integers(1000, 2000, 64), np.concatenate([rng.integers(1000, 2000, 32), stream[300:332]]),
               rng.integers(1000, 2000, 64)]
    res = result_of(prompts, outputs, [(i, a) for i in range(3) for a in (0, 32)], [[0.1, 0.2, 0.7]] * 6)
    # prompt 1: only its second stretch (generated text) is a training sample's run; prompt 2: its prompt
    rows = np.stack([stream[290:354], stream[0:64]])
    assert overlapping_prompts(res, TrainingOverlap(rows, 32)).tolist() == [False, True, True]
    assert overlapping_prompts(res, TrainingOverlap(rows[:1], 48)).tolist() == [False, False, False]


def test_detection_metrics_and_same_rate_baseline():
    y = np.array([1, 1, 0, 0, 1, 0], bool)
    perfect = detection_metrics(y, y.astype(float), y, np.arange(6), n_boot=50)
    assert perfect["auroc"] == 1 and perfect["precision"] == 1 and perfect["recall"] == 1
    wrong = detection_metrics(y, 1 - y.astype(float), ~y, np.arange(6), n_boot=50)
    assert wrong["auroc"] == 0 and wrong["precision"] == 0
    assert at_same_rate(np.array([0.1, 0.9, 0.5, 0.7]), 2).tolist() == [False, True, False, True]
    lo, hi = detection_metrics(y, np.array([0.9, 0.2, 0.4, 0.1, 0.8, 0.3]), y, np.arange(6), n_boot=200)["auroc_ci"]
    assert 0 <= lo <= hi <= 1


def test_evaluate_asks_both_questions():
    df = pd.DataFrame({
        "prompt": np.arange(8), "source_id": np.arange(8) % 3, "recited": [1, 1, 1, 1, 0, 0, 0, 0], "guessable": [1, 1, 0, 0, 1, 0, 0, 0],
        "p_Non-Memo": [0.1, 0.2, 0.1, 0.3, 0.9, 0.8, 0.6, 0.7], "p_Guess": [0.8, 0.7, 0.1, 0.2, 0.05, 0.1, 0.2, 0.1],
        "p_Others": [0.1, 0.1, 0.8, 0.5, 0.05, 0.1, 0.2, 0.2], "mean_logprob": [-0.1, -0.2, -0.3, -2, -1, -3, -4, -5],
    }).astype({"recited": bool, "guessable": bool})
    df["flagged"] = df["p_Non-Memo"] < 0.5
    m = evaluate(df, ["Non-Memo", "Guess", "Others"], n_boot=20).set_index(["question", "method"])
    assert m.loc[("recited vs not", "monitor (CNNs)"), "auroc"] == 1.0
    assert m.loc[("recited vs not", "membership index (ceiling)"), "recall"] == 1.0
    # confidence ranks the recited -2 below the non-recited -1: not perfect
    assert m.loc[("recited vs not", "confidence (mean log-prob)"), "auroc"] == pytest.approx(15 / 16)
    g = m.loc[("Guess vs Recall (recited)", "monitor (CNNs)")]
    assert g["n"] == 4 and g["positives"] == 2 and g["auroc"] == 1.0
    assert m.loc[("recited vs not", "confidence (mean log-prob)"), "groups"] == 3
    # intervals resample source documents: one document, and every resample is the data itself
    one = evaluate(df.assign(source_id=0), ["Non-Memo", "Guess", "Others"], n_boot=20).set_index(["question", "method"])
    conf = one.loc[("recited vs not", "confidence (mean log-prob)")]
    assert conf["auroc_ci"] == (pytest.approx(15 / 16), pytest.approx(15 / 16))
    src = by_source(df.assign(source=["x"] * 4 + ["y"] * 4, label="Non-Memo"), ["Non-Memo", "Guess", "Others"])
    assert src.set_index("source")["documents"].to_dict() == {"x": 3, "y": 3}


def test_the_kind_of_text_baseline_scores_stretches_by_their_source():
    """Each stretch gets its source's class frequencies on the row's training split ("planted[1-5]" is
    the table's "planted"); through evaluate, like any classifier: where the source is the answer it
    is perfect, where every stretch shares one source it ranks nothing (AUROC 0.5)."""
    from mechmem.monitor_eval import source_probabilities, with_probabilities

    names = ["Non-Memo", "Guess", "Others"]
    train_sources = np.array(["stdlib"] * 4 + ["pattern"] * 4 + ["planted"] * 4)
    train_labels = np.repeat([0, 1, 2], 4)
    probs = source_probabilities(train_sources, train_labels, np.array(["planted[1-5]", "pattern", "stdlib", "x"]), 3)
    assert probs.argmax(1).tolist() == [2, 1, 0, 0]  # an unseen source: the first class
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    df = pd.DataFrame({"source_id": np.arange(6), "recited": [1, 1, 1, 0, 0, 0], "guessable": [1, 0, 0, 0, 0, 0],
                       "mean_logprob": np.zeros(6),
                       "source": ["pattern", "planted[6-50]", "planted[1-5]", "stdlib", "stdlib", "stdlib"]}
                      ).astype({"recited": bool, "guessable": bool})
    told = evaluate(with_probabilities(df, source_probabilities(train_sources, train_labels, df["source"], 3), names),
                    names, n_boot=0).set_index(["question", "method"])
    assert told.loc[("recited vs not", "monitor (CNNs)"), "auroc"] == 1.0
    assert told.loc[("Guess vs Recall (recited)", "monitor (CNNs)"), "auroc"] == 1.0
    same = df.assign(source="stdlib")
    blind = evaluate(with_probabilities(same, source_probabilities(train_sources, train_labels, same["source"], 3), names),
                     names, n_boot=0).set_index(["question", "method"])
    assert blind.loc[("recited vs not", "monitor (CNNs)"), "auroc"] == 0.5
