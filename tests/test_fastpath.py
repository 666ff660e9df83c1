import pytest
import torch

from mechmem.fastpath import pattern_forward, supports
from mechmem.features import extract_attention
from mechmem.models import build_hf_pythia, load_model
from conftest import TINY


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """Random layer-norm gains and biases: compatibility mode's folding and centring are not no-ops."""
    hf = build_hf_pythia("14m", device="cpu", dtype=torch.float32, seed=1, n_ctx=128, **TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    folder = tmp_path_factory.mktemp("odd-pythia")
    hf.save_pretrained(folder)
    from mechmem.models import _placeholder_tokenizer

    _placeholder_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def odd_model(odd_checkpoint):
    return load_model(odd_checkpoint, device="cpu")


def test_fast_path_without_compatibility_mode(odd_checkpoint, tiny_tokens):
    """Unprocessed weights (how a 12b fits one GPU's memory at boot) take the fast path, exactly."""
    model = load_model(odd_checkpoint, device="cpu", compatibility_mode=False)
    assert supports(model)
    fast = extract_attention(model, tiny_tokens, per_head=True, batch_size=4)
    bridge = extract_attention(model, tiny_tokens, per_head=True, batch_size=4, fastpath=False)
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-6)


def test_a_pythia_bridge_takes_the_fast_path(odd_model):
    assert supports(odd_model)


def test_fast_path_patterns_equal_the_bridges(odd_model, tiny_tokens):
    fast = extract_attention(odd_model, tiny_tokens, per_head=True, batch_size=4)
    bridge = extract_attention(odd_model, tiny_tokens, per_head=True, batch_size=4, fastpath=False)
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-6)
    other = extract_attention(odd_model, tiny_tokens.roll(1, dims=1), per_head=True, batch_size=4)
    assert (other - bridge).abs().max() > 1e-2  # the comparison can tell inputs apart


def test_fast_path_in_bfloat16(odd_checkpoint, tiny_tokens):
    model = load_model(odd_checkpoint, device="cpu", dtype="bf16")
    fast = extract_attention(model, tiny_tokens[:4], per_head=True)
    bridge = extract_attention(model, tiny_tokens[:4], per_head=True, fastpath=False)
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-2)


def test_a_users_pattern_hook_fires_by_name_and_its_edit_carries_forward(odd_model, tiny_tokens):
    seen = []

    def zero_layer0(pattern, hook):
        seen.append(hook.name)
        return torch.zeros_like(pattern)

    plain = extract_attention(odd_model, tiny_tokens[:3], per_head=True)
    with odd_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", zero_layer0)]):
        assert supports(odd_model)
        fast = extract_attention(odd_model, tiny_tokens[:3], per_head=True)
        bridge = extract_attention(odd_model, tiny_tokens[:3], per_head=True, fastpath=False)
    assert seen == ["blocks.0.attn.hook_pattern"] * 2
    torch.testing.assert_close(fast, bridge, rtol=0, atol=1e-6)
    assert (fast[:, 1:] - plain[:, 1:]).abs().max() > 1e-3  # layer 0's edit changed the later layers


def test_a_hook_elsewhere_falls_back_to_the_bridges_forward(odd_model, tiny_tokens, monkeypatch):
    import mechmem.features as F

    monkeypatch.setattr(F, "pattern_forward", lambda *a, **k: pytest.fail("fast path despite a resid hook"))
    with odd_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x)]):
        assert not supports(odd_model)
        extract_attention(odd_model, tiny_tokens[:2])


def test_only_bridges_are_supported():
    class Legacy(torch.nn.Module):  # a HookedTransformer has cfg and blocks but no original_model
        cfg = object()
        blocks = ()

    assert not supports(Legacy())


def test_stopping_early_returns_the_residual_entering_that_layer(odd_model, tiny_tokens):
    _, cache = odd_model.run_with_cache(tiny_tokens[:2], names_filter="blocks.1.hook_resid_pre")
    resid = pattern_forward(odd_model, tiny_tokens[:2], stop_after_layer=1)
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"], rtol=0, atol=1e-5)
