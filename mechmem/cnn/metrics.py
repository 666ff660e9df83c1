"""Per-class precision, recall and F1, and the alignment score: min F1 over classes with its bootstrap interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechmem.cnn.config import CNNConfig
from mechmem.cnn.model import AttentionCNN


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape)), where=den != 0)


def _prf(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 from confusion matrices [..., true, pred]."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    n_pred, n_true = confusion.sum(-2), confusion.sum(-1)
    return _safe_div(tp, n_pred), _safe_div(tp, n_true), _safe_div(2 * tp, n_pred + n_true)


@dataclass
class ClassMetrics:
    """Per-class metrics on one split; arrays indexed by class, in [0, 1]."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    confusion: np.ndarray  # int [true, pred]
    loss: float = math.nan  # mean cross-entropy, nan when no logits were given

    min_f1 = property(lambda self: float(self.f1.min()))
    mean_f1 = property(lambda self: float(self.f1.mean()))
    min_precision = property(lambda self: float(self.precision.min()))
    mean_precision = property(lambda self: float(self.precision.mean()))
    min_recall = property(lambda self: float(self.recall.min()))
    mean_recall = property(lambda self: float(self.recall.mean()))
    support = property(lambda self: self.confusion.sum(1))
    accuracy = property(lambda self: float(np.trace(self.confusion) / max(self.confusion.sum(), 1)))

    def to_dict(self) -> dict:
        return {"precision": self.precision.tolist(), "recall": self.recall.tolist(), "f1": self.f1.tolist(),
                "confusion": self.confusion.tolist(), "loss": self.loss}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassMetrics":
        return cls(np.array(d["precision"]), np.array(d["recall"]), np.array(d["f1"]),
                   np.array(d["confusion"], dtype=np.int64), float(d["loss"]))


@dataclass
class TrainedCNN:
    config: CNNConfig
    model: AttentionCNN  # in eval mode
    eval_logits: Float[Tensor, "eval class"]  # on cpu
    eval_metrics: ClassMetrics
    train_losses: list[float] = field(default_factory=list)  # mean training cross-entropy per epoch
    val_losses: list[float] = field(default_factory=list)  # validation cross-entropy per epoch (if any)
    epochs_run: int = 0  # epochs trained before stopping (or the fixed count)
    best_epoch: int = 0  # the epoch whose weights were kept (1-based; the last one without validation)

    @property
    def eval_predictions(self) -> Int[Tensor, " eval"]:
        return self.eval_logits.argmax(-1)


def _as_labels(y, n_classes: int, what: str) -> np.ndarray:
    y = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what} must lie in [0, {n_classes}), got values in [{y.min()}, {y.max()}]")
    return y


def classification_metrics(
    y_true: Int[np.ndarray, " sample"] | Int[Tensor, " sample"],
    y_pred: Int[np.ndarray, " sample"] | Int[Tensor, " sample"],
    n_classes: int,
    logits: Float[Tensor, "sample class"] | Float[np.ndarray, "sample class"] | None = None,
) -> ClassMetrics:
    """Per-class precision/recall/F1 and confusion matrix; a class never predicted (or never true) scores 0."""
    y_true, y_pred = _as_labels(y_true, n_classes, "y_true"), _as_labels(y_pred, n_classes, "y_pred")
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and of equal length, got {len(y_true)}, {len(y_pred)}")
    confusion = np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    loss = math.nan
    if logits is not None:
        logits = torch.as_tensor(logits).detach().cpu().double()
        if logits.shape != (len(y_true), n_classes):
            raise ValueError(f"logits must have shape {(len(y_true), n_classes)}, got {tuple(logits.shape)}")
        loss = float(F.cross_entropy(logits, torch.from_numpy(y_true)))
    return ClassMetrics(*_prf(confusion), confusion=confusion, loss=loss)


def mean_min_f1(codes: Int[np.ndarray, "classifier draw sample"], n_classes: int,
                weights: Float[np.ndarray, "classifier draw sample"] | None = None) -> Float[np.ndarray, " draw"]:
    """Min F1 over classes, averaged over classifiers, for many draws at once (bootstrap resamples,
    label permutations). `codes` holds true * n_classes + predicted per sample: one bincount gives
    every confusion matrix; `weights` count each sample that many times."""
    n_cls, b, _ = codes.shape
    k2 = n_classes * n_classes
    cells = codes + (np.arange(n_cls * b) * k2).reshape(n_cls, b, 1)
    conf = np.bincount(cells.ravel(), weights=None if weights is None else weights.ravel(),
                       minlength=n_cls * b * k2).reshape(n_cls, b, n_classes, n_classes)
    return _prf(conf)[2].min(-1).mean(0)


def weighted_mean_min_f1(codes: Int[np.ndarray, "classifier sample"], weights: Float[np.ndarray, "draw sample"],
                         n_classes: int) -> Float[np.ndarray, " draw"]:
    """`mean_min_f1` where each draw weighs the same samples (how many times a resample took each one)."""
    shape = (codes.shape[0], len(weights), codes.shape[1])
    return mean_min_f1(np.broadcast_to(codes[:, None], shape), n_classes, np.broadcast_to(weights[None], shape))


def alignment_summary(
    trained: Sequence[TrainedCNN],
    eval_labels: Int[Tensor, " eval"] | Int[np.ndarray, " eval"],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict:
    """The taxonomy's alignment score (min F1 over classes, in percent, averaged over configs) and its neighbours.

    The confidence interval is a percentile bootstrap over eval samples: each resample draws eval indices
    with replacement and applies the same indices to every config's predictions, so it covers the
    config-averaged score, not each config separately. With `groups` (one id per eval sample: the
    source document) it resamples whole groups instead, the independent unit where overlapping
    windows of one document are not independent samples.
    """
    if not trained:
        raise ValueError("alignment_summary needs at least one TrainedCNN")
    return score_summary([t.eval_logits for t in trained], eval_labels, n_boot, seed, confidence,
                         names=[t.config.name for t in trained], groups=groups)


def score_summary(
    eval_logits: Sequence[Float[Tensor, "eval class"]],
    eval_labels: Int[Tensor, " eval"] | Int[np.ndarray, " eval"],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    names: Sequence[str] | None = None,
    groups: np.ndarray | None = None,
) -> dict:
    """`alignment_summary` for any classifiers' eval logits (the CNNs', a control's, the probe's)."""
    if not eval_logits:
        raise ValueError("score_summary needs at least one set of eval logits")
    n_classes = eval_logits[0].shape[-1]
    y = _as_labels(eval_labels, n_classes, "eval_labels")
    names = names or [f"classifier {i}" for i in range(len(eval_logits))]
    for name, lg in zip(names, eval_logits):
        if tuple(lg.shape) != (len(y), n_classes):
            raise ValueError(f"{name}: eval_logits shape {tuple(lg.shape)} does not match "
                             f"{len(y)} eval labels and {n_classes} classes")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and confidence in (0, 1), got {n_boot}, {confidence}")
    preds = [torch.as_tensor(lg).argmax(-1).numpy() for lg in eval_logits]
    ms = [classification_metrics(y, p, n_classes, lg) for p, lg in zip(preds, eval_logits)]

    def avg(attr: str, scale: float = 100.0) -> float:
        return scale * float(np.mean([getattr(m, attr) for m in ms]))

    out: dict = {"min_f1": avg("min_f1"), "mean_f1": avg("mean_f1"), "min_prec": avg("min_precision"),
                 "mean_prec": avg("mean_precision"), "min_rec": avg("min_recall"), "mean_rec": avg("mean_recall"),
                 "mean_eval_loss": avg("loss", 1.0)}

    # Bootstrap: confusion matrices of all resamples at once via one bincount per chunk of resamples.
    K, n, n_cfg = n_classes, len(y), len(eval_logits)
    codes = np.stack([y * K + p for p in preds])  # (config, sample): cell of the confusion matrix
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, 4_000_000 // (n_cfg * n))
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} eval samples")
    group_of = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_groups = 0 if group_of is None else int(group_of.max()) + 1
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        if group_of is None:
            stats.append(mean_min_f1(codes[:, rng.integers(0, n, size=(b, n))], K))  # (config, resample, sample)
        else:  # each resample draws as many groups as there are, with replacement: weights = times drawn
            drawn = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=b)  # (resample, group)
            stats.append(weighted_mean_min_f1(codes, drawn[:, group_of].astype(np.float64), K))
    boot = 100 * np.concatenate(stats)
    alpha = (1 - confidence) / 2
    out["min_f1_ci_low"], out["min_f1_ci_high"] = (float(v) for v in np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]))
    out["n_configs"], out["n_eval"] = n_cfg, n
    if group_of is not None:  # else: samples, as always
        out["interval_unit"] = f"documents ({n_groups})"
    return out


