"""Regurgitation monitor: while a model generates, flag the stretches it recites, and say whether it
guesses (a pattern the context alone determines) or recalls (text it can only have seen in training).

The CNNs of an alignment row learned to read 64-token samples (32 tokens of context, then a 32-token
continuation) fed from position 0. The monitor cuts the output the same way: every `stride`
generated tokens, a 32-token stretch with the 32 tokens before it, head-pooled and rounded through
float16 as the feature store keeps them, scored by the row's CNNs (softmax averaged over them).

The first stretch after a prompt of at most 32 tokens starts at position 0 of the sequence, so its
attention is exactly what generation computes: the `hook_pattern` hooks copy it while the model
decodes (the prefill block, then one row a step). Every other window is re-encoded, all of them in
batches, through `extract_attention`. A stretch is *flagged* when its most probable class is not the
taxonomy's Non-Memo class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.cnn import AttentionCNN
from mechmem.features import POOLINGS, extract_attention
from mechmem.hooks import pattern_hook
from mechmem.models import weights_fingerprint
from mechmem.memorization import PREFIX_LEN, SUFFIX_LEN, _cache_is_exact, _cache_kwarg, _hf_model, _logits, _past

CONTEXT = PREFIX_LEN  # tokens before a stretch that the CNNs read with it
STRETCH = SUFFIX_LEN  # tokens in a stretch
WINDOW = CONTEXT + STRETCH
NON_MEMO = "Non-Memo"


@dataclass(frozen=True)
class MonitorConfig:
    """How to generate and where to cut the output into stretches."""

    max_new_tokens: int = STRETCH
    stride: int = STRETCH  # a stretch starts every `stride` generated tokens (32: back to back)
    sample: bool = False  # greedy by default; sampling draws from softmax(logits / temperature)
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 64
    capture: bool = True  # reuse generation's attention where a window starts at position 0

    def __post_init__(self):
        for name in ("max_new_tokens", "stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


def stretch_starts(prompt_len: int, total_len: int, stride: int = STRETCH) -> list[int]:
    """Sequence positions where stretches begin: the first where 32 tokens of context exist and
    generation has begun, then every `stride` tokens while a whole stretch fits."""
    first = max(prompt_len, CONTEXT)
    return list(range(first, total_len - STRETCH + 1, stride))


# ----------------------------------------------------------------------------- the classifier
class SpanClassifier:
    """The CNNs of one alignment row as one classifier: class probabilities averaged over them."""

    def __init__(self, cnns: Sequence[AttentionCNN], class_names: Sequence[str], name: str = "",
                 model_weights: str | None = None):
        """`model_weights`: the `models.weights_fingerprint` of the model whose attention trained the CNNs
        (from_run reads it from the run's feature store); `monitor` refuses another model's."""
        if not cnns:
            raise ValueError("a SpanClassifier needs at least one CNN")
        self.cnns = [c.eval() for c in cnns]
        self.class_names = list(class_names)
        self.name, self.model_weights = name, model_weights
        bad = [c.n_classes for c in self.cnns if c.n_classes != len(self.class_names)]
        if bad:
            raise ValueError(f"CNNs with {bad[0]} classes cannot score {len(self.class_names)} classes {self.class_names}")
        if {c.seq_len for c in self.cnns} != {WINDOW}:
            raise ValueError(f"the monitor cuts {WINDOW}-token windows; these CNNs read {[c.seq_len for c in self.cnns]}")
        self.pooling = tuple(sorted({c.config.pooling for c in self.cnns}))
        # the class that is not flagged: Non-Memo (first in every taxonomy of mechmem.taxonomy)
        self.negative = self.class_names.index(NON_MEMO) if NON_MEMO in self.class_names else 0

    @property
    def n_layers(self) -> int:
        return self.cnns[0].n_layers

    @classmethod
    def from_run(cls, run: str | os.PathLike, taxonomy: str | None = None, *, seeds: str = "first",
                 device=None) -> SpanClassifier:
        """The saved CNNs of a run_alignment row (display name or slug; default the paper's proposed
        "Non-Memo, Guess, Others"); `seeds="all"` averages over every training seed's CNNs too."""
        from mechmem.run import RunFolder
        from mechmem.taxonomy import PROPOSED_NAME

        folder = RunFolder(run)
        slug, row = folder.find_row(taxonomy, default=PROPOSED_NAME)
        if seeds not in ("first", "all"):
            raise ValueError(f"seeds must be 'first' or 'all', got {seeds!r}")
        indices = folder.seed_indices(slug) if seeds == "all" else [0]
        cnns = [t.model for i in indices for t in folder.load_cnns(slug, i, device=device)]
        weights = folder.feature_store().manifest["model"]["weights"] if folder.has_features() else None
        return cls(cnns, row["class_names"], name=row.get("tax_name", slug), model_weights=weights)

    def check_model(self, model) -> None:
        """ValueError unless `model` is the one whose attention trained the CNNs (as far as known): the same
        number of layers, and, where the run recorded it, the same weights. The fingerprints are sums of
        weights: they agree to 1% across devices and dtypes, not across models."""
        if model.cfg.n_layers != self.n_layers:
            raise ValueError(f"the CNNs read {self.n_layers} layers, the model has {model.cfg.n_layers}: "
                             "monitor with the model whose attention trained them")
        if self.model_weights is None:
            return
        if not _same_fingerprint(weights_fingerprint(model), self.model_weights):
            raise ValueError(f"the CNNs of {self.name or 'this row'} read another model's attention (weights "
                             f"{self.model_weights}, this model {weights_fingerprint(model)}): monitor with the "
                             "run's model")

    def to(self, device) -> SpanClassifier:
        self.cnns = [c.to(device) for c in self.cnns]
        return self

    @torch.no_grad()
    def __call__(self, features: Float[Tensor, "window pool layer query key"]) -> Float[Tensor, "window class"]:
        """Mean softmax over the CNNs; `features` pooled in the order of `self.pooling`."""
        if features.shape[1] != len(self.pooling) or features.shape[2] != self.n_layers:
            raise ValueError(f"features of shape {tuple(features.shape)} do not give the {self.pooling} pools of "
                             f"{self.n_layers} layers these CNNs read: another model?")
        device = next(self.cnns[0].parameters()).device
        x = features.to(device).half().float()  # the feature store's precision
        probs = [torch.softmax(c(x[:, self.pooling.index(c.config.pooling)]), dim=-1) for c in self.cnns]
        return torch.stack(probs).mean(0).cpu()


def _same_fingerprint(a: str, b: str, rtol: float = 1e-2) -> bool:
    x, y = [float(v) for v in a.split(",")], [float(v) for v in b.split(",")]
    return len(x) == len(y) and all(abs(u - v) <= rtol * max(abs(u), abs(v)) for u, v in zip(x, y))


# ----------------------------------------------------------------------------- generation
def _next_token(logits: Float[Tensor, "batch vocab"], cfg: MonitorConfig, generator) -> Int[Tensor, " batch"]:
    if not cfg.sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


class _Capture:
    """Hooks that copy the head-pooled attention rows of positions 0..63 while the model decodes."""

    def __init__(self, batch: int, n_layers: int, pooling: Sequence[str], device):
        self.buf = torch.zeros(batch, len(pooling), n_layers, WINDOW, WINDOW, device=device)
        self.pooling, self.pos = tuple(pooling), 0  # pos: the first query position of this forward
        self.hooks = [(pattern_hook(layer), self._hook(layer)) for layer in range(n_layers)]

    def _hook(self, layer: int):
        def hook(pattern: Float[Tensor, "batch head query key"], hook):
            q0, q1 = self.pos, min(self.pos + pattern.shape[2], WINDOW)
            if q1 > q0:
                rows = pattern[:, :, : q1 - q0, : min(pattern.shape[3], WINDOW)]
                for i, name in enumerate(self.pooling):
                    self.buf[:, i, layer, q0:q1, : rows.shape[-1]] = POOLINGS[name](rows)
        return hook


@torch.no_grad()
def generate(
    model,
    prompts: Int[Tensor, "batch prompt"],
    cfg: MonitorConfig = MonitorConfig(),
    *,
    capture_pooling: Sequence[str] | None = None,
) -> tuple[Int[Tensor, "batch new"], Float[Tensor, "batch new"], Tensor | None]:
    """Generate `cfg.max_new_tokens` tokens (no EOS stop) after prompts of one length.

    Returns the new tokens, the model's log-probability of each (its own confidence), and, with
    `capture_pooling` and a prompt of at most 32 tokens, the pooled attention of the first 64
    positions `[batch, pool, layer, 64, 64]` as generation computed it (else None). Decoding uses the
    key/value cache of the Hugging Face model a bridge wraps; a model without one (or whose cache is
    not exact, see `memorization._cache_is_exact`) re-runs full forwards and captures nothing.
    """
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    b, p = prompts.shape
    n_new = cfg.max_new_tokens
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.sample else None
    hf = _hf_model(model)
    cached = hf is not None and _cache_is_exact(hf, prompts)
    capture = None
    if cached and capture_pooling and cfg.capture and p <= CONTEXT and p + n_new >= WINDOW and hasattr(model, "hooks"):
        capture = _Capture(b, model.cfg.n_layers, capture_pooling, device)
    new = torch.empty(b, n_new, dtype=torch.long, device=device)
    logprobs = torch.empty(b, n_new, device=device)

    def step(logits: Tensor, i: int) -> Tensor:
        token = _next_token(logits, cfg, generator)
        new[:, i] = token
        logprobs[:, i] = torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
        return token

    if not cached:
        seq = prompts
        for i in range(n_new):
            token = step(_logits((hf if hf is not None else model)(seq))[:, -1], i)
            seq = torch.cat([seq, token[:, None]], dim=1)
        return new.cpu(), logprobs.cpu(), None

    key = _cache_kwarg(hf)
    hooks = model.hooks(fwd_hooks=capture.hooks) if capture else nullcontext()
    with hooks:
        out = hf(input_ids=prompts, use_cache=True, logits_to_keep=1)
        token = step(out.logits[:, -1], 0)
        for i in range(1, n_new):
            if capture:
                capture.pos = p + i - 1
            out = hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1, **{key: _past(out)})
            token = step(out.logits[:, -1], i)
        if capture and p + n_new == WINDOW:  # the window's last row: the last token, fed once more
            capture.pos = WINDOW - 1
            hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1, **{key: _past(out)})
    return new.cpu(), logprobs.cpu(), capture.buf if capture else None


# ----------------------------------------------------------------------------- the monitor
@dataclass
class Span:
    """One scored stretch: `start`/`end` count generated tokens (0 = the first new token)."""

    prompt: int
    start: int
    end: int
    label: str  # the most probable class
    flagged: bool  # label is not Non-Memo: the monitor says the stretch is recited
    probs: dict[str, float]
    mean_logprob: float  # the model's mean log-probability of the stretch's tokens
    reused: bool  # attention captured during generation (else the window was re-encoded)
    text: str = ""


@dataclass
class MonitorResult:
    """Prompts, what the model generated after each, and every scored stretch."""

    prompts: list[list[int]]
    outputs: Int[np.ndarray, "prompt new"]
    logprobs: Float[np.ndarray, "prompt new"]
    spans: list[Span]
    class_names: list[str]
    taxonomy: str = ""
    config: dict = field(default_factory=dict)

    def spans_of(self, prompt: int) -> list[Span]:
        return [s for s in self.spans if s.prompt == prompt]


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    out = [[int(t) for t in p] for p in prompts]
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("every prompt needs at least one token")
    return out


def monitor(
    model,
    prompts: Sequence[Sequence[int]] | Int[Tensor, "batch prompt"],
    classifier: SpanClassifier,
    cfg: MonitorConfig = MonitorConfig(),
    *,
    tokenizer=None,
    progress: bool = True,
) -> MonitorResult:
    """Generate after each prompt and score every stretch of the output (see the module docstring).

    Prompts of different lengths are generated in separate batches (no padding: padding would
    change the attention the CNNs read). With a `tokenizer`, each span carries its text.
    """
    prompts = _as_prompts(prompts)
    classifier.check_model(model)
    if cfg.max_new_tokens < STRETCH + max(0, CONTEXT - min(map(len, prompts))):  # see stretch_starts
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} is too few for one {STRETCH}-token stretch with "
                         f"{CONTEXT} tokens before it after a prompt of {min(map(len, prompts))} tokens")
    device = next(model.parameters()).device
    classifier.to(device)
    n = len(prompts)
    outputs = np.zeros((n, cfg.max_new_tokens), dtype=np.int64)
    logprobs = np.zeros((n, cfg.max_new_tokens), dtype=np.float32)
    captured: dict[int, Tensor] = {}  # prompt index -> pooled attention of its first window
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    batches = [idx[a:a + cfg.batch_size] for idx in by_length.values() for a in range(0, len(idx), cfg.batch_size)]
    for idx in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2):
        toks = torch.tensor([prompts[i] for i in idx])
        new, lp, att = generate(model, toks, cfg, capture_pooling=classifier.pooling)
        outputs[idx], logprobs[idx] = new.numpy(), lp.numpy()
        if att is not None:
            probs = classifier(att)
            for j, i in enumerate(idx):
                captured[i] = probs[j]

    # Every stretch; windows that generation did not compute are re-encoded together.
    stretches, windows = [], []
    for i, p in enumerate(prompts):
        seq = np.concatenate([p, outputs[i]])
        for s in stretch_starts(len(p), len(seq), cfg.stride):
            reused = s == CONTEXT and i in captured
            stretches.append((i, s, reused))
            if not reused:
                windows.append(seq[s - CONTEXT:s + STRETCH])
    encoded = iter(())
    if windows:
        feats = extract_attention(model, torch.as_tensor(np.stack(windows)), pooling=classifier.pooling,
                                  batch_size=cfg.batch_size, progress=progress)
        encoded = iter(classifier(feats))
    spans = []
    for i, s, reused in stretches:
        probs = captured[i] if reused else next(encoded)
        a, b = s - len(prompts[i]), s - len(prompts[i]) + STRETCH  # in generated tokens
        label = int(probs.argmax())
        text = tokenizer.decode(outputs[i, a:b].tolist()) if tokenizer is not None else ""
        spans.append(Span(i, a, b, classifier.class_names[label], label != classifier.negative,
                          {c: float(v) for c, v in zip(classifier.class_names, probs.tolist())},
                          float(logprobs[i, a:b].mean()), reused, text))
    return MonitorResult(prompts, outputs, logprobs, spans, classifier.class_names, classifier.name, asdict(cfg))
