"""How well the regurgitation monitor finds recited text on the testbed, against two baselines.

Held-out prompts: 32-token windows of the testbed's own streams, from:
  planted[lo-hi]   passages planted lo..hi times, cut at odd offsets (the table's windows sit at even ones)
  pattern          patterned documents trained on (1-5 copies): recited, and guessable from the prompt
  heldout_pattern  patterned documents never trained on: guessable, never recited
  heldout          standard-library text never trained on
  stdlib           standard-library text trained on once
  duplicated       natural text the stream repeats (the second testbed's extra windows; none in the first)
Each prompt carries its `source_id`, the document it was cut from ("stream:first token"; a planted
passage, a pattern document, a standard-library file). Prompts of one document are not independent
(before the held-out rule, the 200 prompts of the top copy tier came from 6 passages), so every
interval resamples documents (`grouped_bootstrap`).

Held-out rule (`TrainingOverlap`): a prompt is left out when any 64-token window the CNNs read for it
(prompt + the model's own continuation, and every later stretch) shares a run of `overlap` (32)
consecutive tokens, at any offset, with a sample the row's CNNs were trained or scored on (the run's
train and eval sequence ids, the table's tokens). One-token shifts of a training row share 63. It is
applied twice: at selection to the true text (prompt + the true continuation, a candidate that would
overlap if recited is skipped for another), and after generation to the windows actually read.

Every 32-token stretch the model generates after a kept prompt is scored by the monitor. Ground truth:
  recited    the stretch occurs verbatim in the training stream (`testbed.membership` index, a `WindowIndex`: exact)
  guessable  the 64-token window is repeating or incrementing, or ROUGE-L/-3 of context to stretch
             >= 0.5: the taxonomy's Guess condition (METHOD.md section 2) without "memorized"
Questions: (1) recited or not, over all stretches: monitor score 1 - P(Non-Memo); (2) Guess or
Recall, among recited stretches: P(Guess) / (P(Guess) + P(Recall)). Every classifier (controls
included) is scored in this one direction, never flipped. Baselines: the model's own confidence (mean
log-probability of the stretch: the usual extraction heuristic) and the membership index (the
ceiling: it is the ground truth here, and what a deployer with the training data has).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Int
from sklearn.metrics import roc_auc_score

from mechmem import heuristics
from mechmem.monitor import CONTEXT, STRETCH, MonitorResult
from mechmem.testbed.corpus import Corpus
from mechmem.testbed.duplicates import WindowIndex

PLANTED_TIERS = ((1, 5), (6, 50), (51, 1000), (1001, 2000))
SOURCES = ("planted", "pattern", "heldout_pattern", "heldout", "stdlib", "duplicated")  # last: earlier draws unchanged


@dataclass(frozen=True)
class EvalConfig:
    prompts_per_source: int = 200  # per planted tier too
    max_new_tokens: int = 64  # two stretches a prompt: the first reuses generation's attention
    n_boot: int = 1000
    seed: int = 0
    overlap: int = 32  # held-out rule: no run of this many tokens shared with a CNN's training sample


class TrainingOverlap:
    """Which windows share a run of `span` consecutive tokens, at any offset, with any of `rows`.

    The rows' every `span`-token run goes into one `WindowIndex` (hashed once, exact): a query window
    of width w costs w - span + 1 look-ups, never a scan of the rows.
    """

    def __init__(self, rows: Int[np.ndarray, "row width"], span: int = 32):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[1] < span or span < 1:
            raise ValueError(f"rows must be [n, width >= {span}] token ids, got shape {rows.shape}")
        self.span, self.n_rows = span, len(rows)
        # -1 is never a token: a run that would straddle two rows can match nothing.
        stream = np.concatenate([rows, np.full((len(rows), 1), -1, dtype=np.int64)], axis=1).ravel()
        self.index = WindowIndex(stream, span)

    def hits(self, windows: Int[np.ndarray, "n width"]) -> Bool[np.ndarray, " n"]:
        """Whether each window shares some `span`-token run with a row."""
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < self.span:
            raise ValueError(f"windows must be [n, width >= {self.span}], got shape {windows.shape}")
        if not len(windows):
            return np.zeros(0, dtype=bool)
        runs = np.lib.stride_tricks.sliding_window_view(windows, self.span, axis=1)  # [n, run, span]
        found = self.index.contains(runs.reshape(-1, self.span))
        return np.asarray(found.reshape(len(windows), -1).any(axis=1))


def heldout_prompts(corpus: Corpus, overlap: TrainingOverlap, eos: int, cfg: EvalConfig = EvalConfig()
                    ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Prompts (32 tokens) with their source, document and the true 32 tokens that follow; and per
    source, how many candidates the held-out rule skipped.

    A candidate is a corpus window shifted by one token (the window stays inside its document). It is
    skipped when its true text (prompt and up to `max_new_tokens` true tokens, to the document's end)
    shares a run of `overlap.span` tokens with a training sample: were it recited, the CNNs would read it.
    """
    rng = np.random.default_rng(cfg.seed)
    w = corpus.windows
    streams = [corpus.train_stream.astype(np.int64), corpus.heldout_stream.astype(np.int64)]
    ends = [np.flatnonzero(s == eos) for s in streams]
    groups = [(f"planted[{lo}-{hi}]", (w["source"] == "planted") & (w["planted_count"] >= lo)
               & (w["planted_count"] <= hi)) for lo, hi in PLANTED_TIERS]
    groups += [(s, w["source"] == s) for s in SOURCES[1:]]
    rows, skipped = [], {}
    for name, mask in groups:
        picked = skipped[name] = 0
        for r in rng.permutation(np.flatnonzero(mask)):
            s = int(w["stream"][r])
            stream, pos = streams[s], int(w["position"][r]) + 1
            window = stream[pos:pos + CONTEXT + STRETCH]
            if len(window) < CONTEXT + STRETCH or (window == eos).any():
                continue
            k = int(np.searchsorted(ends[s], pos))  # EOS tokens before the prompt: the document's number
            doc_start = int(ends[s][k - 1]) + 1 if k else 0
            doc_end = int(ends[s][k]) if k < len(ends[s]) else len(stream)
            true_text = stream[pos:min(pos + CONTEXT + cfg.max_new_tokens, doc_end)]
            if overlap.hits(true_text[None])[0]:
                skipped[name] += 1
                continue
            rows.append({"source": name, "source_id": f"{s}:{doc_start}",
                         "stream": s, "position": pos,
                         "planted_count": int(w["planted_count"][r]), "family": str(w["family"][r]),
                         "prompt": window[:CONTEXT], "true_continuation": window[CONTEXT:]})
            picked += 1
            if picked == cfg.prompts_per_source:
                break
    return pd.DataFrame(rows), skipped


def guessable(windows: np.ndarray, tokenizer, rho: float = 0.5) -> np.ndarray:
    """The taxonomy's Guess condition on (context, stretch) windows, without 'memorized'."""
    texts = tokenizer.batch_decode(windows.tolist())
    pattern = np.array([heuristics.is_repeating(t) or heuristics.is_incrementing(t) for t in texts])
    rouge_l, rouge_3 = heuristics.rouge_columns(windows, CONTEXT)
    return pattern | (rouge_l >= rho) | (rouge_3 >= rho)


def stretch_windows(result: MonitorResult) -> np.ndarray:
    """[span, 64]: each scored stretch with the 32 tokens before it, as the CNNs read it."""
    seqs = [np.concatenate([p, o]) for p, o in zip(result.prompts, result.outputs)]
    return np.stack([seqs[s.prompt][len(result.prompts[s.prompt]) + s.start - CONTEXT:
                                    len(result.prompts[s.prompt]) + s.end] for s in result.spans])


def overlapping_prompts(result: MonitorResult, overlap: TrainingOverlap) -> Bool[np.ndarray, " prompt"]:
    """The held-out rule after generation: prompts of which some window the CNNs read overlaps a training sample."""
    hit = overlap.hits(stretch_windows(result)) if result.spans else np.zeros(0, dtype=bool)
    out = np.zeros(len(result.prompts), dtype=bool)
    out[np.array([s.prompt for s in result.spans], dtype=np.int64)[hit]] = True
    return out


def stretch_table(result: MonitorResult, prompts: pd.DataFrame, index: WindowIndex, tokenizer) -> pd.DataFrame:
    """One row per scored stretch: where it came from, ground truth, the monitor's and the baselines' scores."""
    windows = stretch_windows(result)
    stretch = windows[:, CONTEXT:]
    names = result.class_names
    of_prompt = np.array([s.prompt for s in result.spans])
    df = pd.DataFrame({
        "prompt": of_prompt, "start": [s.start for s in result.spans],
        "source": prompts["source"].to_numpy()[of_prompt], "source_id": prompts["source_id"].to_numpy()[of_prompt],
        "reused": [s.reused for s in result.spans],
        "recited": index.contains(stretch), "guessable": guessable(windows, tokenizer),
        "label": [s.label for s in result.spans], "flagged": [s.flagged for s in result.spans],
        "mean_logprob": [s.mean_logprob for s in result.spans],
    })
    for c in names:
        df[f"p_{c}"] = [s.probs[c] for s in result.spans]
    return df


def grouped_bootstrap(groups: np.ndarray, stat: Callable[[np.ndarray], float], n_boot: int, seed: int
                      ) -> tuple[float, float]:
    """95% percentile interval of `stat(rows)`, resampling whole groups with replacement (a cluster bootstrap).

    Rows of one group (stretches of prompts cut from one document) are not independent: resampling
    rows would treat 200 prompts from 6 passages as 200 draws. The unit resampled is the group.
    Resamples where `stat` is undefined (nan: one class missing) are dropped; none left gives nan.
    """
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(ids)))])
    rows_of = [order[bounds[g]:bounds[g + 1]] for g in range(len(ids))]
    vals = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.integers(0, len(ids), len(ids))])
        v = stat(rows)
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def _prec_rec(y: np.ndarray, flag: np.ndarray) -> tuple[float, float]:
    tp = float((y & flag).sum())
    return (tp / flag.sum() if flag.sum() else float("nan")), (tp / y.sum() if y.sum() else float("nan"))


def detection_metrics(y: np.ndarray, score: np.ndarray, flag: np.ndarray, groups: np.ndarray,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC, precision and recall (at the decision `flag`), each with a 95% interval resampling `groups`."""
    y, score, flag = np.asarray(y, bool), np.asarray(score, float), np.asarray(flag, bool)
    out: dict[str, Any] = {"n": int(len(y)), "positives": int(y.sum()), "flagged": int(flag.sum()),
                           "groups": int(len(np.unique(groups)))}
    stats = {"auroc": lambda r: _auroc(y[r], score[r]), "precision": lambda r: _prec_rec(y[r], flag[r])[0],
             "recall": lambda r: _prec_rec(y[r], flag[r])[1]}
    for name, stat in stats.items():
        out[name] = stat(np.arange(len(y)))
        out[f"{name}_ci"] = grouped_bootstrap(groups, stat, n_boot, seed)
    return out


def at_same_rate(score: np.ndarray, n_flagged: int) -> np.ndarray:
    """Flag the `n_flagged` highest scores: a baseline's decision at the monitor's flag rate."""
    flag = np.zeros(len(score), dtype=bool)
    if n_flagged:
        flag[np.argsort(-np.asarray(score), kind="stable")[:n_flagged]] = True
    return flag


def with_probabilities(df: pd.DataFrame, probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The stretch table with another classifier's probabilities, labels and flags."""
    d = df.copy()
    for j, c in enumerate(class_names):
        d[f"p_{c}"] = probs[:, j]
    d["label"] = np.array(class_names)[probs.argmax(1)]
    d["flagged"] = probs.argmax(1) != class_names.index("Non-Memo")
    return d


def source_probabilities(train_sources: np.ndarray, train_labels: np.ndarray, stretch_sources: np.ndarray,
                         n_classes: int) -> np.ndarray:
    """The kind-of-text baseline for the monitor: each stretch gets the class frequencies of its
    source among the row's training samples (`alignment.source_baseline_logits`; a stretch's source
    "planted[1-5]" is the table's "planted"). [stretch, class] probabilities."""
    from mechmem.alignment import source_baseline_logits

    kinds = np.array([str(s).split("[")[0] for s in stretch_sources])
    return source_baseline_logits(np.asarray(train_sources), np.asarray(train_labels), kinds, n_classes).exp().numpy()


def evaluate(df: pd.DataFrame, class_names: list[str], n_boot: int = 1000, seed: int = 0,
             group: str = "source_id") -> pd.DataFrame:
    """The two questions, for the monitor and its baselines: one row per (question, method).
    Intervals resample the `group` column's units (source documents)."""
    non_memo = "Non-Memo" if "Non-Memo" in class_names else class_names[0]
    groups = df[group].to_numpy()
    rows = []
    y = df["recited"].to_numpy()
    monitor_score = 1 - df[f"p_{non_memo}"].to_numpy()
    flag = df["flagged"].to_numpy()
    conf = df["mean_logprob"].to_numpy()
    methods = [("monitor (CNNs)", monitor_score, flag),
               ("confidence (mean log-prob)", conf, at_same_rate(conf, int(flag.sum()))),
               ("membership index (ceiling)", y.astype(float), y)]
    for method, score, decision in methods:
        rows.append({"question": "recited vs not", "method": method,
                     **detection_metrics(y, score, decision, groups, n_boot, seed)})
    recall_class = [c for c in class_names if c not in (non_memo, "Guess")]
    if "Guess" in class_names and len(recall_class) == 1:
        sub = df[df["recited"]]
        y2 = sub["guessable"].to_numpy()
        pg, pr = sub["p_Guess"].to_numpy(), sub[f"p_{recall_class[0]}"].to_numpy()
        guess_score = pg / np.maximum(pg + pr, 1e-12)
        decision = guess_score > 0.5
        conf2 = sub["mean_logprob"].to_numpy()
        g2 = sub[group].to_numpy()
        for method, score, dec in [("monitor (CNNs)", guess_score, decision),
                                   ("confidence (mean log-prob)", conf2, at_same_rate(conf2, int(decision.sum())))]:
            rows.append({"question": "Guess vs Recall (recited)", "method": method,
                         **detection_metrics(y2, score, dec, g2, n_boot, seed)})
    return pd.DataFrame(rows)


def by_source(df: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Per prompt source: how many stretches (and documents) are recited/guessable, and what the monitor calls them."""
    out = df.groupby("source", sort=False).agg(
        stretches=("recited", "size"), documents=("source_id", "nunique"), recited=("recited", "mean"),
        guessable=("guessable", "mean"), flagged=("flagged", "mean"), mean_logprob=("mean_logprob", "mean"))
    for c in class_names:
        out[f"called {c}"] = df.groupby("source", sort=False)["label"].apply(lambda s, c=c: (s == c).mean())
    return out.reset_index()
