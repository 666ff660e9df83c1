"""Training CNNs: many configs and tasks in lockstep (`train_cnn_tasks`) beside the plain one-CNN loop it equals (`train_cnn`)."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.cnn.config import _config_seed, CNNConfig, LOG_EPS, QUICK_GRID, SCALE_EPS, TrainConfig
from mechmem.cnn.metrics import TrainedCNN, _as_labels, classification_metrics
from mechmem.cnn.model import (_CNNStack, AttentionCNN, Spectrum, feature_side, scale_input, select,
                                select_channels)
from mechmem.timing import phase

logger = logging.getLogger(__name__)



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
    # The index of another task trained in the same call whose CNNs this task's CNNs stop with,
    # config by config, keeping their last weights: what `epochs` set to the twin's epoch counts
    # gives, in the twin's own pass (the shuffled-label control trains beside its twin this way).
    follows: int | None = None
    # The training seed of this task's CNNs (initialisation, dropout, validation split, batch order);
    # None: the TrainConfig's. Tasks of different seeds train together exactly as they would apart:
    # a row's training seeds in one pass, not one pass each.
    seed: int | None = None


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


def _check_follows(tasks: Sequence[Task]) -> None:
    for t, task in enumerate(tasks):
        if task.follows is None:
            continue
        twin = task.follows
        if not 0 <= twin < len(tasks) or twin == t:
            raise ValueError(f"task {t} follows task {twin}: it must be another task of the same call (0-{len(tasks) - 1})")
        if tasks[twin].follows is not None:
            raise ValueError(f"task {t} follows task {twin}, which follows another: follow the twin itself")
        if task.epochs is not None:
            raise ValueError(f"task {t} has both fixed epochs and a twin to follow: give one")


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


def place_features(features: Tensor | np.ndarray, device: torch.device | str) -> Tensor | np.ndarray:
    """The features where training reads them fastest: a tensor on `device` when it fits (once for
    every call of `train_cnn_tasks`), else where they are."""
    device = torch.device(device)
    if not isinstance(features, Tensor) or features.device == device:
        return features
    try:
        return features.to(device)
    except torch.OutOfMemoryError:
        logger.warning("features do not fit on %s; reading them from %s", device, features.device)
        return features


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
    draws, and initialisation and dropout come from per-config seeds of its own seed (`Task.seed`:
    several training seeds train in one pass). On a GPU the CNNs of every task
    and same-shaped config run as one grouped network, so a step costs about as many kernel launches
    for 27 taxonomies as for one (the launches, not the arithmetic, bound a batch-16 CNN); a CNN that
    has stopped leaves its group, so the others no longer pay for it.

    Where one step of all the tasks does not fit the device (the whole 2.8b grid with its controls on
    an H100), the tasks train in two calls, each split again as needed: a task's CNNs do not depend on
    the tasks beside it (the equality tests), so the results are the same.
    """
    try:
        return _train_in_lockstep(features, pools, tasks, n_classes, configs, train, progress)
    except torch.OutOfMemoryError:
        halves = _halves(tasks)
        if halves is None:
            raise
    # (outside the handler, so that the failed attempt's tensors are freed before the retry)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.warning("%d tasks' CNNs do not fit one step on the device: training them as %d + %d tasks",
                   len(tasks), *(len(h) for h in halves))
    out: list[list[TrainedCNN]] = [[] for _ in tasks]
    for half in halves:
        index: dict[int | None, int | None] = {t: k for k, t in enumerate(half)}
        index[None] = None
        part = [replace(tasks[t], follows=index[tasks[t].follows]) for t in half]  # the twin renumbered
        for t, trained in zip(half, train_cnn_tasks(features, pools, part, n_classes, configs, train, progress)):
            out[t] = trained
    return out


def _halves(tasks: Sequence[Task]) -> tuple[list[int], list[int]] | None:
    """Two sets of task indices of about equal size, each follower with its twin; None for one unit."""
    units: dict[int, list[int]] = {}
    for t, task in enumerate(tasks):
        units.setdefault(t if task.follows is None else task.follows, []).append(t)
    if len(units) < 2:
        return None
    first: list[int] = []
    for members in units.values():
        if len(first) + len(members) / 2 > len(tasks) / 2 and first:
            break
        first += members
    taken = set(first)
    return sorted(first), [t for t in range(len(tasks)) if t not in taken]


def _train_in_lockstep(features, pools, tasks, n_classes, configs, train, progress) -> list[list[TrainedCNN]]:
    """`train_cnn_tasks` in one pass: every task's CNNs in the device's memory at once."""
    assert train.epochs and train.batch_size  # TrainConfig.__post_init__
    with _cudnn_deterministic(train.deterministic):
        setup = _Setup.of(features, pools, tasks, n_classes, configs, train)
        fleet = _Fleet(setup)
        bar = tqdm(total=train.epochs, desc=f"training {len(tasks)}x{len(setup.configs)} CNNs", unit="epoch",
                   disable=not progress)
        orders = {seed: torch.Generator().manual_seed(seed) for seed in sorted(set(setup.seeds))}
        n_fit = setup.fit_idx.shape[1]
        for epoch in range(1, train.epochs + 1):
            drawn = {seed: torch.randperm(n_fit, generator=order).numpy() for seed, order in orders.items()}
            perm = np.stack([fit[drawn[seed]] for fit, seed in zip(setup.fit_idx, setup.seeds)])  # a lone task's
            with phase("steps"):
                fleet.train_epoch(perm)
            if setup.val_idx.shape[1]:
                with phase("validation"):
                    fleet.validate(epoch)
            fleet.stop_fixed_and_followers(epoch)
            with phase("compaction"):
                fleet.drop_stopped()
            bar.update()
            bar.set_postfix_str(f"{fleet.running}/{len(fleet.members)} training")
            if fleet.running == 0:
                break
        bar.close()
        with phase("evaluation"):
            return fleet.results()


@dataclass
class _Setup:
    """What every step of the lockstep trainer reads: checked inputs, each task's fit/validation/eval
    samples, the device and features on it, and each task's input statistics."""

    configs: tuple[CNNConfig, ...]
    pools: tuple[str, ...]
    used_pools: list[int]  # the feature pools some config reads; a stack's input holds these
    features: Tensor | np.ndarray
    labels: np.ndarray  # (task, sample)
    fit_idx: np.ndarray  # (task, fit)
    val_idx: np.ndarray  # (task, val)
    eval_idx: list[np.ndarray]
    fixed: list[list[int]]  # (task, config): a fixed epoch count; 0: none
    follows: list[int | None]
    seeds: list[int]  # per task: its CNNs' training seed
    stats: list[tuple[Tensor, Tensor] | None]  # per task: mean and std over used_pools
    n_classes: int
    train: TrainConfig
    device: torch.device

    @classmethod
    def of(cls, features, pools, tasks, n_classes, configs, train: TrainConfig) -> _Setup:
        checked = [_check_inputs(features, pools, t.labels, t.train_idx, t.eval_idx, n_classes, configs, train)
                   for t in tasks]
        if not checked:
            raise ValueError("tasks must not be empty")
        _check_follows(tasks)
        assert train.val_fraction is not None and train.input_scaling is not None  # TrainConfig.__post_init__
        configs, pools = checked[0][0], checked[0][1]
        if len({len(c[3]) for c in checked}) != 1:
            raise ValueError(f"tasks trained together need as many training samples each, got "
                             f"{[len(c[3]) for c in checked]}")
        seeds = [train.seed if t.seed is None else t.seed for t in tasks]
        # The validation part comes out of each task's training split, never its eval split.
        fit_val = [split_validation(c[2], c[3], train.val_fraction, seed) for c, seed in zip(checked, seeds)]
        device = torch.device(train.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        features = place_features(features, device)
        used_pools = sorted({pools.index(c.pooling) for c in configs})
        # Input statistics per task, from its whole training split (fit and validation parts); tasks
        # with the same split (a row and its shuffled-label control) share them.
        by_split: dict[bytes, tuple[Tensor, Tensor]] = {}
        stats: list[tuple[Tensor, Tensor] | None] = []
        for c in checked:
            key = c[3].tobytes()
            if train.input_scaling != "raw" and key not in by_split:
                with phase("statistics"):
                    by_split[key] = input_statistics(features, np.array(used_pools), c[3], train.input_scaling, device)
            stats.append(by_split.get(key))
        return cls(configs, pools, used_pools, features, np.stack([c[2] for c in checked]),
                   np.stack([f for f, _ in fit_val]), np.stack([v for _, v in fit_val]), [c[4] for c in checked],
                   [_fixed_epochs(t.epochs, len(configs), train) for t in tasks], [t.follows for t in tasks], seeds,
                   stats, n_classes, train, device)

    def member_stats(self, t: int, i: int) -> tuple[Tensor, Tensor] | None:
        """Task t's input statistics for the pool config i reads."""
        both = self.stats[t]
        if both is None:
            return None
        k = self.used_pools.index(self.pools.index(self.configs[i].pooling))
        return both[0][k], both[1][k]


@dataclass
class _Member:
    """One (task, config) CNN: its losses, and when it stops with which weights."""

    task: int
    config: int
    fixed: int = 0  # a fixed epoch count; 0: none
    twin: int | None = None  # the member (index) it stops with: a follower
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    best: float = math.inf
    best_epoch: int = 0
    state: dict[str, Tensor] | None = None  # the weights it keeps: its best epoch's, or those at its stop
    stopped: int = 0  # the epoch it stopped at; 0: still training
    model: AttentionCNN | None = None  # once it has left its stack: itself, with the weights it keeps

    @property
    def keeps_best(self) -> bool:
        """Early stopping applies (not a fixed count, not a follower)."""
        return not self.fixed and self.twin is None


class _Fleet:
    """Every task's CNNs in stacks of same-shaped members (on a GPU one grouped network per shape,
    else one network each), one AdamW over them all, trained one epoch at a time."""

    def __init__(self, setup: _Setup):
        self.setup = s = setup
        configs, n_tasks = s.configs, len(s.labels)
        self.members = [_Member(t, i, s.fixed[t][i]) for t in range(n_tasks) for i in range(len(configs))]
        for m in self.members:
            twin_task = s.follows[m.task]
            if twin_task is not None:
                m.twin = twin_task * len(configs) + m.config
        fuse = s.device.type == "cuda" if s.train.fuse is None else s.train.fuse
        self.fft = s.device.type == "cuda" if s.train.fft is None else s.train.fft
        by_shape: dict = {}
        for i, c in enumerate(configs):
            by_shape.setdefault(c.shape_key, []).append(i)
        ids = range(len(self.members))
        if fuse:  # every task's same-shaped configs in one stack
            groups = [[k for k in ids if self.members[k].config in group] for group in by_shape.values()]
        else:
            groups = [[k] for k in ids]
        # On CPU, channels-last convolutions run faster for these shapes (1.3x at batch 16, benchmarks/README.md).
        self.memory_format = torch.channels_last if s.device.type == "cpu" else torch.contiguous_format
        _, _, n_layers, seq_len, _ = s.features.shape
        self.groups = groups  # the stacks of the start (evaluation runs in them again)
        self.stacks: list[_CNNStack] = []
        self.stack_ids: list[list[int]] = []  # the members of each stack, by index into self.members
        for group in groups:
            stack = _CNNStack([_init_member(configs[self.members[k].config], n_layers, s.n_classes, seq_len,
                                            s.seeds[self.members[k].task], s.train.input_scaling or "raw",
                                            s.member_stats(self.members[k].task, self.members[k].config))
                               for k in group])
            stack = stack.to(device=s.device, memory_format=self.memory_format)  # type: ignore[call-overload]  # (missing in torch's stub)
            stack.generators = [torch.Generator(device=s.device).manual_seed(
                _config_seed(s.seeds[self.members[k].task], configs[self.members[k].config], "dropout")) for k in group]
            stack.fft = self.fft
            self.stacks.append(stack)
            self.stack_ids.append(list(group))
        self._reindex()
        # One AdamW over every CNN's parameters: it is elementwise, so this equals one optimizer per
        # CNN, with fewer kernel launches (a single fused kernel on cuda).
        self.optimizer = self._adamw()
        self.labels_dev = torch.from_numpy(s.labels).to(s.device)  # (task, sample)
        self.read = _batch_reader(s.features, np.array(s.used_pools), s.device)

    def _adamw(self) -> torch.optim.AdamW:
        s = self.setup
        return torch.optim.AdamW([p for st in self.stacks for p in st.parameters()], lr=s.train.lr,
                                 weight_decay=s.train.weight_decay, fused=s.device.type == "cuda")

    @property
    def running(self) -> int:
        return sum(not m.stopped for m in self.members)

    def _reindex(self) -> None:
        """Where each stack's members read their inputs, on the device (copied once here, never in a step).

        The inputs are the (task, pool) pairs some member reads, the "sources"; every stack's members
        pick theirs from them. The fleet scales the sources (and on the FFT path transforms them) once
        a step for all stacks: the paper's 8 configs are 4 shapes, so 4 stacks read the same inputs
        and would each scale and transform them (by its profile, roughly a quarter of a 2.8b step).
        """
        setup = self.setup
        member_sources = [[(m.task, setup.used_pools.index(setup.pools.index(setup.configs[m.config].pooling)))
                           for m in (self.members[k] for k in ids)] for ids in self.stack_ids]
        self.member_tasks = [torch.tensor([t for t, _ in srcs], device=setup.device) for srcs in member_sources]
        sources = sorted({src for srcs in member_sources for src in srcs})
        where = {src: i for i, src in enumerate(sources)}
        self.sources = (torch.tensor([t for t, _ in sources], device=setup.device),
                        torch.tensor([p for _, p in sources], device=setup.device))
        # Each stack's members as positions among the sources; None where they are all of them in order
        # (the usual case before any CNN stops): the stack then reads the shared input as it is.
        self.picks: list[Tensor | None] = []
        for srcs in member_sources:
            pick = [where[src] for src in srcs]
            self.picks.append(None if pick == list(range(len(sources)))
                              else torch.tensor(pick, device=setup.device))
        self.source_stats: tuple[Tensor, Tensor] | None = None
        if setup.train.input_scaling != "raw" and sources:  # "(source layer) query key", as a stack's buffers
            stats = [setup.stats[t] for t, _ in sources]
            assert all(st is not None for st in stats)  # _Setup.of: every task has them when scaling
            self.source_stats = (torch.cat([st[0][p] for st, (_, p) in zip(stats, sources)]),  # type: ignore[index]
                                 torch.cat([st[1][p] for st, (_, p) in zip(stats, sources)]))  # type: ignore[index]

    def _inputs(self, x: Float[Tensor, "task batch pool layer query key"]) -> Tensor | Spectrum:
        """The sources' inputs, scaled by their tasks' statistics, transformed on the FFT path: once a
        step for every stack."""
        tasks, pools = self.sources
        x = rearrange(x[tasks, :, pools], "g b l q k -> b (g l) q k").contiguous(memory_format=self.memory_format)
        if self.source_stats is not None:
            x = scale_input(x, *self.source_stats, str(self.setup.train.input_scaling).startswith("log"))
        return Spectrum.of(x) if self.fft else x

    def _run(self, s: int, inputs: Tensor | Spectrum) -> Float[Tensor, "batch member class"]:
        """Stack s on its members' inputs, picked from the shared ones (`_inputs`)."""
        pick, n = self.picks[s], len(self.sources[0])
        if pick is not None:
            inputs = inputs.select(pick, n) if isinstance(inputs, Spectrum) else select_channels(
                inputs, pick, n).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.setup.device.type, dtype=torch.bfloat16, enabled=self.setup.train.precision == "bf16"):
            return self.stacks[s](inputs, scaled=True).float()

    def _read_tasks(self, idx: np.ndarray, idx_dev: Tensor) -> Float[Tensor, "task batch pool layer query key"]:
        return self.read(idx.reshape(-1), idx_dev.reshape(-1)).unflatten(0, idx.shape)

    def train_epoch(self, perm: np.ndarray) -> None:
        """One epoch of every running stack over the tasks' batches (`perm`: (task, fit) in this epoch's order)."""
        setup, n_fit = self.setup, perm.shape[1]
        batch = setup.train.batch_size
        assert batch  # TrainConfig.__post_init__
        for stack in self.stacks:
            stack.train()
        perm_dev = torch.from_numpy(perm).to(setup.device)  # one copy an epoch, none a step
        totals = [torch.zeros(st.n_members, device=setup.device) for st in self.stacks]
        for start in range(0, n_fit, batch):
            idx, idx_dev = perm[:, start:start + batch], perm_dev[:, start:start + batch]
            inputs = self._inputs(self._read_tasks(idx, idx_dev))
            y = self.labels_dev.gather(1, idx_dev)  # (task, batch)
            loss = torch.zeros((), device=setup.device)
            for s in range(len(self.stacks)):
                logits = self._run(s, inputs)  # (b, g, class)
                member_loss = F.cross_entropy(rearrange(logits, "b g c -> b c g"), y[self.member_tasks[s]].T,
                                              reduction="none").mean(0)
                loss = loss + member_loss.sum()  # each CNN's parameters only see its own loss
                totals[s] += member_loss.detach() * idx.shape[1]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        for s, total in enumerate(totals):
            for k, value in zip(self.stack_ids[s], (total / n_fit).tolist()):
                self.members[k].train_losses.append(value)

    def _logits(self, idx_per_task: Sequence[np.ndarray]) -> list[Float[Tensor, "sample member class"]]:
        """Every stack's logits on each task's samples, in lockstep; shorter tasks repeat their last sample."""
        setup = self.setup
        n_tasks = len(idx_per_task)
        n = max(len(e) for e in idx_per_task)
        mat = np.stack([e[np.minimum(np.arange(n), len(e) - 1)] for e in idx_per_task])
        mat_dev = torch.from_numpy(mat).to(setup.device)
        out: list[list[Tensor]] = [[] for _ in self.stacks]
        with torch.no_grad():
            for stack in self.stacks:
                stack.eval()
            # eval_batch_size samples a step, all tasks together, but never fewer a task than a training
            # step takes (which fits, gradients and all): 54 tasks at 256 were 4 samples a task, and
            # evaluation then cost half as much as training (H100, benchmarks/README.md).
            step = max(setup.train.batch_size or 1, setup.train.eval_batch_size // n_tasks)
            for start in range(0, n, step):
                inputs = self._inputs(self._read_tasks(mat[:, start:start + step], mat_dev[:, start:start + step]))
                for s in range(len(self.stacks)):
                    out[s].append(self._run(s, inputs).cpu())
        return [torch.cat(o) for o in out]

    def validate(self, epoch: int) -> None:
        """Early stopping's bookkeeping: each member's validation loss; a copy of its weights when it is
        its best so far; its stop once `patience` epochs have passed without improvement (fixed-count
        members and followers only record the loss)."""
        setup = self.setup
        val_labels = torch.from_numpy(setup.labels[np.arange(len(setup.labels))[:, None], setup.val_idx])
        n_val = setup.val_idx.shape[1]
        for s, logits in enumerate(self._logits(list(setup.val_idx))):
            for g, k in enumerate(self.stack_ids[s]):
                m = self.members[k]
                loss = float(F.cross_entropy(logits[:n_val, g].double(), val_labels[m.task]))
                m.val_losses.append(loss)
                if not m.keeps_best:
                    continue
                if loss < m.best:
                    m.best, m.best_epoch, m.state = loss, epoch, self.stacks[s].member_state(g)
                elif setup.train.patience and epoch - m.best_epoch >= setup.train.patience:
                    m.stopped = epoch

    def _where(self, k: int) -> tuple[int, int]:
        return next((s, ids.index(k)) for s, ids in enumerate(self.stack_ids) if k in ids)

    def stop_fixed_and_followers(self, epoch: int) -> None:
        """Members of a fixed count stop at it, followers with their twin; both keep their last weights."""
        for followers in (False, True):  # fixed counts first: a follower's twin may be one
            for k, m in enumerate(self.members):
                if m.stopped or (m.twin is not None) != followers:
                    continue
                if (m.fixed == epoch) or (m.twin is not None and self.members[m.twin].stopped == epoch):
                    s, g = self._where(k)
                    m.stopped, m.best_epoch, m.state = epoch, epoch, self.stacks[s].member_state(g)

    def drop_stopped(self) -> None:
        """Stopped members leave their stacks (kept as standalone CNNs with the weights they keep): a
        stack then computes only for members still training. AdamW's state is sliced along, so the
        others train on exactly as before."""
        if not any(self.members[k].stopped for ids in self.stack_ids for k in ids):
            return
        state = self.optimizer.state
        new_state: dict[Tensor, dict] = {}
        stacks, stack_ids = [], []
        for stack, ids in zip(self.stacks, self.stack_ids):
            keep = [g for g, k in enumerate(ids) if not self.members[k].stopped]
            for g, k in enumerate(ids):
                m = self.members[k]
                if m.stopped:
                    if m.state is not None:
                        stack.load_member_state(g, m.state)
                    m.model = stack.unstack([g])[0]
                    m.model.set_dropout_generator(None)
            if not keep:
                continue
            if len(keep) < len(ids):
                before = dict(stack.named_parameters())
                n_old = stack.n_members
                index = stack.keep(keep)
                stack.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # (missing in torch's stub)
                for name, p in stack.named_parameters():
                    new_state[p] = {key: (torch.empty_like(p).copy_(select(v, index, n_old))
                                          if torch.is_tensor(v) and v.dim() else v.clone() if torch.is_tensor(v) else v)
                                    for key, v in state[before[name]].items()}
            else:
                new_state |= {p: state[p] for p in stack.parameters() if p in state}
            stacks.append(stack)
            stack_ids.append([ids[g] for g in keep])
        self.stacks, self.stack_ids = stacks, stack_ids
        self._reindex()
        if stacks:  # (none left: every member has stopped, training ends)
            self.optimizer = self._adamw()
            for param, st in new_state.items():
                self.optimizer.state[param] = st

    def results(self) -> list[list[TrainedCNN]]:
        """Each member with the weights it keeps, scored on its task's eval split."""
        setup = self.setup
        epochs_done = max(len(m.train_losses) for m in self.members)
        for s, ids in enumerate(self.stack_ids):  # members still in a stack trained to the cap
            for g, k in enumerate(ids):
                if self.members[k].state is not None:
                    self.stacks[s].load_member_state(g, self.members[k].state)  # type: ignore[arg-type]
            for k, model in zip(ids, self.stacks[s].unstack()):
                self.members[k].model = model
        # Scored in the stacks of the start, whoever left when: one lockstep pass, as a lone run's.
        self.stacks = [_CNNStack([self.members[k].model for k in ids])  # type: ignore[misc]
                       .to(device=setup.device, memory_format=self.memory_format)  # type: ignore[call-overload]  # (missing in torch's stub)
                       for ids in self.groups]
        for stack in self.stacks:
            stack.fft = self.fft
        self.stack_ids = [list(ids) for ids in self.groups]
        self._reindex()
        logits = self._logits(setup.eval_idx)
        trained: list[list[TrainedCNN | None]] = [[None] * len(setup.configs) for _ in setup.labels]
        for s, ids in enumerate(self.stack_ids):
            for g, k in enumerate(ids):
                m = self.members[k]
                assert m.model is not None
                lg = logits[s][: len(setup.eval_idx[m.task]), g].contiguous()
                metrics = classification_metrics(setup.labels[m.task][setup.eval_idx[m.task]], lg.argmax(-1),
                                                 setup.n_classes, lg)
                trained[m.task][m.config] = TrainedCNN(
                    setup.configs[m.config], m.model, lg, metrics, m.train_losses, m.val_losses,
                    epochs_run=m.stopped or epochs_done,
                    best_epoch=m.best_epoch if m.state is not None else epochs_done)
        assert all(t is not None for row in trained for t in row)
        return trained  # type: ignore[return-value]  # (every slot filled above)
