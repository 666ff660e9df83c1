"""Samples drawn from a corpus: seeded, distinct, traceable to their position, within documents when asked."""

import numpy as np
import pytest

from mechmem.tables import samples as S
from mechmem.tables.corpus import Corpus, document_starts, write_megatron


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, int(n)) for n in rng.integers(10, 200, 30)]
    write_megatron(tmp_path / "m", docs)
    np.save(tmp_path / "z.npy", rng.integers(0, 1000, 500).astype(np.uint16))
    return Corpus.open(tmp_path)


def _stream(corpus):
    from mechmem.tables.corpus import read_tokens

    return np.concatenate([read_tokens(f, 0, f.n_tokens) for f in corpus.files])


@pytest.mark.parametrize("sampling", S.SAMPLINGS)
def test_samples_are_seeded_distinct_and_found_at_their_id(corpus, sampling):
    ids, tokens = S.draw(corpus, 200, seed=3, sampling=sampling)
    again, _ = S.draw(corpus, 200, seed=3, sampling=sampling)
    other, _ = S.draw(corpus, 200, seed=4, sampling=sampling)
    np.testing.assert_array_equal(ids, again)
    assert not np.array_equal(ids, other)
    assert len(np.unique(ids)) == 200 and tokens.shape == (200, 64)
    stream = _stream(corpus)
    np.testing.assert_array_equal(tokens, stream[ids[:, None] + np.arange(64)])
    offsets, lengths = corpus.offsets(), corpus.lengths()
    k = np.searchsorted(offsets, ids, side="right") - 1
    assert (ids - offsets[k] + 64 <= np.array(lengths)[k]).all()  # never across two files


def test_document_sampling_never_crosses_a_boundary(corpus):
    ids, _ = S.draw(corpus, 300, seed=0, sampling="documents")
    megatron = corpus.files[0]
    starts = document_starts(megatron)
    ends = np.append(starts[1:], megatron.n_tokens)
    inside = ids[ids < megatron.n_tokens]
    d = np.searchsorted(starts, inside, side="right") - 1
    assert len(inside) and (inside + 64 <= ends[d]).all()


def test_more_samples_than_the_corpus_holds_is_refused(corpus):
    have = S.available(corpus, "positions")
    assert have == sum(n - 63 for n in corpus.lengths())
    with pytest.raises(ValueError, match="more than the corpus can give"):
        S.draw(corpus, have + 1)
    assert len(S.draw(corpus, have)[0]) == have  # every window, once
