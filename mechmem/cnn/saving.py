"""Saving and loading trained CNNs: weights, input statistics and eval logits in safetensors, the rest in JSON."""

from __future__ import annotations

import json
import os
from functools import partial
from dataclasses import asdict
from pathlib import Path
from collections.abc import Sequence

import torch
from torch import Tensor

from mechmem.atomic import atomic_write
from mechmem.cnn.config import CNNConfig
from mechmem.cnn.metrics import ClassMetrics, TrainedCNN
from mechmem.cnn.model import AttentionCNN



INDEX_FILE = "cnns.json"


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1))


def save_cnns(trained: Sequence[TrainedCNN], folder: str | os.PathLike, index: bool = True) -> Path:
    """Write {name}.safetensors (weights, eval logits) and {name}.json (config, metrics) per CNN, then
    the index cnns.json (`index=False`: not, when several ranks each save part of one row's CNNs)."""
    folder = Path(folder)
    names = [t.config.name for t in trained]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must be unique to be saved, got {names}")
    folder.mkdir(parents=True, exist_ok=True)
    for t in trained:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()}
        tensors["eval_logits"] = t.eval_logits.detach().cpu().float().contiguous()
        meta = {"config": asdict(t.config), "n_layers": t.model.n_layers, "n_classes": t.model.n_classes,
                "seq_len": t.model.seq_len, "input_scaling": t.model.input_scaling,
                "train_losses": list(t.train_losses), "val_losses": list(t.val_losses),
                "epochs_run": t.epochs_run, "best_epoch": t.best_epoch, "eval_metrics": t.eval_metrics.to_dict()}
        atomic_write(folder / f"{t.config.name}.safetensors", partial(_save_safetensors, tensors))
        atomic_write(folder / f"{t.config.name}.json", partial(_write_json, meta))
    if index:
        write_cnn_index(folder, names)
    return folder


def write_cnn_index(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """cnns.json: which saved CNNs make up the folder, in order (what load_cnns reads)."""
    atomic_write(Path(folder) / INDEX_FILE, lambda p: p.write_text(json.dumps({"models": list(names)}, indent=1)))


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
        model = AttentionCNN(meta["n_layers"], meta["n_classes"], config, meta["seq_len"],
                             meta.get("input_scaling", "raw"))
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        out.append(TrainedCNN(config, model.to(device or "cpu").eval(), tensors["eval_logits"],
                              ClassMetrics.from_dict(meta["eval_metrics"]), meta["train_losses"],
                              meta.get("val_losses", []), meta.get("epochs_run", len(meta["train_losses"])),
                              meta.get("best_epoch", len(meta["train_losses"]))))
    return out
