"""The alignment benchmark's configuration: the rows it scores and the settings of a run.

Its own module so that `mechmem.run` (which reads a run's config.json back into these classes)
and `mechmem.alignment` (which runs them) both import it, and neither imports the other:
`alignment` uses `run`'s folder layout, `run` only needs the dataclasses. `mechmem.alignment`
re-exports them, so `from mechmem.alignment import AlignmentConfig, Row` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mechmem import taxonomy as tx
from mechmem.cnn import PAPER_GRID, CNNConfig, TrainConfig
from mechmem.controls import check_null

PROBE_FITS = ("cnn-fit", "train")


@dataclass(frozen=True)
class Row:
    """One benchmarked taxonomy: an id, its duplicates threshold and ROUGE choice."""

    tax_id: str
    threshold: int = 5
    rouge: str = "either"
    rouge_threshold: float = 0.5

    @property
    def name(self) -> str:
        return tx.display_name(self.tax_id, self.threshold)

    @property
    def slug(self) -> str:
        extra = "" if (self.rouge, self.rouge_threshold) == ("either", 0.5) else f"_rouge{self.rouge}{self.rouge_threshold:g}"
        return f"{self.tax_id}_t{self.threshold}{extra}"

    def labels(self, df: pd.DataFrame) -> np.ndarray:
        return tx.assign_categories(df, self.tax_id, duplicates_threshold=self.threshold,
                                    rouge_threshold=self.rouge_threshold, rouge=self.rouge)

    def class_names(self) -> list[str]:
        return tx.class_names(self.tax_id, self.threshold)


@dataclass(frozen=True)
class AlignmentConfig:
    rows: tuple[Row, ...]
    train_per_class: int = 4000
    eval_per_class: int = 2000
    configs: tuple[CNNConfig, ...] = PAPER_GRID
    train: TrainConfig = TrainConfig()
    pooling: tuple[str, ...] = ("mean", "max")
    extraction_batch_size: int | None = None  # None: the largest that fits in free GPU memory (64 on cpu)
    chunk_size: int = 1024  # samples per feature-store chunk: the unit of resume, and of work between ranks
    split: str = "shared"  # "shared": taxonomies draw from one seeded ranking (one small extraction); "paper"
    # Draw Non-Memo with the memorized classes' mix of the table's `source` column
    # (`taxonomy.balanced_split(match=)`): the kind of text then no longer tells it apart.
    match_source: bool = False
    n_boot: int = 1000
    seed: int = 0
    sweep: tuple[Row, ...] = ()  # ROUGE-threshold sweep rows, trained on the same features
    # Trainings of every CNN config, with train seeds train.seed, train.seed + 1, ...: the score averages
    # over all of them, and min_f1_seed_sd says how far training noise alone moves it.
    cnn_seeds: int = 1
    # The shuffled-label control (`mechmem.controls`): the CNNs trained on the training split with its
    # labels permuted, for their twin's epoch count, scored on the true eval labels; `control_seeds`
    # shuffles (the k-th with training seed train.seed + k, its twin that seed's CNNs).
    controls: bool = True
    control_seeds: int = 1
    # The permutation null of min F1 (`mechmem.controls.permutation_null`): label permutations drawn.
    null_permutations: int = 1000
    probe: bool = True  # the attention-statistics probe (mechmem.probe) on the same split
    # What the probe fits on: "cnn-fit", the samples the CNNs fit (the training split less the
    # validation part the first seed's CNNs stop on), so the two compare on equal data; "train", the
    # whole training split.
    probe_fit: str = "cnn-fit"

    def __post_init__(self):
        if self.cnn_seeds < 1:
            raise ValueError(f"cnn_seeds must be >= 1, got {self.cnn_seeds}")
        if not 1 <= self.control_seeds <= self.cnn_seeds:
            raise ValueError(f"control_seeds must lie in [1, cnn_seeds = {self.cnn_seeds}] (each shuffle trains "
                             f"for its twin seed's epochs), got {self.control_seeds}")
        if self.probe_fit not in PROBE_FITS:
            raise ValueError(f"unknown probe_fit {self.probe_fit!r}; expected one of {PROBE_FITS}")
        for n_classes in sorted({len(r.class_names()) for r in self.rows + self.sweep}):
            check_null([self.eval_per_class] * n_classes, self.null_permutations)
