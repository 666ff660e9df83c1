"""The monitor's evaluation on the testbed: held-out prompts, ground truth, metrics."""

import numpy as np
import pandas as pd
import pytest

from mechmem.monitor import MonitorResult, Span
from mechmem.testbed.corpus import Corpus
from mechmem.testbed.duplicates import WindowIndex
from mechmem.testbed.monitor_eval import (EvalConfig, at_same_rate, detection_metrics, evaluate, guessable,
                                          heldout_prompts, stretch_table, stretch_windows)

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


def test_heldout_prompts_skip_table_rows_and_document_ends(corpus):
    train = corpus.train_stream.astype(np.int64)
    table = np.stack([train[101:165]])  # the planted[1001-2000] candidate shifted by one: a table row
    prompts = heldout_prompts(corpus, table, EOS, EvalConfig(prompts_per_source=5))
    # 950+1 crosses the EOS at 1000; 100+1 is a table row: both left out
    assert sorted(prompts["position"]) == [1, 11, 401, 2001]
    assert set(prompts["source"]) == {"planted[1-5]", "stdlib", "heldout", "heldout_pattern"}
    row = prompts[prompts["position"] == 2001].iloc[0]
    np.testing.assert_array_equal(row["prompt"], train[2001:2033])
    np.testing.assert_array_equal(row["true_continuation"], train[2033:2065])


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
    df = stretch_table(res, pd.DataFrame({"source": ["a", "b"]}), WindowIndex(stream, 32), _Tok())
    assert df["recited"].tolist() == [True, True, False, False]
    assert df["source"].tolist() == ["a", "a", "b", "b"] and df["reused"].tolist() == [True, False, True, False]


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
        "prompt": np.arange(8), "recited": [1, 1, 1, 1, 0, 0, 0, 0], "guessable": [1, 1, 0, 0, 1, 0, 0, 0],
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
