"""Training CNNs: many configs and tasks in lockstep (`train_cnn_tasks`) beside the plain one-CNN loop it equals (`train_cnn`)."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
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
from mechmem.cnn.model import _CNNStack, AttentionCNN, feature_side
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
            with phase("statistics"):
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
        steps = phase("steps")
        steps.__enter__()
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
        steps.__exit__(None, None, None)
        epochs_done = epoch
        for s, total in totals.items():
            for g, t in enumerate((total / n_fit).tolist()):
                if not history[(s, g)]["stopped"]:
                    history[(s, g)]["train"].append(t)
        if val_idx.shape[1]:
            with phase("validation"):
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
    with phase("evaluation"):
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


