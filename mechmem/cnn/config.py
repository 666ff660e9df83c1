"""The CNN's configurations (`CNNConfig`, the paper's and the quick grids) and how it is trained (`TrainConfig`, protocols)."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass


POOLINGS = ("mean", "max")
PRECISIONS = ("float32", "bf16")


_NAME = re.compile(r"k(\d+)_c(\d+)_([a-z]+)(?:_fc(\d+))?(?:_d(\d*\.?\d+(?:e-?\d+)?))?")


@dataclass(frozen=True)
class CNNConfig:
    """One member of the grid. Both convs have `channels` output channels, no padding, stride 1."""

    kernel_size: int = 6
    channels: int = 10
    pooling: str = "mean"  # which head pooling of the features this CNN reads
    n_feat_fc: int = 64
    dropout: float = 0.5

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {POOLINGS}")
        if min(self.kernel_size, self.channels, self.n_feat_fc) < 1:
            raise ValueError(f"kernel_size, channels and n_feat_fc must be >= 1, got {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def name(self) -> str:
        """e.g. "k6_c10_mean"; non-default n_feat_fc / dropout are appended so names stay unique."""
        name = f"k{self.kernel_size}_c{self.channels}_{self.pooling}"
        if self.n_feat_fc != 64:
            name += f"_fc{self.n_feat_fc}"
        if self.dropout != 0.5:
            name += f"_d{self.dropout:g}"
        return name

    @classmethod
    def from_name(cls, name: str) -> CNNConfig:
        """The inverse of `name` ("k6_c10_mean", "k8_c16_max_fc32_d0.3"); ValueError on anything else."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"not a CNN config name: {name!r} (k<kernel>_c<channels>_<pooling>[_fc<n>][_d<dropout>])")
        k, c, pooling, fc, dropout = match.groups()
        return cls(int(k), int(c), pooling, int(fc) if fc else 64, float(dropout) if dropout else 0.5)

    @property
    def shape_key(self) -> tuple[int, int, int, float]:
        """Configs with equal shape keys have equal parameter shapes and can be fused."""
        return (self.kernel_size, self.channels, self.n_feat_fc, self.dropout)


PAPER_GRID: tuple[CNNConfig, ...] = tuple(
    CNNConfig(kernel_size=k, channels=c, pooling=p) for k in (6, 8) for c in (10, 16) for p in POOLINGS
)
QUICK_GRID: tuple[CNNConfig, ...] = (CNNConfig(6, 10, "mean"), CNNConfig(6, 10, "max"))


PROTOCOLS = ("converged", "paper")
INPUT_SCALINGS = ("raw", "layer", "pixel", "log-pixel")
# What each protocol sets, for the TrainConfig fields left None.
PROTOCOL_DEFAULTS: dict[str, dict] = {
    # The paper's recipe: raw attention probabilities, exactly 3 epochs, the last epoch's weights.
    "paper": dict(epochs=3, batch_size=16, input_scaling="raw", val_fraction=0.0, patience=0),
    # Trained until it stops improving: log attention standardized per pixel with training-split
    # statistics, a fifth of the training split held out for validation, early stopping (patience 4,
    # at most 60 epochs), the best epoch's weights. Batch 64 (4x fewer steps an epoch). Scaling, batch
    # and patience were chosen by measurement (benchmarks/README.md, "Training protocol").
    "converged": dict(epochs=60, batch_size=64, input_scaling="log-pixel", val_fraction=0.2, patience=4),
}
SCALE_EPS = 1e-3  # floor of a standard deviation: constant pixels (the causal mask's zeros) map to 0
LOG_EPS = 1e-4  # log(attention + LOG_EPS) for the "log-pixel" scaling


@dataclass(frozen=True)
class TrainConfig:
    """How the CNNs are trained: a protocol (`PROTOCOL_DEFAULTS`), then AdamW (lr 1e-3, weight decay 0.1).

    Fields left None take the protocol's value, so `TrainConfig(protocol="paper")` is the paper's
    exact recipe and `TrainConfig()` the converged one. `epochs` is the exact count when there is no
    validation part, the cap otherwise.
    """

    protocol: str = "converged"
    epochs: int | None = None
    batch_size: int | None = None
    # How attention is shown to the CNN: "raw" probabilities (the paper's), or standardized with
    # statistics of the training split: per "layer", per "pixel" (layer, query, key), or per pixel of
    # log attention ("log-pixel"). The statistics live in the CNN (`InputScaling`), so a saved CNN
    # reads raw pooled attention like the paper's.
    input_scaling: str | None = None
    val_fraction: float | None = None  # part of the training split held out for early stopping; 0: none
    patience: int | None = None  # stop once the validation loss has not improved for this many epochs; 0: never
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    fuse: bool | None = None  # run same-shaped configs as one grouped network; None: only on cuda
    # The fused network's convolutions through the FFT (`model.fft_conv2d`): the same function to float
    # rounding, several times faster than cuDNN's grouped convolutions on a GPU; None: on cuda. The
    # plain loop (`train_cnn`) and saved CNNs always convolve directly.
    fft: bool | None = None
    eval_batch_size: int = 256  # samples an evaluation step takes, all tasks together (at least batch_size a task)
    # cuDNN's deterministic kernels, no autotuning: on a GPU a rerun, or the same configs on another
    # rank under torchrun, trains bit for bit the same CNNs. False lets cuDNN pick (not reproducible).
    deterministic: bool = True
    # "bf16" runs the CNNs' convolutions and matmuls under bfloat16 autocast (weights, optimizer and
    # loss stay float32): 2x faster for the 27-row groups of --grid paper on an H200, slower for one
    # row and on CPU; it moves scores as much as nondeterministic float32 kernels do
    # (benchmarks/README.md). "float32" is the paper's.
    precision: str = "float32"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown training protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        for name, value in PROTOCOL_DEFAULTS[self.protocol].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown CNN precision {self.precision!r}; expected one of {PRECISIONS}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"unknown input scaling {self.input_scaling!r}; expected one of {INPUT_SCALINGS}")
        assert self.val_fraction is not None and self.epochs is not None and self.batch_size is not None \
            and self.patience is not None  # every protocol sets them
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.patience < 0:
            raise ValueError(f"epochs and batch sizes must be >= 1 and patience >= 0, got {self}")

    @property
    def early_stopping(self) -> bool:
        return (self.val_fraction or 0) > 0 and (self.patience or 0) > 0  # both set by __post_init__


def _config_seed(seed: int, config: CNNConfig, purpose: str) -> int:
    """A stable per-config seed (Python's hash() is salted per process; crc32 is not)."""
    return zlib.crc32(f"{seed}/{config.name}/{purpose}".encode())


