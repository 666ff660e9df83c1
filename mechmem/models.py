"""Loading hooked models: Pythia from the hub, a local checkpoint, the testbed, or random weights.

Everything downstream talks to the returned model through hook names (`mechmem.hooks`) and
`run_with_hooks`, so a legacy `HookedTransformer` a user already holds works as well as the
TransformerLens 4 `TransformerBridge` this module returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mechmem.testbed import PILE_NAMES

HUB_HOST = "huggingface.co"


class ModelNotFound(ValueError):
    """The model could not be found or reached; the message says what to do instead."""


# --------------------------------------------------------------------------------------------
# The Pythia suite: (n_layers, d_model, n_heads, vocab) per size, as published by EleutherAI.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PythiaSpec:
    size: str
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int = 50304

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def hf_name(self, deduped: bool = True) -> str:
        return f"EleutherAI/pythia-{self.size}{'-deduped' if deduped else ''}"


PYTHIA: dict[str, PythiaSpec] = {
    s.size: s
    for s in [
        PythiaSpec("14m", 6, 128, 4, 50304),
        PythiaSpec("31m", 6, 256, 8, 50304),
        PythiaSpec("70m", 6, 512, 8),
        PythiaSpec("160m", 12, 768, 12),
        PythiaSpec("410m", 24, 1024, 16),
        PythiaSpec("1b", 16, 2048, 8),
        PythiaSpec("1.4b", 24, 2048, 16),
        PythiaSpec("2.8b", 32, 2560, 32),
        PythiaSpec("6.9b", 32, 4096, 32, 50432),
        PythiaSpec("12b", 36, 5120, 40, 50688),
    ]
}

# Training-step checkpoints published as hub revisions: log-spaced early steps, then every 1000.
PYTHIA_REVISIONS: tuple[str, ...] = tuple(
    f"step{s}" for s in [0, *[2**i for i in range(10)], *range(1000, 143001, 1000)]
)


def pythia_spec(name_or_size: str) -> PythiaSpec:
    """Spec from a size ("1b") or a hub name ("EleutherAI/pythia-1b-deduped")."""
    size = name_or_size.split("/")[-1].removeprefix("pythia-").removesuffix("-deduped")
    if size not in PYTHIA:
        raise ModelNotFound(f"unknown Pythia size {name_or_size!r}; known: {', '.join(PYTHIA)}")
    return PYTHIA[size]


def pythia_config(size: str, *, n_ctx: int = 2048, **overrides):
    """A `GPTNeoXConfig` with Pythia's architecture at the given size (no download).

    `overrides` replace config fields (e.g. `vocab_size=1024, num_hidden_layers=2` for tests).
    """
    from transformers import GPTNeoXConfig

    spec = pythia_spec(size)
    fields = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        intermediate_size=4 * spec.d_model,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=n_ctx,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXConfig(**(fields | overrides))  # type: ignore[arg-type]  # (one dict of mixed types)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def default_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect, so that an offline machine fails in seconds, not after retries."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return isinstance(found, str)


def download_command(name: str, revision: str | None = None) -> str:
    """The shell command that fetches a hub model (at `revision`) into a folder DIR, for the
    installed huggingface_hub: its `hf` CLI from 0.34 on (1.0 removed `huggingface-cli`)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in re.findall(r"\d+", version("huggingface_hub"))[:2])
    cli = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    return f"{cli} download {name}{f' --revision {revision}' if revision else ''} --local-dir DIR"


def not_cached(name: str, revision: str | None = None) -> str:
    """One line for a hub model (at `revision`) that is neither cached nor reachable: what to run
    where the hub is, and what to pass then (the folder is that one checkpoint: no revision)."""
    at = f" at revision {revision}" if revision else ""
    instead = " in place of the name and --revision" if revision else ""
    return (f"cannot reach the Hugging Face hub to download {name!r}{at} and it is not cached; on a machine with "
            f"access run `{download_command(name, revision)}` and pass DIR{instead}")


@contextlib.contextmanager
def _hub_offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


# Working memory of TransformerLens's weight processing per byte of parameters it processes: it
# upcasts the whole state dict to float32 at once and builds new tensors for every folded weight.
# Measured on top of the parameters themselves: about 5x for bf16 on an H200 (benchmarks/README.md,
# "Compatibility mode at 12b"), 5.5x for bf16 and 1.9x for float32 on CPU; the estimate keeps a margin.
PROCESSING_OVERHEAD = {torch.float32: 3.0, torch.bfloat16: 7.0, torch.float16: 7.0}


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters (shared ones once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def blocks_to_offload(block_bytes: list[int], other_bytes: int, free_bytes: int,
                      overhead: float) -> list[int]:
    """Which blocks (the last ones) to process on the CPU so that weight processing fits in
    `free_bytes` of GPU memory: what stays on the GPU needs (1 + overhead) times its bytes."""
    keep, need = len(block_bytes), (1 + overhead) * (other_bytes + sum(block_bytes))
    while keep > 0 and need > free_bytes:
        keep -= 1
        need -= (1 + overhead) * block_bytes[keep]
    return list(range(keep, len(block_bytes)))


def enable_compatibility_mode(model, device, *, free_bytes: int | None = None) -> list[int]:
    """`model.enable_compatibility_mode()`, with the blocks that would not fit on the GPU during
    weight processing processed on the CPU and moved back afterwards.

    Processing Pythia-12b in bf16 on the GPU needs about 155 GB, more than an H200 has; with the
    last blocks on the CPU it boots (and moving a few GB each way costs seconds). Returns the
    blocks processed on the CPU. `free_bytes` overrides the free GPU memory (tests, benchmarks).
    """
    device = torch.device(device)
    offload: list[int] = []
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if free_bytes is not None:
        block_bytes = [param_bytes(block) for block in model.blocks]
        dtype = next(model.parameters()).dtype
        # What stays resident beside the blocks: embeddings, final norm, unembedding.
        other = param_bytes(model) - sum(block_bytes)
        offload = blocks_to_offload(block_bytes, other, free_bytes, PROCESSING_OVERHEAD.get(dtype, 7.0))
    for i in offload:
        model.blocks[i].to("cpu")
    if offload:
        torch.cuda.empty_cache()
    model.enable_compatibility_mode()
    if offload:
        model.to(device, print_details=False)
    return offload


def _boot(source: str, *, device, dtype, revision=None, hf_model=None, compatibility_mode=True,
          name: str | None = None):
    from transformer_lens.model_bridge import TransformerBridge

    kwargs = dict(device=str(device), dtype=dtype)
    if revision is not None:
        kwargs["revision"] = revision
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
    model = TransformerBridge.boot_transformers(source, **kwargs)
    if compatibility_mode:
        # HookedTransformer numerics (folded LayerNorm, centred weights). Attention patterns and
        # log-probabilities are unchanged; hook names are the same either way.
        enable_compatibility_mode(model, device)
    model.eval()
    # How the model was asked for: recorded by feature stores and run outputs.
    model.mechmem_name = (name or source) + (f"@{revision}" if revision else "")
    return model


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    compatibility_mode: bool = True,
):
    """A TransformerLens hooked model from "testbed", "testbed-pile", a local HF folder, or a hub name.

    `revision` picks a Pythia training checkpoint ("step143000"; see PYTHIA_REVISIONS), or one of
    the second testbed's ("step512"; also "testbed-pile@step512"; default its final one).
    Without access to the hub, a hub name that is not cached raises `ModelNotFound` with one
    line saying how to point at a local folder instead.
    """
    device = default_device(device)
    dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    if name == "testbed":
        from mechmem.testbed import MODEL_DIR

        if not (MODEL_DIR / "config.json").exists():
            raise ModelNotFound(
                f"the testbed model is not built ({MODEL_DIR} has no config.json); "
                "build it with `python -m mechmem.testbed.build`"
            )
        return _boot(str(MODEL_DIR), device=device, dtype=dtype,
                     compatibility_mode=compatibility_mode, name="testbed")
    if name.partition("@")[0] in PILE_NAMES:
        from mechmem.testbed import checkpoint_folder

        try:
            folder = checkpoint_folder(name, revision)
        except FileNotFoundError as err:
            raise ModelNotFound(str(err)) from None
        return _boot(str(folder), device=device, dtype=dtype, compatibility_mode=compatibility_mode,
                     name=f"{name.partition('@')[0]}@{folder.name}")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} is not a Hugging Face model folder (no config.json)")
        return _boot(str(path), device=device, dtype=dtype, compatibility_mode=compatibility_mode)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(
            f"model {name!r} not found: not a local folder, not 'testbed', not a hub name (org/name)"
        )
    if revision is not None and name.startswith("EleutherAI/pythia") and revision not in PYTHIA_REVISIONS:
        raise ModelNotFound(f"unknown Pythia revision {revision!r}; e.g. step143000 (final)")
    if _in_hub_cache(name, revision):
        with _hub_offline():
            return _boot(name, device=device, dtype=dtype, revision=revision,
                         compatibility_mode=compatibility_mode)
    if not _hub_reachable():
        raise ModelNotFound(not_cached(name, revision))
    return _boot(name, device=device, dtype=dtype, revision=revision,
                 compatibility_mode=compatibility_mode)


def _placeholder_tokenizer(folder: Path) -> None:
    """A one-token tokenizer saved beside a config: random models are fed token ids, never text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tk = Tokenizer(models.WordLevel({eos: 0}, unk_token=eos))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token=eos, bos_token=eos, unk_token=eos, pad_token=eos
    ).save_pretrained(folder)


def build_hf_pythia(size: str, *, device=None, dtype=None, seed: int = 0, n_ctx: int = 2048,
                    attn_implementation: str = "eager", **overrides):
    """A randomly initialised Hugging Face GPT-NeoX of a Pythia size, built on `device`."""
    from transformers import GPTNeoXForCausalLM

    device, dtype = default_device(device), _resolve_dtype(dtype)
    config = pythia_config(size, n_ctx=n_ctx, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def random_pythia(
    size: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    n_ctx: int = 2048,
    compatibility_mode: bool = True,
):
    """A hooked model of a Pythia size with random weights: benchmarks with no download."""
    device, dtype = default_device(device), _resolve_dtype(dtype)
    hf_model = build_hf_pythia(size, device=device, dtype=dtype, seed=seed, n_ctx=n_ctx)
    with tempfile.TemporaryDirectory() as folder:
        hf_model.config.save_pretrained(folder)
        _placeholder_tokenizer(Path(folder))
        with _hub_offline():
            return _boot(folder, device=device, dtype=dtype, hf_model=hf_model,
                         compatibility_mode=compatibility_mode, name=f"random-pythia-{size}-seed{seed}")


def save_random_pythia(size: str, folder: str | os.PathLike, *, seed: int = 0, n_ctx: int = 2048,
                       **overrides) -> Path:
    """Save a random Pythia-architecture HF checkpoint folder (config, weights, tokenizer)."""
    folder = Path(folder)
    model = build_hf_pythia(size, device="cpu", dtype=torch.float32, seed=seed, n_ctx=n_ctx, **overrides)
    model.save_pretrained(folder)
    _placeholder_tokenizer(folder)
    return folder


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A cheap signature of the weights (sums of a few tensors), so stores notice a retrained model."""
    params = [p for p in model.parameters() if p.ndim >= 2]
    picked = [params[0], params[len(params) // 2], params[-1]] if params else []
    return ",".join(f"{p.detach().double().abs().sum().item():.6e}" for p in picked)


def model_identity(model) -> dict:
    """What a feature store records about the model that produced it."""
    cfg = model.cfg
    name = getattr(model, "mechmem_name", None) or getattr(cfg, "model_name", None) or "unknown"
    return {
        "name": str(name),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "d_model": int(cfg.d_model),
        "weights": weights_fingerprint(model),
    }
