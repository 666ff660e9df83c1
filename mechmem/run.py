"""The run folder that `experiments/run_alignment.py --out` writes: one class owns its layout.

Everything that reads or writes a run (alignment, localization, inspection, ablation, scripts,
benchmarks, tests) goes through `RunFolder`, so the layout is written down once:

    config.json              what made the run: model, revision, data, the AlignmentConfig (write_config)
    settings.json            the settings that decide a row's numbers (resume check, `result_settings`)
    skipped.json             rows skipped for lack of samples, with the reason
    rows/<slug>.json         one row's results, class names, train/eval sequence ids
    cnns/<slug>/             its CNNs (first training seed), seed<k>/ further seeds, control/ shuffled labels
    features/                the FeatureStore of every sample any row needs
    model_view_tokens.npz    the tokens the model was shown (free generation is the slow half of a resume)
    alignment.csv/.md        the table (rouge_sweep.csv: the ROUGE sweep); min_f1.png, confusion_{best,worst}.png
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mechmem.alignment_config import AlignmentConfig, Row
from mechmem.atomic import atomic_json
from mechmem.cnn import CNNConfig, TrainConfig, TrainedCNN, load_cnns
from mechmem.features import FeatureStore

CONFIG = "config.json"
SETTINGS = "settings.json"
SKIPPED = "skipped.json"
ROWS = "rows"
CNNS = "cnns"
FEATURES = "features"
MODEL_VIEW = "model_view_tokens.npz"
TABLE = "alignment.csv"
TABLE_MD = "alignment.md"
ROUGE_SWEEP = "rouge_sweep.csv"


@dataclass(frozen=True)
class RunConfig:
    """What config.json holds, read back into the dataclasses."""

    model: str
    data: str | None
    config: Any  # an AlignmentConfig (None in a folder made by hand without one)
    revision: str | None = None
    extra: dict | None = None  # argv, compatibility_mode, world_size, ...


@dataclass(frozen=True)
class Split:
    """A row's train and eval samples by sequence id; eval labels when the row stored them."""

    train_ids: np.ndarray
    eval_ids: np.ndarray
    eval_labels: np.ndarray | None


def alignment_config_from_dict(d: dict):
    """The inverse of `dataclasses.asdict` for an AlignmentConfig (as config.json holds it)."""
    known = {f.name for f in fields(AlignmentConfig)}
    d = {k: v for k, v in d.items() if k in known}
    rows = lambda rs: tuple(Row(**r) for r in rs)  # noqa: E731
    out = dict(d, rows=rows(d["rows"]), sweep=rows(d.get("sweep", ())))
    if "configs" in d:
        out["configs"] = tuple(CNNConfig(**c) if isinstance(c, dict) else CNNConfig.from_name(c) for c in d["configs"])
    if "train" in d:
        out["train"] = TrainConfig(**d["train"])
    if "pooling" in d:
        out["pooling"] = tuple(d["pooling"])
    return AlignmentConfig(**out)


class RunFolder:
    """One run_alignment output folder: its paths, its config, its rows and what each row saved."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # paths ----------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def settings_file(self) -> Path:
        return self.path / SETTINGS

    @property
    def skipped_file(self) -> Path:
        return self.path / SKIPPED

    @property
    def rows_dir(self) -> Path:
        return self.path / ROWS

    @property
    def features_dir(self) -> Path:
        return self.path / FEATURES

    @property
    def model_view_file(self) -> Path:
        return self.path / MODEL_VIEW

    @property
    def table_file(self) -> Path:
        return self.path / TABLE

    @property
    def table_md_file(self) -> Path:
        return self.path / TABLE_MD

    @property
    def rouge_sweep_file(self) -> Path:
        return self.path / ROUGE_SWEEP

    def row_file(self, slug: str) -> Path:
        return self.rows_dir / f"{slug}.json"

    def cnn_folder(self, slug: str, seed_index: int | str = 0) -> Path:
        """cnns/{slug}/ for the first training seed (what localization and inspection load),
        cnns/{slug}/seed{k}/ for the k-th further one; "control" is cnns/{slug}/control/, the
        shuffled-label control of the first seed, "control{k}" cnns/{slug}/control/seed{k}/ the k-th's."""
        folder = self.path / CNNS / slug
        if isinstance(seed_index, str) and seed_index.startswith("control"):
            k = seed_index.removeprefix("control")
            return folder / "control" / (f"seed{k}" if k else "")
        return folder if seed_index == 0 else folder / f"seed{seed_index}"

    def seed_indices(self, slug: str) -> list[int]:
        """The training seeds whose CNNs the row saved (0 first; control not included)."""
        n = len(self.read_row(slug).get("min_f1_per_seed", [])) or 1
        return [i for i in range(n) if (self.cnn_folder(slug, i) / "cnns.json").is_file()]

    # config ---------------------------------------------------------------------------------
    def write_config(self, model: str, data: str, config, *, revision: str | None = None, **extra) -> None:
        """config.json: what made the run (`config` an AlignmentConfig); `extra` keys are kept as they are."""
        self.path.mkdir(parents=True, exist_ok=True)
        first = {k: extra.pop(k) for k in ("argv",) if k in extra}
        record = {**first, "model": model, "revision": revision, "data": data, **extra,
                  "config": None if config is None else asdict(config)}
        atomic_json(self.config_file, record, default=str)

    def raw_config(self) -> dict:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} has no {CONFIG}: cannot tell which model and data made it")
        return json.loads(self.config_file.read_text())

    def read_config(self) -> RunConfig:
        """config.json back into the dataclasses."""
        raw = self.raw_config()
        extra = {k: v for k, v in raw.items() if k not in ("model", "data", "config", "revision")}
        cfg = raw.get("config")
        return RunConfig(raw["model"], raw.get("data"), None if cfg is None else alignment_config_from_dict(cfg),
                         raw.get("revision"), extra)

    def model_name(self) -> tuple[str, str | None]:
        """(model, revision) the run was made with."""
        raw = self.raw_config()
        return raw["model"], raw.get("revision")

    # rows -----------------------------------------------------------------------------------
    def rows(self) -> dict[str, dict]:
        """{slug: row json} of every finished row, by slug."""
        files = sorted(self.rows_dir.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{self.path} is not a run_alignment output folder (no {ROWS}/*.json)")
        return {f.stem: json.loads(f.read_text()) for f in files}

    def has_row(self, slug: str) -> bool:
        return self.row_file(slug).is_file()

    def write_row(self, slug: str, record: dict) -> None:
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        atomic_json(self.row_file(slug), record)

    def read_row(self, slug: str) -> dict:
        return json.loads(self.row_file(slug).read_text())

    def find_row(self, wanted: str | None, *, trained: bool = True, default: str | None = None) -> tuple[str, dict]:
        """(slug, row json) by slug or display name (`wanted`, else `default`); with neither given, the
        only row. `trained`: only rows whose CNNs are saved. ValueError when there is none."""
        rows = self.rows() if self.rows_dir.is_dir() else {}
        name = wanted or default
        for slug, row in rows.items():
            if name in (slug, row.get("tax_name")) and (not trained or self.cnn_folder(slug).is_dir()):
                return slug, row
        if wanted is None and len(rows) == 1:
            return next(iter(rows.items()))
        raise ValueError(f"no {'trained ' if trained else ''}taxonomy {name!r} in {self.path}; "
                       f"it has {[r.get('tax_name', s) for s, r in rows.items()]}")

    def split(self, slug: str) -> Split:
        """The row's train/eval sequence ids and, when stored, its eval labels."""
        row = self.read_row(slug)
        labels = row.get("eval_labels")
        return Split(np.asarray(row.get("train_sequence_ids", []), dtype=np.int64),
                     np.asarray(row["eval_sequence_ids"], dtype=np.int64),
                     None if labels is None else np.asarray(labels, dtype=np.int64))

    # what a row saved -------------------------------------------------------------------------
    def load_cnns(self, slug: str, seed_index: int | str = 0, device=None) -> list[TrainedCNN]:
        return load_cnns(self.cnn_folder(slug, seed_index), device=device)

    def has_features(self) -> bool:
        return (self.features_dir / "manifest.json").is_file()

    def feature_store(self) -> FeatureStore:
        return FeatureStore.load(self.features_dir)
