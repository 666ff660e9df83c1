"""The sharding of extraction and CNN training across torchrun ranks, run for real on CPU with gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mechmem.cnn import PAPER_GRID
from mechmem.distributed import Dist, init_from_env, shard_configs
from mechmem.features import FeatureStore, build_feature_store
from mechmem.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ranks_share_the_grid_without_overlap_and_keep_fused_groups_whole(world):
    shards = [shard_configs(PAPER_GRID, Dist(r, world)) for r in range(world)]
    flat = [c for s in shards for c in s]
    assert sorted(c.name for c in flat) == sorted(c.name for c in PAPER_GRID)
    assert all(shards), "a rank was left without work"
    for s in shards:
        assert list(s) == [c for c in PAPER_GRID if c in s]  # the grid's order
        if world <= 4:  # 4 shape groups: a group never straddles two ranks
            keys = {c.shape_key for c in s}
            assert sorted(c.name for c in s) == sorted(c.name for c in PAPER_GRID if c.shape_key in keys)


def test_round_robin_share():
    items = list(range(7))
    assert [Dist(r, 3).share(items) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


def test_without_torchrun_the_job_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == Dist()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_worker(rank, world, port, checkpoint, folder, tokens, stop):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from mechmem.models import load_model

    model = load_model(checkpoint, device="cpu")
    build_feature_store(folder, model, np.arange(len(tokens)), tokens, chunk_size=3, batch_size=2,
                        progress=False, dist=Dist(rank, world), _stop_after_chunks=stop)
    torch.distributed.destroy_process_group()


def test_two_ranks_fill_one_store_equal_to_one_process(tmp_path, tiny_checkpoint, tiny_model, tiny_tokens):
    single = build_feature_store(tmp_path / "one", tiny_model, np.arange(10), tiny_tokens, chunk_size=3,
                                 batch_size=2, progress=False)
    # Two ranks, interrupted after one round: chunks 0 and 1 (one a rank) are done, 2 and 3 are not.
    mp.spawn(_store_worker, args=(2, _free_port(), str(tiny_checkpoint), tmp_path / "two", tiny_tokens, 1), nprocs=2)
    partial = FeatureStore.load(tmp_path / "two")
    assert partial.done.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(np.asarray(partial.features[:6]), np.asarray(single.features[:6]))
    # Resumed by a single process: the store does not depend on how many ranks filled it.
    two = build_feature_store(tmp_path / "two", tiny_model, np.arange(10), tiny_tokens, batch_size=2, progress=False)
    assert two.complete
    np.testing.assert_array_equal(np.asarray(two.features), np.asarray(single.features))
    assert two.manifest["content_sha256"] == single.manifest["content_sha256"]
    two.verify()


def _cli(out: Path, data: Path, checkpoint: Path, nproc: int):
    args = ["--model", str(checkpoint), "--data", str(data), "--taxonomies", "Non-Memo, Guess, Others",
            "Non-Memo, Recite[5], Others", "--configs", "k6_c4_mean", "k6_c4_max", "k8_c4_mean",
            "--train-per-class", "12", "--eval-per-class", "8", "--epochs", "1", "--n-boot", "50",
            "--device", "cpu", "--chunk-size", "16", "--cnn-seeds", "2", "--quiet", "--out", str(out)]
    script = str(ROOT / "experiments" / "run_alignment.py")
    launch = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs: same float summation order
    return subprocess.run(launch + args, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def test_torchrun_on_two_ranks_equals_the_single_process_run(tmp_path, tiny_checkpoint):
    from test_alignment import synthetic_frame

    data = tmp_path / "memo.parquet"
    synthetic_frame().to_parquet(data)
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        result = _cli(out, data, tiny_checkpoint, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = out
    one, two = runs[1], runs[2]
    run_one, run_two = RunFolder(one), RunFolder(two)
    assert run_two.read_config().extra["world_size"] == 2
    store = run_two.feature_store()
    assert len(store.done) > 2  # several chunks, so both ranks extracted some
    np.testing.assert_array_equal(np.asarray(store.features), np.asarray(run_one.feature_store().features))
    pd.testing.assert_frame_equal(pd.read_csv(run_two.table_file), pd.read_csv(run_one.table_file))
    for slug, a in run_one.rows().items():
        b = run_two.read_row(slug)
        assert a == b, slug
        assert len(a["min_f1_per_seed"]) == 2
        for seed in (0, 1):  # both training seeds
            folder_one, folder_two = run_one.cnn_folder(slug, seed), run_two.cnn_folder(slug, seed)
            index = json.loads((folder_two / "cnns.json").read_text())["models"]
            assert index == ["k6_c4_mean", "k6_c4_max", "k8_c4_mean"]
            for name in index:
                x, y = load_file(str(folder_one / f"{name}.safetensors")), load_file(
                    str(folder_two / f"{name}.safetensors"))
                for key in x:
                    torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-6)
