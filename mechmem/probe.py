"""A simple baseline beside the CNN: logistic regression on a few summary statistics of the attention.

If a taxonomy's CNN scores no better than this probe, the CNN sees nothing in the attention that
these statistics do not already say; if the probe beats the CNN, the CNN is under-trained or
mis-specified, not the taxonomy unaligned. The statistics are the ones memorization studies read
off attention by eye. Per head pooling and layer, for the prefix half and the suffix half of the
queries (averaged over those queries):

- entropy of the attention row (spread vs focus);
- mass on the diagonal (a token attending to itself);
- mass on the previous token;
- mass on the first token (the usual attention sink).

With 2 poolings, L layers and 2 halves that is 16 L numbers a sample (96 for the testbed's 6 layers).
The classifier is scikit-learn's multinomial logistic regression on standardized statistics, its
regularisation chosen by 5-fold cross-validation (log-loss) on the training split (the eval split is never seen).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

STATISTICS = ("entropy", "diagonal", "previous", "first")


def attention_statistics(
    features: Float[Tensor, "sample pool layer query key"] | np.ndarray, chunk: int = 512
) -> Float[np.ndarray, "sample stat"]:
    """Per sample: STATISTICS x (prefix, suffix half of queries) for every pool and layer, flattened
    in (pool, layer, stat, half) order. Reads float16 memmaps chunk by chunk, and a tensor on its device."""
    n, _, _, seq, _ = features.shape
    half = seq // 2
    out = []
    for start in range(0, n, chunk):
        part = features[start:start + chunk]  # a tensor is read where it lies (a GPU's, for the alignment runner)
        a = (part if isinstance(part, Tensor) else torch.as_tensor(np.asarray(part))).double()  # (b, p, l, q, k)
        entropy = -(a * torch.log(a.clamp_min(1e-12))).sum(-1)  # (b, p, l, q)
        diagonal = torch.diagonal(a, dim1=-2, dim2=-1)
        previous = torch.nn.functional.pad(torch.diagonal(a, offset=-1, dim1=-2, dim2=-1), (1, 0))  # query 0: none
        first = a[..., 0]
        stats = torch.stack([entropy, diagonal, previous, first], dim=-2)  # (b, p, l, stat, q)
        halves = torch.stack([stats[..., :half].mean(-1), stats[..., half:].mean(-1)], dim=-1)
        out.append(halves.flatten(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class ProbeResult:
    eval_logits: Float[Tensor, "eval class"]  # log-probabilities on the eval split
    c: float  # the inverse regularisation strength that cross-validation chose


def train_probe(
    statistics: Float[np.ndarray, "sample stat"],
    labels: Int[np.ndarray, " sample"],
    train_idx: np.ndarray,
    eval_idx: np.ndarray,
    n_classes: int,
    seed: int = 0,
) -> ProbeResult:
    """Fit on `train_idx` only (scaling and cross-validation included); predict `eval_idx`."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(statistics, dtype=np.float64), np.asarray(labels)
    classes = np.unique(y[train_idx])
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, scoring="neg_log_loss", max_iter=2000,
                                                                 random_state=seed))
    with warnings.catch_warnings():  # scikit-learn's notices of future defaults; the ones used here are explicit
        warnings.simplefilter("ignore", FutureWarning)
        probe.fit(x[train_idx], y[train_idx])
    log_proba = np.full((len(eval_idx), n_classes), -np.inf)  # a class absent from training: never predicted
    log_proba[:, classes] = probe.predict_log_proba(x[eval_idx])
    return ProbeResult(torch.from_numpy(log_proba).float(), float(np.ravel(probe[-1].C_)[0]))
