"""Checkpoints: ordered by training step, each relabelled by itself and benchmarked; run_alignment refuses a
table labelled by another checkpoint unless --relabel."""

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import load_experiment
from mechmem.tables.checkpoints import Checkpoint, checkpoint_list, summarize, training_step
from mechmem.testbed import DATA_FILE, MODEL_DIR
from test_tables_relabel import perturbed_testbed

pytestmark = pytest.mark.usefixtures("one_thread")
built = pytest.mark.skipif(not DATA_FILE.exists(), reason="testbed assets not built")
ALIGNMENT = ["--taxonomies", "Non-Memo, Guess, Others", "--configs", "k6_c4_mean", "--train-per-class", "6",
             "--eval-per-class", "4", "--epochs", "1", "--n-boot", "20", "--device", "cpu", "--no-probe", "--cnn-seeds", "1"]


def test_steps_come_from_revisions_and_folder_names(tmp_path):
    assert training_step("EleutherAI/pythia-1b", "step64000") == 64000
    assert training_step("EleutherAI/pythia-1b", None) == 143000
    assert training_step(str(tmp_path / "run" / "step-512"), None) == 512
    got = checkpoint_list("EleutherAI/pythia-1b", ["step8000", "step1000", "step143000"], None)
    assert [c.step for c in got] == [1000, 8000, 143000] and got[0].label == "step1000"
    folders = checkpoint_list(None, None, [str(tmp_path / "late"), str(tmp_path / "early")])
    assert [c.step for c in folders] == [0, 1] and [c.label for c in folders] == ["late", "early"]  # as given
    with pytest.raises(ValueError, match="either"):
        checkpoint_list("m", ["step1"], ["f"])


def test_summary_is_one_row_a_taxonomy_and_checkpoint():
    a = pd.DataFrame({"tax_name": ["x", "y"], "num_classes": 3, "min_f1": [50.0, 60.0], "min_f1_ci_low": 40.0,
                      "min_f1_ci_high": 70.0})
    long, wide = summarize([(Checkpoint("m", "step1", 1), a, 10), (Checkpoint("m", "step2", 2), a.assign(
        min_f1=[55.0, 65.0]), 20)])
    assert len(long) == 4 and list(wide.columns) == ["tax_name", "step1", "step2"]
    assert wide.set_index("tax_name").loc["y", "step2"] == 65.0


def _subset(tmp_path, n=150):
    shipped = pd.read_parquet(DATA_FILE)
    memo = shipped["memorization_score"].to_numpy() == 1
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.choice(np.flatnonzero(memo), n // 2, replace=False),
                           rng.choice(np.flatnonzero(~memo), n // 2, replace=False)])
    table = shipped.iloc[np.sort(rows)].reset_index(drop=True).assign(label_model="testbed")
    table.to_parquet(tmp_path / "table.parquet")
    return tmp_path / "table.parquet"


@built
def test_run_alignment_refuses_another_checkpoints_labels(tmp_path, capsys):
    run_alignment = load_experiment("run_alignment")
    ckpt = perturbed_testbed(tmp_path / "step2000")
    data = _subset(tmp_path)
    code = run_alignment.main(["--model", str(ckpt), "--data", str(data), *ALIGNMENT, "--quiet",
                               "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--relabel" in err and "testbed" in err
    assert not (tmp_path / "out" / "config.json").exists()


@built
@pytest.mark.slow
def test_checkpoints_study_relabels_each_checkpoint_and_plots(tmp_path):
    checkpoints = load_experiment("checkpoints")
    early = perturbed_testbed(tmp_path / "ckpts" / "step1000", scale=0.03)
    final = tmp_path / "ckpts" / "step4000"
    shutil.copytree(MODEL_DIR, final)
    data = _subset(tmp_path)
    out = tmp_path / "study"
    code = checkpoints.main(["--checkpoints", str(final), str(early), "--data", str(data), "--device", "cpu",
                             "--quiet", "--out", str(out), "--", *ALIGNMENT])
    assert code == 0
    long = pd.read_csv(out / "checkpoints.csv")
    assert long["checkpoint"].tolist() == ["step1000", "step4000"] and long["step"].tolist() == [1000, 4000]
    assert (out / "checkpoints.png").stat().st_size > 0
    early_labels = pd.read_parquet(out / "step1000" / "labels.parquet")
    final_labels = pd.read_parquet(out / "step4000" / "labels.parquet")
    shipped = pd.read_parquet(data)
    np.testing.assert_array_equal(final_labels["memorization_score"], shipped["memorization_score"])
    assert (early_labels["memorization_score"] != shipped["memorization_score"]).any()
    assert set(early_labels["label_model"]) == {str(early)}
    for ck in ("step1000", "step4000"):  # each benchmark ran on its checkpoint's own labels
        assert pd.read_csv(out / ck / "alignment" / "alignment.csv").shape[0] == 1


@built
def test_a_checkpoint_without_enough_samples_is_recorded_and_the_study_goes_on(tmp_path, capsys):
    """Early in training few samples are memorized: a checkpoint where no row has enough samples in
    every class is skipped with its reasons (skipped_checkpoints.json), not the end of the study;
    when every checkpoint is, the study says so in one line, exit 2."""
    import json

    checkpoints = load_experiment("checkpoints")
    early = perturbed_testbed(tmp_path / "ckpts" / "step1000", scale=2.0)  # recites nothing
    final = tmp_path / "ckpts" / "step4000"
    shutil.copytree(MODEL_DIR, final)
    data = _subset(tmp_path)
    out = tmp_path / "study"
    assert checkpoints.main(["--checkpoints", str(early), str(final), "--data", str(data), "--device", "cpu",
                             "--quiet", "--out", str(out), "--", *ALIGNMENT]) == 0
    assert pd.read_csv(out / "checkpoints.csv")["checkpoint"].tolist() == ["step4000"]
    skipped = json.loads((out / "skipped_checkpoints.json").read_text())
    assert list(skipped) == ["step1000"] and "not enough samples" in skipped["step1000"]["Non-Memo, Guess, Others"]
    capsys.readouterr()
    assert checkpoints.main(["--checkpoints", str(early), "--data", str(data), "--device", "cpu", "--quiet",
                             "--out", str(tmp_path / "early"), "--", *ALIGNMENT]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert len(err) == 1 and "no checkpoint has a taxonomy row" in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--checkpoints", "./no/such/ckpt"], "not found"),
    (["--model", "EleutherAI/pythia-160m-deduped", "--revisions", "step1000"], "not cached"),
    (["--checkpoints", "{tiny}", "--", "--revision", "step1"], "set per checkpoint"),
    (["--revisions", "step1000"], "--revisions needs --model"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_checkpoint, capsys, monkeypatch, args, message):
    from mechmem import models

    monkeypatch.setattr(models, "_in_hub_cache", lambda *a: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: False)
    checkpoints = load_experiment("checkpoints")
    args = [a.format(tiny=tiny_checkpoint) for a in args]
    at = args.index("--") if "--" in args else len(args)
    code = checkpoints.main([*args[:at], "--out", str(tmp_path / "out"), *args[at:]])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


@built
def test_run_alignments_own_errors_stop_the_study_in_one_line(tmp_path, capfd):
    checkpoints = load_experiment("checkpoints")
    final = tmp_path / "ckpts" / "step4000"
    shutil.copytree(MODEL_DIR, final)
    code = checkpoints.main(["--checkpoints", str(final), "--data", str(_subset(tmp_path, 10)), "--device", "cpu",
                             "--quiet", "--out", str(tmp_path / "out"), "--", "--grid", "huge"])
    assert code == 2
    lines = [line for line in capfd.readouterr().err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "--grid" in lines[0], lines
    assert (tmp_path / "out" / "step4000" / "labels.parquet").exists()  # kept for the rerun


def test_each_checkpoint_can_read_its_own_table():
    from mechmem.tables.checkpoints import data_name

    assert data_name("testbed-pile@{revision}", Checkpoint("testbed-pile", "step512", 512)) == "testbed-pile@step512"
    assert data_name("runs/t.parquet", Checkpoint("testbed-pile", "step512", 512)) == "runs/t.parquet"


@built
def test_a_table_labelled_by_its_checkpoint_is_not_decoded_again(tmp_path, monkeypatch):
    """The second testbed labels every checkpoint at build time (attrs greedy_model 'name@revision'):
    the study takes those labels as they are; another checkpoint's labels are decoded again."""
    import mechmem.tables.checkpoints as ckm
    from mechmem.data import load_memorization_data
    from mechmem.models import load_model

    model = load_model("testbed", device="cpu")
    df = load_memorization_data("testbed").head(12)
    decoded = []
    monkeypatch.setattr(ckm, "relabel_table", lambda table, *a, **k: decoded.append(1) or table.assign(
        label_model="testbed", label_revision="step9", label_weights=None))
    df.attrs["greedy_model"] = "testbed@step7"
    ckm.label_checkpoint(df, model, Checkpoint("testbed", "step7", 7), tmp_path / "own.parquet", progress=False)
    assert decoded == []
    own = pd.read_parquet(tmp_path / "own.parquet")
    assert set(own["label_revision"]) == {"step7"}
    np.testing.assert_array_equal(own["memorization_score"], df["memorization_score"])
    ckm.label_checkpoint(df, model, Checkpoint("testbed", "step9", 9), tmp_path / "other.parquet", progress=False)
    assert decoded == [1]
