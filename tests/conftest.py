"""Shared fixtures: a tiny randomly initialised Pythia-architecture checkpoint on disk."""

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
