"""Controls that can say "not aligned": a permutation null of min F1 and a shuffled-label control.

A row's alignment score means something only beside what it would be if attention carried no
information about the labels. Two controls answer that, each able to say no:

- the **permutation null**: the min F1 of a label-blind classifier that guesses with the eval
  split's own class proportions (`permutation_null`: the eval labels scored against a permutation of
  themselves). It depends on the eval class sizes alone, needs no training and cannot collapse. A
  guesser with these proportions is, near enough, the best any uninformed classifier can do for min
  F1 (guessing some class less often lowers that class's F1), and the null is that of one such
  classifier, not an average over configs (which would narrow it): its 95th percentile is a bar no
  input-blind strategy clears more than 1 time in 20.
- the **shuffled-label control**: the same CNNs trained on the training split with its labels
  permuted, scored on the true eval labels (`shuffled_control`). It trains its twin's budget (the
  epochs the real CNN ran, per config), no early stopping, last weights. Trained on labels that carry
  nothing, these regularised CNNs stay near uniform (training loss about ln K): their argmax is
  decided by tiny class biases, falls on one or two classes, and min F1 drops to zero, which says
  nothing about chance. So the control is scored on its logits centred per class over the eval
  samples (`centred`, no labels used): the input-dependent part decides, predictions spread over
  the classes, and a control on uninformative features lands near chance instead of at zero. What
  it adds to the null: what the architecture and training reach on these features without the
  labels' information. The argmax score is kept beside it (`min_f1_control_argmax`).

A row is `aligned` when its score exceeds the null's 95th percentile and its bootstrap interval
lies above the control's (`is_aligned`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from mechmem.cnn import Task, TrainedCNN, mean_min_f1

MIN_PERMUTATIONS = 100  # a 95th percentile and a p-value to 0.01 need at least this many draws
NULL_LEVEL = 0.05


def shuffled_control(task: Task, seed: int, epochs: int | Sequence[int] | None = None,
                     follows: int | None = None) -> Task:
    """The task with its training labels permuted among its training samples (eval labels untouched),
    to train for `epochs` (its twin's: `twin_epochs`), or beside its twin, task `follows` of the same
    `train_cnn_tasks` call, stopping with it (what the alignment runner does: one pass for both).
    Its CNNs train under the task's own training seed (`Task.seed`)."""
    labels = np.array(task.labels, copy=True)
    train_idx = np.asarray(task.train_idx)
    labels[train_idx] = np.random.default_rng([seed, 0xC0]).permutation(labels[train_idx])
    return Task(labels, task.train_idx, task.eval_idx, epochs, follows, task.seed)


def twin_epochs(twin: Sequence[TrainedCNN]) -> list[int]:
    """The epochs each real CNN trained (to its stop, past the epoch it kept): its control's budget, config by config."""
    return [max(1, t.epochs_run) for t in twin]


def centred(logits: Float[Tensor, "eval class"]) -> Float[Tensor, "eval class"]:
    """Logits less each class's mean over the samples: a near-uniform classifier's argmax follows its
    input, not its biases (how the shuffled-label control is scored)."""
    return logits - logits.mean(0, keepdim=True)


def permutation_null(
    eval_labels: Int[np.ndarray, " eval"], n_permutations: int = 1000, seed: int = 0
) -> Float[np.ndarray, " permutation"]:
    """Min F1 (percent) of a classifier that ignores its input and guesses with the eval class
    proportions, one value a draw: the eval labels against a permutation of themselves."""
    y = np.asarray(eval_labels, dtype=np.int64)
    n_classes = int(y.max()) + 1
    rng = np.random.default_rng([seed, 0x9E11])
    out = []
    chunk = max(1, 4_000_000 // len(y))
    for start in range(0, n_permutations, chunk):
        b = min(chunk, n_permutations - start)
        guesses = rng.permuted(np.broadcast_to(y, (b, len(y))), axis=1)  # (draw, eval)
        out.append(mean_min_f1((y * n_classes + guesses)[None], n_classes))
    return 100 * np.concatenate(out)


def null_summary(null: np.ndarray, score: float) -> dict:
    """The null's 95th percentile, its mean, and the p-value of `score` under it."""
    return {"min_f1_null_p95": float(np.percentile(null, 100 * (1 - NULL_LEVEL))),
            "min_f1_null_mean": float(null.mean()),
            "min_f1_null_p": float((1 + np.sum(null >= score - 1e-9)) / (1 + len(null)))}


def check_null(class_counts: Sequence[int], n_permutations: int) -> None:
    """Refuse, before any training, a null that cannot say yes: too few permutations to place a 95th
    percentile, or eval classes so small that even a perfect classifier falls in the null's top 5%
    (the chance that a permutation of the labels is itself perfect is 1 / multinomial(n; counts))."""
    if n_permutations < MIN_PERMUTATIONS:
        raise ValueError(f"the permutation null needs at least {MIN_PERMUTATIONS} permutations, got {n_permutations}")
    ways, left = 1, sum(class_counts)
    for c in class_counts:  # multinomial(n; counts) as a product of binomials, stopped once large enough
        ways, left = ways * math.comb(left, c), left - c
        if ways > round(1 / NULL_LEVEL):  # integers: the counts of a large row overflow a float
            return
    raise ValueError(f"{min(class_counts)} eval samples a class are too few for the permutation null of a "
                     f"{len(class_counts)}-class row: 1 label permutation in {ways} is perfect, so no score "
                     f"can clear its 95th percentile; use more eval samples a class (--eval-per-class)")


def is_aligned(summary: dict) -> bool:
    """Above the permutation null's 95th percentile and, where a control was trained, with its
    bootstrap interval above the control's."""
    above_null = summary["min_f1"] > summary["min_f1_null_p95"]
    control = summary.get("min_f1_control_ci_high")
    return bool(above_null and (control is None or summary["min_f1_ci_low"] > control))
