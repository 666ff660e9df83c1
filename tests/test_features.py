import numpy as np
import pytest
import torch
from transformers import GPTNeoXForCausalLM

from mechmem.features import FeatureStore, StoreMismatch, build_feature_store, extract_attention
from mechmem.models import load_model


@pytest.fixture(scope="module")
def hf_attentions(tiny_checkpoint, tiny_tokens):
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(tiny_tokens, output_attentions=True)
    return torch.stack(out.attentions, dim=1)  # [sample, layer, head, q, k]


def test_pooled_features_equal_hf_eager_attention(tiny_model, tiny_tokens, hf_attentions):
    feats = extract_attention(tiny_model, tiny_tokens, pooling=("mean", "max"), batch_size=4)
    assert feats.shape == (10, 2, 3, 64, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[:, 0], hf_attentions.mean(2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(feats[:, 1], hf_attentions.amax(2), atol=1e-6, rtol=1e-5)


def test_per_head_patterns_equal_hf(tiny_model, tiny_tokens, hf_attentions):
    heads = extract_attention(tiny_model, tiny_tokens[:3], per_head=True)
    torch.testing.assert_close(heads, hf_attentions[:3], atol=1e-6, rtol=1e-5)


def test_batch_size_does_not_change_features(tiny_model, tiny_tokens):
    a = extract_attention(tiny_model, tiny_tokens, batch_size=1)
    b = extract_attention(tiny_model, tiny_tokens, batch_size=7)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_any_sequence_length(tiny_model, tiny_tokens):
    feats = extract_attention(tiny_model, tiny_tokens[:2, :20], pooling=("max",))
    assert feats.shape == (2, 1, 3, 20, 20)
    assert torch.allclose(feats[:, 0].triu(1), torch.zeros(()))  # causal


def test_bad_arguments(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="head pooling"):
        extract_attention(tiny_model, tiny_tokens, pooling=("median",))
    with pytest.raises(ValueError, match="integer ids"):
        extract_attention(tiny_model, tiny_tokens.float())
    with pytest.raises(ValueError, match="batch_size"):
        extract_attention(tiny_model, tiny_tokens, batch_size=0)


def test_hooks_are_removed_after_extraction(tiny_model, tiny_tokens):
    extract_attention(tiny_model, tiny_tokens[:2])
    assert all(len(hp._forward_hooks) == 0 for hp in tiny_model.hook_dict.values())


def test_store_round_trip(tmp_path, tiny_model, tiny_tokens):
    ids = np.arange(100, 110)
    store = build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens, chunk_size=4, progress=False)
    assert store.complete
    direct = extract_attention(tiny_model, tiny_tokens).numpy().astype(np.float16)
    np.testing.assert_array_equal(np.asarray(store.features), direct)
    reopened = FeatureStore.load(tmp_path / "s")
    assert reopened.pooling == ("mean", "max")
    np.testing.assert_array_equal(reopened.index([107, 100]), [7, 0])
    np.testing.assert_array_equal(reopened.tokens, tiny_tokens.numpy())
    reopened.verify()
    with pytest.raises(KeyError, match="999"):
        reopened.index([999])


def test_interrupted_extraction_resumes_without_recomputing(tmp_path, tiny_model, tiny_tokens, monkeypatch):
    ids = np.arange(10)
    partial = build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens, chunk_size=3,
                                  progress=False, _stop_after_chunks=2)
    assert not partial.complete and partial.done.tolist() == [True, True, False, False]
    first_rows = np.asarray(partial.features[:6]).copy()
    with pytest.raises(StoreMismatch, match="incomplete"):
        partial.verify()

    calls = []
    import mechmem.features as F
    real = F._extract
    monkeypatch.setattr(F, "_extract", lambda m, t, **kw: calls.append(len(t)) or real(m, t, **kw))
    store = build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens, chunk_size=3, progress=False)
    assert calls == [3, 1]  # only the two missing chunks
    assert store.complete
    np.testing.assert_array_equal(np.asarray(store.features[:6]), first_rows)
    full = build_feature_store(tmp_path / "fresh", tiny_model, ids, tiny_tokens, chunk_size=3, progress=False)
    assert store.manifest["content_sha256"] == full.manifest["content_sha256"]


def test_store_refuses_other_model_samples_or_pooling(tmp_path, tiny_checkpoint, tiny_model, tiny_tokens):
    ids = np.arange(10)
    build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens, progress=False)
    with pytest.raises(StoreMismatch, match="sample ids"):
        build_feature_store(tmp_path / "s", tiny_model, ids + 1, tiny_tokens, progress=False)
    with pytest.raises(StoreMismatch, match="tokens"):
        build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens.flip(0), progress=False)
    with pytest.raises(StoreMismatch, match="pooling"):
        build_feature_store(tmp_path / "s", tiny_model, ids, tiny_tokens, pooling=("max",), progress=False)
    other = load_model(tiny_checkpoint, device="cpu")
    with torch.no_grad():
        next(p for p in other.parameters() if p.ndim >= 2).mul_(1.5)
    with pytest.raises(StoreMismatch, match="model"):
        build_feature_store(tmp_path / "s", other, ids, tiny_tokens, progress=False)
    with pytest.raises(ValueError, match="unique"):
        build_feature_store(tmp_path / "t", tiny_model, np.zeros(10), tiny_tokens, progress=False)
