import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mechmem.alignment as al
import mechmem.features as F
from mechmem.cnn import CNNConfig, TrainConfig
from mechmem.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SMALL = (CNNConfig(6, 4, "mean"),)

sys.path.insert(0, str(ROOT / "experiments"))
import run_alignment as run_alignment_cli  # noqa: E402


def synthetic_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Memorization table in the published schema: a third non-memorized, the rest split
    between guessable (repeating) and recalled samples with varied duplicate counts."""
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 3  # 0 non-memo, 1 guess (repeating), 2 recall
    tokens = rng.integers(1, 512, size=(n, 64))
    tokens[kind == 1, 32:] = tokens[kind == 1, :32]  # suffix repeats prefix: ROUGE 1
    from mechmem.heuristics import rouge_columns

    rouge_l, rouge_3 = rouge_columns(tokens)
    return pd.DataFrame({
        "sequence_id": np.arange(1000, 1000 + n, dtype=np.int64),
        "tokens": list(tokens),
        "text": ["x"] * n,
        "memorization_score": np.where(kind == 0, 0.25, 1.0),
        "sequence_duplicates": np.where(kind == 2, rng.integers(0, 20, n), rng.integers(0, 3, n)).astype(np.int64),
        "is_incrementing": np.zeros(n, dtype=bool),
        "is_repeating": kind == 1,
        "rouge_L_prefix_to_suffix": rouge_l,
        "rouge_3_prefix_to_suffix": rouge_3,
        "is_code": np.zeros(n, dtype=bool),
    })


def small_config(**kw):
    rows = (al.Row("merge_2_other_guess_recollect_recite", 5), al.Row("merge_2_other_recite_guess_recollect", 5))
    return al.AlignmentConfig(rows=rows, train_per_class=12, eval_per_class=8, configs=SMALL,
                              train=TrainConfig(protocol="paper", epochs=1, device="cpu"), n_boot=50, **kw)


def test_run_writes_the_paper_table_and_resumes(tmp_path, tiny_model, monkeypatch):
    df = synthetic_frame()
    table = al.run_alignment(tiny_model, df, small_config(), tmp_path, progress=False)
    assert list(pd.read_csv(tmp_path / "alignment.csv").columns) == al.TABLE_COLUMNS + al.CONTROL_COLUMNS
    assert set(table["tax_name"]) == {"Non-Memo, Guess, Others", "Non-Memo, Recite[5], Others"}
    for name in ("alignment.md", "min_f1.png", "confusion_best.png", "confusion_worst.png"):
        assert (tmp_path / name).stat().st_size > 0
    row = table.iloc[0]
    assert 0 <= row.min_f1_ci_low <= row.min_f1 <= row.min_f1_ci_high <= 100
    run = RunFolder(tmp_path)
    assert (run.cnn_folder("merge_2_other_guess_recollect_recite_t5") / "cnns.json").exists()
    # Guess is perfectly visible in attention (the suffix copies the prefix): better than chance.
    guess = run.read_row("merge_2_other_guess_recollect_recite_t5")
    assert guess["class_names"] == ["Non-Memo", "Guess", "Others"]
    assert len(guess["eval_sequence_ids"]) == 3 * 8

    # A second run resumes: no extraction, no training.
    monkeypatch.setattr(al, "train_cnn_tasks", lambda *a, **k: pytest.fail("retrained a finished row"))
    monkeypatch.setattr(F, "_extract", lambda *a, **k: pytest.fail("re-extracted features"))
    again = al.run_alignment(tiny_model, df, small_config(), tmp_path, progress=False)
    pd.testing.assert_frame_equal(again[al.TABLE_COLUMNS], table[al.TABLE_COLUMNS])


def test_a_table_that_knows_its_documents_gets_intervals_over_documents(tmp_path, tiny_model):
    """A `document` column (the second testbed's tables): every interval of a row resamples
    documents, and the table and its ranking say so; the point estimates are those of the run
    without it."""
    from mechmem.data import DOCUMENT

    df = synthetic_frame()
    plain = al.run_alignment(tiny_model, df, small_config(), tmp_path / "plain", progress=False)
    df[DOCUMENT] = np.arange(len(df)) // 3  # three windows a document
    grouped = al.run_alignment(tiny_model, df, small_config(), tmp_path / "grouped", progress=False)
    assert grouped["interval_unit"].str.match(r"documents \(\d+\)").all()
    assert "interval_unit" in pd.read_csv(tmp_path / "grouped" / "alignment.csv").columns
    assert "interval over documents" in (tmp_path / "grouped" / "alignment.md").read_text()
    pd.testing.assert_series_equal(grouped["min_f1"], plain["min_f1"])
    assert "interval_unit" not in plain  # no document column: samples, as always (the effect: test_cnn)


def test_a_table_that_knows_its_sources_breaks_each_rows_confusion_down_by_source(tmp_path, tiny_model):
    """A `source` column (the testbeds'): each row's confusion by source sums to its confusion, for
    the CNNs and the probe; `source_confusion` gives every (class, source) its count and shares."""
    from mechmem.data import SOURCE

    df = synthetic_frame()
    df[SOURCE] = np.where(np.arange(len(df)) % 2, "pattern", "natural")
    al.run_alignment(tiny_model, df, small_config(), tmp_path, progress=False)
    row = RunFolder(tmp_path).read_row("merge_2_other_guess_recollect_recite_t5")
    by_source = {k: np.array(v) for k, v in row["confusion_by_source"].items()}
    assert set(by_source) == {"pattern", "natural"}
    np.testing.assert_array_equal(sum(by_source.values()), np.array(row["confusion"]))
    assert sum(np.array(v) for v in row["probe_confusion_by_source"].values()).sum() == 3 * 8  # one probe
    table = al.source_confusion(row)
    assert table.groupby("true")["n"].sum().to_dict() == {"Non-Memo": 8, "Guess": 8, "Others": 8}
    shares = table[[f"called {c}" for c in row["class_names"]]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0)
    assert "confusion_by_source" in RunFolder(tmp_path).read_row("merge_2_other_recite_guess_recollect_t5")
    long = pd.read_csv(tmp_path / al.BY_SOURCE)
    assert set(long["classifier"]) == {"CNNs", "probe"} and set(long["called"]) >= {"Non-Memo", "Guess", "Others"}
    assert long.groupby(["tax_name", "classifier", "true", "source"])["share"].sum().round(6).eq(1).all()
    plain = tmp_path / "plain"
    al.run_alignment(tiny_model, synthetic_frame(), small_config(), plain, progress=False)
    assert not (plain / al.BY_SOURCE).exists()
    assert "confusion_by_source" not in RunFolder(plain).read_row("merge_2_other_guess_recollect_recite_t5")


def test_the_kind_of_text_baseline_scores_what_sources_alone_tell(tmp_path, tiny_model):
    """min_f1_source: a classifier that sees only each window's source, fitted on the CNNs' training
    samples. Sources that are the classes score 100; sources drawn independently of the classes land
    near chance (the control could say no either way); the table and ranking carry it."""
    from mechmem.data import SOURCE

    df = synthetic_frame()
    kind = np.arange(len(df)) % 3  # synthetic_frame's classes: non-memo, guess, recall
    df[SOURCE] = np.array(["natural", "pattern", "planted"])[kind]
    table = al.run_alignment(tiny_model, df, small_config(), tmp_path / "told", progress=False)
    guess = table.set_index("tax_name").loc["Non-Memo, Guess, Others"]
    assert guess["min_f1_source"] == 100.0 and guess["min_f1_source_ci_low"] == 100.0
    assert not guess["beyond_source"] and "(within the kind-of-text baseline)" in (tmp_path / "told" / "alignment.md").read_text()
    assert "min_f1_source" in pd.read_csv(tmp_path / "told" / "alignment.csv").columns
    assert "| source 100.0" in (tmp_path / "told" / "alignment.md").read_text()
    df[SOURCE] = np.random.default_rng(0).choice(["natural", "pattern", "planted"], len(df))
    blind = al.run_alignment(tiny_model, df, small_config(), tmp_path / "blind", progress=False)
    assert (blind["min_f1_source"] < 50).all()
    # benchmarks/source_baseline.py recomputes it for older runs from the rows' class-grouped ids: the same
    import importlib.util

    spec = importlib.util.spec_from_file_location("source_baseline", ROOT / "benchmarks" / "source_baseline.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name in ("Non-Memo, Guess, Others", "Non-Memo, Recite[5], Others"):
        _, row = RunFolder(tmp_path / "blind").find_row(name)
        again = script.row_baseline(row, df[["sequence_id", SOURCE]].set_index("sequence_id"), n_boot=50, seed=0)
        assert again["min_f1_source"] == pytest.approx(row["min_f1_source"])
        assert again["min_f1_source_ci_low"] == pytest.approx(row["min_f1_source_ci_low"])
    assert script.main([str(tmp_path / "nothing"), "--data", "testbed"]) == 2


def test_a_matched_run_draws_non_memo_like_the_memorized_classes(tmp_path, tiny_model):
    """match_source: Non-Memo takes the memorized classes' source mix, so the kind-of-text baseline
    can no longer use it to find Non-Memo (its score falls); a table without sources is refused."""
    from mechmem.data import SOURCE

    df = synthetic_frame()
    kind = np.arange(len(df)) % 3
    rng = np.random.default_rng(0)  # each class mostly its own kind of text: Non-Memo natural, Guess pattern, Others planted
    mix = np.array([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])[kind]
    df[SOURCE] = np.array(["natural", "pattern", "planted"])[(rng.random(len(df))[:, None] > mix.cumsum(1)).sum(1)]
    cfg = replace(small_config(), rows=(al.Row("merge_2_other_guess_recollect_recite", 5),))
    plain = al.run_alignment(tiny_model, df, cfg, tmp_path / "plain", progress=False)
    matched = al.run_alignment(tiny_model, df, replace(cfg, match_source=True), tmp_path / "matched", progress=False)
    row = RunFolder(tmp_path / "matched").read_row("merge_2_other_guess_recollect_recite_t5")
    ids = np.asarray(row["train_sequence_ids"] + row["eval_sequence_ids"])
    source = df.set_index("sequence_id").loc[ids, SOURCE].to_numpy()
    assert len(ids) == 3 * (12 + 8)  # train ids then eval ids, each grouped by class
    non_memo = np.r_[source[:12], source[36:36 + 8]]  # class 0's train and eval parts
    memorized = np.delete(source, np.r_[0:12, 36:44])
    for kind_of_text in ("natural", "pattern", "planted"):
        assert abs(np.mean(non_memo == kind_of_text) - np.mean(memorized == kind_of_text)) < 0.1
    assert plain["min_f1_source"].iloc[0] > 40 and matched["min_f1_source"].iloc[0] < 20
    with pytest.raises(ValueError, match="source"):
        al.plan_rows(synthetic_frame(), cfg.rows, 12, 8, 0, match_source=True)


def test_source_baseline_calls_each_source_its_most_frequent_class():
    logits = al.source_baseline_logits(np.array(["a", "a", "a", "b", "b"]), np.array([0, 1, 1, 2, 2]),
                                       np.array(["b", "a", "c"]), 3)
    assert logits.argmax(-1).tolist() == [2, 1, 0]  # b -> 2, a -> 1, unseen c -> the first class
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(logits[1].exp(), torch.tensor([2 / 6, 3 / 6, 1 / 6]))  # add-one smoothed


def test_confusion_by_group_counts_each_classifiers_calls():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 0.0]])]
    got = al.confusion_by_group(logits, np.array([0, 1, 1]), np.array(["a", "b", "a"]), 2)
    # a: sample 0 (true 0) called 0 then 1; sample 2 (true 1) called 1 then 0. b: sample 1 (true 1) called 1 twice.
    assert got == {"a": [[1, 1], [1, 1]], "b": [[0, 0], [0, 2]]}


def test_probes_fitted_while_the_cnns_train_give_the_same_table(tmp_path, tiny_model, monkeypatch):
    """With the CNNs on a GPU the probes are fitted meanwhile, in the background: the same fits, so
    the same table (forced here on the CPU), and they did run in the background thread, in worker
    processes (a fit in this process slows the GPU's driver thread)."""
    import threading

    import joblib

    workers = []
    real_parallel = joblib.Parallel

    class SpyParallel(real_parallel):  # type: ignore[misc, valid-type]
        def __init__(self, n_jobs=None, **kwargs):
            workers.append(n_jobs)
            super().__init__(n_jobs=n_jobs, **kwargs)

    df = synthetic_frame()
    inline = al.run_alignment(tiny_model, df, small_config(), tmp_path / "inline", progress=False)
    monkeypatch.setattr(joblib, "Parallel", SpyParallel)
    threads = []
    fit = al._probe_all

    def spy(*args, **kwargs):
        threads.append(threading.current_thread() is not threading.main_thread())
        return fit(*args, **kwargs)

    monkeypatch.setattr(al, "_probes_in_background", lambda cfg: True)
    monkeypatch.setattr(al, "_probe_all", spy)
    meanwhile = al.run_alignment(tiny_model, df, small_config(), tmp_path / "meanwhile", progress=False)
    assert threads and all(threads)
    assert workers and min(workers) >= 2  # never joblib's in-process n_jobs=1
    pd.testing.assert_frame_equal(meanwhile, inline)
    assert meanwhile["min_f1_probe"].notna().all()


def test_resuming_with_other_settings_is_refused_before_anything_is_touched(tmp_path, tiny_model):
    df = synthetic_frame()
    al.run_alignment(tiny_model, df, small_config(), tmp_path, progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    other = al.AlignmentConfig(**{**small_config().__dict__, "train": TrainConfig(protocol="paper", epochs=2, device="cpu",
                                                                                 precision="bf16")})
    with pytest.raises(ValueError, match="train.epochs 1 -> 2; train.precision 'float32' -> 'bf16'") as err:
        al.run_alignment(tiny_model, df, other, tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    # Where the run executes is not a result setting: another device, fusing or batch size resumes.
    same = al.AlignmentConfig(**{**small_config().__dict__, "extraction_batch_size": 3,
                                 "train": TrainConfig(protocol="paper", epochs=1, device="cpu", fuse=True, eval_batch_size=7)})
    al.check_resume(tmp_path, same)


def test_several_cnn_seeds_average_the_score_and_report_its_spread(tmp_path, tiny_model):
    df = synthetic_frame()
    one = al.run_alignment(tiny_model, df, small_config(), tmp_path / "one", progress=False)
    two = al.run_alignment(tiny_model, df, small_config(cnn_seeds=2), tmp_path / "two", progress=False)
    al.run_alignment(tiny_model, df, replace(small_config(), train=replace(small_config().train, seed=1)),
                     tmp_path / "next", progress=False)
    for row in small_config().rows:
        record = RunFolder(tmp_path / "two").read_row(row.slug)
        first, second = record["min_f1_per_seed"]
        # the first seed is the single-seed run, CNN for CNN; the second trains other CNNs
        alone = RunFolder(tmp_path / "one").read_row(row.slug)
        assert first == pytest.approx(alone["min_f1"])
        a, b = (RunFolder(tmp_path / "two").load_cnns(row.slug, k) for k in (0, 1))
        c = RunFolder(tmp_path / "one").load_cnns(row.slug)
        assert torch.equal(a[0].model.layers.fc2.weight, c[0].model.layers.fc2.weight)
        assert not torch.equal(a[0].model.layers.fc2.weight, b[0].model.layers.fc2.weight)
        # ...the second is a single-seed run under the next training seed (both seeds train in one pass)
        d = RunFolder(tmp_path / "next").load_cnns(row.slug)
        assert all(torch.equal(x.model.layers.fc2.weight, y.model.layers.fc2.weight) for x, y in zip(b, d))
        assert record["min_f1"] == pytest.approx((first + second) / 2)
        assert record["min_f1_seed_sd"] == pytest.approx(abs(first - second) / np.sqrt(2))
        assert record["n_configs"] == 2 * len(SMALL)
    csv = pd.read_csv(tmp_path / "two" / "alignment.csv")
    assert list(csv.columns) == al.TABLE_COLUMNS + al.CONTROL_COLUMNS + [al.SEED_COLUMN]
    assert list(pd.read_csv(tmp_path / "one" / "alignment.csv").columns) == al.TABLE_COLUMNS + al.CONTROL_COLUMNS
    assert "seeds sd" in al.ranking_text(two) and "seeds sd" not in al.ranking_text(one)
    with pytest.raises(ValueError, match="cnn_seeds must be >= 1"):
        small_config(cnn_seeds=0)


def test_non_memorized_samples_are_shown_with_the_models_own_continuation(tiny_model):
    from mechmem.memorization import greedy_continuation

    df = synthetic_frame(30)
    positions = np.array([0, 1, 3])  # kinds 0 (non-memo), 1 (memorized), 0
    view = al.generate_model_view(tiny_model, df, positions)
    original = np.stack(df["tokens"].to_numpy()[positions])
    np.testing.assert_array_equal(view[1], original[1])
    np.testing.assert_array_equal(view[:, :32], original[:, :32])
    expected = greedy_continuation(tiny_model, original[[0, 2], :32], progress=False)
    np.testing.assert_array_equal(view[[0, 2], 32:], np.asarray(expected))


def test_rows_short_of_samples_are_skipped_with_the_reason(tmp_path, tiny_model, caplog):
    df = synthetic_frame()
    cfg = small_config()
    cfg = al.AlignmentConfig(**{**cfg.__dict__, "rows": cfg.rows + (al.Row("merge_2_other_recite_guess_recollect", 1000),)})
    with caplog.at_level("INFO", logger="mechmem"):
        al.run_alignment(tiny_model, df, cfg, tmp_path, progress=False)
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert list(skipped) == ["Non-Memo, Recite[1k], Others"]
    assert any("Recite[1k]" in r.getMessage() and r.name == "mechmem.alignment" for r in caplog.records)


def test_rouge_sweep_reuses_one_feature_extraction(tmp_path, tiny_model, monkeypatch):
    df = synthetic_frame()
    calls = []
    real = F.build_feature_store
    monkeypatch.setattr(al, "build_feature_store", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep = tuple(r for r in al.sweep_rows((0.3, 0.6)))
    al.run_alignment(tiny_model, df, small_config(sweep=sweep), tmp_path, progress=False)
    assert len(calls) == 1
    rouge = pd.read_csv(tmp_path / "rouge_sweep.csv")
    assert list(rouge.columns[:3]) == ["Rouge-L", "Rouge-3", "Threshold"]
    assert len(rouge) == 6 and set(rouge["Threshold"]) == {0.3, 0.6}
    store = F.FeatureStore.load(tmp_path / "features")
    needed = al.plan_rows(df, small_config().rows + sweep, 12, 8, 0).samples
    assert store.manifest["n_samples"] == len(needed)


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run_alignment.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--taxonomies", "Non-Memo, Banana, Others"], "taxonomy"),
    (["--rouge-threshold", "1.5"], "--rouge-threshold"),
    (["--duplicates-thresholds", "-3", "--taxonomies", "merge_2_other_guess_recollect_recite"], "thresholds"),
    (["--model", "./no/such/model", "--data", "{data}"], "no/such/model"),
    (["--configs", "k6_c10_median"], "k6_c10_median"),
    (["--cnn-precision", "fp8"], "fp8"),
    (["--cnn-seeds", "0"], "--cnn-seeds"),
    (["--data", "missing.parquet", "--model", "{model}"], "missing.parquet"),
    (["--data", "{data}", "--model", "{model}", "--match-source"], "needs a 'source' column"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "memo.parquet"
    synthetic_frame(30).to_parquet(data)
    args = [a.format(data=data, model=tiny_checkpoint) for a in args]
    code = run_alignment_cli.main([*args, "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_cli_takes_every_config_name_the_configs_produce():
    configs = (CNNConfig(6, 4, "mean", n_feat_fc=32), CNNConfig(5, 4, "max", dropout=0.25))
    assert run_alignment_cli._configs([c.name for c in configs], "quick") == configs


def test_cli_runs_end_to_end_on_a_local_model_and_table(tmp_path, tiny_checkpoint):
    data = tmp_path / "memo.parquet"
    synthetic_frame().to_parquet(data)
    out = tmp_path / "out"
    result = _cli("--model", str(tiny_checkpoint), "--data", str(data), "--taxonomies", "Non-Memo, Guess, Others",
                  "--configs", "k6_c4_mean", "--train-per-class", "10", "--eval-per-class", "5", "--epochs", "1",
                  "--n-boot", "20", "--device", "cpu", "--cnn-precision", "bf16", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Non-Memo, Guess, Others" in result.stdout
    assert pd.read_csv(out / "alignment.csv").shape[0] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == str(data) and config["config"]["train"]["precision"] == "bf16"
    # ...which reads back into the dataclasses: the settings the script checks on resume
    saved = RunFolder(out).read_config()
    assert saved.config.configs == (CNNConfig(6, 4, "mean"),) and saved.config.train.epochs == 1
    assert al.result_settings(saved.config) == json.loads((out / "settings.json").read_text())
    # Resuming into it with other settings: one line, exit 2, the folder as it was.
    result = _cli("--model", str(tiny_checkpoint), "--data", str(data), "--taxonomies", "Non-Memo, Guess, Others",
                  "--configs", "k6_c4_mean", "--train-per-class", "10", "--eval-per-class", "5", "--epochs", "2",
                  "--n-boot", "20", "--device", "cpu", "--cnn-precision", "bf16", "--quiet", "--out", str(out))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "epochs 1 -> 2" in result.stderr
    assert json.loads((out / "config.json").read_text()) == config
    # The training protocol is a result setting: recorded, and a resume with the other one is refused.
    settings = json.loads((out / "settings.json").read_text())
    assert settings["train.protocol"] == "converged" and settings["train.input_scaling"] == "log-pixel"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code = run_alignment_cli.main(["--model", str(tiny_checkpoint), "--data", str(data), "--taxonomies",
                                   "Non-Memo, Guess, Others", "--configs", "k6_c4_mean", "--train-per-class", "10",
                                   "--eval-per-class", "5", "--epochs", "1", "--n-boot", "20", "--device", "cpu",
                                   "--cnn-precision", "bf16", "--quiet", "--out", str(out), "--training", "paper"])
    assert code == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_cli_loads_without_compatibility_mode_when_asked(tmp_path, tiny_checkpoint, monkeypatch):
    import mechmem.models as models

    data = tmp_path / "memo.parquet"
    synthetic_frame().to_parquet(data)
    seen, real = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: seen.append(kw["compatibility_mode"]) or real(*a, **kw))
    common = ["--model", str(tiny_checkpoint), "--data", str(data), "--taxonomies", "Non-Memo, Guess, Others",
              "--configs", "k6_c4_mean", "--train-per-class", "10", "--eval-per-class", "5", "--epochs", "1",
              "--n-boot", "20", "--device", "cpu", "--quiet"]
    for flag, out in (([], tmp_path / "a"), (["--no-compatibility-mode"], tmp_path / "b")):
        assert run_alignment_cli.main([*common, *flag, "--out", str(out)]) == 0
    assert seen == [True, False]
    assert [json.loads((tmp_path / d / "config.json").read_text())["compatibility_mode"] for d in "ab"] == [True, False]


def test_settings_cover_every_config_field_but_the_resumable_ones():
    """A field added to AlignmentConfig or TrainConfig is a result setting unless listed as resumable."""
    from dataclasses import fields

    settings = al.result_settings(small_config())
    expected = {f.name for f in fields(al.AlignmentConfig) if f.name != "train"} | \
        {f"train.{f.name}" for f in fields(TrainConfig)}
    assert set(settings) == expected - al.RESUMABLE_FIELDS
    assert {"train.protocol", "train.input_scaling", "train.patience", "controls", "probe"} <= set(settings)
    assert al.RESUMABLE_FIELDS <= expected  # no stale names


def test_control_scores_chance_where_the_cnn_scores_near_100():
    """A synthetic separable task: the CNNs find it, the same CNNs on shuffled labels do not."""
    from mechmem.cnn import Task, alignment_summary, train_cnn_tasks
    from mechmem.controls import shuffled_control

    g = torch.Generator().manual_seed(0)
    n, n_classes = 360, 3
    labels = np.arange(n) % n_classes
    feats = 0.3 * torch.rand(n, 1, 3, 16, 16, generator=g)
    feats[torch.arange(n), :, torch.from_numpy(labels)] += torch.eye(16)  # class = the bright layer's index
    task = Task(labels, np.arange(240), np.arange(240, n))
    control = shuffled_control(task, seed=0)
    np.testing.assert_array_equal(control.labels[240:], labels[240:])  # eval labels untouched
    assert sorted(control.labels[:240]) == sorted(labels[:240]) and (control.labels[:240] != labels[:240]).any()
    cfg = (CNNConfig(3, 8, "mean", n_feat_fc=32),)
    real, shuffled = train_cnn_tasks(feats.half(), ("mean",), [task, control], n_classes, cfg,
                                     TrainConfig(device="cpu", epochs=40, batch_size=16), progress=False)
    assert alignment_summary(real, labels[240:], n_boot=50)["min_f1"] > 95
    chance = 100 / n_classes
    assert alignment_summary(shuffled, labels[240:], n_boot=50)["min_f1"] < chance + 8


def _table(**extra):
    base = {"tax_name": ["A", "B", "C"], "num_classes": [3, 3, 4], "min_f1": [70.0, 65.0, 40.0],
            "min_f1_ci_low": [66.0, 60.0, 35.0], "min_f1_ci_high": [74.0, 68.0, 45.0]}
    return pd.DataFrame({**base, **extra})


def test_ranking_lists_overlapping_ranks_and_flags_rows_within_their_control():
    table = _table(min_f1_control=[5.0, 3.0, 30.0], min_f1_control_ci_high=[9.0, 6.0, 38.0],
                   min_f1_probe=[71.0, 60.0, 50.0], min_f1_chance=[100 / 3, 100 / 3, 25.0],
                   aligned=[True, True, False], paper_12b_min_f1=[np.nan, 80.0, 60.0])
    assert al.overlapping_ranks(table) == [[2], [1], []]  # A and B overlap (66 <= 68); C overlaps none
    lines = al.ranking_text(table).splitlines()[2:]
    assert lines[0].startswith(" 1.  70.0 [ 66.0,  74.0]") and lines[0].endswith("A  ~ 2")
    assert "probe  71.0" in lines[0] and "control   5.0" in lines[0] and "paper  -  " in lines[0]
    assert "NOT ALIGNED" in lines[2] and "NOT ALIGNED" not in lines[0] + lines[1]
    assert "~" not in lines[2]
    md = al.ranking_text(table, markdown=True)
    assert md.startswith("```\n") and md.endswith("```\n")


def test_min_f1_figure_draws_the_controls(tmp_path, monkeypatch):
    import mechmem.plots as plots

    drawn = []
    real = plots.plt.Axes.scatter
    monkeypatch.setattr(plots.plt.Axes, "scatter", lambda self, *a, **k: drawn.append(k["label"]) or real(self, *a, **k))
    table = _table(min_f1_control=[5.0, 3.0, 30.0], min_f1_probe=[71.0, 60.0, 50.0],
                   min_f1_chance=[100 / 3, 100 / 3, 25.0], paper_12b_min_f1=[np.nan, 80.0, 60.0],
                   aligned=[True, True, False])
    plots.min_f1_bar_png(table, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert drawn == ["probe (attention statistics)", "shuffled-label control", "chance (100 / classes)",
                     "paper, Pythia-12B"]
    drawn.clear()
    plots.min_f1_bar_png(_table(), tmp_path / "g.png")  # a table without controls: bars only
    assert drawn == []


def test_paper_agreement_reads_the_table_as_the_report_does():
    """Spearman with the paper per class count, the headline row's rank, CNN against probe: on a table
    whose answers are known (3-class rows in the paper's order, 4-class rows reversed)."""
    import pandas as pd

    rows = [("Non-Memo, Guess, Others", 3, 70.0, 90.0), ("A", 3, 60.0, 80.0), ("B", 3, 50.0, 70.0),
            ("C", 4, 40.0, 60.0), ("D", 4, 45.0, 50.0), ("E", 4, 50.0, 40.0), ("no paper figure", 3, 80.0, None)]
    table = pd.DataFrame(rows, columns=["tax_name", "num_classes", "min_f1", "paper_12b_min_f1"])
    table["min_f1_ci_low"], table["min_f1_ci_high"] = table["min_f1"] - 2, table["min_f1"] + 2
    table["min_f1_probe"] = [75.0, 59.0, 40.0, 40.0, 45.0, 50.0, 80.0]  # above, tie, below, tie...
    table["min_f1_probe_ci_low"], table["min_f1_probe_ci_high"] = table["min_f1_probe"] - 1, table["min_f1_probe"] + 1
    out = al.paper_agreement(table)
    assert out["headline_row"] == {"name": "Non-Memo, Guess, Others", "rank": 2, "of": 7, "min_f1": 70.0}
    sp = out["spearman_with_paper_12b"]
    assert sp["3 classes"]["rho"] == pytest.approx(1.0) and sp["3 classes"]["rows"] == 3
    assert sp["4 classes"]["rho"] == pytest.approx(-1.0) and sp["all"]["rows"] == 6
    assert out["cnn_vs_probe"] == {"cnn_above_probe_interval": 1, "probe_above_cnn_interval": 1,
                                   "cnn_at_or_above_probe": 6, "rows": 7}
