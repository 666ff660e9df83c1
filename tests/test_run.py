"""The run folder: config.json back into the dataclasses, rows by slug or display name, a row's CNNs,
split and store; and the scripts go through the library, never through each other."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from mechmem.alignment import AlignmentConfig, Row, quick_rows, result_settings
from mechmem.cnn import PAPER_GRID, CNNConfig, TrainConfig, save_cnns
from mechmem.run import RunFolder, alignment_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
SLUG = "merge_2_other_guess_recollect_recite_t5"
NAME = "Non-Memo, Guess, Others"


def full_config() -> AlignmentConfig:
    return AlignmentConfig(rows=quick_rows()[:3] + (Row("merge_2_other_guess_recollect_recite", 50, "L", 0.6),),
                           train_per_class=12, eval_per_class=8,
                           configs=(*PAPER_GRID[:2], CNNConfig(5, 4, "max", n_feat_fc=32, dropout=0.25)),
                           train=TrainConfig(protocol="paper", epochs=2, input_scaling="layer", seed=3),
                           pooling=("mean",), sweep=(Row("merge_2_other_guess_recollect_recite", 5, "L", 0.3),),
                           cnn_seeds=2, controls=False, seed=7)


def test_config_json_reads_back_into_the_dataclasses(tmp_path):
    cfg = full_config()
    run = RunFolder(tmp_path / "run")
    run.write_config("testbed", "testbed", cfg, revision="step1", argv=["--grid", "quick"], world_size=2)
    back = run.read_config()
    assert back.config == cfg and (back.model, back.data, back.revision) == ("testbed", "testbed", "step1")
    assert back.extra == {"argv": ["--grid", "quick"], "world_size": 2}
    assert run.model_name() == ("testbed", "step1")
    raw = json.loads(run.config_file.read_text())
    assert list(raw)[:4] == ["argv", "model", "revision", "data"] and raw["config"]["train"]["seed"] == 3
    assert result_settings(back.config) == result_settings(cfg)


def test_config_from_dict_takes_names_and_ignores_unknown_fields():
    d = json.loads(json.dumps({**full_config().__dict__, "rows": [r.__dict__ for r in quick_rows()[:1]],
                               "sweep": [], "configs": ["k6_c10_mean", "k5_c4_max_fc32_d0.25"],
                               "train": TrainConfig().__dict__, "someday": 1}, default=str))
    cfg = alignment_config_from_dict(d)
    assert cfg.configs == (CNNConfig(6, 10, "mean"), CNNConfig(5, 4, "max", 32, 0.25))
    assert cfg.rows == quick_rows()[:1] and cfg.train == TrainConfig()


def test_a_folder_without_config_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RunFolder(tmp_path).read_config()


def test_layout_is_the_documented_one(tmp_path):
    run = RunFolder(tmp_path)
    assert run.row_file(SLUG) == tmp_path / "rows" / f"{SLUG}.json"
    assert run.cnn_folder(SLUG) == tmp_path / "cnns" / SLUG
    assert run.cnn_folder(SLUG, 2) == tmp_path / "cnns" / SLUG / "seed2"
    assert run.cnn_folder(SLUG, "control") == tmp_path / "cnns" / SLUG / "control"
    assert (run.features_dir, run.settings_file, run.skipped_file, run.model_view_file) == (
        tmp_path / "features", tmp_path / "settings.json", tmp_path / "skipped.json", tmp_path / "model_view_tokens.npz")


def test_rows_by_slug_or_display_name(tmp_path):
    run = RunFolder(tmp_path)
    run.write_row(SLUG, {"tax_name": NAME, "train_sequence_ids": [1, 2], "eval_sequence_ids": [3, 4],
                         "eval_labels": [0, 2]})
    other = "merge_2_other_recite_guess_recollect_t50"
    run.write_row(other, {"tax_name": "Non-Memo, Recite[50], Others", "eval_sequence_ids": [5]})
    with pytest.raises(ValueError, match="no trained taxonomy"):
        run.find_row(NAME)  # no CNNs saved yet
    assert run.find_row(NAME, trained=False)[0] == SLUG
    assert run.find_row(other, trained=False)[0] == other
    assert run.find_row(None, trained=False, default="Non-Memo, Recite[50], Others")[0] == other
    with pytest.raises(ValueError, match="Non-Memo, Code, Others"):
        run.find_row("Non-Memo, Code, Others", trained=False)
    split = run.split(SLUG)
    np.testing.assert_array_equal(split.train_ids, [1, 2])
    np.testing.assert_array_equal(split.eval_labels, [0, 2])
    assert run.split(other).eval_labels is None and len(run.split(other).train_ids) == 0


def test_a_rows_cnns_and_store(tmp_path, tiny_model, tiny_checkpoint):
    from test_localize import make_run

    folder = make_run(tmp_path / "run", tiny_model, tiny_checkpoint)[0]
    run = RunFolder(folder)
    slug, row = run.find_row(NAME)
    assert slug == SLUG and run.find_row(None) == (slug, row)  # the only row
    cnns = run.load_cnns(slug)
    assert [c.config.name for c in cnns] == ["k6_c4_mean_fc16", "k6_c4_max_fc16"]
    save_cnns(cnns[:1], run.cnn_folder(slug, "control"))
    assert [c.config.name for c in run.load_cnns(slug, "control")] == ["k6_c4_mean_fc16"]
    assert run.has_features() and len(run.feature_store().sequence_ids) == 36
    assert run.read_config().config is None and run.model_name()[0] == str(tiny_checkpoint)


def test_seed_indices_are_the_seeds_with_saved_cnns(tmp_path):
    run = RunFolder(tmp_path)
    run.write_row("r", {"min_f1_per_seed": [50.0, 51.0, 52.0]})
    for seed in (0, 2, "control"):
        run.cnn_folder("r", seed).mkdir(parents=True)
        (run.cnn_folder("r", seed) / "cnns.json").write_text("{}")
    assert run.seed_indices("r") == [0, 2]  # seed 1 never saved; the control is not a seed
    run.write_row("one", {})
    assert run.seed_indices("one") == []
    run.cnn_folder("one").mkdir(parents=True)
    (run.cnn_folder("one") / "cnns.json").write_text("{}")
    assert run.seed_indices("one") == [0]


def test_scripts_do_not_import_scripts():
    """The experiment scripts share code through mechmem, never by loading each other (by import or
    importlib), and benchmarks do not load them either. (Benchmark helpers may import each other by
    name: benchmarks/conftest.py puts them on the path for their pytest-benchmark wrappers.)"""
    experiments = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    offenders = []
    for d, forbidden in (("experiments", experiments | benchmarks), ("benchmarks", experiments)):
        for path in sorted((ROOT / d).glob("*.py")):
            text = path.read_text()
            if "spec_from_file_location" in text or "import_module" in text:
                offenders.append(f"{d}/{path.name}: importlib")
            for node in ast.walk(ast.parse(text)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{d}/{path.name}: imports {n}" for n in names if n.split(".")[0] in forbidden]
    assert offenders == []
