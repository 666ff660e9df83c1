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
import math
import os
import warnings
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

POOLINGS = ("mean", "max")
PRECISIONS = ("float32", "bf16")


# ----------------------------------------------------------------------------- configs


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

    @property
    def shape_key(self) -> tuple[int, int, int, float]:
        """Configs with equal shape keys have equal parameter shapes and can be fused."""
        return (self.kernel_size, self.channels, self.n_feat_fc, self.dropout)


PAPER_GRID: tuple[CNNConfig, ...] = tuple(
    CNNConfig(kernel_size=k, channels=c, pooling=p) for k in (6, 8) for c in (10, 16) for p in POOLINGS
)
QUICK_GRID: tuple[CNNConfig, ...] = (CNNConfig(6, 10, "mean"), CNNConfig(6, 10, "max"))


@dataclass(frozen=True)
class TrainConfig:
    """The paper's optimisation: AdamW, lr 1e-3, weight decay 0.1, batch 16, 3 epochs."""

    epochs: int = 3
    batch_size: int = 16
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown CNN precision {self.precision!r}; expected one of {PRECISIONS}")


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


class AttentionCNN(nn.Module):
    """conv -> ReLU -> dropout -> maxpool, twice, then linear -> ReLU -> dropout -> linear.

    Layers are modules in one `nn.Sequential` (not functional calls) so that localization can hook
    the ReLUs by name for guided backpropagation.
    """

    def __init__(self, n_layers: int, n_classes: int, config: CNNConfig = CNNConfig(), seq_len: int = 64):
        super().__init__()
        if n_layers < 1 or n_classes < 2:
            raise ValueError(f"need n_layers >= 1 and n_classes >= 2, got {n_layers}, {n_classes}")
        self.config, self.n_layers, self.n_classes, self.seq_len = config, n_layers, n_classes, seq_len
        k, c, p = config.kernel_size, config.channels, config.dropout
        side = feature_side(seq_len, k)
        self.layers = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(n_layers, c, k),
                relu1=nn.ReLU(),
                drop1=nn.Dropout(p),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(c, c, k),
                relu2=nn.ReLU(),
                drop2=nn.Dropout(p),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),  # (c h w) order
                fc1=nn.Linear(c * side * side, config.n_feat_fc),
                relu3=nn.ReLU(),
                drop3=nn.Dropout(p),
                fc2=nn.Linear(config.n_feat_fc, n_classes),
            )
        )

    def forward(self, x: Float[Tensor, "batch layer query key"]) -> Float[Tensor, "batch class"]:
        return self.layers(x)


class _CNNStack(nn.Module):
    """G same-shaped AttentionCNNs run as one network.

    Input channels are the members' inputs side by side, "(member layer)"; grouped convolutions keep
    the members apart, and the linear layers are batched matmuls over a member axis. Dropout masks
    are drawn per member from the member's own generator, with the shapes a lone member would draw,
    so a member trains the same whether it is stacked with others or alone.
    """

    def __init__(self, members: Sequence[AttentionCNN]):
        super().__init__()
        first = members[0]
        if any(m.config.shape_key != first.config.shape_key or m.n_layers != first.n_layers
               or m.n_classes != first.n_classes or m.seq_len != first.seq_len for m in members):
            raise ValueError("only same-shaped AttentionCNNs can be stacked")
        self.configs = [m.config for m in members]
        self.n_layers, self.n_classes, self.seq_len = first.n_layers, first.n_classes, first.seq_len
        G, L, C, k = len(members), first.n_layers, first.config.channels, first.config.kernel_size
        self.n_members, self.p = G, first.config.dropout
        self.conv1 = nn.Conv2d(G * L, G * C, k, groups=G)
        self.conv2 = nn.Conv2d(G * C, G * C, k, groups=G)
        layers = [m.layers for m in members]
        with torch.no_grad():  # a grouped conv's weight is its groups' weights concatenated
            for conv, name in ((self.conv1, "conv1"), (self.conv2, "conv2")):
                conv.weight.copy_(torch.cat([getattr(ls, name).weight for ls in layers]))
                conv.bias.copy_(torch.cat([getattr(ls, name).bias for ls in layers]))
        self.fc1_w = nn.Parameter(torch.stack([ls.fc1.weight.detach() for ls in layers]).clone())
        self.fc1_b = nn.Parameter(torch.stack([ls.fc1.bias.detach() for ls in layers]).clone())
        self.fc2_w = nn.Parameter(torch.stack([ls.fc2.weight.detach() for ls in layers]).clone())
        self.fc2_b = nn.Parameter(torch.stack([ls.fc2.bias.detach() for ls in layers]).clone())
        self.generators: list[torch.Generator] | None = None  # per-member dropout RNGs, set to train

    def _dropout(self, x: Tensor) -> Tensor:
        """Dropout with member g's mask drawn from generator g; x's axis 1 is (member ...)."""
        if not self.training or self.p == 0:
            return x
        if self.generators is None:
            raise RuntimeError("set _CNNStack.generators before training")
        masks = [torch.rand(chunk.shape, generator=g, device=x.device) >= self.p
                 for chunk, g in zip(x.chunk(self.n_members, dim=1), self.generators)]
        return x * torch.cat(masks, dim=1) / (1 - self.p)

    def forward(self, x: Float[Tensor, "batch member_layer query key"]) -> Float[Tensor, "batch member class"]:
        x = F.max_pool2d(self._dropout(F.relu(self.conv1(x))), 2)
        x = F.max_pool2d(self._dropout(F.relu(self.conv2(x))), 2)
        x = rearrange(x, "b (g c) h w -> b g (c h w)", g=self.n_members)
        x = self._dropout(F.relu(einsum(x, self.fc1_w, "b g i, g o i -> b g o") + self.fc1_b))
        return einsum(x, self.fc2_w, "b g i, g o i -> b g o") + self.fc2_b

    def unstack(self) -> list[AttentionCNN]:
        """The members as standalone AttentionCNNs (copies, on this stack's device)."""
        out = []
        convs = [(self.conv1, "conv1"), (self.conv2, "conv2")]
        for g, config in enumerate(self.configs):
            model = AttentionCNN(self.n_layers, self.n_classes, config, self.seq_len).to(self.fc1_w.device)
            state = {f"layers.{name}.{p}": getattr(conv, p).chunk(self.n_members)[g]
                     for conv, name in convs for p in ("weight", "bias")}
            state |= {"layers.fc1.weight": self.fc1_w[g], "layers.fc1.bias": self.fc1_b[g],
                      "layers.fc2.weight": self.fc2_w[g], "layers.fc2.bias": self.fc2_b[g]}
            model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
            out.append(model.eval())
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


def _init_member(config: CNNConfig, n_layers: int, n_classes: int, seq_len: int, seed: int) -> AttentionCNN:
    """Initialise on cpu from the config's own seed: same weights whatever else is trained, on any device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_config_seed(seed, config, "init"))
        return AttentionCNN(n_layers, n_classes, config, seq_len)


def _check_inputs(features, pools, labels, train_idx, eval_idx, n_classes, configs, train):
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
        warnings.warn("train_idx and eval_idx overlap: eval metrics are not held-out", stacklevel=3)
    if train.epochs < 1 or train.batch_size < 1 or train.eval_batch_size < 1:
        raise ValueError(f"epochs and batch sizes must be >= 1, got {train}")
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


@dataclass
class Task:
    """One classification problem on a feature array: a taxonomy's labels and its split."""

    labels: Int[Tensor, " sample"] | Int[np.ndarray, " sample"]
    train_idx: Sequence[int] | np.ndarray | Tensor
    eval_idx: Sequence[int] | np.ndarray | Tensor


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
    labels = np.stack([c[2] for c in checked])
    train_idx = np.stack([c[3] for c in checked]) if len({len(c[3]) for c in checked}) == 1 else None
    if train_idx is None:
        raise ValueError(f"tasks trained together need as many training samples each, got {[len(c[3]) for c in checked]}")
    eval_idx = [c[4] for c in checked]
    n_tasks, n_train = train_idx.shape
    _, _, n_layers, seq_len, _ = features.shape
    device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(features, Tensor) and features.device != device:
        try:
            features = features.to(device)
        except torch.OutOfMemoryError:
            warnings.warn(f"features do not fit on {device}; reading them from {features.device}", stacklevel=2)

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
    used_pools = sorted({pools.index(c.pooling) for c in configs})
    stacks, member_task, member_pool = [], [], []
    for members in stack_members:
        stack = _CNNStack([_init_member(configs[i], n_layers, n_classes, seq_len, train.seed)
                           for _, i in members]).to(device)
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return stack(rearrange(x[tasks_of, :, pools_of], "g b l q k -> b (g l) q k")).float()

    def read_tasks(idx: np.ndarray, idx_dev: Tensor) -> Float[Tensor, "task batch pool layer query key"]:
        return read(idx.reshape(-1), idx_dev.reshape(-1)).unflatten(0, idx.shape)

    order = torch.Generator().manual_seed(train.seed)
    n_batches = math.ceil(n_train / train.batch_size)
    bar = tqdm(total=train.epochs * n_batches, desc=f"training {n_tasks}x{len(configs)} CNNs", disable=not progress)
    epoch_losses = {(t, i): [] for t in range(n_tasks) for i in range(len(configs))}
    for s in stacks:
        s.train()
    for _ in range(train.epochs):
        perm = train_idx[:, torch.randperm(n_train, generator=order).numpy()]  # the permutation a lone task draws
        perm_dev = torch.from_numpy(perm).to(device)  # one copy an epoch, none a step
        totals = [torch.zeros(len(m), device=device) for m in stack_members]
        for start in range(0, n_train, train.batch_size):
            idx, idx_dev = perm[:, start:start + train.batch_size], perm_dev[:, start:start + train.batch_size]
            x = read_tasks(idx, idx_dev)
            y = labels_dev.gather(1, idx_dev)  # (task, batch)
            loss = 0.0
            for stack, tasks_of, pools_of, total in zip(stacks, member_task, member_pool, totals):
                logits = run(stack, tasks_of, pools_of, x)  # (b, g, class)
                member_loss = F.cross_entropy(rearrange(logits, "b g c -> b c g"), y[tasks_of].T,
                                              reduction="none").mean(0)
                loss = loss + member_loss.sum()  # each CNN's parameters only see its own loss
                total += member_loss.detach() * idx.shape[1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
        for members, total in zip(stack_members, totals):
            for member, t in zip(members, (total / n_train).tolist()):
                epoch_losses[member].append(t)
    bar.close()

    # Evaluate in lockstep too; a task with fewer eval samples repeats its last one, and drops those outputs.
    n_eval = max(len(e) for e in eval_idx)
    eval_mat = np.stack([e[np.minimum(np.arange(n_eval), len(e) - 1)] for e in eval_idx])
    eval_dev = torch.from_numpy(eval_mat).to(device)
    eval_logits = [[] for _ in stacks]
    with torch.no_grad():
        for s in stacks:
            s.eval()
        step = max(1, train.eval_batch_size // n_tasks)  # eval_batch_size samples a step, all tasks together
        for start in range(0, n_eval, step):
            stop = start + step
            x = read_tasks(eval_mat[:, start:stop], eval_dev[:, start:stop])
            for out, stack, tasks_of, pools_of in zip(eval_logits, stacks, member_task, member_pool):
                out.append(run(stack, tasks_of, pools_of, x).cpu())
    trained: list[list[TrainedCNN | None]] = [[None] * len(configs) for _ in range(n_tasks)]
    for members, stack, out in zip(stack_members, stacks, eval_logits):
        logits = torch.cat(out)  # (eval, g, class)
        for g, ((t, i), model) in enumerate(zip(members, stack.unstack())):
            lg = logits[: len(eval_idx[t]), g].contiguous()
            y_eval = labels[t][eval_idx[t]]
            metrics = classification_metrics(y_eval, lg.argmax(-1), n_classes, lg)
            trained[t][i] = TrainedCNN(configs[i], model, lg, metrics, epoch_losses[(t, i)])
    return trained


# ----------------------------------------------------------------------------- alignment score


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
    n_classes = trained[0].eval_logits.shape[-1]
    y = _as_labels(eval_labels, n_classes, "eval_labels")
    for t in trained:
        if tuple(t.eval_logits.shape) != (len(y), n_classes):
            raise ValueError(f"{t.config.name}: eval_logits shape {tuple(t.eval_logits.shape)} does not match "
                             f"{len(y)} eval labels and {n_classes} classes")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and confidence in (0, 1), got {n_boot}, {confidence}")
    preds = [t.eval_logits.argmax(-1).numpy() for t in trained]
    ms = [classification_metrics(y, p, n_classes, t.eval_logits) for p, t in zip(preds, trained)]

    def avg(attr: str, scale: float = 100.0) -> float:
        return scale * float(np.mean([getattr(m, attr) for m in ms]))

    out = {"min_f1": avg("min_f1"), "mean_f1": avg("mean_f1"), "min_prec": avg("min_precision"),
           "mean_prec": avg("mean_precision"), "min_rec": avg("min_recall"), "mean_rec": avg("mean_recall"),
           "mean_eval_loss": avg("loss", 1.0)}

    # Bootstrap: confusion matrices of all resamples at once via one bincount per chunk of resamples.
    K, n, n_cfg = n_classes, len(y), len(trained)
    codes = np.stack([y * K + p for p in preds])  # (config, sample): cell of the confusion matrix
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, 4_000_000 // (n_cfg * n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        cells = codes[:, rng.integers(0, n, size=(b, n))]  # (config, resample, sample)
        cells = cells + (np.arange(n_cfg * b) * K * K).reshape(n_cfg, b, 1)
        conf = np.bincount(cells.ravel(), minlength=n_cfg * b * K * K).reshape(n_cfg, b, K, K)
        stats.append(_prf(conf)[2].min(-1).mean(0))  # config-averaged min F1 per resample
    stats = 100 * np.concatenate(stats)
    alpha = (1 - confidence) / 2
    out["min_f1_ci_low"], out["min_f1_ci_high"] = (float(v) for v in np.percentile(stats, [100 * alpha, 100 * (1 - alpha)]))
    out["n_configs"], out["n_eval"] = n_cfg, n
    return out


# ----------------------------------------------------------------------------- save / load


from mechmem.atomic import atomic_write as _atomic_write  # noqa: E402  (readers never see a half-written file)


INDEX_FILE = "cnns.json"


def save_cnns(trained: Sequence[TrainedCNN], folder: str | os.PathLike, index: bool = True) -> Path:
    """Write {name}.safetensors (weights, eval logits) and {name}.json (config, metrics) per CNN, then
    the index cnns.json (`index=False`: not, when several ranks each save part of one row's CNNs)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    names = [t.config.name for t in trained]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must be unique to be saved, got {names}")
    folder.mkdir(parents=True, exist_ok=True)
    for t in trained:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
        tensors["eval_logits"] = t.eval_logits.detach().cpu().float().contiguous()
        meta = {"config": asdict(t.config), "n_layers": t.model.n_layers, "n_classes": t.model.n_classes,
                "seq_len": t.model.seq_len, "train_losses": list(t.train_losses),
                "eval_metrics": t.eval_metrics.to_dict()}
        _atomic_write(folder / f"{t.config.name}.safetensors", lambda p: save_file(tensors, str(p)))
        _atomic_write(folder / f"{t.config.name}.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    if index:
        write_cnn_index(folder, names)
    return folder


def write_cnn_index(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """cnns.json: which saved CNNs make up the folder, in order (what load_cnns reads)."""
    _atomic_write(Path(folder) / INDEX_FILE, lambda p: p.write_text(json.dumps({"models": list(names)}, indent=1)))


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
        model = AttentionCNN(meta["n_layers"], meta["n_classes"], config, meta["seq_len"])
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        out.append(TrainedCNN(config, model.to(device or "cpu").eval(), tensors["eval_logits"],
                              ClassMetrics.from_dict(meta["eval_metrics"]), meta["train_losses"]))
    return out
