"""Greedy continuation, the memorization score, and free generation.

A sample is 64 tokens: a 32-token prefix and a 32-token suffix. It is *extractable*
(memorized) when greedy decoding from the prefix reproduces the whole suffix; its
`memorization_score` is the fraction of suffix tokens reproduced, position by position.
Decoding is plain argmax for exactly `n_new` tokens: no sampling, no EOS stop.

Three kinds of model are accepted:
- a TransformerLens `TransformerBridge`: decoding runs on its `.original_model` (the HF
  model), whose key/value cache makes each new token cost one position. After
  `enable_compatibility_mode()` that model's weights are folded in place, but its
  log-softmax (hence its argmax) is the original's.
- a bare Hugging Face causal LM (anything whose forward takes `past_key_values`).
- a legacy HookedTransformer-like callable returning logits: a loop of full forwards.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

PREFIX_LEN = 32
SUFFIX_LEN = 32


def _as_tokens(tokens, name: str = "tokens") -> Int[Tensor, "batch pos"]:
    t = tokens if isinstance(tokens, Tensor) else torch.as_tensor(np.asarray(tokens))
    if t.ndim != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids of shape [batch, pos], got {tuple(t.shape)} {t.dtype}")
    return t.long()


def _hf_model(model):
    """The Hugging Face model that can decode with a KV cache, or None (legacy path)."""
    hf = getattr(model, "original_model", None)
    if hf is not None:
        return hf
    if hasattr(model, "config") and hasattr(model, "generate") and hasattr(model, "forward"):
        return model
    return None


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits(output) -> Float[Tensor, "batch pos vocab"]:
    return output.logits if hasattr(output, "logits") else output


def _cache_kwarg(hf) -> str:
    """Recent transformers renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@torch.no_grad()
def _greedy_cached(hf, prefix: Int[Tensor, "batch prefix"], n_new: int) -> Int[Tensor, "batch n_new"]:
    """Prefill once, then one position per step from the key/value cache."""
    key = _cache_kwarg(hf)
    out = hf(input_ids=prefix, use_cache=True, logits_to_keep=1)
    new = []
    token = out.logits[:, -1].argmax(-1)
    new.append(token)
    for _ in range(n_new - 1):
        out = hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1, **{key: _past(out)})
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
    return torch.stack(new, dim=1)


def _past(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def _cache_is_exact(hf, prefix: Int[Tensor, "batch prefix"]) -> bool:
    """Does one decoding step from the key/value cache give the logits a full forward gives?

    TransformerBridge swaps each attention module of the HF model it wraps for its own; for some
    architectures (GPT-2, Llama, Qwen2 under TransformerLens 4.3) that module ignores the cache, and
    cached decoding goes wrong from the second token (relative logit error above 1; 1e-7 where it
    works). Checked once per model on two prefixes; where it fails, decoding re-runs full forwards.
    """
    verdict = getattr(hf, "_mechmem_cache_exact", None)
    if verdict is None:
        probe = prefix[:2]
        out = hf(input_ids=probe, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        step = hf(input_ids=token, use_cache=True, logits_to_keep=1, **{_cache_kwarg(hf): _past(out)}).logits[:, -1]
        full = _logits(hf(input_ids=torch.cat([probe, token], dim=1)))[:, -1]
        spread = (full - full.mean(-1, keepdim=True)).float().norm(dim=-1)
        verdict = bool(((step - full).float().norm(dim=-1) <= 0.1 * spread).all())
        hf._mechmem_cache_exact = verdict
    return verdict


@torch.no_grad()
def _greedy_full(model, prefix: Int[Tensor, "batch prefix"], n_new: int) -> Int[Tensor, "batch n_new"]:
    """No cache: re-run the whole sequence each step (legacy hooked models; the reference)."""
    seq = prefix
    for _ in range(n_new):
        token = _logits(model(seq))[:, -1].argmax(-1)
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq[:, prefix.shape[1]:]


def greedy_continuation(
    model,
    prefixes: Int[Tensor, "batch prefix"],
    n_new: int = SUFFIX_LEN,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> Int[Tensor, "batch n_new"]:
    """The model's argmax continuation of each prefix, exactly `n_new` tokens (on CPU).

    `use_cache=False` forces the full-forward loop, the reference the cached path must equal; a
    model whose cached decoding is not exact (`_cache_is_exact`) takes that loop too.
    """
    prefixes = _as_tokens(prefixes, "prefixes")
    if n_new < 1:
        raise ValueError(f"n_new must be at least 1, got {n_new}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    hf = _hf_model(model)
    device = torch.device(device) if device is not None else _device_of(hf if hf is not None else model)
    out = torch.empty(prefixes.shape[0], n_new, dtype=torch.long)
    starts = range(0, prefixes.shape[0], batch_size)
    for start in tqdm(starts, desc="greedy decoding", disable=not progress or len(starts) < 2):
        batch = prefixes[start:start + batch_size].to(device)
        if hf is not None and use_cache and _cache_is_exact(hf, batch):
            new = _greedy_cached(hf, batch, n_new)
        else:
            new = _greedy_full(hf if hf is not None else model, batch, n_new)
        out[start:start + batch_size] = new.cpu()
    return out


def _split(tokens, prefix_len: int) -> tuple[Int[Tensor, "n prefix"], Int[Tensor, "n suffix"]]:
    tokens = _as_tokens(tokens)
    if not 0 < prefix_len < tokens.shape[1]:
        raise ValueError(f"prefix_len {prefix_len} must split samples of {tokens.shape[1]} tokens")
    return tokens[:, :prefix_len], tokens[:, prefix_len:]


def score_continuation(suffix: Int[Tensor, "n suffix"], continuation: Int[Tensor, "n suffix"]) -> np.ndarray:
    """Fraction of suffix positions where the continuation has the same token."""
    suffix, continuation = _as_tokens(suffix, "suffix"), _as_tokens(continuation, "continuation")
    if suffix.shape != continuation.shape:
        raise ValueError(f"suffix {tuple(suffix.shape)} and continuation {tuple(continuation.shape)} differ in shape")
    return (suffix == continuation).double().mean(dim=1).numpy()


def memorization_score_and_continuation(
    model, tokens: Int[Tensor, "n seq"], *, prefix_len: int = PREFIX_LEN, **kwargs
) -> tuple[np.ndarray, Int[Tensor, "n suffix"]]:
    """`memorization_score` and the greedy continuation it was computed from."""
    prefix, suffix = _split(tokens, prefix_len)
    continuation = greedy_continuation(model, prefix, suffix.shape[1], **kwargs)
    return score_continuation(suffix, continuation), continuation


def memorization_score(model, tokens: Int[Tensor, "n seq"], *, prefix_len: int = PREFIX_LEN, **kwargs) -> np.ndarray:
    """Per sample, the fraction of the suffix that greedy decoding from the prefix reproduces."""
    return memorization_score_and_continuation(model, tokens, prefix_len=prefix_len, **kwargs)[0]


def free_generation(
    model,
    tokens: Int[Tensor, "n seq"],
    scores,
    *,
    continuation: Int[Tensor, "n suffix"] | None = None,
    prefix_len: int = PREFIX_LEN,
    **kwargs,
) -> Int[Tensor, "n seq"]:
    """Tokens where every non-memorized row's suffix is the model's own greedy continuation.

    The paper's datasets show the model generating its own text in every sample: memorized rows
    already do, the others (score < 1) get their suffix replaced. A precomputed `continuation`
    (e.g. the `greedy_suffix` column) skips decoding; otherwise only the rows that need it are decoded.
    """
    prefix, suffix = _split(tokens, prefix_len)
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (prefix.shape[0],):
        raise ValueError(f"scores must have one value per sample ({prefix.shape[0]}), got shape {scores.shape}")
    redo = torch.from_numpy(scores < 1.0)
    out = torch.cat([prefix, suffix], dim=1).clone()
    if not redo.any():
        return out
    if continuation is None:
        new = greedy_continuation(model, prefix[redo], suffix.shape[1], **kwargs)
    else:
        continuation = _as_tokens(continuation, "continuation")
        if continuation.shape != suffix.shape:
            raise ValueError(f"continuation must have shape {tuple(suffix.shape)}, got {tuple(continuation.shape)}")
        new = continuation[redo]
    out[redo, prefix_len:] = new
    return out
