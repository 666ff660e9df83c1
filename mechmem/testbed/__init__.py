"""The offline default: a small Pythia-architecture model trained with known duplication.

At run time the testbed is only a folder: `load_model("testbed")` reads MODEL_DIR as any
local checkpoint, `load_memorization_data("testbed")` reads DATA_FILE.

The second testbed (Pythia's regime, `pile_regime.py`) is built into the cache, not shipped:
PILE_NAMES are the names `load_model` and `load_memorization_data` take for it, with an optional
"@step<N>" (or `revision=`) for a checkpoint.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"
DATA_FILE = ASSETS / "memorization.parquet"
MANIFEST_FILE = ASSETS / "manifest.json"

PILE_NAMES = ("testbed-pile", "testbed-pile-tiny")
