"""Shared fixtures: a tiny randomly initialised Pythia-architecture checkpoint on disk; helpers."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mechmem.models import load_model, save_random_pythia

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=256)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A local HF folder with Pythia's architecture at a toy size (3 layers, 4 heads)."""
    return save_random_pythia("14m", tmp_path_factory.mktemp("tiny-pythia"), seed=0, n_ctx=128, **TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY["vocab_size"], (10, 64), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Toy models run faster on one thread, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_experiment(name: str):
    """experiments/{name}.py as a module, to call its main() in-process."""
    path = Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
