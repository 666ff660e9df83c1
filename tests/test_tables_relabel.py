"""Labels belong to a checkpoint: relabelling changes them exactly where the checkpoint's greedy output
differs, a mismatch is refused in one line, and an unavailable revision fails before any work."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from mechmem import models
from mechmem.memorization import greedy_continuation
from mechmem.tables import relabel as R
from mechmem.testbed import DATA_FILE, MODEL_DIR

pytestmark = [pytest.mark.skipif(not DATA_FILE.exists(), reason="testbed assets not built"),
              pytest.mark.usefixtures("one_thread")]


def perturbed_testbed(folder, scale: float = 0.05, seed: int = 0):
    """"Another checkpoint" of the testbed: its weights plus seeded noise, as a local HF folder."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    for f in MODEL_DIR.glob("tokenizer*"):
        shutil.copy(f, folder)
    return folder


def some_testbed_rows(n: int = 40, seed: int = 0) -> pd.DataFrame:
    df = pd.read_parquet(DATA_FILE).sample(n, random_state=seed).reset_index(drop=True)
    df.attrs["greedy_model"] = "testbed"  # as load_memorization_data("testbed") marks it
    return df


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return perturbed_testbed(tmp_path_factory.mktemp("ckpt") / "step2000")


@pytest.fixture(scope="module")
def other_model(other_checkpoint):
    return models.load_model(other_checkpoint, device="cpu")


def test_relabelling_changes_labels_exactly_where_the_greedy_output_differs(other_checkpoint, other_model):
    df = some_testbed_rows()
    tokens = torch.as_tensor(np.stack(df["tokens"].to_numpy()))
    direct = greedy_continuation(other_model, tokens[:, :32], 32, progress=False).numpy()
    out = R.check_labels(df, other_model, str(other_checkpoint), None, relabel=True, progress=False)
    new = np.stack(out["greedy_suffix"].to_numpy())
    np.testing.assert_array_equal(new, direct)
    np.testing.assert_array_equal(out["memorization_score"], (direct == tokens[:, 32:].numpy()).mean(1))
    old = np.stack(df["greedy_suffix"].to_numpy())
    differs = (direct != old).any(1)
    changed = out["memorization_score"].to_numpy() != df["memorization_score"].to_numpy()
    assert differs.any() and not differs.all()
    assert not changed[~differs].any()  # same greedy output, same label
    assert changed.any() and (changed <= differs).all()
    assert set(out["label_model"]) == {str(other_checkpoint)} and out.attrs["greedy_model"] == other_model.mechmem_name
    np.testing.assert_array_equal(out["sequence_duplicates"], df["sequence_duplicates"])  # the corpus's, unchanged
    assert R.table_labeller(out) == R.Labeller(str(other_checkpoint), None, models.weights_fingerprint(other_model))


def test_another_checkpoint_is_refused_without_relabel(other_checkpoint, other_model):
    df = some_testbed_rows(10)
    with pytest.raises(ValueError, match="--relabel") as err:
        R.check_labels(df, other_model, str(other_checkpoint), None)
    assert "\n" not in str(err.value) and "testbed" in str(err.value)
    # a table relabelled by it is accepted by it, and its greedy suffix reused
    relabelled = R.relabel_table(df, other_model, R.loaded_labeller(other_model, other_checkpoint, None),
                                 progress=False)
    relabelled.attrs = {}
    same = R.check_labels(relabelled, other_model, str(other_checkpoint), None)
    assert same.attrs["greedy_model"] == other_model.mechmem_name


def test_the_testbed_table_is_the_testbed_models():
    testbed = models.load_model("testbed", device="cpu")
    df = some_testbed_rows(5)
    assert R.check_labels(df, testbed, "testbed", None) is df


def test_published_tables_are_the_final_pythia_checkpoints():
    df = pd.DataFrame({"sequence_id": [1]})
    df.attrs["source"] = "semantic-filters:12b-deduped"
    have = R.table_labeller(df)
    assert have == R.Labeller("EleutherAI/pythia-12b-deduped")
    assert R.same_labeller(have, R.Labeller("EleutherAI/pythia-12b-deduped", "step143000"))
    assert not R.same_labeller(have, R.Labeller("EleutherAI/pythia-12b-deduped", "step50000"))
    assert not R.same_labeller(have, R.Labeller("EleutherAI/pythia-12b"))
    df.attrs["source"] = "mine.parquet"
    assert R.table_labeller(df) is None


def test_a_table_of_mixed_labellers_is_refused():
    df = pd.DataFrame({"label_model": ["a", "b"], "label_revision": [None, None], "label_weights": [None, None]})
    with pytest.raises(ValueError, match="mixes labels of 2 models"):
        R.table_labeller(df)


@pytest.mark.parametrize("name, revision, message", [
    ("EleutherAI/pythia-160m-deduped", "step1000", "not cached"),
    ("EleutherAI/pythia-160m-deduped", "step7", "unknown Pythia revision"),
    ("testbed", "step1000", "only its final weights"),
    ("./no/such/folder", None, "not found"),
])
def test_an_unavailable_model_or_revision_fails_in_one_line(monkeypatch, name, revision, message):
    monkeypatch.setattr(models, "_in_hub_cache", lambda *a: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *a: False)
    with pytest.raises(models.ModelNotFound, match=message) as err:
        R.check_available(name, revision)
    assert "\n" not in str(err.value)
