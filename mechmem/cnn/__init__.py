"""The attention CNN of Dentan et al. (2025): its configuration grid, training several configs at once, metrics.

One idea a module: `config` (configurations, protocols), `model` (the network, its input scaling,
the fused stack), `training` (the lockstep trainer and the plain loop it equals), `metrics` (F1, the
alignment score and its bootstrap), `saving` (files). Every public name is importable from here.

A CNN reads one sample's attention patterns, pooled over heads (mean or max), as an image of
n_layers channels of seq_len x seq_len, and predicts the sample's memorization class. How well it
can do that for a taxonomy (its min F1 over classes) is the taxonomy's *alignment score*.

Why train several configs at once: the paper trains 8 configurations per taxonomy, one process each,
each re-reading the features from disk. Here one epoch loop reads every batch once, moves it to the
device once, and feeds it to every configuration. Configurations of the same shape (the paper's grid
pairs them: they differ only in which head pooling they read) are fused into one network with grouped
convolutions (`_CNNStack`), so G small networks run as one set of kernels. Fusing is exact: AdamW is
elementwise and member g's parameters only see member g's loss, so it changes floating-point
summation order, not the maths. It is on by default on cuda only: on a GPU the small kernels are
launch-bound and fusing pays (1.9x over one-config-at-a-time for the paper's grid on an H200, see
benchmarks/bench_cnn.py); on CPU grouped convolutions run slower than separate ones. On a GPU the fused
networks convolve through the FFT (`model.fft_conv2d`, `TrainConfig.fft`): the same function to float
rounding, 1.6x faster than cuDNN's grouped convolutions for a `--grid paper` group. A CNN that stops
early leaves its fused network, and a row's shuffled-label control trains beside it (`Task.follows`).

Randomness is chosen so that a config's training never depends on which configs train beside it:
- batch order: one generator seeded by `TrainConfig.seed`, shared by all configs (that is what lets
  one batch feed them all);
- initialisation and dropout masks: per-config generators seeded from (seed, config.name).
"""

from mechmem.cnn.config import (
    CNNConfig,
    INPUT_SCALINGS,
    LOG_EPS,
    PAPER_GRID,
    POOLINGS,
    PRECISIONS,
    PROTOCOL_DEFAULTS,
    PROTOCOLS,
    QUICK_GRID,
    SCALE_EPS,
    TrainConfig,
)
from mechmem.cnn.model import (
    _CNNStack,
    AttentionCNN,
    dropout_mask,
    feature_side,
    InputScaling,
    LAYERS,
    scale_input,
    scaling_shape,
    SeededDropout,
)
from mechmem.cnn.metrics import (
    alignment_summary,
    classification_metrics,
    ClassMetrics,
    mean_min_f1,
    score_summary,
    TrainedCNN,
)
from mechmem.cnn.training import (
    input_statistics,
    split_validation,
    Task,
    train_cnn,
    train_cnn_tasks,
    train_cnns,
)
from mechmem.cnn.saving import (
    INDEX_FILE,
    load_cnns,
    save_cnns,
    write_cnn_index,
)

__all__ = [
    "CNNConfig",
    "INPUT_SCALINGS",
    "LOG_EPS",
    "PAPER_GRID",
    "POOLINGS",
    "PRECISIONS",
    "PROTOCOL_DEFAULTS",
    "PROTOCOLS",
    "QUICK_GRID",
    "SCALE_EPS",
    "TrainConfig",
    "_CNNStack",
    "AttentionCNN",
    "dropout_mask",
    "feature_side",
    "InputScaling",
    "LAYERS",
    "scale_input",
    "scaling_shape",
    "SeededDropout",
    "alignment_summary",
    "classification_metrics",
    "ClassMetrics",
    "mean_min_f1",
    "score_summary",
    "input_statistics",
    "split_validation",
    "Task",
    "train_cnn",
    "train_cnn_tasks",
    "train_cnns",
    "TrainedCNN",
    "INDEX_FILE",
    "load_cnns",
    "save_cnns",
    "write_cnn_index",
]
