"""Shared fixtures: a tiny randomly initialised Pythia-architecture checkpoint on disk; helpers; the
rule for browser tests (marked `browser`): without chromium they skip, unless asked for."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mechmem.models import load_model, save_random_pythia

pytest_plugins = ["pytester"]  # tests of the browser rule run pytest in pytest

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


# ----------------------------------------------------------------------------- browser tests
# A fresh machine has no chromium: its browser tests skip, with one reason. CI (which sets CI=true)
# or MECHMEM_REQUIRE_BROWSER=1 asks for them: there a missing browser is a failure.
BROWSER_ENV = ("CI", "MECHMEM_REQUIRE_BROWSER")


def browser_required(env=None) -> bool:
    """Does the environment ask for the browser tests? A variable set to anything but '', 0 or false."""
    env = os.environ if env is None else env
    return any(env.get(name, "").strip().lower() not in ("", "0", "false", "no") for name in BROWSER_ENV)


def browser_gate(missing: str | None, env=None) -> None:
    """Skip, or fail where a browser is required, when `missing` says why no browser can be driven."""
    if missing is None:
        return
    if browser_required(env):
        pytest.fail(f"no browser, but CI or MECHMEM_REQUIRE_BROWSER asks for the browser tests: {missing}",
                    pytrace=False)
    pytest.skip(f"no browser for the browser tests ({missing}); with CI or MECHMEM_REQUIRE_BROWSER=1 set "
                "this is a failure")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of a `browser` test is set up."""
    if item.get_closest_marker("browser") is not None:
        from mechmem.viz import browser_missing

        browser_gate(browser_missing())
