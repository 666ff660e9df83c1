"""The testbed: shipped assets are what they claim to be, and the build's pieces do what they say."""

import collections
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mechmem.testbed import ASSETS, DATA_FILE, MANIFEST_FILE, MODEL_DIR
from mechmem.testbed import duplicates
from mechmem.testbed.corpus import Corpus, CorpusConfig, build_corpus, cut_passages, file_role, stdlib_files
from mechmem.testbed.duplicates import count_windows
from mechmem.testbed.patterns import FAMILIES, make_patterns

built = pytest.mark.skipif(not DATA_FILE.exists(), reason="testbed assets not built")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table():
    return pd.read_parquet(DATA_FILE)


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST_FILE.read_text())


def _same_python(manifest) -> bool:
    return sys.version.split()[0] == manifest["corpus"]["python"]


# ------------------------------------------------------------------------------ shipped assets
@built
def test_assets_fit_and_match_manifest(manifest):
    import hashlib

    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30e6
    listed = manifest["assets"]
    assert set(listed) == {p.relative_to(ASSETS).as_posix() for p in files if p != MANIFEST_FILE}
    for rel, info in listed.items():
        assert hashlib.sha256((ASSETS / rel).read_bytes()).hexdigest() == info["sha256"], rel


@built
def test_model_is_pythia_architecture():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(MODEL_DIR)
    assert cfg.architectures == ["GPTNeoXForCausalLM"]
    rotary = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(cfg, "rotary_pct", None)  # the key's name depends on the transformers version
    assert cfg.use_parallel_residual and rotary == 0.25 and not cfg.tie_word_embeddings
    assert cfg.hidden_act == "gelu"
    assert (MODEL_DIR / "model.safetensors").exists() and (MODEL_DIR / "tokenizer.json").exists()


@built
def test_load_model_testbed_offline(monkeypatch):
    from mechmem.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    model = load_model("testbed", device="cpu")
    assert model.cfg.n_layers == 6 and model.cfg.n_heads == 8
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "def __init__(self):\n        return"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.eos_token_id == 0 and len(tok) == model.cfg.d_vocab
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), model.cfg.d_vocab)


@built
def test_load_memorization_data_testbed(table):
    from mechmem.data import load_memorization_data

    df = load_memorization_data("testbed", progress=False)
    assert len(df) == len(table) and df["sequence_id"].is_unique
    for col in ("sequence_id", "tokens", "text", "memorization_score", "sequence_duplicates", "is_incrementing",
                "is_repeating", "rouge_L_prefix_to_suffix", "rouge_3_prefix_to_suffix", "is_code", "in_training",
                "planted_count", "source", "greedy_suffix"):
        assert col in df.columns, col


@built
def test_table_is_consistent(table):
    tokens = np.stack(table["tokens"].to_numpy())
    greedy = np.stack(table["greedy_suffix"].to_numpy())
    assert tokens.shape == (len(table), 64) and greedy.shape == (len(table), 32)
    np.testing.assert_array_equal(table["memorization_score"], (greedy == tokens[:, 32:]).mean(1))
    assert (table["in_training"] == (table["sequence_duplicates"] > 0)).all()
    # Every copy of a planted passage or pattern holds each of its windows.
    planted = table["source"].isin(["planted", "pattern"])
    assert (table.loc[planted, "sequence_duplicates"] >= table.loc[planted, "planted_count"]).all()
    held = table["source"].str.startswith("heldout")
    assert (table.loc[held, "sequence_id"] >= 10**9).all() and (table.loc[~held, "sequence_id"] < 10**9).all()
    assert (table.loc[held, "planted_count"] == 0).all()


@built
def test_enough_samples_per_class(table):
    from mechmem.taxonomy import assign_categories, class_counts

    three = class_counts(assign_categories(table, "merge_2_other_guess_recollect_recite", duplicates_threshold=5), 3)
    four = class_counts(assign_categories(table, "other_recite_reconstruct_recollect", duplicates_threshold=5), 4)
    assert three.min() >= 1500, three
    assert four.min() >= 500, four
    memo = table["memorization_score"] == 1
    for t in (5, 50, 1000):  # recite and recollect populated at every paper threshold
        assert (memo & (table["sequence_duplicates"] > t)).sum() >= 100
        assert (memo & (table["sequence_duplicates"] <= t)).sum() >= 100
    # Pure guesses exist: extractable windows the model never trained on.
    assert (memo & ~table["in_training"]).sum() >= 100


@built
def test_shipped_labels_are_true(table):
    """Greedy decoding with the shipped model reproduces the suffix of memorized rows only."""
    from mechmem.memorization import greedy_continuation
    from mechmem.models import load_model

    rng = np.random.default_rng(0)
    memo = table["memorization_score"].to_numpy() == 1
    rows = np.concatenate([rng.choice(np.flatnonzero(memo), 6, replace=False),
                           rng.choice(np.flatnonzero(~memo), 6, replace=False)])
    tokens = torch.as_tensor(np.stack(table["tokens"].to_numpy()[rows]))
    model = load_model("testbed", device="cpu")
    new = greedy_continuation(model, tokens[:, :32], 32).numpy()
    reproduced = (new == tokens[:, 32:].numpy()).all(1)
    assert reproduced[:6].all() and not reproduced[6:].any()
    np.testing.assert_array_equal(new, np.stack(table["greedy_suffix"].to_numpy()[rows]))


@built
def test_manifest_records_the_build(manifest):
    corpus, training = manifest["corpus"], manifest["training"]
    assert training["steps"] > 0 and len(training["loss_curve"]) > 10
    assert training["loss_curve"][-1][1] < training["loss_curve"][0][1]
    counts = [p["count"] for p in corpus["passages"]]
    assert min(counts) == 1 and max(counts) >= 1000
    assert corpus["files"] and all(len(f["sha256"]) == 64 for f in corpus["files"])
    assert f"--steps {training['steps']}" in manifest["reproduce"]


@built
def test_corpus_plan_reproduces_from_manifest(manifest):
    """Same Python: the standard library files, planted passages and patterns are the recorded ones."""
    corpus = manifest["corpus"]
    if not _same_python(manifest):
        pytest.skip(f"the corpus was built with Python {corpus['python']}")
    cfg = CorpusConfig(**{k: tuple(tuple(x) for x in v) if k == "passage_tiers" else
                          (tuple(v) if isinstance(v, list) else v) for k, v in corpus["config"].items()})
    files = stdlib_files(max_files=cfg.max_files)
    import hashlib

    recorded = {f["path"]: f for f in corpus["files"]}
    assert [p for p, _ in files] == list(recorded)
    for path, text in files:
        assert hashlib.sha256(text.encode()).hexdigest() == recorded[path]["sha256"], path
        assert file_role(path, cfg) == recorded[path]["role"]
    pool = [(p, t) for p, t in files if recorded[p]["role"] == "pool"]
    assert cut_passages(pool, cfg) == corpus["passages"]
    patterns = make_patterns(corpus["patterns"]["n_train"] + corpus["patterns"]["n_heldout"],
                             corpus["patterns"]["seed"])
    assert hashlib.sha256("\0".join(p.text for p in patterns).encode()).hexdigest() == corpus["patterns"]["sha256"]


@built
@pytest.mark.slow
def test_rebuilt_stream_matches_and_recounts(manifest, table):
    """Rebuild the corpus with the shipped tokenizer: same token stream, same duplicate counts."""
    import hashlib

    from tokenizers import Tokenizer

    corpus = manifest["corpus"]
    if not _same_python(manifest):
        pytest.skip(f"the corpus was built with Python {corpus['python']}")
    from mechmem.testbed.membership import corpus_config

    rebuilt, _ = build_corpus(corpus_config(manifest), tokenizer=Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")))
    assert hashlib.sha256(rebuilt.train_stream.tobytes()).hexdigest() == corpus["train_stream_sha256"]
    sample = table.sample(300, random_state=0)
    counts = count_windows(rebuilt.train_stream, np.stack(sample["tokens"].to_numpy()))
    np.testing.assert_array_equal(counts, sample["sequence_duplicates"].to_numpy())


# ------------------------------------------------------------------------------ build pieces
def test_count_windows_matches_brute_force():
    rng = np.random.default_rng(0)
    passage = rng.integers(0, 50, 30)
    parts = [rng.integers(0, 6, rng.integers(5, 40)) for _ in range(60)]
    for i in range(0, 60, 4):  # plant a passage 15 times in a low-entropy stream
        parts[i] = np.concatenate([parts[i], passage])
    stream = np.concatenate(parts).astype(np.uint16)
    width = 8
    queries = np.stack([stream[p:p + width] for p in rng.integers(0, len(stream) - width, 300)] +
                       [rng.integers(0, 50, width)])  # one that never occurs
    truth = collections.Counter(tuple(stream[i:i + width]) for i in range(len(stream) - width + 1))
    expected = [truth[tuple(q)] for q in queries]
    np.testing.assert_array_equal(count_windows(stream, queries, progress=False), expected)
    assert max(expected) >= 15 and expected[-1] == 0


def test_count_windows_survives_hash_collisions(monkeypatch):
    """With a degenerate hash (every window hashes to its last token) counts stay exact."""
    monkeypatch.setattr(duplicates, "_BASE", np.uint64(0))
    rng = np.random.default_rng(1)
    stream = rng.integers(0, 4, 500).astype(np.uint16)
    queries = np.stack([stream[p:p + 5] for p in range(0, 400, 7)])
    truth = collections.Counter(tuple(stream[i:i + 5]) for i in range(len(stream) - 4))
    np.testing.assert_array_equal(count_windows(stream, queries, chunk=64, progress=False),
                                  [truth[tuple(q)] for q in queries])


def test_stable_sort_is_numpys_stable_argsort():
    """Many ties (the repeated windows), no ties, one key, none: the same indices as numpy's stable sort."""
    rng = np.random.default_rng(2)
    for keys in (rng.integers(0, 50, 5000).astype(np.uint64), rng.permutation(1000).astype(np.uint64),
                 np.full(7, 3, dtype=np.uint64), np.zeros(1, dtype=np.uint64), np.zeros(0, dtype=np.uint64)):
        order, ranked = duplicates.stable_sort(keys)
        np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
        np.testing.assert_array_equal(ranked, keys[order])


def test_window_index_finds_every_occurrence_under_collisions(monkeypatch):
    """Base 0 hashes every window to its last token: the index still returns exactly the true
    (query, position) pairs, in the order of the stable sort."""
    monkeypatch.setattr(duplicates, "_BASE", 0)
    rng = np.random.default_rng(3)
    stream = rng.integers(0, 3, 400).astype(np.uint16)
    queries = np.stack([stream[p:p + 4] for p in range(0, 300, 11)])
    rows, positions = duplicates.WindowIndex(stream, 4).occurrences(queries, progress=False)
    truth = {(q, p) for q in range(len(queries)) for p in range(len(stream) - 3)
             if (stream[p:p + 4] == queries[q]).all()}
    assert set(zip(rows.tolist(), positions.tolist())) == truth and len(rows) == len(truth)
    for q in range(len(queries)):  # positions of one query ascending: ties kept in stream order
        assert (np.diff(positions[rows == q]) > 0).all()


TIERS = ((2, 5, 1000), (6, 50, 1000), (51, 1000, 1000), (1001, 10**9, 1000))


def test_duplicated_windows_are_distinct_repeated_and_capped():
    """The second testbed's extra candidates: natural windows the stream repeats, each distinct, in
    its copy tier (counted exactly here), at most `per_doc` a document in each tier, every tier filled
    as far as the stream allows."""
    from mechmem.testbed.corpus import WINDOW, duplicated_windows

    rng = np.random.default_rng(0)
    boiler = rng.integers(0, 1000, 80)  # a licence header: in every document
    docs = [np.concatenate([boiler, rng.integers(0, 1000, 150)]) for _ in range(12)]
    docs += [docs[0].copy() for _ in range(3)]  # a vendored file: four copies in all
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    stream = np.concatenate([np.r_[d, 1000] for d in docs]).astype(np.int64)
    lengths = np.array([len(d) for d in docs])
    got = duplicated_windows(np.random.default_rng(1), stream, starts, lengths, TIERS, per_doc=1000)
    windows = np.stack([stream[p:p + WINDOW] for p in got])
    assert len({w.tobytes() for w in windows}) == len(got)  # distinct
    copies = count_windows(stream, windows, progress=False)
    assert (copies >= 2).all()
    every = np.lib.stride_tricks.sliding_window_view(stream, WINDOW)
    inside = np.concatenate([np.arange(a, a + n - WINDOW + 1) for a, n in zip(starts, lengths)])
    repeated = {w.tobytes() for w, c in zip(every[inside], count_windows(stream, every[inside], progress=False))
                if c >= 2}
    assert {w.tobytes() for w in windows} == repeated  # room for all: every repeated window is taken
    assert set(copies.tolist()) == {4, 15}  # the vendored file's own windows, and the licence's
    capped = duplicated_windows(np.random.default_rng(1), stream, starts, lengths, TIERS, per_doc=5)
    doc_of = np.searchsorted(starts, capped, side="right") - 1
    assert set(doc_of.tolist()) == {0}  # each first seen in document 0
    capped_copies = count_windows(stream, np.stack([stream[p:p + WINDOW] for p in capped]), progress=False)
    assert sorted(capped_copies.tolist()) == [4] * 5 + [15] * 5  # the cap holds in each tier, not over all
    few = duplicated_windows(np.random.default_rng(1), stream, starts, lengths, ((2, 5, 3), (6, 50, 2), (51, 99, 9)),
                             per_doc=1000)
    assert sorted(count_windows(stream, np.stack([stream[p:p + WINDOW] for p in few]), progress=False)) == [4, 4, 4, 15, 15]


def test_patterns_are_deterministic_and_detected():
    from mechmem import heuristics

    a, b = make_patterns(45, 3), make_patterns(45, 3)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in make_patterns(45, 4)] != [p.text for p in a]
    assert {p.family for p in a} == set(FAMILIES)
    for p in a:
        head = p.text[:200]
        if p.kind == "incrementing":
            assert heuristics.is_incrementing(head), (p.family, head)
        elif p.family != "rep_symbols":  # long symbol rules may break mid-line
            assert heuristics.is_repeating(head), (p.family, head)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """A corpus built from a fake 'standard library' of random-word files."""
    root = tmp_path_factory.mktemp("stdlib")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)] + ["def", "return", "self", "class", "import"]
    for i in range(40):
        lines = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(rng.integers(40, 80))]
        (root / f"mod{i:02d}.py").write_text("\n".join(lines) + "\n")
    (root / "test").mkdir()
    (root / "test" / "skipped.py").write_text("never read\n")
    cfg = CorpusConfig(vocab_size=400, heldout_frac=0.2, pool_frac=0.3, passage_tiers=((1, 3, 3), (4, 40, 3)),
                       passage_chars=300, n_patterns=30, n_heldout_patterns=9, n_stdlib_windows=200,
                       n_heldout_windows=50)
    corpus, tokenizer = build_corpus(cfg, root=root)
    return corpus, tokenizer, cfg, root


def test_corpus_plants_known_counts(small_corpus):
    corpus, tokenizer, cfg, root = small_corpus
    m = corpus.manifest
    assert "test/skipped.py" not in {f["path"] for f in m["files"]}
    assert sorted(p["count"] for p in m["passages"]) == [1, 2, 3, 4, 13, 40]  # log-spaced tiers
    w, tokens = corpus.windows, corpus.window_tokens()
    counts = count_windows(corpus.train_stream, tokens, progress=False)
    for source in ("planted", "pattern"):
        rows = w["source"] == source
        assert rows.any()
        assert (counts[rows] >= w["planted_count"][rows]).all()
        # random-word passages have no natural duplicates: the counts are exactly what was planted
        if source == "planted":
            np.testing.assert_array_equal(counts[rows], w["planted_count"][rows])
    held = w["source"] == "heldout"
    assert held.any() and (counts[held] == 0).mean() > 0.9
    # the held-out stream holds no planted copy, the training stream no held-out file
    assert (w["stream"][held] == 1).all() and (w["stream"][~np.isin(w["source"], ["heldout", "heldout_pattern"])] == 0).all()
    roles = {f["path"]: f["role"] for f in m["files"]}
    text = tokenizer.decode(corpus.train_stream.tolist())
    for path, role in roles.items():
        first_line = (root / path).read_text().splitlines()[0]
        if role == "stdlib":
            assert first_line in text


def test_corpus_save_load_roundtrip(small_corpus, tmp_path):
    corpus = small_corpus[0]
    corpus.save(tmp_path)
    again = Corpus.load(tmp_path)
    np.testing.assert_array_equal(again.train_stream, corpus.train_stream)
    np.testing.assert_array_equal(again.window_tokens(), corpus.window_tokens())
    assert again.manifest == json.loads(json.dumps(corpus.manifest))
    with pytest.raises(FileNotFoundError, match="corpus stage"):
        Corpus.load(tmp_path / "missing")


def test_training_learns_and_fp16_roundtrip(tmp_path):
    from mechmem.testbed.train import TrainConfig, load_fp32, save_fp16, train

    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(1, 60, 40), 30).astype(np.uint16)  # one 40-token text, repeated
    cfg = TrainConfig(n_layers=1, d_model=32, n_heads=2, ctx=32, batch_size=8, steps=30, warmup_steps=3,
                      lr=2e-2, n_positions=64)
    model, log = train(stream, 64, cfg, log_every=5)
    assert log["steps"] == 30 and log["loss_curve"][-1][1] < 0.5 * log["loss_curve"][0][1]
    save_fp16(model, tmp_path)
    loaded = load_fp32(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)


def test_export_import_roundtrip(tmp_path):
    from mechmem.testbed.build import export, import_
    from mechmem.testbed.train import TrainConfig, model_config, save_fp16
    from transformers import GPTNeoXForCausalLM
    from safetensors.torch import load_file

    cfg = TrainConfig(n_layers=1, d_model=32, n_heads=2, n_positions=64)
    model = GPTNeoXForCausalLM._from_config(model_config(64, cfg))
    save_fp16(model, tmp_path / "a" / "model")
    (tmp_path / "a" / "train_log.json").write_text("{}")
    export(tmp_path / "a", tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "config.json", "train_log.json", "weights-0.safetensors", "weights-1.safetensors"]
    import_(tmp_path / "x", tmp_path / "b")
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
