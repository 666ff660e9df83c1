"""How well the regurgitation monitor finds recited text on the testbed, against two baselines.

Held-out prompts: 32-token windows of the testbed's own streams that no alignment row ever saw
(none equals a row of the shipped memorization table, so none trained or scored a CNN), from:
  planted[lo-hi]   passages planted lo..hi times, cut at odd offsets (the table's windows sit at even ones)
  pattern          patterned documents trained on (1-5 copies): recited, and guessable from the prompt
  heldout_pattern  patterned documents never trained on: guessable, never recited
  heldout          standard-library text never trained on
  stdlib           standard-library text trained on once
Every 32-token stretch the model generates after them is scored by the monitor. Ground truth:
  recited    the stretch occurs verbatim in the training stream (`membership.WindowIndex`, exact)
  guessable  the 64-token window is repeating or incrementing, or ROUGE-L/-3 of context to stretch
             >= 0.5: the taxonomy's Guess condition (METHOD.md section 2) without "memorized"
Questions: (1) recited or not, over all stretches: monitor score 1 - P(Non-Memo); (2) Guess or
Recall, among recited stretches: P(Guess) / (P(Guess) + P(Recall)). Baselines: the model's own
confidence (mean log-probability of the stretch: the usual extraction heuristic) and the membership
index (the ceiling: it is the ground truth here, and what a deployer with the training data has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from mechmem import heuristics
from mechmem.monitor import CONTEXT, STRETCH, MonitorResult
from mechmem.testbed.corpus import Corpus
from mechmem.testbed.duplicates import WindowIndex

PLANTED_TIERS = ((1, 5), (6, 50), (51, 1000), (1001, 2000))
SOURCES = ("planted", "pattern", "heldout_pattern", "heldout", "stdlib")


@dataclass(frozen=True)
class EvalConfig:
    prompts_per_source: int = 200  # per planted tier too
    max_new_tokens: int = 64  # two stretches a prompt: the first reuses generation's attention
    n_boot: int = 1000
    seed: int = 0


def _window_keys(tokens: np.ndarray) -> set[bytes]:
    return {np.asarray(t, dtype=np.int64).tobytes() for t in tokens}


def heldout_prompts(corpus: Corpus, table_tokens: np.ndarray, eos: int, cfg: EvalConfig = EvalConfig()
                    ) -> pd.DataFrame:
    """Prompts (32 tokens) with their source and the true 32 tokens that follow, none a table row.

    A candidate window of the corpus shifted by one token: the window stays inside the same
    document, while every 64-token window the table holds is left out explicitly.
    """
    rng = np.random.default_rng(cfg.seed)
    w = corpus.windows
    streams = [corpus.train_stream.astype(np.int64), corpus.heldout_stream.astype(np.int64)]
    seen = _window_keys(table_tokens)
    groups = [(f"planted[{lo}-{hi}]", (w["source"] == "planted") & (w["planted_count"] >= lo)
               & (w["planted_count"] <= hi)) for lo, hi in PLANTED_TIERS]
    groups += [(s, w["source"] == s) for s in SOURCES[1:]]
    rows = []
    for name, mask in groups:
        picked = 0
        for r in rng.permutation(np.flatnonzero(mask)):
            stream = streams[int(w["stream"][r])]
            pos = int(w["position"][r]) + 1
            window = stream[pos:pos + CONTEXT + STRETCH]
            if len(window) < CONTEXT + STRETCH or (window == eos).any() or window.tobytes() in seen:
                continue
            rows.append({"source": name, "stream": int(w["stream"][r]), "position": pos,
                         "planted_count": int(w["planted_count"][r]), "family": str(w["family"][r]),
                         "prompt": window[:CONTEXT], "true_continuation": window[CONTEXT:]})
            picked += 1
            if picked == cfg.prompts_per_source:
                break
    return pd.DataFrame(rows)


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


def stretch_table(result: MonitorResult, prompts: pd.DataFrame, index: WindowIndex, tokenizer) -> pd.DataFrame:
    """One row per scored stretch: where it came from, ground truth, the monitor's and the baselines' scores."""
    windows = stretch_windows(result)
    stretch = windows[:, CONTEXT:]
    names = result.class_names
    df = pd.DataFrame({
        "prompt": [s.prompt for s in result.spans], "start": [s.start for s in result.spans],
        "source": prompts["source"].to_numpy()[[s.prompt for s in result.spans]],
        "reused": [s.reused for s in result.spans],
        "recited": index.contains(stretch), "guessable": guessable(windows, tokenizer),
        "label": [s.label for s in result.spans], "flagged": [s.flagged for s in result.spans],
        "mean_logprob": [s.mean_logprob for s in result.spans],
    })
    for c in names:
        df[f"p_{c}"] = [s.probs[c] for s in result.spans]
    return df


def _bootstrap(groups: np.ndarray, stat, n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of `stat(rows)` resampling whole prompts (a prompt's stretches are not independent)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    rows_of = {g: np.flatnonzero(groups == g) for g in ids}
    vals = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[g] for g in rng.choice(ids, len(ids))])
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
    """AUROC, precision and recall (at the decision `flag`), each with a prompt-bootstrap 95% interval."""
    y, score, flag = np.asarray(y, bool), np.asarray(score, float), np.asarray(flag, bool)
    out: dict[str, Any] = {"n": int(len(y)), "positives": int(y.sum()), "flagged": int(flag.sum())}
    stats = {"auroc": lambda r: _auroc(y[r], score[r]), "precision": lambda r: _prec_rec(y[r], flag[r])[0],
             "recall": lambda r: _prec_rec(y[r], flag[r])[1]}
    for name, stat in stats.items():
        out[name] = stat(np.arange(len(y)))
        out[f"{name}_ci"] = _bootstrap(groups, stat, n_boot, seed)
    return out


def at_same_rate(score: np.ndarray, n_flagged: int) -> np.ndarray:
    """Flag the `n_flagged` highest scores: a baseline's decision at the monitor's flag rate."""
    flag = np.zeros(len(score), dtype=bool)
    if n_flagged:
        flag[np.argsort(-np.asarray(score), kind="stable")[:n_flagged]] = True
    return flag


def evaluate(df: pd.DataFrame, class_names: list[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The two questions, for the monitor and its baselines: one row per (question, method)."""
    non_memo = "Non-Memo" if "Non-Memo" in class_names else class_names[0]
    groups = df["prompt"].to_numpy()
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
        g2 = sub["prompt"].to_numpy()
        for method, score, dec in [("monitor (CNNs)", guess_score, decision),
                                   ("confidence (mean log-prob)", conf2, at_same_rate(conf2, int(decision.sum())))]:
            rows.append({"question": "Guess vs Recall (recited)", "method": method,
                         **detection_metrics(y2, score, dec, g2, n_boot, seed)})
    return pd.DataFrame(rows)


def by_source(df: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Per prompt source: how many stretches are recited/guessable, and what the monitor calls them."""
    out = df.groupby("source", sort=False).agg(
        stretches=("recited", "size"), recited=("recited", "mean"), guessable=("guessable", "mean"),
        flagged=("flagged", "mean"), mean_logprob=("mean_logprob", "mean"))
    for c in class_names:
        out[f"called {c}"] = df.groupby("source", sort=False)["label"].apply(lambda s, c=c: (s == c).mean())
    return out.reset_index()
