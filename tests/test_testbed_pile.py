"""The second testbed end to end at toy size on the CPU (`--tiny`): corpus pack, one ordered pass,
log-spaced checkpoints as Hugging Face folders with their own true labels, manifest, loading by name."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mechmem.testbed import pile_regime
from mechmem.testbed.corpus import WINDOW, Corpus
from mechmem.testbed.pile_regime import TINY_NAME, checkpoint_folder, checkpoint_steps, checkpoints, log_steps
from mechmem.testbed.train import ChunkSampler, Stopped, TrainConfig, seen_tokens, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build in a fresh cache: the one command, every stage."""
    from mechmem.testbed.build import main

    mp = pytest.MonkeyPatch()
    mp.setenv("MECHMEM_CACHE", str(tmp_path_factory.mktemp("cache")))
    with pytest.raises(SystemExit) as done:
        main(["--preset", "pile-regime", "--tiny", "--device", "cpu"])
    assert done.value.code == 0
    out = pile_regime.testbed_dir(TINY_NAME)
    yield out, json.loads((out / "manifest.json").read_text()), Corpus.load(out / "work" / "corpus")
    mp.undo()


def test_log_steps_and_seen_tokens():
    assert log_steps(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert log_steps(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert checkpoint_steps(1680, 3) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1188, 1352, 1516, 1680]
    assert checkpoint_steps(100, 0) == log_steps(100) and checkpoint_steps(65, 3) == log_steps(65)  # no room
    assert checkpoint_steps(1, 3) == [0, 1]
    cfg = TrainConfig(ctx=8, batch_size=2, shuffle_chunks=False)
    assert seen_tokens(0, cfg, 1000) == 1 and seen_tokens(3, cfg, 1000) == 3 * 2 * 8 + 1
    assert seen_tokens(10_000, cfg, 1000) is None                   # past one pass: all of it
    assert seen_tokens(3, TrainConfig(shuffle_chunks=True), 1000) is None  # shuffled: no prefix


def test_first_pass_reads_the_stream_in_order():
    stream = torch.arange(200)
    cfg = TrainConfig(ctx=8, batch_size=3, shuffle_chunks=False)
    sampler = ChunkSampler(stream, cfg, np.random.default_rng(0))
    rows = torch.cat([sampler.next() for _ in range(4)])
    assert torch.equal(rows[:, 0], torch.arange(12) * 8)             # chunk k starts at k * ctx
    assert torch.equal(rows[5], torch.arange(40, 49))                # ctx + 1 tokens each
    seen = seen_tokens(4, cfg, len(stream))
    assert int(rows.max()) + 1 == seen                               # exactly the prefix it reports


def test_stopped_training_resumes_to_the_same_weights(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.integers(1, 60, 3000).astype(np.uint16)
    cfg = TrainConfig(n_layers=1, d_model=32, n_heads=2, ctx=16, batch_size=4, steps=12, warmup_steps=2,
                      n_positions=64, shuffle_chunks=False)
    whole, _ = train(stream, 64, cfg, log_every=4)
    state, saved = tmp_path / "state.pt", []
    with pytest.raises(Stopped):
        train(stream, 64, cfg, log_every=4, resume_from=state, stop_after=0.0,
              checkpoint_steps={0, 4}, on_checkpoint=lambda s, m: saved.append(s))
    assert state.exists() and saved == [0]
    resumed, log = train(stream, 64, cfg, log_every=4, resume_from=state,
                         checkpoint_steps={0, 4}, on_checkpoint=lambda s, m: saved.append(s))
    assert saved == [0, 4, 12] and log["steps"] == 12
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_checkpoints_are_log_spaced_hugging_face_folders(built):
    out, manifest, corpus = built
    steps = [s for s, _ in checkpoints(out)]
    final = manifest["training"]["steps"]
    assert len(steps) >= 8 and steps == checkpoint_steps(final, 2) and manifest["final"] == f"step{final}"
    assert steps[-3:-1] == [144, 161] and manifest["config"]["late_checkpoints"] == 2
    for step, folder in checkpoints(out):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "memorization.parquet"} <= names, step
    cfg = json.loads((out / "checkpoints" / "step0" / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["num_hidden_layers"] == 2
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"  # as the weights are
    # the checkpoints differ: training moved the weights between them
    from safetensors.torch import load_file
    a, b = (load_file(out / "checkpoints" / f"step{s}" / "model.safetensors") for s in (0, final))
    assert not torch.equal(a["embed_out.weight"], b["embed_out.weight"])
    assert {t.dtype for t in b.values()} == {torch.float16}


def test_one_pass_and_manifest_record_the_build(built):
    out, manifest, corpus = built
    log = manifest["training"]
    assert 1.0 <= log["epochs"] <= 1.5 and log["config"]["shuffle_chunks"] is False
    assert log["loss_curve"][-1][1] < log["loss_curve"][0][1]
    m = manifest["corpus"]
    assert m["train_tokens"] == len(corpus.train_stream)
    assert m["train_stream_sha256"] == hashlib.sha256(corpus.train_stream.tobytes()).hexdigest()
    # every file is in the manifest with its hash, and the pack's record agrees
    assert len(m["files"]) == m["pack"]["files"] and all(len(f["sha256"]) == 64 for f in m["files"])
    assert {f["role"] for f in m["files"]} == {"stdlib", "heldout", "pool"}
    assert m["passages"] and m["patterns"]["n_heldout"] > 0
    for step, info in manifest["checkpoints"].items():
        table_file = out / "checkpoints" / step / "memorization.parquet"
        assert info["files"]["memorization.parquet"]["sha256"] == hashlib.sha256(table_file.read_bytes()).hexdigest()
        assert [r["duplicates"] for r in info["rate_by_duplicates"]][0] == "0 (never seen)"
    assert (out / "testbed_memorization.png").stat().st_size > 1000
    assert (out / "checkpoints.png").stat().st_size > 1000
    text = (out / "summary.md").read_text()
    assert f"{m['train_tokens']:,} tokens" in text and f"{log['n_params']:,} parameters" in text
    assert sum(line.startswith("| step") for line in text.splitlines()) == len(manifest["checkpoints"])


def test_each_checkpoint_has_its_own_true_labels(built):
    from mechmem.memorization import greedy_continuation
    from transformers import GPTNeoXForCausalLM

    out, manifest, corpus = built
    stream = corpus.train_stream
    final = manifest["final"]
    for step in ("step4", final):
        table = pd.read_parquet(out / "checkpoints" / step / "memorization.parquet")
        tokens = np.stack(table["tokens"].to_numpy())
        # greedy labels: re-decoded by that checkpoint
        model = GPTNeoXForCausalLM.from_pretrained(out / "checkpoints" / step, dtype=torch.float32)
        rows = np.random.default_rng(0).choice(len(table), 24, replace=False)
        again = greedy_continuation(model, torch.as_tensor(tokens[rows, :32]), 32, progress=False).numpy()
        np.testing.assert_array_equal(again, np.stack(table["greedy_suffix"].to_numpy()[rows]))
        np.testing.assert_allclose(table["memorization_score"].to_numpy()[rows], (again == tokens[rows, 32:]).mean(1))
        # duplicates: brute force over the part of the stream the checkpoint had trained on
        seen = manifest["checkpoints"][step]["tokens_seen"]
        limit = len(stream) if seen >= len(stream) else max(0, seen - WINDOW + 1)
        all_windows = np.lib.stride_tricks.sliding_window_view(stream, WINDOW)
        for r in rows[:8]:
            hits = np.flatnonzero((all_windows == tokens[r]).all(axis=1))
            assert table["stream_duplicates"].iloc[r] == len(hits)
            assert table["sequence_duplicates"].iloc[r] == (hits < limit).sum()
    early = pd.read_parquet(out / "checkpoints" / "step4" / "memorization.parquet")
    late = pd.read_parquet(out / "checkpoints" / final / "memorization.parquet")
    assert early["sequence_duplicates"].sum() < late["sequence_duplicates"].sum()  # data seen grows
    assert (early["stream_duplicates"] == late["stream_duplicates"]).all()


def test_loaded_by_name(built):
    from mechmem.data import load_memorization_data
    from mechmem.models import load_model

    out, manifest, _ = built
    final = manifest["final"]
    df = load_memorization_data(TINY_NAME, progress=False)
    assert df.attrs["greedy_model"] == f"{TINY_NAME}@{final}" and len(df) > 200
    assert {"in_training", "planted_count", "source", "greedy_suffix", "stream_duplicates"} <= set(df.columns)
    early = load_memorization_data(f"{TINY_NAME}@step2", progress=False)
    assert early.attrs["greedy_model"] == f"{TINY_NAME}@step2"
    assert checkpoint_folder(TINY_NAME, "step2") == checkpoint_folder(f"{TINY_NAME}@step2")
    model = load_model(TINY_NAME, device="cpu", revision="step2")
    assert model.mechmem_name == f"{TINY_NAME}@step2" and model.cfg.n_layers == 2
    final_model = load_model(TINY_NAME, device="cpu")
    assert final_model.mechmem_name == df.attrs["greedy_model"]  # the alignment runner reuses greedy_suffix
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step3'"):
        checkpoint_folder(TINY_NAME, "step3")


def test_every_window_knows_its_document(built):
    """The `document` column (the unit the alignment intervals resample): the EOS-delimited document
    of the stream that holds the window; every window lies inside it."""
    from mechmem.data import DOCUMENT, load_memorization_data
    from mechmem.testbed.corpus import EOS
    from mechmem.testbed.table import HELDOUT_ID_OFFSET
    from tokenizers import Tokenizer

    out, manifest, corpus = built
    df = load_memorization_data(TINY_NAME, progress=False)
    eos = Tokenizer.from_file(str(out / "work" / "corpus" / "tokenizer.json")).token_to_id(EOS)
    streams = (corpus.train_stream, corpus.heldout_stream)
    for seq, doc in zip(df["sequence_id"].to_numpy(), df[DOCUMENT].to_numpy()):
        s, pos = divmod(int(seq), HELDOUT_ID_OFFSET)
        assert doc // HELDOUT_ID_OFFSET == s
        ends = np.flatnonzero(streams[s] == eos)
        before = ends[doc % HELDOUT_ID_OFFSET - 1] if doc % HELDOUT_ID_OFFSET else -1
        after = ends[doc % HELDOUT_ID_OFFSET] if doc % HELDOUT_ID_OFFSET < len(ends) else len(streams[s])
        assert before < pos and pos + WINDOW <= after
    assert df[DOCUMENT].nunique() < len(df)  # planted passages and patterns give several windows a document


def test_the_final_checkpoint_by_its_bare_name_takes_its_own_labels(built):
    """`run_alignment.py --model testbed-pile --data testbed-pile`: both name the final checkpoint,
    so its labels are its own; an earlier checkpoint's table is refused in one line."""
    from mechmem.data import load_memorization_data
    from mechmem.models import load_model
    from mechmem.tables.relabel import check_labels

    model = load_model(TINY_NAME, device="cpu")
    df = load_memorization_data(TINY_NAME, progress=False)
    assert check_labels(df, model, TINY_NAME, None) is df
    early = load_memorization_data(f"{TINY_NAME}@step2", progress=False)
    with pytest.raises(ValueError, match=f"labels are {TINY_NAME}@step2's, the model is {TINY_NAME}@step"):
        check_labels(early, model, TINY_NAME, None)


def test_not_built_says_which_command_builds_it(tmp_path, monkeypatch):
    from mechmem.data import load_memorization_data
    from mechmem.models import ModelNotFound, load_model

    monkeypatch.setenv("MECHMEM_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="--preset pile-regime --device cuda`"):
        load_model("testbed-pile", device="cpu")
    with pytest.raises(FileNotFoundError, match="--preset pile-regime --device cuda --tiny"):
        load_memorization_data("testbed-pile-tiny@step4")


def test_build_command_line_refuses_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MECHMEM_CACHE", str(tmp_path))
    assert pile_regime.main(["--preset", "pile-regime", "--epochs", "3"]) == 2
    assert "at most 1.5 epochs" in capsys.readouterr().err
    assert pile_regime.main(["--preset", "pile-regime", "--pack", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no corpus pack" in err
    if not torch.cuda.is_available():
        assert pile_regime.main(["--preset", "pile-regime", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "testbed-pile").exists()  # refused before any work


def test_rerun_resumes_instead_of_redoing(built):
    out, manifest, _ = built
    final = out / "checkpoints" / manifest["final"]
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert pile_regime.main(["--preset", "pile-regime", "--tiny", "--device", "cpu", "--stages", "train,label"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before  # trained and labelled once


def test_label_from_leaves_early_checkpoints_unlabelled(built, tmp_path):
    """--label-from: the checkpoints before it keep their weights but get no table, and the manifest
    says which they are (the GPU build skips those the first build found nothing extractable in)."""
    out, manifest, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for step in ("step0", "step1", "step2", "step4"):
        (copy / "checkpoints" / step / pile_regime.TABLE_FILE).unlink()
    args = ["--preset", "pile-regime", "--tiny", "--device", "cpu", "--out", str(copy), "--stages", "label,report",
            "--label-from", "4"]
    assert pile_regime.main(args) == 0
    again = json.loads((copy / "manifest.json").read_text())
    assert again["unlabelled_checkpoints"] == ["step0", "step1", "step2"]
    assert list(again["checkpoints"]) == [s for s in manifest["checkpoints"] if s not in ("step0", "step1", "step2")]
    assert (copy / "checkpoints" / "step4" / pile_regime.TABLE_FILE).exists()  # relabelled: at or after 4
    assert not (copy / "checkpoints" / "step2" / pile_regime.TABLE_FILE).exists()
    assert (copy / "checkpoints" / "step2" / "model.safetensors").exists()
    assert again["checkpoints"][again["final"]]["class_counts"] == manifest["checkpoints"][manifest["final"]]["class_counts"]


def test_the_checkpoint_study_takes_each_checkpoints_own_labels(built, tmp_path, monkeypatch):
    """experiments/checkpoints.py over this testbed by name (`--model testbed-pile --revisions ...
    --data 'testbed-pile@{revision}'`): each checkpoint is found (a missing one refused in one line),
    and its own table, labelled at build time, is taken as it is: nothing decoded again."""
    import pandas as pd

    import mechmem.tables.checkpoints as ckm
    from mechmem.data import load_memorization_data
    from mechmem.models import ModelNotFound, load_model
    from mechmem.tables.relabel import check_available

    check_available(TINY_NAME, "step4")
    with pytest.raises(ModelNotFound, match="no checkpoint 'step3'"):
        check_available(TINY_NAME, "step3")
    ck = ckm.Checkpoint(TINY_NAME, "step4", 4)
    df = load_memorization_data(ckm.data_name(f"{TINY_NAME}@{{revision}}", ck), progress=False)
    model = load_model(TINY_NAME, device="cpu", revision="step4")
    monkeypatch.setattr(ckm, "relabel_table", lambda *a, **k: pytest.fail("decoded again"))
    labels = pd.read_parquet(ckm.label_checkpoint(df, model, ck, tmp_path / "labels.parquet", progress=False))
    assert set(labels["label_model"]) == {TINY_NAME} and set(labels["label_revision"]) == {"step4"}
    np.testing.assert_array_equal(labels["memorization_score"], df["memorization_score"])


def test_the_monitor_evaluation_reads_this_testbeds_corpus(built):
    """benchmarks/monitor_eval.py --model testbed-pile: the build's corpus (its windows carry the
    sources the monitor's held-out prompts are drawn from) and its membership index."""
    from mechmem.monitor_eval import SOURCES, EvalConfig, TrainingOverlap, heldout_prompts
    from mechmem.testbed.membership import membership_index, testbed_corpus

    out, manifest, corpus = built
    loaded = testbed_corpus(f"{TINY_NAME}@step4")
    np.testing.assert_array_equal(loaded.train_stream, corpus.train_stream)
    assert set(np.asarray(loaded.windows["source"])) <= set(SOURCES)
    prompts, _ = heldout_prompts(loaded, TrainingOverlap(np.zeros((0, 64), dtype=np.int64), 32), 0,
                                 EvalConfig(prompts_per_source=3))
    assert len(prompts) and set(prompts["source"]) >= {"heldout", "stdlib"}
    index = membership_index(loaded)
    assert index.contains(loaded.train_stream[None, 100:132].astype(np.int64)).all()
    with pytest.raises(ValueError, match="not a testbed"):
        testbed_corpus("EleutherAI/pythia-160m")


def test_label_dtype_check_finds_every_changed_label(built, tmp_path):
    """benchmarks/label_dtype.py: decoding the final checkpoint again in float32 (as the tiny build
    labelled it) changes nothing; a table whose labels were changed is caught window by window."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "label_dtype.py"
    spec = importlib.util.spec_from_file_location("label_dtype", path)
    label_dtype = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(label_dtype)
    out, manifest, _ = built
    assert label_dtype.main(["--model", f"{TINY_NAME}@{manifest['final']}", "--device", "cpu",
                             "--out", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["continuation_differs"] == same["score_differs"] == 0 and same["windows"] > 200
    table = pd.read_parquet(checkpoint_folder(TINY_NAME) / "memorization.parquet")
    greedy = np.stack(table["greedy_suffix"].to_numpy())
    tokens = np.stack(table["tokens"].to_numpy())
    greedy[:3, -1] = (greedy[:3, -1] + 1) % 512          # three continuations differ in their last token
    greedy[3:5] = tokens[3:5, 32:]                         # two windows become extractable
    changed = label_dtype.compare(table, greedy)
    assert changed["continuation_differs"] == 5
    extractable = int((table["memorization_score"] == 1).sum())
    assert changed["extractable"]["again"] == extractable + int((table["memorization_score"].iloc[3:5] < 1).sum())


def test_study_sizes_follow_what_the_labels_allow():
    """The pile study's sizes from the manifest's class counts: the full sizes where the classes hold
    them (the grid keeping 500 more held out), else shares of the smallest class; the checkpoint
    study on the last six checkpoints that hold its sizes, sized by the first of the last three with
    60 a class (not the final alone when the third-last has none)."""
    from mechmem.testbed.pile_regime import study_sizes

    def manifest(smallest_by_step):
        return {"checkpoints": {f"step{s}": {"class_counts": {
            "Non-Memo, Guess, Others (rho 0.5)": {"Non-Memo": 90000, "Guess": 5000, "Others": n},
            "other_recite_reconstruct_recollect (t 5)": {"Non-Memo": 90000, "Recite": 1}}}
            for s, n in smallest_by_step.items()}}

    big = study_sizes(manifest({2**k: 600 * k for k in range(10)}))  # final 5400, third-last 4200
    assert big == {"grid": (1000, 500), "checkpoints": (300, 150),
                   "revisions": ["step16", "step32", "step64", "step128", "step256", "step512"]}
    first_build = study_sizes(manifest({0: 0, 256: 0, 512: 0, 1024: 22, 1680: 189}))  # 2026-12-06
    assert first_build == {"grid": (94, 47), "checkpoints": (126, 63), "revisions": ["step1680"]}
    grown = study_sizes(manifest({512: 40, 1024: 300, 1680: 1200, 2048: 1900}))
    assert grown == {"grid": (950, 475), "checkpoints": (200, 100), "revisions": ["step1024", "step1680", "step2048"]}
    rebuild = study_sizes(manifest({512: 0, 1024: 256, 1680: 682}))  # 2026-12-06, second build
    assert rebuild == {"grid": (341, 170), "checkpoints": (170, 85), "revisions": ["step1024", "step1680"]}
    fourth = study_sizes(manifest({1024: 48, 1680: 2136}))  # 2026-12-07: one checkpoint qualifies
    assert fourth == {"grid": (1000, 500), "checkpoints": (300, 150), "revisions": ["step1680"]}
    late = study_sizes(manifest({1024: 48, 1188: 300, 1352: 700, 1516: 1300, 1680: 2136}))  # with late checkpoints
    assert late == {"grid": (1000, 500), "checkpoints": (300, 150), "revisions": ["step1352", "step1516", "step1680"]}


def test_the_study_runs_only_the_steps_asked_for(tmp_path):
    """benchmarks/pile_study.sh with STEPS: the other steps are skipped and said so (a python3 on PATH
    that only records its arguments stands in for the steps' commands)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "python3").write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "REVISIONS": "step1 step2", "DEVICE": "cpu"}

    def study(steps: str | None) -> tuple[str, list[str]]:
        calls.unlink(missing_ok=True)
        run = subprocess.run(["bash", str(root / "benchmarks" / "pile_study.sh"), str(tmp_path / "out")],
                             cwd=root, env={**env, "STEPS": steps} if steps is not None else env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout, calls.read_text().split() if calls.exists() else []

    out, ran = study("grid checkpoints")
    assert ran == ["experiments/run_alignment.py", "experiments/checkpoints.py"]
    assert all(f"== {s} skipped (STEPS)" in out for s in ("localize", "ablate", "seeds", "matched", "monitor"))
    assert "grid skipped" not in out and "checkpoints skipped" not in out
    _, ran = study(None)  # unset: every step (the grid, seeds and matched are run_alignment.py)
    assert sorted(ran) == sorted(["experiments/run_alignment.py", "experiments/localize.py", "experiments/ablate_heads.py",
                                  "experiments/run_alignment.py", "experiments/run_alignment.py",
                                  "experiments/checkpoints.py", "benchmarks/monitor_eval.py"])


def test_the_waiting_call_mirrors_results_and_stops_when_the_job_is_done(tmp_path):
    """benchmarks/pile_wait.sh: results and the log land in OUT while the job runs; it returns at once
    when RUN/done exists, and after SECONDS when not."""
    import subprocess
    import time

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pile_wait.sh"
    run, out, log = tmp_path / "run", tmp_path / "out", tmp_path / "run.log"
    (run / "study").mkdir(parents=True)
    (run / "results.tgz").write_bytes(b"build")
    (run / "study" / "summary.tgz").write_bytes(b"study")
    log.write_text("== train\rstep 1 3.2 it/s\rstep 2\n== label done in 27 s\n")
    t0 = time.monotonic()
    waited = subprocess.run(["bash", str(script), str(run), str(log), str(out), "1"], capture_output=True, text=True)
    assert waited.returncode == 0 and "job still running" in waited.stdout and "== label done in 27 s" in waited.stdout
    assert (out / "results.tgz").read_bytes() == b"build" and (out / "summary.tgz").read_bytes() == b"study"
    assert gzip.decompress((out / "run.log.gz").read_bytes()) == log.read_bytes()
    (run / "results.tgz").write_bytes(b"build, then study")
    (run / "done").write_text("0\n")
    done = subprocess.run(["bash", str(script), str(run), str(log), str(out), "600"], capture_output=True, text=True)
    assert done.returncode == 0 and "job done, exit 0" in done.stdout and time.monotonic() - t0 < 60
    assert (out / "results.tgz").read_bytes() == b"build, then study"
    assert subprocess.run(["bash", str(script), str(run)], capture_output=True).returncode == 2


@pytest.mark.slow
def test_the_whole_study_runs_on_a_tiny_build_that_memorizes(tmp_path, monkeypatch):
    """benchmarks/pile_study.sh end to end on the CPU (minutes): a tiny build trained long enough to
    memorize, then the grid (two rows), localization, ablation, the headline row again with two seeds,
    the checkpoint study and the monitor (two lanes side by side), each leaving its outputs; a checkpoint without enough
    samples is skipped and recorded; pile_report.py reads it all."""
    import os
    import subprocess
    import tarfile

    monkeypatch.setenv("MECHMEM_CACHE", str(tmp_path / "cache"))
    assert pile_regime.main(["--preset", "pile-regime", "--tiny", "--device", "cpu", "--steps", "3000"]) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "TRAIN_PER_CLASS": "30", "EVAL_PER_CLASS": "15",
           "CK_TRAIN_PER_CLASS": "40", "CK_EVAL_PER_CLASS": "20", "REVISIONS": "step256 step3000", "SEEDS": "2",
           "GRID_TAXONOMIES": "Non-Memo, Guess, Others;Non-Memo, Recite[50], Others"}
    out = tmp_path / "study"
    done = subprocess.run(["bash", str(root / "benchmarks" / "pile_study.sh"), str(out), TINY_NAME], env=env,
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grid = pd.read_csv(out / "grid" / "alignment.csv")
    assert set(grid["tax_name"]) == {"Non-Memo, Guess, Others", "Non-Memo, Recite[50], Others"}
    assert grid["interval_unit"].str.startswith("documents").all()
    for path in ("localize/heads.csv", "ablate/ablation.csv", "monitor/metrics.csv", "checkpoints/checkpoints.csv",
                 "matched/alignment.csv"):
        assert (out / path).stat().st_size > 0, path
    assert pd.read_csv(out / "seeds" / "alignment.csv")["min_f1_seed_sd"].notna().all()  # the headline row, 2 seeds
    assert grid["min_f1_source"].between(0, 100).all() and (out / "grid" / "by_source.csv").stat().st_size > 0
    assert "kind of text (source)" in set(pd.read_csv(out / "monitor" / "metrics.csv")["method"])
    assert list(json.loads((out / "checkpoints" / "skipped_checkpoints.json").read_text())) == ["step256"]
    ablation = pd.read_csv(out / "ablate" / "ablation.csv")  # 20 random draws a k: rank p down to 1/21
    assert (ablation.loc[ablation["condition"] == "random", "n_draws"] == 20).all()
    assert ablation.loc[ablation["condition"] == "targeted", "rank_p_below"].between(1 / 21 - 1e-6, 1).all()  # (6 decimals)
    with tarfile.open(out / "summary.tgz") as tgz:
        assert {"grid/alignment.csv", "localize/heads.csv", "ablate/ablation.csv", "seeds/alignment.csv",
                "monitor/metrics.csv", "checkpoints/checkpoints.csv"} <= set(tgz.getnames())  # both lanes'
    assert not list(out.glob("summary.tgz.part*"))
    report = subprocess.run(["python3", str(root / "benchmarks" / "pile_report.py"), str(out), "--first", "none"],
                            cwd=root, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| **Non-Memo, Guess, Others** |" in report.stdout and "| taxonomy | step3000 |" in report.stdout
    assert "over 2 training seeds, seed sd" in report.stdout
    assert "| kind of text |" in report.stdout and "| true class | source | samples |" in report.stdout
    assert "- Non-Memo, Guess, Others: " in report.stdout.split("Non-Memo matched by source")[1]


def test_the_report_quotes_the_shipped_study(tmp_path, capsys):
    """benchmarks/pile_report.py on the GPU study's shipped files (laid out as pile_study.sh
    writes them): the figures the testbed page quotes, the first testbed beside them; missing parts
    are said so, a missing grid is one line and exit 2."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pile_report", root / "benchmarks" / "pile_report.py")
    pile_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pile_report)
    shipped = root / "docs" / "results" / "pile_testbed"
    study = tmp_path / "study"
    shutil.copytree(shipped / "grid", study / "grid")
    shutil.copytree(shipped / "monitor", study / "monitor")
    assert pile_report.main([str(study)]) == 0
    assert "| Guess | pattern | 294 | 0.7% | 99.3% | 0.0% |" in capsys.readouterr().out
    (study / "grid" / "by_source.csv").unlink()
    assert pile_report.main([str(study)]) == 0
    text = capsys.readouterr().out
    assert ("| **Non-Memo, Guess, Others** | 95.7 [94.1, 96.9] | 91.6 | 34.6 | 20.0 | 37.0 [31.6, 42.0] "
            "| 61.8 [59.1, 64.2] (13 of 26) | 65.7 | 89.2 |") in text  # (the kind of text: the runner's own columns)
    assert "the first testbed over the same 8 rows: 0.45 (p = 0.26)" in text
    assert "Spearman with the paper's 12B figures, all: 0.29 (p = 0.49, 8 rows)" in text
    assert "CNN at or above the probe on 8 of 8 rows, above the probe's interval on 8" in text
    assert "recited vs not, confidence (mean log-prob): AUROC 0.858 [0.731, 0.946]" in text
    assert "Guess vs Recall (recited), monitor (CNNs): AUROC 0.979 [0.929, 1.000]" in text
    assert "untrained CNNs (initialisations): AUROC mean 0.857" in text
    assert "Guess vs Recall (recited), kind of text (source): AUROC 0.451 [0.198, 0.699]" in text
    assert "the checkpoint study did not run" in text and "no seed spread" in text
    assert "localization did not run" in text and "the ablation did not run" in text
    assert "no grid/by_source.csv" in text and "no matched/alignment.csv" in text
    pd.DataFrame({"tax_name": "Non-Memo, Guess, Others", "classifier": ["CNNs"] * 4 + ["probe"], "true": "Non-Memo",
                  "source": ["pattern", "pattern", "stdlib", "stdlib", "pattern"], "n": [20, 20, 30, 30, 20],
                  "called": ["Non-Memo", "Guess", "Non-Memo", "Guess", "Guess"], "share": [0.25, 0.75, 1.0, 0.0, 0.5],
                  }).to_csv(study / "grid" / "by_source.csv", index=False)
    assert pile_report.main([str(study)]) == 0
    text = capsys.readouterr().out
    assert "| Non-Memo | pattern | 20 | 25.0% | 75.0% |" in text and "| Non-Memo | stdlib | 30 | 100.0% | 0.0% |" in text
    for part in ("localize", "ablate", "matched"):
        shutil.copytree(shipped / part, study / part)
    # the third build's two checkpoints (the fourth build's study has one)
    shutil.copytree(shipped.parent / "pile_testbed_third_build_checkpoints", study / "checkpoints")
    assert pile_report.main([str(study)]) == 0
    text = capsys.readouterr().out
    assert "- Guess: layer 11 0.19, layer 3 0.15, layer 7 0.11 of the importance; top heads L11H10, L11H7, L11H6, L0H8, L11H3" in text
    assert ("- top 8 for Guess (L0H8;L0H10;L0H11;L11H0;L11H3;L11H6;L11H7;L11H10): Non-Memo loss 2.590 vs 2.567, +0.023 "
            "[+0.007, +0.040]; Guess extractable 0.738 vs 0.881, -0.144 [-0.225, -0.064], rank p 0.09; Others "
            "extractable 0.950 vs 0.892, +0.058 [-0.003, +0.124], rank p 0.73") in text  # 0 and 7 of 10 draws as low
    assert "- Non-Memo, Guess, Others: 95.5 [93.6, 97.1] (as drawn: 95.7); probe 90.4" in text
    assert ("| Non-Memo, Guess, Others | 96.4 [93.0, 99.1], probe 94.7, control 35.2 | 90.0 [86.3, 93.2], probe 86.4, "
            "control 26.1 |") in text
    (study / "checkpoints" / "checkpoints.csv").unlink()  # min F1 alone where the full table is missing
    assert pile_report.main([str(study)]) == 0
    assert "| Non-Memo, Guess, Others | 96.4 | 90.0 |" in capsys.readouterr().out
    quick = root / "docs" / "results" / "testbed_quick"  # a run with three training seeds
    (study / "seeds").mkdir()
    for name in ("alignment.csv", "settings.json"):
        shutil.copy(quick / name, study / "seeds" / name)
    assert pile_report.main([str(study)]) == 0
    assert "- Non-Memo, Guess, Others: 62.3 [57.1, 66.7] over 3 training seeds, seed sd 2.4" in capsys.readouterr().out
    # A rehearsal's two rows: no Spearman (fewer than 3 rows), no probe, no headline row.
    (study / "grid" / "paper_agreement.json").write_text(json.dumps({"rows": 2}))
    assert pile_report.main([str(study), "--first", "none"]) == 0
    text = capsys.readouterr().out
    assert "fewer than 3 rows" in text and "no probe in this run" in text and "not among the feasible rows" in text
    assert "first testbed" not in text
    shutil.rmtree(study / "grid")
    assert pile_report.main([str(study)]) == 2
    assert "no " in capsys.readouterr().err
