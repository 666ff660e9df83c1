"""The offline default: a small Pythia-architecture model trained with known duplication.

At run time the testbed is only a folder: `load_model("testbed")` reads MODEL_DIR as any
local checkpoint, `load_memorization_data("testbed")` reads DATA_FILE.

The second testbed (Pythia's regime, `pile_regime.py`) is built into the cache, not shipped:
PILE_NAMES are the names `load_model` and `load_memorization_data` take for it, with an optional
"@step<N>" (or `revision=`) for a checkpoint.
"""

import json
import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
DATA_FILE = ASSETS / "memorization.parquet"
MANIFEST_FILE = ASSETS / "manifest.json"

PILE_NAMES = ("testbed-pile", "testbed-pile-tiny")
NAME, TINY_NAME = PILE_NAMES
TABLE_FILE = "memorization.parquet"
MANIFEST = "manifest.json"
BUILD_COMMAND = "python -m mechmem.testbed.build --preset pile-regime --device cuda"


def cache_root() -> Path:
    return Path(os.environ.get("MECHMEM_CACHE", Path.home() / ".cache" / "mechmem")).expanduser()


def testbed_dir(name: str = NAME) -> Path:
    return cache_root() / name


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step{step}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every saved checkpoint, by step."""
    found = [(int(p.name[4:]), p) for p in (out / "checkpoints").glob("step*")
             if p.name[4:].isdigit() and (p / "config.json").exists()]
    return sorted(found)


def checkpoint_folder(name: str, revision: str | None = None) -> Path:
    """The folder of a built checkpoint: "testbed-pile" (the final one), "testbed-pile@step512",
    or `revision="step512"`. Raises FileNotFoundError saying which command builds it."""
    base, _, at = name.partition("@")
    if base not in PILE_NAMES:
        raise ValueError(f"{name!r} is not a second-testbed name ({', '.join(PILE_NAMES)})")
    if at and revision and at != revision:
        raise ValueError(f"{name!r} and revision={revision!r} name different checkpoints")
    revision = revision or at or None
    out = testbed_dir(base)
    if not (out / MANIFEST).is_file():
        command = BUILD_COMMAND + (" --tiny" if base == TINY_NAME else "")
        raise FileNotFoundError(f"the {base} testbed is not built ({out / MANIFEST} is missing); "
                                f"build it with `{command}`")
    revision = revision or json.loads((out / MANIFEST).read_text())["final"]
    built = [f"step{s}" for s, _ in checkpoints(out)]
    if revision not in built:
        raise FileNotFoundError(f"{base} has no checkpoint {revision!r}; built: {', '.join(built)}")
    return step_dir(out, int(revision[4:]))
