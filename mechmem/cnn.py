"""The attention CNN of Dentan et al. (2025): its configuration grid, training several configs at once, metrics.

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
benchmarks/bench_cnn.py); on CPU grouped convolutions run slower than separate ones.

Randomness is chosen so that a config's training never depends on which configs train beside it:
- batch order: one generator seeded by `TrainConfig.seed`, shared by all configs (that is what lets
  one batch feed them all);
- initialisation and dropout masks: per-config generators seeded from (seed, config.name).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechmem.atomic import atomic_write

POOLINGS = ("mean", "max")
PRECISIONS = ("float32", "bf16")


# ----------------------------------------------------------------------------- configs


logger = logging.getLogger(__name__)
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
    eval_batch_size: int = 256
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


# ----------------------------------------------------------------------------- model


def feature_side(seq_len: int, kernel_size: int) -> int:
    """Side of the feature map after conv(k) -> maxpool(2) -> conv(k) -> maxpool(2)."""
    side = (seq_len - kernel_size + 1) // 2
    side = (side - kernel_size + 1) // 2
    if side < 1:
        raise ValueError(f"seq_len {seq_len} is too short for kernel_size {kernel_size}")
    return side


def scaling_shape(scaling: str, n_layers: int, seq_len: int) -> tuple[int, int, int]:
    """Shape of an `InputScaling`'s statistics: one per layer, or one per (layer, query, key)."""
    return (n_layers, 1, 1) if scaling == "layer" else (n_layers, seq_len, seq_len)


def scale_input(x: Tensor, mean: Tensor, std: Tensor, log: bool) -> Tensor:
    """(f(x) - mean) / std, f = log(x + LOG_EPS) or identity: what InputScaling and the fused stack apply."""
    return ((torch.log(x + LOG_EPS) if log else x) - mean) / std


class InputScaling(nn.Module):
    """x -> (f(x) - mean) / std with fixed statistics of the training split; f = log(x + LOG_EPS) or identity."""

    mean: Tensor  # buffers, declared for the type checker
    std: Tensor

    def __init__(self, scaling: str, n_layers: int, seq_len: int):
        super().__init__()
        if scaling not in INPUT_SCALINGS[1:]:
            raise ValueError(f"InputScaling takes one of {INPUT_SCALINGS[1:]}, got {scaling!r}")
        self.scaling, self.log = scaling, scaling.startswith("log")
        shape = scaling_shape(scaling, n_layers, seq_len)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: Float[Tensor, "batch layer query key"]) -> Float[Tensor, "batch layer query key"]:
        return scale_input(x, self.mean, self.std, self.log)


# The CNN, layer by layer: one definition that both the single network (AttentionCNN, a module per
# entry, named so that localization can hook the ReLUs) and the fused stack (_CNNStack: the same
# sequence over G members at once, grouped convolutions and batched linears) are built from.
LAYERS: tuple[tuple[str, str], ...] = (
    ("conv1", "conv"), ("relu1", "relu"), ("drop1", "dropout"), ("pool1", "pool"),
    ("conv2", "conv"), ("relu2", "relu"), ("drop2", "dropout"), ("pool2", "pool"),
    ("flatten", "flatten"),  # (c h w) order
    ("fc1", "linear"), ("relu3", "relu"), ("drop3", "dropout"),
    ("fc2", "linear"),
)


def _layer_shapes(config: CNNConfig, n_layers: int, n_classes: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each trained layer."""
    c, fc, side = config.channels, config.n_feat_fc, feature_side(seq_len, config.kernel_size)
    return {"conv1": (n_layers, c), "conv2": (c, c), "fc1": (c * side * side, fc), "fc2": (fc, n_classes)}


def dropout_mask(shape: torch.Size, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Dropout's keep-mask drawn from `generator`: a CNN's masks come from its own generator, so it
    trains the same alone, in a stack, or in the plain loop."""
    return torch.rand(shape, generator=generator, device=device) >= p


class SeededDropout(nn.Dropout):
    """nn.Dropout whose masks come from `generator` when one is set (training sets it); else torch's own."""

    generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, self.generator, x.device) / (1 - self.p)


class AttentionCNN(nn.Module):
    """[input scaling ->] conv -> ReLU -> dropout -> maxpool, twice, then linear -> ReLU -> dropout -> linear.

    Layers are modules in one `nn.Sequential` (not functional calls), built from LAYERS, so that
    localization can hook the ReLUs by name for guided backpropagation. The input scaling (absent
    for "raw") holds the training split's statistics, so the CNN always reads raw pooled attention.
    """

    def __init__(self, n_layers: int, n_classes: int, config: CNNConfig = CNNConfig(), seq_len: int = 64,
                 input_scaling: str = "raw"):
        super().__init__()
        if n_layers < 1 or n_classes < 2:
            raise ValueError(f"need n_layers >= 1 and n_classes >= 2, got {n_layers}, {n_classes}")
        self.config, self.n_layers, self.n_classes, self.seq_len = config, n_layers, n_classes, seq_len
        self.input_scaling = input_scaling
        shapes = _layer_shapes(config, n_layers, n_classes, seq_len)
        make = {
            "conv": lambda name: nn.Conv2d(*shapes[name], config.kernel_size),
            "linear": lambda name: nn.Linear(*shapes[name]),
            "relu": lambda name: nn.ReLU(),
            "dropout": lambda name: SeededDropout(config.dropout),
            "pool": lambda name: nn.MaxPool2d(2),
            "flatten": lambda name: nn.Flatten(),
        }
        scale = [] if input_scaling == "raw" else [("scale", InputScaling(input_scaling, n_layers, seq_len))]
        self.layers = nn.Sequential(OrderedDict(scale + [(name, make[kind](name)) for name, kind in LAYERS]))

    def forward(self, x: Float[Tensor, "batch layer query key"]) -> Float[Tensor, "batch class"]:
        return self.layers(x)

    def set_dropout_generator(self, generator: torch.Generator | None) -> None:
        """Draw every dropout mask from `generator` (None: torch's global generator)."""
        for name, kind in LAYERS:
            if kind == "dropout":
                self.layers.get_submodule(name).generator = generator  # type: ignore[assignment]

    @property
    def fc_in_features(self) -> int:
        return self.layers.get_submodule("fc1").in_features  # type: ignore[return-value]

    @property
    def scale(self) -> InputScaling:
        """The input scaling layer (absent, KeyError, for "raw")."""
        return self.layers.get_submodule("scale")  # type: ignore[return-value]


class _CNNStack(nn.Module):
    """G same-shaped AttentionCNNs run as one network: LAYERS over a member axis.

    Input channels are the members' inputs side by side, "(member layer)"; grouped convolutions keep
    the members apart, and the linear layers are batched matmuls over a member axis. Dropout masks
    are drawn per member from the member's own generator, with the shapes a lone member would draw,
    so a member trains the same whether it is stacked with others or alone.
    """

    scale_mean: Tensor  # buffers (with input scaling), declared for the type checker
    scale_std: Tensor

    def __init__(self, members: Sequence[AttentionCNN]):
        super().__init__()
        first = members[0]
        if any(m.config.shape_key != first.config.shape_key or m.n_layers != first.n_layers
               or m.n_classes != first.n_classes or m.seq_len != first.seq_len
               or m.input_scaling != first.input_scaling for m in members):
            raise ValueError("only same-shaped AttentionCNNs can be stacked")
        self.configs = [m.config for m in members]
        self.n_layers, self.n_classes, self.seq_len = first.n_layers, first.n_classes, first.seq_len
        self.input_scaling = first.input_scaling
        G, k = len(members), first.config.kernel_size
        self.n_members, self.p = G, first.config.dropout
        shapes = _layer_shapes(first.config, first.n_layers, first.n_classes, first.seq_len)
        for name, kind in LAYERS:
            n_in, n_out = shapes.get(name, (0, 0))
            if kind == "conv":
                setattr(self, name, nn.Conv2d(G * n_in, G * n_out, k, groups=G))
            elif kind == "linear":
                setattr(self, f"{name}_w", nn.Parameter(torch.empty(G, n_out, n_in)))
                setattr(self, f"{name}_b", nn.Parameter(torch.empty(G, n_out)))
        self.log = self.input_scaling.startswith("log")
        if self.input_scaling != "raw":  # members' statistics side by side: "(member layer) query key"
            self.register_buffer("scale_mean", torch.cat([m.scale.mean for m in members]).clone())
            self.register_buffer("scale_std", torch.cat([m.scale.std for m in members]).clone())
        for g, m in enumerate(members):
            self.load_member_state(g, m.state_dict())
        self.generators: list[torch.Generator] | None = None  # per-member dropout RNGs, set to train

    def _member_views(self, g: int) -> dict[str, Tensor]:
        """Member g's trained parameters as views into the stack, named as in an AttentionCNN."""
        views: dict[str, Tensor] = {}
        for name, kind in LAYERS:
            if kind == "conv":
                conv = getattr(self, name)
                C = conv.out_channels // self.n_members
                views |= {f"layers.{name}.{p}": getattr(conv, p)[g * C:(g + 1) * C] for p in ("weight", "bias")}
            elif kind == "linear":
                views |= {f"layers.{name}.weight": getattr(self, f"{name}_w")[g],
                          f"layers.{name}.bias": getattr(self, f"{name}_b")[g]}
        return views

    def member_state(self, g: int) -> dict[str, Tensor]:
        """A copy of member g's trained parameters (what early stopping keeps of its best epoch)."""
        return {k: v.detach().clone() for k, v in self._member_views(g).items()}

    def load_member_state(self, g: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self._member_views(g).items():
                v.copy_(state[k])

    def _dropout(self, x: Tensor) -> Tensor:
        """Dropout with member g's mask drawn from generator g; x's axis 1 is (member ...)."""
        if not self.training or self.p == 0:
            return x
        if self.generators is None:
            raise RuntimeError("set _CNNStack.generators before training")
        masks = [dropout_mask(chunk.shape, self.p, g, x.device)
                 for chunk, g in zip(x.chunk(self.n_members, dim=1), self.generators)]
        return x * torch.cat(masks, dim=1) / (1 - self.p)

    def forward(self, x: Float[Tensor, "batch member_layer query key"]) -> Float[Tensor, "batch member class"]:
        if self.input_scaling != "raw":
            x = scale_input(x, self.scale_mean, self.scale_std, self.log)
        for name, kind in LAYERS:
            if kind == "conv":
                x = getattr(self, name)(x)
            elif kind == "linear":
                x = einsum(x, getattr(self, f"{name}_w"), "b g i, g o i -> b g o") + getattr(self, f"{name}_b")
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "dropout":
                x = self._dropout(x)
            elif kind == "pool":
                x = F.max_pool2d(x, 2)
            elif kind == "flatten":
                x = rearrange(x, "b (g c) h w -> b g (c h w)", g=self.n_members)
        return x

    def unstack(self) -> list[AttentionCNN]:
        """The members as standalone AttentionCNNs (copies, on this stack's device)."""
        out = []
        L = self.n_layers
        for g, config in enumerate(self.configs):
            model = AttentionCNN(self.n_layers, self.n_classes, config, self.seq_len, self.input_scaling)
            state = self.member_state(g)
            if self.input_scaling != "raw":
                state |= {"layers.scale.mean": self.scale_mean[g * L:(g + 1) * L].clone(),
                          "layers.scale.std": self.scale_std[g * L:(g + 1) * L].clone()}
            model.load_state_dict(state)
            out.append(model.to(next(self.parameters()).device).eval())
        return out



# ----------------------------------------------------------------------------- metrics


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


# ----------------------------------------------------------------------------- training


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


def _as_indices(idx, n_samples: int, what: str) -> np.ndarray:
    idx = idx.detach().cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{what} must be a non-empty 1-D array of integer sample indices")
    if idx.min() < 0 or idx.max() >= n_samples:
        raise ValueError(f"{what} must lie in [0, {n_samples}), got values in [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64)


def _batch_reader(features, pool_ids: np.ndarray, device: torch.device):
    """read(idx, idx_dev) -> the samples `idx`, pools `pool_ids`, as float32 on `device`.

    `idx_dev` is the same indices already on `device`: features held on the device are gathered
    there, so a training step never waits for a host-to-device copy of its indices (which would
    serialise the CPU and the GPU). A numpy memmap is read row by row from disk instead.
    """
    if isinstance(features, Tensor):
        pools = torch.from_numpy(pool_ids).to(features.device)

        def read(idx: np.ndarray, idx_dev: Tensor) -> Float[Tensor, "batch pool layer query key"]:
            i = idx_dev if idx_dev.device == features.device else torch.from_numpy(idx).to(features.device)
            return features[i[:, None], pools[None, :]].to(device, non_blocking=True).float()
    else:
        def read(idx: np.ndarray, idx_dev: Tensor) -> Float[Tensor, "batch pool layer query key"]:
            x = torch.from_numpy(np.ascontiguousarray(features[idx[:, None], pool_ids[None, :]]))
            return x.to(device, non_blocking=True).float()
    return read


def split_validation(labels: np.ndarray, train_idx: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val): `fraction` of the training split held out, in proportion to each class.

    The draw depends on the seed and the training split alone (not on which tasks train beside it),
    and always holds out round(fraction * n) samples, so tasks of equal size stay in lockstep.
    """
    n = len(train_idx)
    n_val = round(fraction * n)
    if n_val == 0:
        return train_idx, train_idx[:0]
    if n_val >= n:
        raise ValueError(f"val_fraction {fraction} leaves no training samples out of {n}")
    y = labels[train_idx]
    u = np.random.default_rng([seed, 0x7A1]).random(n)
    key = np.empty(n)
    for c in np.unique(y):  # i-th of a class's m samples (random order) gets key (i + 0.5) / m
        members = np.flatnonzero(y == c)
        key[members[np.argsort(u[members], kind="stable")]] = (np.arange(len(members)) + 0.5) / len(members)
    val_mask = np.zeros(n, dtype=bool)
    val_mask[np.lexsort((u, key))[:n_val]] = True
    return train_idx[~val_mask], train_idx[val_mask]


def input_statistics(
    features, pool_ids: np.ndarray, idx: np.ndarray, scaling: str, device: torch.device, chunk: int = 256
) -> tuple[Float[Tensor, "pool layer q k"], Float[Tensor, "pool layer q k"]]:
    """Mean and standard deviation of the samples `idx` (the training split only), per pool and
    `scaling` granularity, floored at SCALE_EPS; float64 sums, so their order does not matter."""
    read = _batch_reader(features, pool_ids, device)
    total: Tensor | None = None
    total_sq: Tensor | None = None
    for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        x = read(part, torch.from_numpy(part).to(device)).double()
        if scaling.startswith("log"):
            x = torch.log(x + LOG_EPS)
        s, s2 = x.sum(0), (x * x).sum(0)
        total, total_sq = (s, s2) if total is None else (total + s, total_sq + s2)
    assert total is not None and total_sq is not None, "no samples"
    count = len(idx)
    if scaling == "layer":
        count *= total.shape[-1] * total.shape[-2]
        total, total_sq = total.sum((-2, -1), keepdim=True), total_sq.sum((-2, -1), keepdim=True)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(SCALE_EPS)
    return mean.float(), std.float()


def _init_member(config: CNNConfig, n_layers: int, n_classes: int, seq_len: int, seed: int,
                 scaling: str = "raw", stats: tuple[Tensor, Tensor] | None = None) -> AttentionCNN:
    """Initialise on cpu from the config's own seed: same weights whatever else is trained, on any device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_config_seed(seed, config, "init"))
        model = AttentionCNN(n_layers, n_classes, config, seq_len, scaling)
    if stats is not None:
        model.scale.mean.copy_(stats[0])
        model.scale.std.copy_(stats[1])
    return model



def _check_inputs(features, pools, labels, train_idx, eval_idx, n_classes, configs, train
                  ) -> tuple[tuple[CNNConfig, ...], tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Validate train_cnns' arguments; return them normalised (tuples, int64 numpy arrays)."""
    configs = tuple(configs)
    if not configs or not all(isinstance(c, CNNConfig) for c in configs):
        raise ValueError("configs must be a non-empty sequence of CNNConfig")
    if len({c.name for c in configs}) != len(configs):
        raise ValueError(f"config names must be unique, got {[c.name for c in configs]}")
    if not isinstance(features, (Tensor, np.ndarray)) or features.ndim != 5:
        raise ValueError(f"features must be a 5-D [sample pool layer query key] tensor or array, got "
                         f"{getattr(features, 'shape', type(features))}")
    pools = tuple(pools)
    n_samples, n_pools, _, seq_len, seq_len_k = features.shape
    if n_pools != len(pools) or seq_len != seq_len_k:
        raise ValueError(f"features shape {tuple(features.shape)} does not match pools {pools} "
                         "or is not square in query/key")
    for c in configs:
        if c.pooling not in pools:
            raise ValueError(f"config {c.name} reads pooling {c.pooling!r}, but features only hold {pools}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    labels = _as_labels(labels, n_classes, "labels")
    if len(labels) != n_samples:
        raise ValueError(f"labels has {len(labels)} entries but features has {n_samples} samples")
    train_idx = _as_indices(train_idx, n_samples, "train_idx")
    eval_idx = _as_indices(eval_idx, n_samples, "eval_idx")
    if np.intersect1d(train_idx, eval_idx).size:
        logger.warning("train_idx and eval_idx overlap: eval metrics are not held-out")
    for c in configs:
        feature_side(seq_len, c.kernel_size)  # fail before training if a kernel is too large
    return configs, pools, labels, train_idx, eval_idx


def train_cnns(
    features: Float[Tensor, "sample pool layer query key"] | np.ndarray,
    pools: Sequence[str],
    labels: Int[Tensor, " sample"] | Int[np.ndarray, " sample"],
    train_idx: Sequence[int] | np.ndarray | Tensor,
    eval_idx: Sequence[int] | np.ndarray | Tensor,
    n_classes: int,
    configs: Sequence[CNNConfig] = QUICK_GRID,
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> list[TrainedCNN]:
    """Train every config in `configs` in one pass over the data; return them in the same order.

    `features` holds head-pooled attention, its pool axis named by `pools` (e.g. ("mean", "max")); each
    config reads the pool named by its `pooling`. A torch tensor is moved to the device once (keep it
    float16 to halve the memory; it stays on cpu if the device is out of memory); a numpy array or
    memmap is read batch by batch. Either way each batch is converted to float32 on the device.
    """
    return train_cnn_tasks(features, pools, [Task(labels, train_idx, eval_idx)], n_classes, configs, train,
                           progress)[0]


def train_cnn(
    features: Float[Tensor, "sample pool layer query key"] | np.ndarray,
    pools: Sequence[str],
    labels: Int[Tensor, " sample"] | Int[np.ndarray, " sample"],
    train_idx: Sequence[int] | np.ndarray | Tensor,
    eval_idx: Sequence[int] | np.ndarray | Tensor,
    n_classes: int,
    config: CNNConfig,
    train: TrainConfig = TrainConfig(),
    epochs: int | None = None,
) -> TrainedCNN:
    """One CNN, trained in a plain loop that reads top to bottom. `epochs`: exactly that many, the
    last weights kept, no early stopping (what `Task.epochs` asks of `train_cnn_tasks`).

    This is the reference: `train_cnn_tasks` trains many CNNs and tasks in lockstep (one pass over
    the data, same-shaped CNNs fused into one grouped network on a GPU) and is tested to give what
    this loop gives. Same seeds, same data order, same dropout masks, same early stopping.
    """
    _, pools, labels, train_idx, eval_idx = _check_inputs(features, pools, labels, train_idx, eval_idx,
                                                          n_classes, [config], train)
    assert train.epochs and train.batch_size and train.input_scaling and train.val_fraction is not None  # __post_init__
    device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pool = np.array([pools.index(config.pooling)])
    read = _batch_reader(features, pool, device)

    def batch(idx: np.ndarray) -> Float[Tensor, "batch layer query key"]:
        return read(idx, torch.from_numpy(idx).to(device))[:, 0]

    def predict(model: AttentionCNN, idx: np.ndarray) -> Float[Tensor, "sample class"]:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(batch(idx[s:s + train.eval_batch_size])).float().cpu()
                              for s in range(0, len(idx), train.eval_batch_size)])

    # The validation part (early stopping) comes out of the training split; input statistics from all of it.
    fit_idx, val_idx = split_validation(labels, train_idx, train.val_fraction, train.seed)
    stats = None
    if train.input_scaling != "raw":
        mean, std = input_statistics(features, pool, train_idx, train.input_scaling, device)
        stats = (mean[0], std[0])
    _, _, n_layers, seq_len, _ = features.shape
    model = _init_member(config, n_layers, n_classes, seq_len, train.seed, train.input_scaling, stats).to(device)
    model.set_dropout_generator(torch.Generator(device=device).manual_seed(_config_seed(train.seed, config, "dropout")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                  fused=device.type == "cuda")
    order = torch.Generator().manual_seed(train.seed)  # the data order: from the seed alone
    y = torch.from_numpy(labels).to(device)
    train_losses: list[float] = []
    val_losses: list[float] = []
    best, best_epoch, best_state, epoch = math.inf, 0, None, 0
    fixed = _fixed_epochs(epochs, 1, train)[0]
    with _cudnn_deterministic(train.deterministic):
        for epoch in range(1, (fixed or train.epochs) + 1):
            model.train()
            perm = fit_idx[torch.randperm(len(fit_idx), generator=order).numpy()]
            total = torch.zeros((), device=device)
            for start in range(0, len(perm), train.batch_size):
                idx = perm[start:start + train.batch_size]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16"):
                    logits = model(batch(idx)).float()
                loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(idx)
            train_losses.append(float(total / len(perm)))
            if len(val_idx):
                val_loss = float(F.cross_entropy(predict(model, val_idx).double(), torch.from_numpy(labels[val_idx])))
                val_losses.append(val_loss)
                if fixed:
                    continue
                if val_loss < best:
                    best, best_epoch = val_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                elif train.patience and epoch - best_epoch >= train.patience:
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        eval_logits = predict(model, eval_idx)
    metrics = classification_metrics(labels[eval_idx], eval_logits.argmax(-1), n_classes, eval_logits)
    model.set_dropout_generator(None)
    return TrainedCNN(config, model.eval(), eval_logits, metrics, train_losses, val_losses, epochs_run=epoch,
                      best_epoch=best_epoch if best_state is not None else epoch)


@dataclass
class Task:
    """One classification problem on a feature array: a taxonomy's labels and its split."""

    labels: Int[Tensor, " sample"] | Int[np.ndarray, " sample"]
    train_idx: Sequence[int] | np.ndarray | Tensor
    eval_idx: Sequence[int] | np.ndarray | Tensor
    # None: the protocol decides when to stop. An int (or one per config): exactly that many epochs,
    # last weights kept, never early-stopped - the shuffled-label control trains its twin's epoch
    # count this way (`mechmem.controls`), since stopping on shuffled validation labels collapses it.
    epochs: int | Sequence[int] | None = None


def _fixed_epochs(epochs: int | Sequence[int] | None, n_configs: int, train: TrainConfig) -> list[int]:
    """A task's fixed epoch count per config (0: none, the protocol stops it), checked against the cap."""
    if epochs is None:
        return [0] * n_configs
    counts = [int(epochs)] * n_configs if isinstance(epochs, (int, np.integer)) else [int(e) for e in epochs]
    if len(counts) != n_configs:
        raise ValueError(f"a task's epochs must be one count or one per config ({n_configs}), got {len(counts)}")
    assert train.epochs is not None  # __post_init__
    if any(not 1 <= e <= train.epochs for e in counts):
        raise ValueError(f"a task's fixed epochs must lie in [1, {train.epochs}] (the protocol's cap), got {counts}")
    return counts


@contextmanager
def _cudnn_deterministic(on: bool):
    """cuDNN deterministic (and not autotuned) inside, as it was outside after."""
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    if on:
        cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def train_cnn_tasks(
    features: Float[Tensor, "sample pool layer query key"] | np.ndarray,
    pools: Sequence[str],
    tasks: Sequence[Task],
    n_classes: int,
    configs: Sequence[CNNConfig] = QUICK_GRID,
    train: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> list[list[TrainedCNN]]:
    """`train_cnns` for several tasks at once (taxonomies of one benchmark): `out[task][config]`.

    The tasks must have as many training samples each; they step in lockstep, each on its own batches.
    A task's CNNs train exactly as they would alone: its batch order is the permutation a lone task
    draws, and initialisation and dropout come from per-config seeds. On a GPU the CNNs of every task
    and same-shaped config run as one grouped network, so a step costs about as many kernel launches
    for 27 taxonomies as for one (the launches, not the arithmetic, bound a batch-16 CNN).
    """
    with _cudnn_deterministic(train.deterministic):
        return _train_cnn_tasks(features, pools, tasks, n_classes, configs, train, progress)


def _train_cnn_tasks(features, pools, tasks, n_classes, configs, train, progress) -> list[list[TrainedCNN]]:
    checked = [_check_inputs(features, pools, t.labels, t.train_idx, t.eval_idx, n_classes, configs, train)
               for t in tasks]
    if not checked:
        raise ValueError("tasks must not be empty")
    configs, pools = checked[0][0], checked[0][1]
    fixed = [_fixed_epochs(t.epochs, len(configs), train) for t in tasks]  # fixed[task][config]; 0: none
    labels = np.stack([c[2] for c in checked])
    if len({len(c[3]) for c in checked}) != 1:
        raise ValueError(f"tasks trained together need as many training samples each, got {[len(c[3]) for c in checked]}")
    # The validation part comes out of each task's training split, never its eval split.
    fit_val = [split_validation(c[2], c[3], train.val_fraction, train.seed) for c in checked]
    fit_idx, val_idx = np.stack([f for f, _ in fit_val]), np.stack([v for _, v in fit_val])
    eval_idx = [c[4] for c in checked]
    n_tasks, n_fit = fit_idx.shape
    _, _, n_layers, seq_len, _ = features.shape
    device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(features, Tensor) and features.device != device:
        try:
            features = features.to(device)
        except torch.OutOfMemoryError:
            logger.warning("features do not fit on %s; reading them from %s", device, features.device)
    used_pools = sorted({pools.index(c.pooling) for c in configs})

    # Input statistics per task, from its whole training split (fit and validation parts); tasks with
    # the same split (a row and its shuffled-label control) share them.
    stats: dict[bytes, tuple[Tensor, Tensor]] = {}
    task_stats: list[tuple[Tensor, Tensor] | None] = []
    for c in checked:
        key = c[3].tobytes()
        if train.input_scaling != "raw" and key not in stats:
            stats[key] = input_statistics(features, np.array(used_pools), c[3], train.input_scaling, device)
        task_stats.append(stats.get(key))

    # Stacks of (task, config) members: on a GPU, every task's same-shaped configs in one grouped network;
    # else one network each. (Fusing pays on a GPU, where small kernels are launch-bound; on CPU grouped
    # convs run slower than separate ones, see benchmarks/bench_cnn.py.)
    fuse = device.type == "cuda" if train.fuse is None else train.fuse
    by_shape: dict = {}
    for i, c in enumerate(configs):
        by_shape.setdefault(c.shape_key, []).append(i)
    if fuse:
        stack_members = [[(t, i) for t in range(n_tasks) for i in group] for group in by_shape.values()]
    else:
        stack_members = [[(t, i)] for t in range(n_tasks) for i in range(len(configs))]
    # On CPU, channels-last convolutions run faster for these shapes (1.3x at batch 16, benchmarks/README.md).
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    def member_stats(t: int, i: int) -> tuple[Tensor, Tensor] | None:
        """Task t's input statistics for the pool config i reads."""
        both = task_stats[t]
        if both is None:
            return None
        k = used_pools.index(pools.index(configs[i].pooling))
        return both[0][k], both[1][k]

    stacks: list[_CNNStack] = []
    member_task: list[Tensor] = []
    member_pool: list[Tensor] = []
    for members in stack_members:
        stack = _CNNStack([
            _init_member(configs[i], n_layers, n_classes, seq_len, train.seed, train.input_scaling, member_stats(t, i))
            for t, i in members])
        stack = stack.to(device=device, memory_format=memory_format)  # type: ignore[call-overload]  # (missing in torch's stub)
        stack.generators = [torch.Generator(device=device).manual_seed(_config_seed(train.seed, configs[i], "dropout"))
                            for _, i in members]
        stacks.append(stack)
        member_task.append(torch.tensor([t for t, _ in members], device=device))
        member_pool.append(torch.tensor([used_pools.index(pools.index(configs[i].pooling)) for _, i in members],
                                        device=device))
    # One AdamW over every CNN's parameters: it is elementwise, so this equals one optimizer per CNN,
    # with fewer kernel launches (a single fused kernel on cuda).
    optimizer = torch.optim.AdamW([p for s in stacks for p in s.parameters()], lr=train.lr,
                                  weight_decay=train.weight_decay, fused=device.type == "cuda")
    labels_dev = torch.from_numpy(labels).to(device)  # (task, sample)
    read = _batch_reader(features, np.array(used_pools), device)
    bf16 = train.precision == "bf16"

    def run(stack: _CNNStack, tasks_of: Tensor, pools_of: Tensor, x: Tensor) -> Float[Tensor, "batch member class"]:
        """x: (task, batch, pool, layer, q, k) -> each member reads its task's batch and its pool."""
        x = rearrange(x[tasks_of, :, pools_of], "g b l q k -> b (g l) q k").contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return stack(x).float()

    def read_tasks(idx: np.ndarray, idx_dev: Tensor) -> Float[Tensor, "task batch pool layer query key"]:
        return read(idx.reshape(-1), idx_dev.reshape(-1)).unflatten(0, idx.shape)

    def evaluate(idx_per_task: Sequence[np.ndarray], which: Sequence[int]) -> dict[int, Float[Tensor, "sample member class"]]:
        """Stacks `which`'s logits on each task's samples, in lockstep; shorter tasks repeat their last sample."""
        n = max(len(e) for e in idx_per_task)
        mat = np.stack([e[np.minimum(np.arange(n), len(e) - 1)] for e in idx_per_task])
        mat_dev = torch.from_numpy(mat).to(device)
        out: dict[int, list[Tensor]] = {s: [] for s in which}
        with torch.no_grad():
            for s in which:
                stacks[s].eval()
            step = max(1, train.eval_batch_size // n_tasks)  # eval_batch_size samples a step, all tasks together
            for start in range(0, n, step):
                x = read_tasks(mat[:, start:start + step], mat_dev[:, start:start + step])
                for s in which:
                    out[s].append(run(stacks[s], member_task[s], member_pool[s], x).cpu())
        return {s: torch.cat(o) for s, o in out.items()}

    # Per member (stack s, slot g): losses, and with validation the best epoch's weights so far.
    history: dict[tuple[int, int], dict[str, Any]] = {
        (s, g): {"train": [], "val": [], "best": math.inf, "best_epoch": 0, "state": None, "stopped": 0,
                 "fixed": fixed[t][i]}
        for s, members in enumerate(stack_members) for g, (t, i) in enumerate(members)}
    order = torch.Generator().manual_seed(train.seed)
    val_labels = labels[np.arange(n_tasks)[:, None], val_idx]  # (task, val)
    bar = tqdm(total=train.epochs, desc=f"training {n_tasks}x{len(configs)} CNNs", unit="epoch",
               disable=not progress)
    epochs_done = 0
    active = list(range(len(stacks)))  # stacks with a member still training
    for epoch in range(1, train.epochs + 1):
        for s in active:
            stacks[s].train()
        perm = fit_idx[:, torch.randperm(n_fit, generator=order).numpy()]  # the permutation a lone task draws
        perm_dev = torch.from_numpy(perm).to(device)  # one copy an epoch, none a step
        totals = {s: torch.zeros(len(stack_members[s]), device=device) for s in active}
        for start in range(0, n_fit, train.batch_size):
            idx, idx_dev = perm[:, start:start + train.batch_size], perm_dev[:, start:start + train.batch_size]
            x = read_tasks(idx, idx_dev)
            y = labels_dev.gather(1, idx_dev)  # (task, batch)
            loss = torch.zeros((), device=device)
            for s in active:
                logits = run(stacks[s], member_task[s], member_pool[s], x)  # (b, g, class)
                member_loss = F.cross_entropy(rearrange(logits, "b g c -> b c g"), y[member_task[s]].T,
                                              reduction="none").mean(0)
                loss = loss + member_loss.sum()  # each CNN's parameters only see its own loss
                totals[s] += member_loss.detach() * idx.shape[1]
            optimizer.zero_grad(set_to_none=True)  # a finished stack's parameters get no gradient: AdamW skips them
            loss.backward()
            optimizer.step()
        epochs_done = epoch
        for s, total in totals.items():
            for g, t in enumerate((total / n_fit).tolist()):
                if not history[(s, g)]["stopped"]:
                    history[(s, g)]["train"].append(t)
        if val_idx.shape[1]:
            _track_validation(history, evaluate(list(val_idx), active), val_labels, member_task, stacks, epoch,
                              train.patience)
        for (s, g), h in history.items():  # members of fixed-epoch tasks stop here, with their last weights
            if h["fixed"] == epoch:
                h["stopped"], h["best_epoch"], h["state"] = epoch, epoch, stacks[s].member_state(g)
        # a stopped member has the weights it keeps saved: training it on is wasted
        active = [s for s in active if any(not history[(s, g)]["stopped"] for g in range(len(stack_members[s])))]
        bar.update()
        running = sum(not h["stopped"] for h in history.values())
        bar.set_postfix_str(f"{running}/{len(history)} training")
        if running == 0:
            break
    bar.close()

    # The best epoch's weights (with validation), then the eval split, in lockstep.
    for (s, g), h in history.items():
        if h["state"] is not None:
            stacks[s].load_member_state(g, h["state"])
    eval_logits = evaluate(eval_idx, range(len(stacks)))
    trained: list[list[TrainedCNN | None]] = [[None] * len(configs) for _ in range(n_tasks)]
    for s, (members, stack) in enumerate(zip(stack_members, stacks)):
        logits = eval_logits[s]
        for g, ((t, i), model) in enumerate(zip(members, stack.unstack())):
            h = history[(s, g)]
            lg = logits[: len(eval_idx[t]), g].contiguous()
            metrics = classification_metrics(labels[t][eval_idx[t]], lg.argmax(-1), n_classes, lg)
            trained[t][i] = TrainedCNN(configs[i], model, lg, metrics, h["train"], h["val"],
                                       epochs_run=h["stopped"] or epochs_done,
                                       best_epoch=h["best_epoch"] if h["state"] is not None else epochs_done)
    assert all(t is not None for row in trained for t in row)
    return trained  # type: ignore[return-value]  # (every slot filled above)


def _track_validation(history: dict, val_logits: dict[int, Tensor], val_labels: np.ndarray, member_task: list[Tensor],
                      stacks: list[_CNNStack], epoch: int, patience: int) -> None:
    """Early stopping's bookkeeping: each member's validation loss; a copy of its weights when it is
    its best so far; the epoch it stops at once `patience` epochs have passed without improvement
    (members of a fixed epoch count only record the loss).
    A stopped member is left alone (it would have stopped training alone), so neighbours never matter."""
    y = torch.from_numpy(val_labels)
    for s, logits in val_logits.items():
        n_val = val_labels.shape[1]
        for g, t in enumerate(member_task[s].tolist()):
            h = history[(s, g)]
            if h["stopped"]:
                continue
            loss = float(F.cross_entropy(logits[:n_val, g].double(), y[t]))
            h["val"].append(loss)
            if h["fixed"]:  # a fixed epoch count: no best epoch, no early stop
                continue
            if loss < h["best"]:
                h["best"], h["best_epoch"], h["state"] = loss, epoch, stacks[s].member_state(g)
            elif patience and epoch - h["best_epoch"] >= patience:
                h["stopped"] = epoch



# ----------------------------------------------------------------------------- alignment score


def mean_min_f1(codes: Int[np.ndarray, "classifier draw sample"], n_classes: int) -> Float[np.ndarray, " draw"]:
    """Min F1 over classes, averaged over classifiers, for many draws at once (bootstrap resamples,
    label permutations). `codes` holds true * n_classes + predicted per sample: one bincount gives
    every confusion matrix."""
    n_cls, b, _ = codes.shape
    k2 = n_classes * n_classes
    cells = codes + (np.arange(n_cls * b) * k2).reshape(n_cls, b, 1)
    conf = np.bincount(cells.ravel(), minlength=n_cls * b * k2).reshape(n_cls, b, n_classes, n_classes)
    return _prf(conf)[2].min(-1).mean(0)


def alignment_summary(
    trained: Sequence[TrainedCNN],
    eval_labels: Int[Tensor, " eval"] | Int[np.ndarray, " eval"],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """The taxonomy's alignment score (min F1 over classes, in percent, averaged over configs) and its neighbours.

    The confidence interval is a percentile bootstrap over eval samples: each resample draws eval indices
    with replacement and applies the same indices to every config's predictions, so it covers the
    config-averaged score, not each config separately.
    """
    if not trained:
        raise ValueError("alignment_summary needs at least one TrainedCNN")
    return score_summary([t.eval_logits for t in trained], eval_labels, n_boot, seed, confidence,
                         names=[t.config.name for t in trained])


def score_summary(
    eval_logits: Sequence[Float[Tensor, "eval class"]],
    eval_labels: Int[Tensor, " eval"] | Int[np.ndarray, " eval"],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    names: Sequence[str] | None = None,
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

    out = {"min_f1": avg("min_f1"), "mean_f1": avg("mean_f1"), "min_prec": avg("min_precision"),
           "mean_prec": avg("mean_precision"), "min_rec": avg("min_recall"), "mean_rec": avg("mean_recall"),
           "mean_eval_loss": avg("loss", 1.0)}

    # Bootstrap: confusion matrices of all resamples at once via one bincount per chunk of resamples.
    K, n, n_cfg = n_classes, len(y), len(eval_logits)
    codes = np.stack([y * K + p for p in preds])  # (config, sample): cell of the confusion matrix
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, 4_000_000 // (n_cfg * n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        stats.append(mean_min_f1(codes[:, rng.integers(0, n, size=(b, n))], K))  # (config, resample, sample)
    boot = 100 * np.concatenate(stats)
    alpha = (1 - confidence) / 2
    out["min_f1_ci_low"], out["min_f1_ci_high"] = (float(v) for v in np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]))
    out["n_configs"], out["n_eval"] = n_cfg, n
    return out


# ----------------------------------------------------------------------------- save / load


INDEX_FILE = "cnns.json"


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1))


def save_cnns(trained: Sequence[TrainedCNN], folder: str | os.PathLike, index: bool = True) -> Path:
    """Write {name}.safetensors (weights, eval logits) and {name}.json (config, metrics) per CNN, then
    the index cnns.json (`index=False`: not, when several ranks each save part of one row's CNNs)."""
    folder = Path(folder)
    names = [t.config.name for t in trained]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must be unique to be saved, got {names}")
    folder.mkdir(parents=True, exist_ok=True)
    for t in trained:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
        tensors["eval_logits"] = t.eval_logits.detach().cpu().float().contiguous()
        meta = {"config": asdict(t.config), "n_layers": t.model.n_layers, "n_classes": t.model.n_classes,
                "seq_len": t.model.seq_len, "input_scaling": t.model.input_scaling,
                "train_losses": list(t.train_losses), "val_losses": list(t.val_losses),
                "epochs_run": t.epochs_run, "best_epoch": t.best_epoch, "eval_metrics": t.eval_metrics.to_dict()}
        atomic_write(folder / f"{t.config.name}.safetensors", partial(_save_safetensors, tensors))
        atomic_write(folder / f"{t.config.name}.json", partial(_write_json, meta))
    if index:
        write_cnn_index(folder, names)
    return folder


def write_cnn_index(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """cnns.json: which saved CNNs make up the folder, in order (what load_cnns reads)."""
    atomic_write(Path(folder) / INDEX_FILE, lambda p: p.write_text(json.dumps({"models": list(names)}, indent=1)))


def load_cnns(folder: str | os.PathLike, device: str | torch.device | None = None) -> list[TrainedCNN]:
    """Read what save_cnns wrote, in the saved order; models in eval mode on `device` (default cpu)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        raise FileNotFoundError(f"no saved CNNs in {folder} (missing {INDEX_FILE})")
    out = []
    for name in json.loads((folder / INDEX_FILE).read_text())["models"]:
        meta = json.loads((folder / f"{name}.json").read_text())
        tensors = load_file(str(folder / f"{name}.safetensors"))
        config = CNNConfig(**meta["config"])
        model = AttentionCNN(meta["n_layers"], meta["n_classes"], config, meta["seq_len"],
                             meta.get("input_scaling", "raw"))
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        out.append(TrainedCNN(config, model.to(device or "cpu").eval(), tensors["eval_logits"],
                              ClassMetrics.from_dict(meta["eval_metrics"]), meta["train_losses"],
                              meta.get("val_losses", []), meta.get("epochs_run", len(meta["train_losses"])),
                              meta.get("best_epoch", len(meta["train_losses"]))))
    return out
