"""The monitor's ground truth on the testbed: the rebuilt training stream and its window index."""

import json
import sys

import numpy as np
import pytest

from mechmem.testbed import MANIFEST_FILE, membership
from mechmem.testbed.corpus import Corpus
from mechmem.testbed.duplicates import WindowIndex


def small_corpus(seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    windows = {"stream": np.zeros(1, np.int8), "position": np.zeros(1, np.int64), "source": np.array(["stdlib"]),
               "planted_count": np.zeros(1, np.int64), "family": np.array([""])}
    return Corpus(rng.integers(0, 50, 400).astype(np.uint16), rng.integers(0, 50, 100).astype(np.uint16), windows,
                  {"stdlib_dir": "nowhere"})


def manifest_for(tmp_path, corpus: Corpus | None, python: str) -> str:
    import hashlib

    sha = hashlib.sha256(corpus.train_stream.tobytes()).hexdigest() if corpus is not None else "0" * 64
    real = json.loads(MANIFEST_FILE.read_text())
    real["corpus"].update(python=python, train_stream_sha256=sha)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(real))
    return path


def test_window_index_contains_exactly_the_streams_windows():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 5, 300).astype(np.uint16)
    index = WindowIndex(stream, 6)
    inside = np.stack([stream[p:p + 6] for p in range(0, 290, 13)])
    outside = np.full((1, 6), 7)  # a token the stream never has
    assert index.contains(inside).all() and not index.contains(outside).any()
    brute = [sum((stream[i:i + 6] == w).all() for i in range(len(stream) - 5)) for w in inside]
    np.testing.assert_array_equal(index.count(inside, progress=False), brute)
    with pytest.raises(ValueError, match=r"\[n, 6\]"):
        index.contains(np.zeros((2, 5), dtype=np.int64))


def test_a_cached_corpus_with_the_manifests_hash_is_used_as_it_is(tmp_path, monkeypatch):
    corpus = small_corpus()
    corpus.save(tmp_path / "cache")
    monkeypatch.setattr(membership, "build_corpus", lambda *a, **k: pytest.fail("rebuilt a good cache"))
    got = membership.training_corpus(tmp_path / "cache", manifest_for(tmp_path, corpus, "0.0.0"))
    np.testing.assert_array_equal(got.train_stream, corpus.train_stream)
    index = membership.membership_index(got, width=8)
    assert index.contains(corpus.train_stream[None, 10:18].astype(np.int64)).all()


def test_another_python_cannot_rebuild_the_stream(tmp_path):
    small_corpus(seed=1).save(tmp_path / "cache")  # a cache of another corpus: not the testbed's
    with pytest.raises(ValueError, match="only on Python 0.0.1") as err:
        membership.training_corpus(tmp_path / "cache", manifest_for(tmp_path, None, "0.0.1"))
    assert "\n" not in str(err.value)


def test_a_rebuild_that_differs_is_refused(tmp_path, monkeypatch):
    here = sys.version.split()[0]
    monkeypatch.setattr(membership, "build_corpus", lambda *a, **k: (small_corpus(seed=2), None))
    with pytest.raises(ValueError, match="differs"):
        membership.training_corpus(tmp_path / "cache", manifest_for(tmp_path, None, here))
    assert not (tmp_path / "cache" / "train_stream.npy").exists()  # nothing wrong is cached
