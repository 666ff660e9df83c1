"""Memorization tables: sources (file, folder, published splits, testbed), schema errors, derived columns."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from mechmem import data, heuristics

CODE = "def f(x):\n    return {k: v for k, v in x.items() if v is not None}\n"
PROSE = "The weather was mild for the season, and most of the village walked down to the harbour."


def make_frame(n: int = 12, seed: int = 0, first_id: int = 0) -> pd.DataFrame:
    """A table in the published schema (no derived columns), plus an extra column to keep."""
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 50, 64) for _ in range(n)]
    tokens[0][32:] = tokens[0][:32]  # suffix repeats prefix: ROUGE 1
    return pd.DataFrame({
        "sequence_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "tokens": tokens,
        "text": [CODE if i % 2 else PROSE for i in range(n)],
        "memorization_score": np.round(rng.random(n), 3),
        "sequence_duplicates": rng.integers(0, 2000, n),
        "is_incrementing": rng.random(n) < 0.3,
        "is_repeating": rng.random(n) < 0.3,
        "huffman_coding_length": rng.random(n) * 100,
    })


def test_parquet_roundtrip_adds_derived_columns(tmp_path):
    df = make_frame()
    df.to_parquet(tmp_path / "t.parquet")
    out = data.load_memorization_data(tmp_path / "t.parquet")
    assert list(out.columns[:len(df.columns)]) == list(df.columns)  # extra columns kept, in order
    for c in data.DERIVED:
        assert c in out.columns
    assert out["sequence_id"].dtype == np.int64 and out["is_code"].dtype == bool
    assert out["is_code"].tolist() == [heuristics.is_code(t) for t in df["text"]] == [bool(i % 2) for i in range(12)]
    rl, r3 = heuristics.rouge_columns(np.stack(df["tokens"]))
    np.testing.assert_array_equal(out["rouge_L_prefix_to_suffix"], rl)
    np.testing.assert_array_equal(out["rouge_3_prefix_to_suffix"], r3)
    assert out["rouge_L_prefix_to_suffix"].iloc[0] == 1.0
    tokens = data.tokens_array(out)
    assert tokens.shape == (12, 64) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, np.stack(df["tokens"]))
    assert out.attrs["source"] == str(tmp_path / "t.parquet")


def test_jsonl_and_existing_derived_columns_are_kept(tmp_path):
    df = make_frame().assign(is_code=True, rouge_L_prefix_to_suffix=0.25, rouge_3_prefix_to_suffix=0.0)
    df = df.assign(tokens=[t.tolist() for t in df["tokens"]])
    path = tmp_path / "t.jsonl"
    df.to_json(path, orient="records", lines=True)
    out = data.load_memorization_data(str(path))
    assert out["is_code"].all()                      # not recomputed
    assert (out["rouge_L_prefix_to_suffix"] == 0.25).all()
    assert isinstance(out["tokens"].iloc[0], np.ndarray)


def test_folder_concatenates_and_drops_duplicate_ids(tmp_path):
    a, b = make_frame(6, seed=1), make_frame(6, seed=2, first_id=4)  # ids 4, 5 in both
    a.to_parquet(tmp_path / "a.parquet")
    b.to_parquet(tmp_path / "b.parquet")
    out = data.load_memorization_data(tmp_path)
    assert out["sequence_id"].tolist() == list(range(10))
    assert out["memorization_score"].iloc[4] == a["memorization_score"].iloc[4]  # the first file wins


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.drop(columns="sequence_duplicates"), r"column 'sequence_duplicates' is missing"),
    (lambda d: d.assign(tokens=[t[:63] if i == 3 else t for i, t in enumerate(d["tokens"])]),
     r"column 'tokens': row 3 \(sequence_id 3\) has 63 tokens, expected 64"),
    (lambda d: d.assign(tokens=[t * -1 if i == 2 else t for i, t in enumerate(d["tokens"])]),
     r"column 'tokens': row 2 .*negative"),
    (lambda d: d.assign(tokens=[np.full(64, 0.5) if i == 1 else t for i, t in enumerate(d["tokens"])]),
     r"column 'tokens': row 1 .*non-integer"),
    (lambda d: d.assign(memorization_score=[1.5 if i == 5 else s for i, s in enumerate(d["memorization_score"])]),
     r"column 'memorization_score': row 5 \(sequence_id 5\) is 1.5, outside \[0, 1\]"),
    (lambda d: d.assign(memorization_score=[np.nan if i == 7 else s for i, s in enumerate(d["memorization_score"])]),
     r"column 'memorization_score': row 7 .*outside \[0, 1\]"),
    (lambda d: d.assign(rouge_L_prefix_to_suffix=[-0.1] * len(d)), r"column 'rouge_L_prefix_to_suffix': row 0"),
    (lambda d: d.assign(sequence_duplicates=[-1 if i == 4 else x for i, x in enumerate(d["sequence_duplicates"])]),
     r"column 'sequence_duplicates': row 4 .*>= 0"),
    (lambda d: d.assign(sequence_id=[0, 1, 2, 1] + list(range(4, len(d)))),
     r"column 'sequence_id': row 3 \(sequence_id 1\) repeats"),
    (lambda d: d.assign(text=[None if i == 6 else t for i, t in enumerate(d["text"])]),
     r"column 'text': row 6 .*expected a string"),
    (lambda d: d.assign(is_repeating=["yes" if i == 8 else x for i, x in enumerate(d["is_repeating"])]),
     r"column 'is_repeating': row 8 .*'yes', expected a boolean"),
])
def test_schema_errors_name_column_and_row(mutate, match):
    with pytest.raises(ValueError, match=match):
        data.validate(mutate(make_frame()))


def test_validate_normalises_types():
    df = make_frame().assign(is_repeating=[1, 0] * 6, sequence_duplicates=lambda d: d["sequence_duplicates"] * 1.0)
    out = data.validate(df)
    assert out["is_repeating"].dtype == bool and out["sequence_duplicates"].dtype == np.int64
    assert df["is_repeating"].dtype != bool  # the input is left alone
    with pytest.raises(ValueError, match="DataFrame"):
        data.validate({"sequence_id": [1]})


def test_published_splits_from_local_dir(tmp_path):
    pile, memories = make_frame(8, seed=1), make_frame(5, seed=2, first_id=6).assign(memorization_score=1.0)
    pile.to_parquet(tmp_path / "pile_duped_12b.parquet")
    (tmp_path / "data").mkdir()
    memories.to_parquet(tmp_path / "data" / "memories_duped_12b-00000-of-00001.parquet")
    make_frame(3, seed=3, first_id=100).to_parquet(tmp_path / "memories_deduped_12b.parquet")  # other scheme
    make_frame(3, seed=4, first_id=200).to_parquet(tmp_path / "memories_duped_1.4b.parquet")   # other size
    out = data.load_memorization_data("semantic-filters:12b", local_dir=tmp_path)
    assert out["sequence_id"].tolist() == list(range(11))
    assert out["memorization_score"].iloc[6] == pile["memorization_score"].iloc[6]  # pile row kept, as the paper
    assert out["memorization_score"].iloc[8:].tolist() == [1.0] * 3
    with pytest.raises(FileNotFoundError, match="pile_deduped_12b"):
        data.load_memorization_data("semantic-filters:12b-deduped", local_dir=tmp_path)


def test_published_splits_from_hub(monkeypatch):
    calls = []
    frames = {"pile_deduped_2.8b": make_frame(6, seed=1),
              "memories_deduped_2.8b": make_frame(4, seed=2, first_id=5).assign(memorization_score=1.0)}

    def load_dataset(name, split):
        calls.append((name, split))
        if split not in frames:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(frames)}.')
        return types.SimpleNamespace(to_pandas=lambda: frames[split].copy())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = data.load_memorization_data("semantic-filters:2.8b-deduped", progress=False)
    assert calls == [(data.HUB_DATASET, "pile_deduped_2.8b"), (data.HUB_DATASET, "memories_deduped_2.8b")]
    assert out["sequence_id"].tolist() == list(range(9))
    assert "is_code" in out.columns

    calls.clear()
    with pytest.raises(ConnectionError, match="pile_duped_2.8b"):  # duped is the default scheme
        data.load_memorization_data("semantic-filters:2.8b")
    assert calls[0][1] == "pile_duped_2.8b"


def test_hub_unreachable_is_one_line(monkeypatch):
    def load_dataset(name, split):
        raise OSError("Couldn't reach the hub\nretrying ...")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ConnectionError) as err:
        data.load_memorization_data("semantic-filters:12b")
    msg = str(err.value)
    assert "\n" not in msg and "Hugging Face hub" in msg and "local_dir" in msg and "pile_duped_12b" in msg


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown Pythia size '13b'"):
        data.load_memorization_data("semantic-filters:13b")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_memorization_data(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        data.load_memorization_data(tmp_path)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        data.load_memorization_data(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="local_dir only applies"):
        data.load_memorization_data(tmp_path / "t.csv", local_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.load_memorization_data("semantic-filters:12b", local_dir=tmp_path / "nope")


def test_a_folder_with_other_files_names_the_file_and_what_was_expected(tmp_path):
    """`--data /tmp` read every .json under it; pandas' answer named neither the file nor the schema
    ("Unexpected character found when decoding object value at position 17")."""
    make_frame(4).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "merges": ["a b"]}, indent=2))
    with pytest.raises(ValueError) as err:
        data.load_memorization_data(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'model' / 'tokenizer.json'} is not a JSON or JSON-lines memorization table (")
    assert "expected rows with columns sequence_id, tokens, text" in message
    assert f"every .parquet/.jsonl/.json file under {tmp_path} is read as one: pass the table file" in message
    assert "\n" not in message


def test_a_file_of_other_rows_names_its_first_missing_column(tmp_path):
    make_frame(4).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"sequence_id": [1, 2], "loss": [0.5, 0.7]}).to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.jsonl'}: column 'tokens' is missing \(and 5 more\); "
                                         r"a memorization table needs sequence_id, tokens"):
        data.load_memorization_data(tmp_path)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.jsonl'}: column 'tokens' is missing .*needs [^(]*$"):
        data.load_memorization_data(tmp_path / "b.jsonl")  # the file itself: no word about folders
    (tmp_path / "c.parquet").write_bytes(b"PAR1 but not parquet")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'c.parquet'} is not a parquet memorization table \("):
        data.load_memorization_data(tmp_path / "c.parquet")


def test_testbed_source(tmp_path, monkeypatch):
    import mechmem.testbed as testbed

    monkeypatch.setattr(testbed, "DATA_FILE", tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match=r"testbed assets are not built.*python -m mechmem.testbed.build"):
        data.load_memorization_data("testbed")
    make_frame().assign(in_training=True).to_parquet(tmp_path / "memorization.parquet")
    monkeypatch.setattr(testbed, "DATA_FILE", tmp_path / "memorization.parquet")
    out = data.load_memorization_data("testbed")
    assert len(out) == 12 and out["in_training"].all() and out.attrs["source"] == "testbed"


def test_tokens_array_errors():
    with pytest.raises(ValueError, match="'tokens' is missing"):
        data.tokens_array(pd.DataFrame({"a": [1]}))
    assert data.tokens_array(make_frame().iloc[:0]).shape == (0, 64)
    with pytest.raises(ValueError, match="row 0"):
        data.tokens_array(pd.DataFrame({"tokens": [[1, 2, 3]]}))


def test_check_vocab_names_the_first_row_past_the_vocabulary():
    df = make_frame(first_id=100).iloc[2:].copy()  # an index that is not 0..n-1: positions are reported
    data.check_vocab(df, 50)  # ids 0..49 fit a vocabulary of 50
    df.at[5, "tokens"] = np.where(np.arange(64) == 9, 77, df.at[5, "tokens"])
    df.at[9, "tokens"] = np.full(64, 99)
    with pytest.raises(ValueError, match=r"^column 'tokens': row 3 \(sequence_id 105\) holds token id 77, "
                                         r"outside the model's vocabulary \(ids 0-49\)"):
        data.check_vocab(df, 50)
    data.check_vocab(df, 100)
