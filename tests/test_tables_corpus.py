"""Corpus readers: every format gives the tokens and documents it holds; bad corpora fail in one line."""

import json

import numpy as np
import pytest

from mechmem.tables.corpus import Corpus, document_starts, read_megatron_index, read_tokens, write_megatron


def _docs(seed=0, n=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 500, int(rng.integers(3, 90))) for _ in range(n)]


def test_megatron_roundtrip_keeps_tokens_and_document_boundaries(tmp_path):
    docs = _docs()
    bin_path = write_megatron(tmp_path / "part", docs, dtype=np.uint16)
    dtype, sizes, pointers, doc_idx = read_megatron_index(tmp_path / "part.idx")
    assert dtype == np.uint16 and list(sizes) == [len(d) for d in docs] and len(doc_idx) == len(docs) + 1
    for given in (tmp_path, bin_path, tmp_path / "part.idx", tmp_path / "part"):  # folder, either file, prefix
        corpus = Corpus.open(given)
        (f,) = corpus.files
        assert f.kind == "megatron" and f.n_tokens == sum(map(len, docs))
        np.testing.assert_array_equal(read_tokens(f, 0, f.n_tokens), np.concatenate(docs))
        np.testing.assert_array_equal(document_starts(f), np.cumsum([0] + [len(d) for d in docs[:-1]]))
    np.testing.assert_array_equal(read_tokens(f, 5, 20), np.concatenate(docs)[5:20])
    every = document_starts(f)
    for a, b in ((1, 200), (every[3], every[7]), (every[3] + 1, f.n_tokens)):  # a shard's documents, by bisection
        np.testing.assert_array_equal(document_starts(f, start=a, stop=b), every[(every >= a) & (every < b)])


def test_npy_folder_is_one_stream_a_file_in_path_order(tmp_path):
    a, b = np.arange(100, dtype=np.uint16), np.arange(50, 130, dtype=np.int32)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "a.npy", a)
    (tmp_path / "notes.md").write_text("not a corpus file: skipped")
    corpus = Corpus.open(tmp_path)
    assert [f.n_tokens for f in corpus.files] == [100, 80] and corpus.n_tokens == 180
    np.testing.assert_array_equal(corpus.offsets(), [0, 100])
    np.testing.assert_array_equal(read_tokens(corpus.files[1], 0, 80), b)
    shards = corpus.shards(30)
    assert [(s.start, s.stop) for s in shards] == [(0, 30), (30, 60), (60, 90), (90, 100), (0, 30), (30, 60),
                                                     (60, 80)]
    assert len({s.key for s in shards}) == len(shards)


def test_text_and_jsonl_are_tokenized_with_the_models_tokenizer_and_eos(tmp_path):
    from mechmem.tables.relabel import load_tokenizer

    tok = load_tokenizer("testbed")
    (tmp_path / "one.txt").write_text("def f(x):\n    return x + 1\n")
    lines = ["import os", {"text": "print('hi')"}, {"text": "x = 1"}]
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    corpus = Corpus.open(tmp_path, tokenizer="testbed")
    one, two = corpus.files
    assert (one.kind, two.kind) == ("text", "jsonl")
    expected = []
    for text in ["import os", "print('hi')", "x = 1"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(read_tokens(two, 0, two.n_tokens, "testbed"), expected)
    starts = document_starts(two, "testbed")
    assert len(starts) == 3 and starts[0] == 0
    assert [s.stop for s in corpus.shards(4)] == [one.n_tokens, two.n_tokens]  # a text file: one shard


def _put(path, data: bytes):
    path.write_bytes(data)
    return path


def _npy(path, array):
    np.save(path, array)
    return path


def _dir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: _dir(d / "empty"), "no readable corpus file"),
    (lambda d: _put(d / "x.idx", b"MMIDIDX\x00\x00"), "no data file x.bin"),
    (lambda d: _put(d / "x.bin", b"\x00" * 8), "no index x.idx"),
    (lambda d: _put(d / "x.bin", b"\x00" * 8) and _put(d / "x.idx", b"NOTMEGATRON" + b"x" * 30), "not a Megatron index"),
    (lambda d: _npy(d / "x.npy", np.zeros((3, 3), dtype=np.int64)), "1-D integer"),
])
def test_bad_corpora_fail_in_one_line(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        Corpus.open(make(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bin_that_does_not_match_its_index_is_refused(tmp_path):
    write_megatron(tmp_path / "p", _docs(), dtype=np.uint16)
    with open(tmp_path / "p.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="describes"):
        Corpus.open(tmp_path)


def test_text_needs_a_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="tokenizer"):
        Corpus.open(tmp_path)


def test_probe_finds_ids_outside_the_vocabulary(tmp_path):
    np.save(tmp_path / "a.npy", np.array([1, 2, 3, 60000, 4], dtype=np.uint16))
    assert Corpus.open(tmp_path).probe_max_token() == 60000


def test_files_of_the_same_name_in_two_folders_are_two_shards(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "part.npy", np.arange(100))
    shards = Corpus.open(tmp_path).shards(1000)
    assert len(shards) == 2 and shards[0].key != shards[1].key
