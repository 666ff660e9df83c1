"""Attention features: head-pooled attention patterns captured through hooks, and their store.

The paper saved every head's pattern of every sample to its own HDF5 file and pooled over heads
inside the CNN. Pooling commutes with storage, so here it happens inside the
`blocks.{l}.attn.hook_pattern` hooks, on the model's device, into a preallocated buffer: the
per-head patterns never leave the device, and a sample costs 1/n_heads of the bytes per pooling.
The forward pass is cut short after the last layer's pattern, so the unembedding (a large share
of a small model's compute) is never run.

Features depend on the model and the tokens only, never on a taxonomy: the `FeatureStore` keeps
them once per (model, sample) in one memory-mapped file per run, and every taxonomy reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.atomic import atomic_json, atomic_write, sha256_file
from mechmem.batching import CPU_BATCH_SIZE, probe_batch_size, run_batches
from mechmem.distributed import Dist
from mechmem.fastpath import pattern_forward, supports
from mechmem.hooks import pattern_hook
from mechmem.models import default_device, model_identity
from mechmem.timing import phase

logger = logging.getLogger(__name__)

POOLINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda pattern: pattern.mean(dim=1),
    "max": lambda pattern: pattern.amax(dim=1),
}


class _StopForward(Exception):
    """Raised by the last pattern hook: everything wanted has been captured."""


def _check_pooling(pooling: Sequence[str]) -> tuple[str, ...]:
    pooling = tuple(pooling)
    unknown = [p for p in pooling if p not in POOLINGS]
    if unknown or not pooling:
        raise ValueError(f"unknown head pooling {unknown or pooling}; use some of {list(POOLINGS)}")
    return pooling


def _check_tokens(tokens) -> Tensor:
    tokens = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids of shape [sample, pos], got {tuple(tokens.shape)} {tokens.dtype}")
    return tokens.long()


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _forward_to_last_pattern(model, batch: Tensor, fast: bool) -> None:
    """One forward pass up to the last layer's pattern: the lean forward stops there, the model's
    own forward is cut short by the last pattern hook raising _StopForward."""
    if fast:
        pattern_forward(model, batch)
        return
    try:
        model(batch)
    except _StopForward:
        return
    raise RuntimeError("the last layer's hook_pattern never fired; is this a hooked transformer?")


def extract_attention(
    model,
    tokens: Int[Tensor, "sample pos"],
    *,
    pooling: Sequence[str] = ("mean", "max"),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    per_head: bool = False,
    out_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    fastpath: bool = True,
) -> Float[Tensor, "sample pool layer query key"] | Float[Tensor, "sample layer head query key"]:
    """Head-pooled attention patterns of every layer, on the CPU.

    With `per_head=True` it returns the unpooled patterns `[sample, layer, head, query, key]`
    instead: meant for the few samples localization and visualisation look at. `batch_size=None`
    takes the largest batch that fits in free GPU memory (64 on a CPU); a batch that runs out of
    memory is retried smaller (`mechmem.batching`). A Pythia bridge runs `mechmem.fastpath`'s lean
    forward, which fires the same hook points; `fastpath=False` forces the model's own forward.
    """
    return _extract(model, tokens, pooling=pooling, batch_size=batch_size, device=device, per_head=per_head,
                    out_dtype=out_dtype, progress=progress, fastpath=fastpath)[0]


@torch.no_grad()
def _extract(model, tokens, *, pooling, batch_size, device, per_head=False, out_dtype=torch.float32,
             progress=False, fastpath=True) -> tuple[Tensor, int]:
    """extract_attention, also returning the batch size it ended with (a store keeps it for its next chunk)."""
    pooling = _check_pooling(pooling)
    tokens = _check_tokens(tokens)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = default_device(device) if device is not None else _model_device(model)
    n, seq = tokens.shape
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    shape = (n, n_layers, n_heads, seq, seq) if per_head else (n, len(pooling), n_layers, seq, seq)
    out = torch.empty(shape, dtype=out_dtype, pin_memory=device.type == "cuda")
    state: dict[str, Tensor] = {}  # the device buffer the hooks write into

    def capture(layer: int):
        def hook(pattern: Float[Tensor, "batch head query key"], hook):
            b, buf = pattern.shape[0], state["buf"]
            if per_head:
                buf[:b, layer] = pattern
            else:
                for i, name in enumerate(pooling):
                    buf[:b, i, layer] = POOLINGS[name](pattern)
            if layer == n_layers - 1 and not fast:  # (the lean forward stops there by itself)
                raise _StopForward

        return hook

    hooks = [(pattern_hook(layer), capture(layer)) for layer in range(n_layers)]
    fast = False  # set once the hooks are on: whether the lean forward applies

    def forward(batch: Tensor) -> None:
        if "buf" not in state or len(state["buf"]) < len(batch):
            state.pop("buf", None)
            state["buf"] = torch.empty((len(batch), *shape[1:]), dtype=out_dtype, device=device)
        _forward_to_last_pattern(model, batch.to(device, non_blocking=True), fast)

    def probe(b: int) -> None:  # a pass over b samples, its buffer included, for the memory probe
        state.pop("buf", None)
        forward(tokens[torch.arange(b) % n])
        state.pop("buf", None)

    def step(start: int, stop: int) -> None:
        forward(tokens[start:stop])
        out[start:stop].copy_(state["buf"][: stop - start], non_blocking=True)

    with model.hooks(fwd_hooks=hooks), tqdm(total=n, desc="attention", disable=not progress) as bar:
        fast = fastpath and supports(model)  # hooks registered once, not once a batch
        if batch_size is None:
            batch_size = CPU_BATCH_SIZE if device.type != "cuda" else n if n <= 8 else probe_batch_size(probe, device)
        batch_size = run_batches(n, min(batch_size, n), step, progress=bar)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, batch_size


# --------------------------------------------------------------------------------------------
# The feature store
# --------------------------------------------------------------------------------------------
class StoreMismatch(ValueError):
    """An existing store was made from another model, other samples or another pooling."""


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))


@dataclass
class FeatureStore:
    """Pooled attention of a run's samples: `features[i]` is `[pool, layer, query, key]`.

    Files in `folder`: `manifest.json` (what produced it), `sequence_ids.npy`, `tokens.npy`
    (the tokens the model saw), `features.npy` (memory-mapped) and `done.npy` (which chunks are
    written). A chunk is marked done only after its features are flushed, and every small file
    is replaced atomically, so an interrupted extraction resumes and loses nothing it finished.
    """

    folder: Path
    manifest: dict

    FEATURES = "features.npy"
    DONE = "done.npy"

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def done(self) -> np.ndarray:
        return np.load(self.folder / self.DONE)

    @property
    def features(self) -> np.memmap:
        mode: Literal["r", "r+"] = "r" if self.complete else "r+"
        return np.load(self.folder / self.FEATURES, mmap_mode=mode)

    def tensor(self, device: str | torch.device = "cpu", chunk: int = 1024) -> Float[Tensor, "sample pool layer query key"]:
        """The features as one tensor of the store's dtype on `device`, read chunk by chunk (on the
        way to a GPU no second copy of the whole store is made in host memory). Where they do not
        fit the device, in host memory, with a warning."""
        src = self.features
        device = torch.device(device)
        dtype = torch.from_numpy(np.empty(0, dtype=src.dtype)).dtype
        try:
            out = torch.empty(src.shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError:
            logger.warning("the feature store (%.1f GB) does not fit on %s: kept in host memory", src.nbytes / 1e9, device)
            out = torch.empty(src.shape, dtype=dtype)
        for start in range(0, len(src), chunk):
            out[start:start + chunk] = torch.from_numpy(np.array(src[start:start + chunk])).to(out.device)
        return out

    @property
    def sequence_ids(self) -> np.ndarray:
        return np.load(self.folder / "sequence_ids.npy")

    @property
    def tokens(self) -> np.ndarray:
        return np.load(self.folder / "tokens.npy")

    @property
    def pooling(self) -> tuple[str, ...]:
        return tuple(self.manifest["pooling"])

    def verify(self) -> None:
        """Recompute the content hash of a complete store and compare it with the manifest."""
        if not self.complete:
            raise StoreMismatch(f"feature store {self.folder} is incomplete; rerun the extraction to resume")
        if sha256_file(self.folder / self.FEATURES) != self.manifest.get("content_sha256"):
            raise StoreMismatch(f"feature store {self.folder}: features.npy does not match its content hash")

    def index(self, sequence_ids: Sequence[int]) -> np.ndarray:
        """Rows of the store holding these samples (raises if one is absent)."""
        ids = self.sequence_ids
        order = np.argsort(ids, kind="stable")
        wanted = np.asarray(sequence_ids)
        pos = np.searchsorted(ids, wanted, sorter=order)
        pos = np.clip(pos, 0, len(ids) - 1)
        rows = order[pos]
        missing = ids[rows] != wanted
        if missing.any():
            raise KeyError(f"sequence_id {wanted[missing][0]} is not in the feature store {self.folder}")
        return rows

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FeatureStore":
        folder = Path(folder)
        if not (folder / "manifest.json").exists():
            raise FileNotFoundError(f"no feature store at {folder} (manifest.json missing)")
        return cls(folder, json.loads((folder / "manifest.json").read_text()))


def _expected_manifest(model, sequence_ids, tokens, pooling, store_dtype, revision) -> dict:
    param = next(model.parameters())
    return {
        "format": 1,
        "model": model_identity(model),
        "revision": revision,
        "model_dtype": str(param.dtype).removeprefix("torch."),
        "store_dtype": np.dtype(store_dtype).name,
        "pooling": list(pooling),
        "n_samples": int(len(sequence_ids)),
        "n_layers": int(model.cfg.n_layers),
        "seq_len": int(tokens.shape[1]),
        "sequence_ids_sha256": _sha256(np.asarray(sequence_ids, dtype=np.int64)),
        "tokens_sha256": _sha256(np.asarray(tokens, dtype=np.int64)),
    }


def _compare(found: dict, wanted: dict, folder: Path) -> None:
    for key, value in wanted.items():
        if found.get(key) != value:
            what = {"sequence_ids_sha256": "sample ids", "tokens_sha256": "tokens"}.get(key, key)
            raise StoreMismatch(
                f"feature store {folder} was made with another {what} "
                f"({found.get(key)!r} != {value!r}); use a new folder or delete it"
            )


def build_feature_store(
    folder: str | os.PathLike,
    model,
    sequence_ids: npt.ArrayLike,
    tokens: Int[Tensor, "sample pos"] | np.ndarray,
    *,
    pooling: Sequence[str] = ("mean", "max"),
    batch_size: int | None = None,
    chunk_size: int = 1024,
    store_dtype=np.float16,
    revision: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    dist: Dist = Dist(),
    _stop_after_chunks: int | None = None,
) -> FeatureStore:
    """Extract (or finish extracting) the pooled attention of these samples into `folder`.

    An existing store for the same model, samples, tokens and pooling is resumed; one made from
    anything else is refused with `StoreMismatch`. Under torchrun (`dist`) the ranks take the
    chunks round-robin into the same file. `batch_size=None` sizes batches from free GPU memory.
    `_stop_after_chunks` simulates an interruption after that many rounds of chunks (tests).
    """
    folder = Path(folder)
    pooling = _check_pooling(pooling)
    tokens = _check_tokens(tokens).numpy()
    sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
    if len(sequence_ids) != len(tokens):
        raise ValueError(f"{len(sequence_ids)} sequence ids for {len(tokens)} token rows")
    if len(np.unique(sequence_ids)) != len(sequence_ids):
        raise ValueError("sequence ids must be unique")
    wanted = _expected_manifest(model, sequence_ids, tokens, pooling, store_dtype, revision)
    n, seq = tokens.shape
    existed = (folder / "manifest.json").exists()
    dist.barrier()  # every rank has looked before rank 0 creates anything
    if existed:  # every rank checks, so a mismatch stops them all alike
        _compare(FeatureStore.load(folder).manifest, wanted, folder)
    elif dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(folder / "sequence_ids.npy", sequence_ids)
        _atomic_save_npy(folder / "tokens.npy", tokens)
        shape = (n, len(pooling), model.cfg.n_layers, seq, seq)
        atomic_write(folder / FeatureStore.FEATURES,
                     lambda tmp: np.lib.format.open_memmap(tmp, mode="w+", dtype=store_dtype, shape=shape).flush())
        _atomic_save_npy(folder / FeatureStore.DONE, np.zeros(max(1, -(-n // chunk_size)), dtype=bool))
        atomic_json(folder / "manifest.json", {**wanted, "chunk_size": chunk_size}, indent=2, sort_keys=True)
    dist.barrier()
    store = FeatureStore.load(folder)
    chunk_size, done = store.manifest["chunk_size"], store.done
    todo = [c for c in range(len(done)) if not done[c]]
    n_rounds = -(-len(todo) // dist.world_size)
    features = np.load(folder / FeatureStore.FEATURES, mmap_mode="r+")
    out_dtype = torch.from_numpy(np.empty(0, dtype=store_dtype)).dtype
    for r in tqdm(range(n_rounds), desc="feature store", disable=not (progress and dist.is_main)):
        if _stop_after_chunks is not None and r >= _stop_after_chunks:
            break
        mine = dist.share(todo[r * dist.world_size : (r + 1) * dist.world_size])
        for c in mine:
            rows = slice(c * chunk_size, min(n, (c + 1) * chunk_size))
            # Cast to the store's dtype on the device: half the copy to the host, no casting on the CPU.
            with phase("forward"):
                pooled, batch_size = _extract(model, torch.from_numpy(tokens[rows]), pooling=pooling,
                                              batch_size=batch_size, device=device, out_dtype=out_dtype)
            with phase("store writes"):
                features[rows] = pooled.numpy()
                features.flush()
        finished = [c for cs in dist.all_gather(list(mine)) for c in cs]  # all ranks have flushed these
        if dist.is_main:
            done[finished] = True
            _atomic_save_npy(folder / FeatureStore.DONE, done)
    del features
    if dist.is_main and done.all() and "content_sha256" not in store.manifest:
        with phase("store hash"):
            digest = sha256_file(folder / FeatureStore.FEATURES)
        atomic_json(folder / "manifest.json",
                    {**store.manifest, "content_sha256": digest},
                    indent=2, sort_keys=True)
    dist.barrier()
    return FeatureStore.load(folder)
