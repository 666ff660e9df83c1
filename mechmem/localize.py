"""Localization: which attention regions, layers and heads make a trained CNN decide for a class.

The paper's visual technique (METHOD.md section 6). Per CNN and per sample of origin class c:

    B[c][d]  guided-backprop gradient of logit d w.r.t. the CNN's input (the head-pooled pattern)
    C[c]     B[c][c] - mean over d != c of B[c][d]    what pushes towards c rather than elsewhere
    D[c]     C[c] / max(C[c]) over the sample, clipped at 0: the decisive region, peak 1
    Delta[c] mean over samples of max over heads of D[c] * pattern: where the decisive heads look

Guided backpropagation (Springenberg et al. 2015) lets a gradient through a ReLU only where the
forward input was positive AND the gradient coming back is positive, so the maps show what
*supports* a logit, not what could be changed to move it.

Beyond the paper, the same D is scored per head: how much of the decisive region a head's own
attention covers, `sum_qk D[l] * A[l, h]` (Delta's per-head term before the max over heads), as a
share of that sum over every (layer, head), averaged over samples. Heads are named by their hook (`blocks.{l}.attn.hook_pattern`), so the ranking feeds `mechmem.ablation`.
Per-head patterns are recomputed for the few samples used here; they are never stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from einops import einsum, reduce
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechmem.atomic import atomic_json, atomic_write
from mechmem.cnn import AttentionCNN, TrainedCNN
from mechmem.features import extract_attention
from mechmem.hooks import pattern_hook
from mechmem.run import RunFolder
from mechmem.taxonomy import PROPOSED_NAME

DEFAULT_TAXONOMY = PROPOSED_NAME  # the paper's proposed taxonomy (Others = Recall)


@dataclass(frozen=True)
class LocalizeConfig:
    samples_per_class: int = 96  # eval samples of each origin class (fewer if the class has fewer)
    batch_size: int = 32  # samples per recomputed per-head batch
    confidence: float = 0.95  # of the per-head score intervals (normal approximation over samples)
    seed: int = 0  # which samples are drawn


# --------------------------------------------------------------------------------------------
# Guided backpropagation
# --------------------------------------------------------------------------------------------
class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes gradient only where input > 0 and incoming gradient > 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


@contextlib.contextmanager
def guided_relus(cnn: nn.Module):
    """Inside the block every `nn.ReLU` of `cnn` backpropagates guided, and dropout is off.

    A forward hook swaps each ReLU's output for the same values computed by `_GuidedReLU`, so the
    module tree (and the names relu1/relu2/relu3) is untouched; hooks and training mode are
    restored on exit.
    """
    relus = [m for m in cnn.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("guided backpropagation needs a network with nn.ReLU modules; found none")
    was_training = cnn.training
    handles = [m.register_forward_hook(lambda _m, inputs, _out: _GuidedReLU.apply(inputs[0])) for m in relus]
    cnn.eval()
    try:
        yield cnn
    finally:
        for h in handles:
            h.remove()
        cnn.train(was_training)


def guided_gradients(
    cnn: AttentionCNN, x: Float[Tensor, "batch layer query key"]
) -> Float[Tensor, "batch dest layer query key"]:
    """B: the guided-backprop gradient of every logit (destination class) w.r.t. the input.

    Samples do not interact in eval mode, so the gradient of a logit summed over the batch is each
    sample's own gradient.
    """
    if x.ndim != 4:
        raise ValueError(f"CNN input must be [batch, layer, query, key], got shape {tuple(x.shape)}")
    param = next(cnn.parameters())
    x = x.detach().to(param.device, param.dtype).requires_grad_(True)
    with guided_relus(cnn), torch.enable_grad():
        logits = cnn(x)
        n = logits.shape[-1]
        grads = [torch.autograd.grad(logits[:, d].sum(), x, retain_graph=d < n - 1)[0] for d in range(n)]
    return torch.stack(grads, dim=1).detach()


def decisive_region(
    grads: Float[Tensor, "batch dest layer query key"], origin: Int[Tensor, " batch"] | int
) -> Float[Tensor, "batch layer query key"]:
    """D: (`B[c][c]` - mean over d != c of `B[c][d]`) / its per-sample maximum, clipped at 0.

    A sample whose contrast C is nowhere positive has no decisive region: D = 0.
    """
    b, n = grads.shape[:2]
    if n < 2:
        raise ValueError(f"need at least 2 destination classes, got {n}")
    origin = torch.as_tensor(origin, device=grads.device).long()
    origin = origin.expand(b) if origin.ndim == 0 else origin
    if origin.shape != (b,) or origin.min() < 0 or origin.max() >= n:
        raise ValueError(f"origin must be {b} class indices in [0, {n}), got {origin.tolist()}")
    own = grads[torch.arange(b, device=grads.device), origin]
    contrast = own - (grads.sum(1) - own) / (n - 1)  # C
    peak = reduce(contrast, "b l q k -> b", "max")
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    scaled = contrast / safe[:, None, None, None]
    return torch.where(peak[:, None, None, None] > 0, scaled.clamp(min=0), torch.zeros_like(scaled))


def weighted_by_heads(
    decisive: Float[Tensor, "batch layer query key"], patterns: Float[Tensor, "batch layer head query key"]
) -> Float[Tensor, "batch layer query key"]:
    """D times each head's attention pattern, max over heads: one sample's contribution to Delta."""
    return reduce(decisive[:, :, None] * patterns, "b l h q k -> b l q k", "max")


def head_coverage(
    decisive: Float[Tensor, "batch layer query key"], patterns: Float[Tensor, "batch layer head query key"]
) -> Float[Tensor, "batch layer head"]:
    """Each head's share of the sample's decisive attention: sum_qk D[l] * A[l, h] over all heads' sums.

    The un-maxed per-head term of Delta, normalised to sum to 1 over (layer, head): a head that
    attends where D is high, in a layer where D is high, takes a large share; with no preference
    every head gets 1 / (n_layers * n_heads). A sample with no decisive region scores 0 everywhere.
    """
    covered = einsum(decisive, patterns, "b l q k, b l h q k -> b l h")
    total = reduce(covered, "b l h -> b", "sum")
    return covered / total.clamp(min=torch.finfo(total.dtype).tiny)[:, None, None]


def pool_heads(patterns: Float[Tensor, "batch layer head query key"], pooling: str) -> Float[Tensor, "batch layer query key"]:
    """The CNN's input: per-head patterns pooled over heads as the feature store pools them."""
    if pooling not in ("mean", "max"):
        raise ValueError(f"unknown head pooling {pooling!r}; use 'mean' or 'max'")
    return reduce(patterns, "b l h q k -> b l q k", pooling)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class Localization:
    """Maps and scores per origin class, averaged over the CNNs (arrays indexed by class first)."""

    class_names: list[str]
    delta: np.ndarray  # [class, layer, query, key]  Delta[c]
    head_scores: np.ndarray  # [class, layer, head]  mean share of the decisive attention (sums to 1)
    head_ci: np.ndarray  # [class, layer, head, 2]  confidence interval of head_scores
    n_samples: np.ndarray  # [class]
    sequence_ids: np.ndarray  # the samples used
    labels: np.ndarray  # their origin classes
    cnn_names: list[str]
    meta: dict = field(default_factory=dict)  # model, run, taxonomy: what produced it

    @property
    def n_layers(self) -> int:
        return self.delta.shape[1]

    @property
    def n_heads(self) -> int:
        return self.head_scores.shape[2]

    @property
    def layer_importance(self) -> np.ndarray:
        """[class, layer]: Delta[c] summed over each layer's map, how much each layer matters."""
        return self.delta.sum(axis=(-2, -1))

    def class_index(self, name_or_index: str | int) -> int:
        if isinstance(name_or_index, (int, np.integer)):
            if not 0 <= name_or_index < len(self.class_names):
                raise ValueError(f"class index {name_or_index} out of range for {self.class_names}")
            return int(name_or_index)
        if name_or_index not in self.class_names:
            raise ValueError(f"unknown class {name_or_index!r}; classes are {self.class_names}")
        return self.class_names.index(name_or_index)

    def head_table(self) -> pd.DataFrame:
        """Every (class, layer, head) ranked within its class by score, best first, with its hook."""
        records = []
        for c, name in enumerate(self.class_names):
            order = np.argsort(-self.head_scores[c], axis=None, kind="stable")
            for rank, flat in enumerate(order, 1):
                layer, head = np.unravel_index(flat, self.head_scores[c].shape)
                records.append({"class": name, "rank": rank, "layer": int(layer), "head": int(head),
                                "hook_name": pattern_hook(int(layer)), "score": float(self.head_scores[c, layer, head]),
                                "ci_low": float(self.head_ci[c, layer, head, 0]),
                                "ci_high": float(self.head_ci[c, layer, head, 1]),
                                "n_samples": int(self.n_samples[c])})
        return pd.DataFrame.from_records(records)

    def layer_table(self) -> pd.DataFrame:
        imp = self.layer_importance
        share = imp / np.maximum(imp.sum(1, keepdims=True), 1e-30)
        return pd.DataFrame.from_records(
            [{"class": name, "layer": l, "hook_name": pattern_hook(l), "importance": float(imp[c, l]),
              "share": float(share[c, l])} for c, name in enumerate(self.class_names) for l in range(self.n_layers)])

    def top_heads(self, cls: str | int, k: int) -> list[tuple[int, int]]:
        """The k best (layer, head) pairs of a class."""
        c = self.class_index(cls)
        if not 0 <= k <= self.n_layers * self.n_heads:
            raise ValueError(f"k must be in [0, {self.n_layers * self.n_heads}], got {k}")
        order = np.argsort(-self.head_scores[c], axis=None, kind="stable")[:k]
        return [(int(layer), int(head)) for layer, head in zip(*np.unravel_index(order, self.head_scores[c].shape))]

    # ---- save / load
    ARRAYS = "localization.npz"

    def save(self, folder: str | os.PathLike) -> Path:
        """localization.npz (arrays), localization.json (names, meta), heads.csv, layers.csv."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / self.ARRAYS, lambda tmp: np.savez_compressed(
            tmp, delta=self.delta.astype(np.float32), head_scores=self.head_scores, head_ci=self.head_ci,
            n_samples=self.n_samples, sequence_ids=self.sequence_ids, labels=self.labels))
        atomic_json(folder / "localization.json",
                    {"class_names": self.class_names, "cnn_names": self.cnn_names, "meta": self.meta}, default=str)
        atomic_write(folder / "heads.csv", lambda tmp: self.head_table().to_csv(tmp, index=False))
        atomic_write(folder / "layers.csv", lambda tmp: self.layer_table().to_csv(tmp, index=False))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Localization":
        folder = Path(folder)
        if not (folder / cls.ARRAYS).is_file() or not (folder / "localization.json").is_file():
            raise FileNotFoundError(f"no localization results in {folder} (localization.npz/.json missing)")
        info = json.loads((folder / "localization.json").read_text())
        with np.load(folder / cls.ARRAYS) as a:
            arrays = {k: a[k] for k in a.files}
        return cls(info["class_names"], arrays["delta"], arrays["head_scores"], arrays["head_ci"],
                   arrays["n_samples"], arrays["sequence_ids"], arrays["labels"], info["cnn_names"], info["meta"])


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
def pick_per_class(labels: np.ndarray, n_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """Positions of up to `per_class` samples of each class (seeded), sorted; raises if a class is empty."""
    labels = np.asarray(labels)
    if per_class < 1:
        raise ValueError(f"samples per class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(n_classes):
        pos = np.flatnonzero(labels == c)
        if len(pos) == 0:
            raise ValueError(f"class {c} has no samples to localize")
        picked.append(rng.choice(pos, size=min(per_class, len(pos)), replace=False))
    return np.sort(np.concatenate(picked))


def _as_cnns(cnns: Sequence[TrainedCNN | AttentionCNN]) -> list[AttentionCNN]:
    models = [c.model if isinstance(c, TrainedCNN) else c for c in cnns]
    if not models or not all(isinstance(m, AttentionCNN) for m in models):
        raise ValueError("localize needs a non-empty list of AttentionCNN or TrainedCNN")
    return models


def localize(
    model,
    cnns: Sequence[TrainedCNN | AttentionCNN],
    tokens: Int[Tensor, "sample pos"] | np.ndarray,
    labels: Int[np.ndarray, " sample"],
    class_names: Sequence[str],
    *,
    sequence_ids: Sequence[int] | None = None,
    cfg: LocalizeConfig = LocalizeConfig(),
    progress: bool = True,
    meta: dict | None = None,
) -> Localization:
    """Delta maps, layer importance and per-head scores of every class, over all given samples.

    `tokens` are what the CNNs were trained on (the model-view tokens of the feature store);
    `labels` their origin classes. Per-head patterns are recomputed batch by batch and pooled per
    CNN as its config says, so nothing per-head outlives a batch.
    """
    models = _as_cnns(cnns)
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    labels = np.asarray(labels, dtype=np.int64)
    n_classes, n_layers, n_heads = len(class_names), model.cfg.n_layers, model.cfg.n_heads
    if tokens.ndim != 2 or len(tokens) != len(labels):
        raise ValueError(f"need tokens [sample, pos] and one label per sample, got {tuple(tokens.shape)} and {len(labels)}")
    if labels.size == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be non-empty and lie in [0, {n_classes})")
    for m in models:
        if (m.n_layers, m.n_classes, m.seq_len) != (n_layers, n_classes, tokens.shape[1]):
            raise ValueError(f"CNN {m.config.name} reads {m.n_layers} layers x {m.seq_len} tokens into "
                             f"{m.n_classes} classes, but the model has {n_layers} layers, the samples "
                             f"{tokens.shape[1]} tokens and the taxonomy {n_classes} classes")
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        raise ValueError(f"no samples of class {class_names[int(np.argmin(counts))]!r} to localize")

    delta = torch.zeros(n_classes, n_layers, tokens.shape[1], tokens.shape[1], dtype=torch.float64)
    coverage = np.zeros((len(labels), n_layers, n_heads))  # per sample, averaged over CNNs
    starts = range(0, len(labels), cfg.batch_size)
    for start in tqdm(starts, desc="localize", disable=not progress):
        batch = slice(start, start + cfg.batch_size)
        origin = torch.from_numpy(labels[batch])
        patterns = extract_attention(model, tokens[batch], per_head=True, batch_size=cfg.batch_size)
        patterns = patterns.float().cpu()  # [b, layer, head, q, k]
        for cnn in models:
            grads = guided_gradients(cnn, pool_heads(patterns, cnn.config.pooling)).cpu()
            decisive = decisive_region(grads, origin)
            delta.index_add_(0, origin, weighted_by_heads(decisive, patterns).double())
            coverage[batch] += head_coverage(decisive, patterns).double().numpy()
    delta /= torch.from_numpy(counts)[:, None, None, None] * len(models)
    coverage /= len(models)

    z = statistics.NormalDist().inv_cdf(0.5 + cfg.confidence / 2)
    scores = np.stack([coverage[labels == c].mean(0) for c in range(n_classes)])
    sem = np.stack([coverage[labels == c].std(0, ddof=1) / np.sqrt(counts[c]) if counts[c] > 1
                    else np.full((n_layers, n_heads), np.nan) for c in range(n_classes)])
    ci = np.stack([scores - z * sem, scores + z * sem], axis=-1)
    ids = np.arange(len(labels)) if sequence_ids is None else np.asarray(sequence_ids)
    return Localization(list(class_names), delta.float().numpy(), scores, ci, counts, ids, labels,
                        [m.config.name for m in models], dict(meta or {}, config=asdict(cfg)))


# --------------------------------------------------------------------------------------------
# From a run_alignment output folder
# --------------------------------------------------------------------------------------------
def run_labels(run: RunFolder | str | os.PathLike, row: dict, sequence_ids: np.ndarray,
               df: pd.DataFrame | None = None) -> np.ndarray:
    """Class of each sample of a row: stored in the row if it has `eval_labels`, else recomputed from the data."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    sequence_ids = np.asarray(sequence_ids)
    if "eval_labels" in row:
        known = dict(zip(row["eval_sequence_ids"], row["eval_labels"]))
        return np.array([known[int(i)] for i in sequence_ids], dtype=np.int64)
    from mechmem.alignment import Row

    if df is None:
        from mechmem.data import load_memorization_data

        df = load_memorization_data(run.raw_config()["data"])
    labels = pd.Series(np.asarray(Row(**row["row"]).labels(df)), index=df["sequence_id"].to_numpy())
    return labels.loc[sequence_ids].to_numpy().astype(np.int64)


def localize_run(
    run: str | os.PathLike,
    model=None,
    *,
    taxonomy: str | None = None,
    cfg: LocalizeConfig = LocalizeConfig(),
    df: pd.DataFrame | None = None,
    progress: bool = True,
) -> Localization:
    """Localize one taxonomy row of a run_alignment folder on (a seeded subset of) its eval samples.

    Uses the row's saved CNNs and the feature store's model-view tokens; the model defaults to the
    one named in the run's config.json and must be the one whose features trained the CNNs.
    """
    from mechmem.models import load_model, model_identity

    folder = RunFolder(run)
    slug, row = folder.find_row(taxonomy, default=DEFAULT_TAXONOMY)
    cnns = folder.load_cnns(slug)
    store = folder.feature_store()
    if model is None:
        name, revision = folder.model_name()
        model = load_model(name, revision=revision)
    found, wanted = store.manifest["model"]["weights"], model_identity(model)["weights"]
    if found != wanted:
        raise ValueError(f"the model given is not the one that made {folder.path}'s features ({wanted} != {found})")
    eval_ids = np.asarray(row["eval_sequence_ids"])
    labels = run_labels(folder, row, eval_ids, df)
    chosen = pick_per_class(labels, len(row["class_names"]), cfg.samples_per_class, cfg.seed)
    ids = eval_ids[chosen]
    tokens = store.tokens[store.index(ids)]
    meta = {"run": str(folder.path), "row": slug, "tax_name": row.get("tax_name"), "taxonomy": row.get("row"),
            "model": getattr(model, "mechmem_name", None) or store.manifest["model"]["name"]}
    return localize(model, cnns, tokens, labels[chosen], row["class_names"], sequence_ids=ids, cfg=cfg,
                    progress=progress, meta=meta)
