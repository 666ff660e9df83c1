"""Head ablation: switch attention heads off through hooks, and measure what that does to memorization.

A head writes to the residual stream through W_O from its `blocks.{l}.attn.hook_z` output, so
replacing that output removes exactly that head's contribution and nothing else. "zero" sets it to
0; "mean" sets it to the head's mean output over a reference batch (and over positions), which
keeps the average signal downstream layers expect while removing the sample-specific part.

The hooks are plain `(hook_name, function)` pairs: use them with `model.run_with_hooks(...)` or
inside `with model.hooks(fwd_hooks=...)`. On a TransformerBridge they also fire when the wrapped
Hugging Face model runs on its own (the bridge wraps its submodules in place), which is how
`mechmem.memorization` decodes with a key/value cache: so memorization scores under ablation are
measured with the ordinary memorization functions inside the hooks context.

The experiment (`ablation_experiment`): per memorized class, ablate its top-k heads from
`mechmem.localize`; as control, k heads drawn at random; measure on held-out samples of every
class the share still extractable and the mean memorization score, and the loss on
non-memorized text (is the effect specific to memorization, or is the model just broken?).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.hooks import z_hook

METHODS = ("zero", "mean")
Head = tuple[int, int]  # (layer, head)


def _check_heads(model, heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: sorted heads}, after checking every (layer, head) exists in the model."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    by_layer: dict[int, set[int]] = {}
    for pair in heads:
        try:
            layer, head = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"heads must be (layer, head) pairs, got {pair!r}") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head ({layer}, {head}) does not exist: the model has {n_layers} layers x {n_heads} heads")
        by_layer.setdefault(layer, set()).add(head)
    return {layer: sorted(hs) for layer, hs in sorted(by_layer.items())}


@torch.no_grad()
def head_means(
    model, tokens: Int[Tensor, "batch pos"] | Int[np.ndarray, "batch pos"], layers: Sequence[int] | None = None, *,
    batch_size: int = 64
) -> dict[int, Float[Tensor, "head d_head"]]:
    """Each head's `hook_z` output averaged over the reference samples and their positions."""
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(f"reference tokens must be a non-empty [batch, pos] array, got shape {tuple(tokens.shape)}")
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(set(layers))
    sums: dict[int, Tensor] = {}

    def capture(layer: int):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            s = z.double().sum(dim=(0, 1))
            sums[layer] = sums[layer] + s if layer in sums else s
        return hook

    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        model.run_with_hooks(tokens[start:start + batch_size].to(device),
                             fwd_hooks=[(z_hook(l), capture(l)) for l in layers])
    return {l: (sums[l] / tokens.numel()).float() for l in layers}


def head_ablation_hooks(
    model,
    heads: Sequence[Head],
    *,
    method: str = "zero",
    reference: Int[Tensor, "batch pos"] | None = None,
    means: dict[int, Float[Tensor, "head d_head"]] | None = None,
) -> list[tuple[str, Callable]]:
    """`(hook_name, function)` pairs that ablate `heads` (a list of (layer, head)); one hook per layer.

    method "zero": the head's `hook_z` output is set to 0. "mean": set to its mean over the
    `reference` tokens (or precomputed `means` from `head_means`). An empty list gives no hooks.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {METHODS}")
    by_layer = _check_heads(model, heads)
    if not by_layer:
        return []
    if method == "mean" and means is None:
        if reference is None:
            raise ValueError("mean ablation needs reference tokens (or precomputed means) to average over")
        means = head_means(model, reference, list(by_layer))

    mean_of = means or {}  # set above whenever method == "mean"

    def make(layer: int, idx: list[int]):
        value = None if method == "zero" else mean_of[layer][idx]  # [n_idx, d_head]

        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            z = z.clone()
            z[:, :, idx] = 0.0 if value is None else value.to(z.device, z.dtype)
            return z

        return hook

    return [(z_hook(layer), make(layer, idx)) for layer, idx in by_layer.items()]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced(
    model, tokens: Int[Tensor, "n pos"], *, prefix_len: int = 32, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over the whole samples: per sample, how many leading suffix tokens are each the
    argmax after the true context, and the mean next-token loss (nats) over the sample.

    Greedy decoding reproduces the whole suffix exactly when every suffix token is the argmax after
    the true context (its context is then the true one at every step), so `leading == suffix length`
    decides extractability without decoding.
    """
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    device = next(model.parameters()).device
    leading, loss = [], []
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        logits = model(batch)[:, :-1].float()  # no log_softmax copy: the vocabulary axis is the big one
        target = batch[:, 1:]
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[..., None])[..., 0]
        loss.append(nll.mean(-1).double().cpu())
        hit = (logits[:, prefix_len - 1:].argmax(-1) == target[:, prefix_len - 1:]).long()
        leading.append(hit.cumprod(-1).sum(-1).cpu())
    if not leading:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return torch.cat(leading).numpy(), torch.cat(loss).numpy()


def measure(
    model,
    tokens: Int[Tensor, "n pos"],
    hooks: Sequence[tuple[str, Callable]] = (),
    *,
    prefix_len: int = 32,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Per sample, with `hooks` active: memorization score (greedy decoding from the prefix) and loss.

    Extractable samples are recognised by one teacher-forced pass (`teacher_forced`); only the
    others are decoded, with `mechmem.memorization` inside the hooks context. On a testbed-sized
    model most samples under a random ablation stay extractable, so this saves most of the decoding.
    """
    from mechmem.memorization import memorization_score

    tokens = torch.as_tensor(np.asarray(tokens)).long()
    with model.hooks(fwd_hooks=list(hooks)):
        leading, loss = teacher_forced(model, tokens, prefix_len=prefix_len, batch_size=batch_size)
        score = np.ones(len(tokens))
        redo = leading < tokens.shape[1] - prefix_len
        if redo.any():
            score[redo] = memorization_score(model, tokens[torch.from_numpy(redo)], prefix_len=prefix_len,
                                             batch_size=batch_size, progress=False)
    return {"memorization_score": score, "loss": loss}


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Held-out samples of every class (original tokens) and what the experiment derives from them."""

    eval_sets: dict[str, np.ndarray]  # class name -> tokens [n, 64]
    sequence_ids: dict[str, np.ndarray]
    memorized: list[str]  # classes whose samples are all extractable: the ablation targets
    non_memorized: list[str]  # the others: their loss is the "is the model still fine?" check
    subsets: dict[str, tuple[str, np.ndarray]]  # e.g. "Others (dup > 5)" -> ("Others", mask)
    reference: np.ndarray  # other held-out samples, any class: what "mean" ablation averages over


def held_out_sets(
    df: pd.DataFrame,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    per_class: int,
    exclude_ids: Sequence[int] = (),
    duplicates_threshold: int | None = None,
    seed: int = 0,
) -> HeldOut:
    """Up to `per_class` samples of each class, none of `exclude_ids` (what trained the CNNs or
    chose the heads). With `duplicates_threshold` t, each memorized class is also split into its
    samples duplicated more than t times and the rest (when both parts are non-empty)."""
    labels = np.asarray(labels)
    if len(labels) != len(df):
        raise ValueError(f"{len(labels)} labels for {len(df)} samples")
    for col in ("sequence_id", "tokens", "memorization_score"):
        if col not in df.columns:
            raise ValueError(f"the data has no {col!r} column")
    if duplicates_threshold is not None and "sequence_duplicates" not in df.columns:
        raise ValueError("splitting by duplicates needs a 'sequence_duplicates' column")
    free = ~np.isin(df["sequence_id"].to_numpy(), np.asarray(exclude_ids, dtype=np.int64))
    scores = df["memorization_score"].to_numpy()
    rng = np.random.default_rng(seed)

    def tokens_at(pos):
        return np.stack([np.asarray(t, dtype=np.int64) for t in df["tokens"].to_numpy()[pos]])

    eval_sets, ids, memorized, non_memorized, subsets = {}, {}, [], [], {}
    for c, name in enumerate(class_names):
        pos = np.flatnonzero((labels == c) & free)
        if len(pos) == 0:
            raise ValueError(f"no held-out samples of class {name!r} (all are excluded or the class is empty)")
        pos = np.sort(rng.choice(pos, size=min(per_class, len(pos)), replace=False))
        free[pos] = False
        eval_sets[name], ids[name] = tokens_at(pos), df["sequence_id"].to_numpy()[pos]
        if (scores[labels == c] >= 1.0).all():
            memorized.append(name)
            if duplicates_threshold is not None:
                high = df["sequence_duplicates"].to_numpy()[pos] > duplicates_threshold
                if high.any() and not high.all():
                    subsets[f"{name} (dup > {duplicates_threshold})"] = (name, high)
                    subsets[f"{name} (dup <= {duplicates_threshold})"] = (name, ~high)
        else:
            non_memorized.append(name)
    if not memorized:
        raise ValueError("no class is memorized (every class has samples with memorization_score < 1)")
    if not non_memorized:
        raise ValueError("no non-memorized class: the loss on non-memorized text cannot be measured")
    rest = np.flatnonzero(free & (labels >= 0))
    reference = tokens_at(np.sort(rng.choice(rest, size=min(per_class, len(rest)), replace=False))) if len(rest) \
        else np.concatenate(list(eval_sets.values()))
    return HeldOut(eval_sets, ids, memorized, non_memorized, subsets, reference)


@dataclass(frozen=True)
class AblationConfig:
    ks: tuple[int, ...] = (1, 2, 4, 8)
    n_random: int = 10  # random control draws per k (shared by every target class)
    method: str = "zero"
    batch_size: int = 64
    n_boot: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown ablation method {self.method!r}; use one of {METHODS}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive head counts, got {self.ks}")
        if self.n_random < 1 or self.n_boot < 1 or not 0 < self.confidence < 1:
            raise ValueError("need n_random >= 1, n_boot >= 1 and confidence in (0, 1)")


@dataclass
class Condition:
    """One ablation: which heads, why, and the per-sample results."""

    kind: str  # "baseline", "targeted" or "random"
    target: str  # the class whose heads are ablated ("" for baseline and random)
    k: int
    draw: int
    heads: list[Head]
    result: dict[str, np.ndarray] | None = None

    @property
    def results(self) -> dict[str, np.ndarray]:
        """The per-sample results of a measured condition."""
        if self.result is None:
            raise ValueError(f"condition {self} has not been measured")
        return self.result


def random_heads(n_layers: int, n_heads: int, k: int, rng: np.random.Generator) -> list[Head]:
    flat = rng.choice(n_layers * n_heads, size=k, replace=False)
    return sorted((int(f // n_heads), int(f % n_heads)) for f in flat)


def plan_conditions(rankings: dict[str, Sequence[Head]], n_layers: int, n_heads: int,
                    cfg: AblationConfig) -> list[Condition]:
    """Baseline, then each target's top-k heads, then the random draws (one set for all targets)."""
    total = n_layers * n_heads
    ks = [k for k in cfg.ks if k <= total]
    if not ks:
        raise ValueError(f"every k in {cfg.ks} exceeds the model's {total} heads")
    out = [Condition("baseline", "", 0, 0, [])]
    for target, ranked in rankings.items():
        for k in ks:
            if k > len(ranked):
                raise ValueError(f"class {target!r} ranks only {len(ranked)} heads, fewer than k = {k}")
            out.append(Condition("targeted", target, k, 0, sorted((int(h[0]), int(h[1])) for h in ranked[:k])))
    rng = np.random.default_rng(cfg.seed)
    for k in ks:
        out += [Condition("random", "", k, d, random_heads(n_layers, n_heads, k, rng)) for d in range(cfg.n_random)]
    return out


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Resampled means of values [draw, sample]: draws and samples both resampled (paired samples)."""
    n_draws, n = values.shape
    d = rng.integers(0, n_draws, size=(n_boot, n_draws))
    s = rng.integers(0, n, size=(n_boot, n))
    per_draw = values[:, s].mean(-1)  # [draw, boot]: each draw's mean over the resampled samples
    return np.take_along_axis(per_draw.T, d, axis=1).mean(1)


def _paired_diff(targeted: np.ndarray, random: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap of mean(targeted) - mean(random) with the same resampled samples for both."""
    n_draws, n = random.shape
    s = rng.integers(0, n, size=(n_boot, n))
    d = rng.integers(0, n_draws, size=(n_boot, n_draws))
    t = targeted[s].mean(-1)
    r = np.take_along_axis(random[:, s].mean(-1).T, d, axis=1).mean(1)
    return t - r


METRICS: dict[str, Callable[[dict], np.ndarray]] = {
    "extractable": lambda r: (r["memorization_score"] >= 1.0).astype(float),
    "memorization_score": lambda r: r["memorization_score"],
    "loss": lambda r: r["loss"],
}
SUMMARY_COLUMNS = ["condition", "target_class", "k", "heads", "eval_set", "metric", "n", "n_draws", "value", "ci_low",
                   "ci_high", "draws_min", "draws_max", "random_value", "diff_vs_random", "diff_ci_low",
                   "diff_ci_high", "frac_random_below", "rank_p_below"]


def rank_p_below(n_as_low: int, n_draws: int) -> float:
    """The one-sided rank p that a random head set lowers a metric as much as the targeted one did:
    (1 + draws as low) / (1 + draws), never below 1 / (draws + 1)."""
    return (1 + n_as_low) / (1 + n_draws)


def summarize(conditions: Sequence[Condition], sets: dict[str, np.ndarray], cfg: AblationConfig) -> pd.DataFrame:
    """One row per (condition, eval set, metric) with a percentile-bootstrap interval.

    `sets` maps eval-set names to positions in the per-sample results. Random rows pool the draws
    of one k (the interval resamples draws and samples; draws_min/max are the extreme draws).
    Targeted rows carry the contrast with random at the same k: the difference with its paired
    bootstrap interval, and `frac_random_below`, the share of random draws whose mean is <= the
    targeted value (for extraction, 0 means the targeted heads did more damage than every draw).
    The interval is for the difference from the draws' mean; against the draws themselves the
    evidence is a rank, `rank_p_below` (0.09 at best with 10 draws).
    """
    rng = np.random.default_rng(cfg.seed + 1)
    lo, hi = 100 * (1 - cfg.confidence) / 2, 100 * (1 + cfg.confidence) / 2
    randoms: dict[int, list[Condition]] = {}
    for c in conditions:
        if c.kind == "random":
            randoms.setdefault(c.k, []).append(c)
    records = []
    groups = [[c] for c in conditions if c.kind != "random"] + list(randoms.values())
    for group in groups:
        first = group[0]
        for set_name, pos in sets.items():
            if len(pos) == 0:
                continue
            for metric, fn in METRICS.items():
                v = np.stack([fn(c.results)[pos] for c in group])  # [draw, sample]
                boot = _bootstrap_means(v, cfg.n_boot, rng)
                rec = {"condition": first.kind, "target_class": first.target, "k": first.k,
                       "heads": ";".join(f"L{l}H{h}" for l, h in first.heads) if first.kind != "random" else "",
                       "eval_set": set_name, "metric": metric, "n": v.shape[1], "n_draws": len(group),
                       "value": float(v.mean()), "ci_low": float(np.percentile(boot, lo)),
                       "ci_high": float(np.percentile(boot, hi))}
                if first.kind == "random":
                    rec |= {"draws_min": float(v.mean(1).min()), "draws_max": float(v.mean(1).max())}
                if first.kind == "targeted" and first.k in randoms:
                    r = np.stack([fn(c.results)[pos] for c in randoms[first.k]])
                    diff = _paired_diff(v[0], r, cfg.n_boot, rng)
                    as_low = int((r.mean(1) <= v.mean() + 1e-12).sum())  # random draws at or below the targeted
                    rec |= {"random_value": float(r.mean()), "diff_vs_random": float(v.mean() - r.mean()),
                            "diff_ci_low": float(np.percentile(diff, lo)),
                            "diff_ci_high": float(np.percentile(diff, hi)),
                            "frac_random_below": as_low / len(r), "rank_p_below": rank_p_below(as_low, len(r))}
                records.append(rec)
    return pd.DataFrame.from_records(records).reindex(columns=SUMMARY_COLUMNS)


def ablation_experiment(
    model,
    eval_sets: dict[str, Int[Tensor, "n pos"]] | dict[str, Int[np.ndarray, "n pos"]],
    rankings: dict[str, Sequence[Head]],
    cfg: AblationConfig = AblationConfig(),
    *,
    subsets: dict[str, tuple[str, np.ndarray]] | None = None,
    reference: Int[Tensor, "r pos"] | Int[np.ndarray, "r pos"] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[Condition]]:
    """Run every condition of `plan_conditions` on every eval set and summarise it (`summarize`).

    `eval_sets` maps names (the classes) to held-out samples, original tokens; `rankings` maps each
    target class to its heads, best first. `subsets` adds named eval sets made of some samples of a
    set (name -> (set name, boolean mask)), e.g. the highly duplicated part of a class, at no cost.
    `reference` is the batch "mean" ablation averages over (default: every eval sample).
    """
    if not eval_sets:
        raise ValueError("ablation_experiment needs at least one eval set")
    names = list(eval_sets)
    tokens = [torch.as_tensor(np.asarray(eval_sets[n])).long() for n in names]
    for n, t in zip(names, tokens):
        if t.ndim != 2 or len(t) == 0:
            raise ValueError(f"eval set {n!r} must be a non-empty [sample, pos] token array, got {tuple(t.shape)}")
    offsets = np.cumsum([0] + [len(t) for t in tokens])
    sets = {n: np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    for sub, (parent, mask) in (subsets or {}).items():
        mask = np.asarray(mask, dtype=bool)
        if parent not in sets or mask.shape != sets[parent].shape:
            raise ValueError(f"subset {sub!r}: needs a mask over the {len(sets.get(parent, []))} samples of {parent!r}")
        sets[sub] = sets[parent][mask]
    all_tokens = torch.cat(tokens)

    conditions = plan_conditions(rankings, model.cfg.n_layers, model.cfg.n_heads, cfg)
    means = None
    if cfg.method == "mean":
        means = head_means(model, all_tokens if reference is None else reference, batch_size=cfg.batch_size)
    for c in tqdm(conditions, desc=f"ablations ({cfg.method})", disable=not progress):
        hooks = head_ablation_hooks(model, c.heads, method=cfg.method, means=means)
        c.result = measure(model, all_tokens, hooks, batch_size=cfg.batch_size)
    return summarize(conditions, sets, cfg), conditions
