"""Counting over a corpus: Dask on a LocalCluster of 2 processes equals the in-memory exact count,
shard boundaries and files are handled, and a killed count resumes per shard."""

import numpy as np
import pytest

from mechmem.tables import count as C
from mechmem.tables.corpus import Corpus, write_megatron
from mechmem.testbed.duplicates import count_windows


def _corpus(tmp_path, seed=0):
    """Two .npy streams and a Megatron file, low-entropy so that windows repeat, a passage planted across."""
    rng = np.random.default_rng(seed)
    passage = rng.integers(0, 60, 20)
    streams = []
    for k in range(2):
        parts = [rng.integers(0, 3, rng.integers(5, 60)) for _ in range(40)]
        for i in range(0, 40, 5):
            parts[i] = np.concatenate([parts[i], passage])
        streams.append(np.concatenate(parts).astype(np.uint16))
        np.save(tmp_path / f"s{k}.npy", streams[-1])
    docs = [np.concatenate([rng.integers(0, 3, 30), passage]) for _ in range(6)]
    write_megatron(tmp_path / "m", docs, dtype=np.uint16)
    streams.append(np.concatenate(docs).astype(np.uint16))
    return Corpus.open(tmp_path), streams, passage


def _queries(streams, passage, w=8, seed=0):
    rng = np.random.default_rng(seed)
    q = [s[p:p + w] for s in streams for p in rng.integers(0, len(s) - w, 40)]
    q += [passage[:w], passage[5:5 + w], rng.integers(100, 200, w)]  # planted 21 times; absent
    return np.stack(q).astype(np.int64)


def _in_memory(streams, queries):
    """The in-memory exact count (the testbed's WindowIndex), file by file: no window spans two files."""
    return sum(count_windows(s, queries, progress=False) for s in streams)


def test_dask_on_two_worker_processes_equals_the_in_memory_count(tmp_path):
    """Through a scheduler address (the cluster path); build_table's tests take the default LocalCluster."""
    from dask.distributed import LocalCluster

    corpus, streams, passage = _corpus(tmp_path)
    queries = _queries(streams, passage)
    expected = _in_memory(streams, queries)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cfg = C.CountConfig(scheduler=cluster.scheduler_address, tokens_per_shard=97)  # windows across shards
        result = C.count_sequences(corpus, queries, cfg, progress=False)
    assert result.engine == f"dask {cluster.scheduler_address} (2 workers)" and result.shards > 10
    np.testing.assert_array_equal(result.counts, expected)
    assert expected[-3] >= 21 and expected[-1] == 0
    assert result.windows_scanned == sum(len(s) - 7 for s in streams)
    serial = C.count_sequences(corpus, queries, C.CountConfig(scheduler="synchronous", tokens_per_shard=1000),
                               progress=False)
    np.testing.assert_array_equal(serial.counts, expected)


def test_document_scope_counts_only_windows_inside_a_document(tmp_path):
    from mechmem.tables.corpus import document_starts

    corpus, streams, passage = _corpus(tmp_path)
    megatron = streams[2]
    starts = document_starts(corpus.files[0])
    docs = np.split(megatron, starts[1:])
    q = np.stack([megatron[p:p + 8] for p in range(starts[1] - 6, starts[1] + 2)] + [passage[:8]]).astype(np.int64)
    expected = _in_memory(streams[:2] + docs, q)  # each document on its own: no window crosses one
    cfg = C.CountConfig(scheduler="synchronous", scope="document", tokens_per_shard=40)
    doc = C.count_sequences(corpus, q, cfg, progress=False)
    np.testing.assert_array_equal(doc.counts, expected)
    stream = C.count_sequences(corpus, q, C.CountConfig(scheduler="synchronous", tokens_per_shard=40), progress=False)
    np.testing.assert_array_equal(stream.counts, _in_memory(streams, q))
    assert (stream.counts[:6] > doc.counts[:6]).all()  # windows across a boundary count only in stream scope
    assert doc.counts[-1] == stream.counts[-1] >= 21   # the planted passage lies inside its documents


def test_a_killed_count_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    corpus, streams, passage = _corpus(tmp_path / "c")
    queries = _queries(streams, passage)
    cfg = C.CountConfig(scheduler="synchronous", tokens_per_shard=200)
    real, calls = C.count_shard, []

    def dies_on_the_fourth(shard, *a, **k):
        calls.append(shard.key)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(shard, *a, **k)

    monkeypatch.setattr(C, "count_shard", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        C.count_sequences(corpus, queries, cfg, work_dir=tmp_path / "work", progress=False)
    (saved,) = list((tmp_path / "work").iterdir())
    assert len(list(saved.glob("*.npz"))) == 3 and not list(saved.glob(".*"))  # 3 done, nothing torn
    calls.clear()
    monkeypatch.setattr(C, "count_shard", lambda shard, *a, **k: calls.append(shard.key) or real(shard, *a, **k))
    result = C.count_sequences(corpus, queries, cfg, work_dir=tmp_path / "work", progress=False)
    assert result.shards_resumed == 3 and len(calls) == result.shards - 3
    np.testing.assert_array_equal(result.counts, _in_memory(streams, queries))
    # other samples never reuse these results
    other = C.count_sequences(corpus, queries[:5], cfg, work_dir=tmp_path / "work", progress=False)
    assert other.shards_resumed == 0


@pytest.mark.parametrize("field, value, message", [
    ("scope", "line", "scope"), ("tokens_per_shard", 0, "tokens_per_shard"), ("workers", 0, "workers"),
    ("scheduler", "my-cluster", "tcp://"),
])
def test_bad_settings_are_refused(field, value, message):
    cfg = C.CountConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.check()


def test_a_rewritten_corpus_file_is_counted_again(tmp_path):
    import os

    np.save(tmp_path / "a.npy", np.tile(np.arange(10), 20))
    query = np.arange(8)[None]
    cfg = C.CountConfig(scheduler="synchronous")
    assert C.count_sequences(Corpus.open(tmp_path), query, cfg, work_dir=tmp_path / "w", progress=False).counts[0] == 20
    np.save(tmp_path / "a.npy", np.tile(np.arange(10), 30))
    os.utime(tmp_path / "a.npy", ns=(1, 1))  # even with an old modification time: the size changed
    again = C.count_sequences(Corpus.open(tmp_path), query, cfg, work_dir=tmp_path / "w", progress=False)
    assert again.shards_resumed == 0 and again.counts[0] == 30
