"""Window hashes and the exact count: equal to brute force, whatever the hash does."""

import collections

import numpy as np
import pytest

from mechmem.tables.windows import BASE, SampleSet, valid_starts, window_hashes


def _naive_hashes(stream, width, base=BASE):
    n = len(stream) - width + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            h = h * np.uint64(base) + (stream[j:j + n].astype(np.uint64) + np.uint64(1))
    return h


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 13, 64])
def test_doubling_hash_is_the_polynomial_hash(width):
    stream = np.random.default_rng(width).integers(0, 50000, 400)
    np.testing.assert_array_equal(window_hashes(stream, width), _naive_hashes(stream, width))
    rows = np.stack([stream[p:p + width] for p in (0, 17, 100)])
    np.testing.assert_array_equal(window_hashes(rows, width)[:, 0], _naive_hashes(stream, width)[[0, 17, 100]])


def _brute(stream, queries, docs=None):
    w = queries.shape[1]
    ok = valid_starts(len(stream), w, docs)
    c = collections.Counter(tuple(stream[i:i + w]) for i in range(len(stream) - w + 1) if ok[i])
    return np.array([c[tuple(q)] for q in queries])


def _stream(seed=0):
    rng = np.random.default_rng(seed)
    passage = rng.integers(0, 50, 30)
    parts = [rng.integers(0, 4, rng.integers(5, 40)) for _ in range(60)]
    for i in range(0, 60, 4):  # a passage planted 15 times in a low-entropy stream
        parts[i] = np.concatenate([parts[i], passage])
    return np.concatenate(parts), rng


@pytest.mark.parametrize("base", [BASE, 1, 0])  # 1: every permutation collides; 0: only the last token counts
def test_counts_are_exact_even_when_every_hash_collides(base):
    stream, rng = _stream()
    w = 8
    queries = np.stack([stream[p:p + w] for p in rng.integers(0, len(stream) - w, 200)] +
                       [rng.integers(0, 50, w), stream[:w][::-1]])  # absent; a permutation (collides at base 1)
    samples = SampleSet(queries, base)
    got = samples.per_sample(*samples.count(stream))
    np.testing.assert_array_equal(got, _brute(stream, queries))
    assert got.max() >= 15


def test_forced_collision_cannot_inflate_a_count():
    stream = np.array([1, 2, 3, 3, 2, 1, 2, 1, 3], dtype=np.int64)
    query = np.array([[1, 2, 3]])  # under base 1 every permutation of (1, 2, 3) hashes alike: 3 candidates
    samples = SampleSet(query, base=1)
    assert (window_hashes(stream, 3, 1) == samples.hashes[0]).sum() == 3
    assert samples.per_sample(*samples.count(stream)).tolist() == [1]


def test_documents_and_limit_restrict_the_windows_counted():
    stream, rng = _stream(1)
    docs = np.array([0, 100, 250, 400])
    queries = np.stack([stream[p:p + 6] for p in range(0, len(stream) - 6, 9)])
    samples = SampleSet(queries)
    np.testing.assert_array_equal(samples.per_sample(*samples.count(stream, doc_starts=docs)),
                                  _brute(stream, queries, docs))
    head = samples.per_sample(*samples.count(stream, limit=300))
    np.testing.assert_array_equal(head, _brute(stream[:305], queries))


def test_duplicate_samples_each_get_the_count():
    stream = np.tile(np.arange(5), 4)
    samples = SampleSet(np.array([[0, 1, 2], [0, 1, 2], [4, 0, 1]]))
    assert len(samples) == 2
    assert samples.per_sample(*samples.count(stream)).tolist() == [4, 4, 3]
