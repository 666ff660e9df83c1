"""Training the testbed model: Pythia's architecture at a toy size, on the token stream.

The model is a Hugging Face `GPTNeoXForCausalLM` exactly as Pythia configures it (parallel
attention and MLP, rotary on 25% of each head, untied embeddings, LayerNorm, GELU), so a saved
testbed loads through the same path as a real Pythia checkpoint. Training is plain next-token
prediction over fixed-length chunks of the stream; each epoch shifts the chunk grid by a random
offset, so every 64-token window is seen contiguously in most epochs. With `shuffle_chunks` off
(the second testbed, one pass as Pythia) the first epoch reads the stream in order, so the data
a checkpoint at step s was trained on is exactly the stream's first `seen_tokens(s)` tokens.

A run can stop after `stop_after` seconds and resume from its state file (`resume_from`): the
GPU machine allows ten minutes a command.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    n_layers: int = 6
    d_model: int = 256
    n_heads: int = 8
    ctx: int = 256                  # training chunk length (samples need only 64)
    n_positions: int = 2048         # the config's max_position_embeddings, as Pythia
    batch_size: int = 256           # chunks per step
    epochs: float = 40.0
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    steps: int | None = None        # overrides `epochs`; a manifest's recorded steps reproduce a run
    max_seconds: float | None = None  # cap on training time: steps are cut once the step time is known
    shuffle_chunks: bool = True     # False: the first epoch reads the stream in order (one pass, as Pythia)

    @classmethod
    def tiny(cls) -> "TrainConfig":
        return cls(batch_size=8, steps=30, warmup_steps=5)


def model_config(vocab_size: int, cfg: TrainConfig, eos_id: int = 0):
    """Pythia's architecture (`mechmem.models.pythia_config`) at the testbed's size, without dropout."""
    from mechmem.models import pythia_config

    return pythia_config(
        "70m", n_ctx=cfg.n_positions, vocab_size=vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=4 * cfg.d_model,
        attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


class ChunkSampler:
    """Batches of `ctx + 1` tokens: per epoch a random grid offset and a random chunk order."""

    def __init__(self, stream: torch.Tensor, cfg: TrainConfig, generator: np.random.Generator):
        self.stream, self.cfg, self.rng = stream, cfg, generator
        self.queue = np.zeros(0, dtype=np.int64)
        self.epoch = 0

    def _refill(self):
        if self.epoch == 0 and not self.cfg.shuffle_chunks:
            starts = np.arange(0, len(self.stream) - self.cfg.ctx - 1, self.cfg.ctx)
        else:
            offset = int(self.rng.integers(self.cfg.ctx))
            starts = np.arange(offset, len(self.stream) - self.cfg.ctx - 1, self.cfg.ctx)
            starts = starts[self.rng.permutation(len(starts))]
        self.queue = np.concatenate([self.queue, starts])
        self.epoch += 1

    def state(self) -> dict:
        return {"queue": self.queue, "epoch": self.epoch, "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.queue, self.epoch = np.asarray(state["queue"], dtype=np.int64), int(state["epoch"])
        self.rng.bit_generator.state = state["rng"]

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.cfg.batch_size:
            self._refill()
        starts, self.queue = self.queue[:self.cfg.batch_size], self.queue[self.cfg.batch_size:]
        idx = torch.as_tensor(starts, device=self.stream.device)[:, None] + torch.arange(
            self.cfg.ctx + 1, device=self.stream.device)
        return self.stream[idx]


def seen_tokens(step: int, cfg: TrainConfig, n_tokens: int) -> int | None:
    """How many leading tokens of the stream a run has trained on after `step` steps, when that is
    a prefix (`shuffle_chunks` off, first epoch); None when the whole stream may have been seen."""
    if cfg.shuffle_chunks:
        return None
    n_chunks = len(range(0, n_tokens - cfg.ctx - 1, cfg.ctx))
    used = step * cfg.batch_size
    return None if used >= n_chunks else used * cfg.ctx + 1


class Stopped(Exception):
    """Training stopped at `stop_after` seconds; its state is saved, the same call resumes it."""


def train(stream: np.ndarray, vocab_size: int, cfg: TrainConfig, *, device="cpu", eos_id: int = 0,
          log_every: int = 20, checkpoint_steps: set[int] | None = None,
          on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
          resume_from: Path | None = None, stop_after: float | None = None):
    """Train from scratch; returns (fp32 HF model, log dict with the loss curve and timings).

    `on_checkpoint(step, model)` is called before the first step when 0 is in `checkpoint_steps`,
    after each step listed, and after the last step. With `resume_from` (a state file) a run
    that finds the file continues from it, and one that runs past `stop_after` seconds saves its
    state there and raises `Stopped`.
    """
    from transformers import GPTNeoXForCausalLM

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = GPTNeoXForCausalLM._from_config(model_config(vocab_size, cfg, eos_id), dtype=torch.float32,
                                            attn_implementation="sdpa").to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, cfg.beta2), fused=device.type == "cuda")
    tokens = torch.as_tensor(stream.astype(np.int64), device=device)
    sampler = ChunkSampler(tokens, cfg, np.random.default_rng(cfg.seed))
    tokens_per_step = cfg.batch_size * cfg.ctx
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(stream) / tokens_per_step))
    planned = total
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve: list = []
    running: list = []
    step, before = 0, 0.0  # seconds trained in earlier calls of a resumed run
    checkpoint_steps = checkpoint_steps or set()
    if resume_from is not None and Path(resume_from).exists():
        state = torch.load(resume_from, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step, total, planned, curve, before = state["step"], state["total"], state["planned"], state["curve"], state["seconds"]
    elif on_checkpoint is not None and 0 in checkpoint_steps:
        on_checkpoint(0, model)
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="training", mininterval=5)
    resumed = step > 0
    while step < total:
        if stop_after is not None and resume_from is not None and time.time() - t0 > stop_after:
            bar.close()
            _save_state(resume_from, model, opt, sampler, step=step, total=total, planned=planned, curve=curve,
                        seconds=before + time.time() - t0)
            raise Stopped(f"stopped at step {step} of {total}; run the same command again to resume")
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, cfg)
        batch = sampler.next()
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running.append(loss.detach())
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total:
            mean = torch.stack(running).mean().item()
            running = []
            curve.append([step, round(mean, 4)])
            bar.set_postfix(loss=f"{mean:.3f}", epoch=sampler.epoch)
        if on_checkpoint is not None and step in checkpoint_steps and step < total:
            on_checkpoint(step, model)
        if cfg.max_seconds and cfg.steps is None and step in (10, 50) and not resumed:
            # Once the step time is known (steps 10-50, past the first-call overheads), cut the run
            # to fit the time cap; the LR schedule then decays over the shorter run (warmup is
            # unaffected as long as it ends after step 50 or the cut is past it).
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 10:
                t10 = time.time()
            else:
                per_step = (time.time() - t10) / 40
                fit = step + int((cfg.max_seconds - (time.time() - t0)) / per_step)
                if fit < total:
                    total = max(fit, step + 1)
                    bar.total = total
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = before + time.time() - t0
    if on_checkpoint is not None:
        on_checkpoint(total, model)
    log = {
        "config": asdict(cfg), "steps": total, "planned_steps": planned, "tokens_per_step": tokens_per_step,
        "epochs": round(total * tokens_per_step / len(stream), 3), "seconds": round(seconds, 1),
        "tokens_per_second": round(total * tokens_per_step / seconds), "final_loss": curve[-1][1],
        "loss_curve": curve, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "n_params": sum(p.numel() for p in model.parameters()),
    }
    return model.eval(), log


def _save_state(path: Path, model, opt, sampler: ChunkSampler, **progress) -> None:
    from mechmem.atomic import atomic_write

    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.state(),
             "torch_rng": torch.get_rng_state(), **progress}
    atomic_write(path, lambda p: torch.save(state, p))


def save_checkpoint(model, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A Hugging Face folder of the weights rounded to `dtype`, the training weights untouched
    (save_fp16 rounds the model itself: right at the end of a run, wrong in the middle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    config = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # the weights' dtype, not the training model's
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def save_fp16(model, folder: Path, max_shard_size: str | None = None) -> Path:
    """Save the weights rounded to float16 (the shipped precision) as a Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = model.to(torch.float16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    half.save_pretrained(folder, **kwargs)
    model.to(torch.float32)
    return folder


def load_fp32(folder: Path, device="cpu"):
    """The shipped weights in float32 with eager attention: the labels' reference numerics."""
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").to(device).eval()


def write_log(log: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(log, indent=1))
