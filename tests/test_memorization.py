import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mechmem.memorization import (
    free_generation,
    greedy_continuation,
    memorization_score,
    memorization_score_and_continuation,
)

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128,
                           use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu")
    # Larger init than the default so the argmax is decided by the weights, not by float noise.
    model = GPTNeoXForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def prefixes():
    return torch.randint(0, VOCAB, (9, 32), generator=torch.Generator().manual_seed(1))


class _Legacy(torch.nn.Module):
    """A HookedTransformer-like callable: tokens in, logits out, no `config`, no cache."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens):
        return self.hf(tokens).logits


def test_cache_equals_full_forward_loop(hf_model, prefixes):
    cached = greedy_continuation(hf_model, prefixes, 20, batch_size=4)
    full = greedy_continuation(hf_model, prefixes, 20, batch_size=4, use_cache=False)
    assert cached.shape == (9, 20) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert torch.equal(greedy_continuation(_Legacy(hf_model), prefixes, 20), full)
    # Not a constant output: the test would pass vacuously on a degenerate model.
    assert len(torch.unique(cached)) > 5


def test_greedy_is_argmax_of_last_position(hf_model, prefixes):
    new = greedy_continuation(hf_model, prefixes, 3)
    seq = prefixes
    for i in range(3):
        nxt = hf_model(seq).logits[:, -1].argmax(-1)
        assert torch.equal(new[:, i], nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)


def test_score_exact_fractions(hf_model, prefixes):
    cont = greedy_continuation(hf_model, prefixes, 32)
    tokens = torch.cat([prefixes, cont], 1)
    corrupted = tokens.clone()
    n_wrong = [0, 1, 5, 16, 32, 3, 7, 31, 2]
    for row, k in enumerate(n_wrong):
        corrupted[row, 32:32 + k] = (corrupted[row, 32:32 + k] + 1) % VOCAB
    scores, got = memorization_score_and_continuation(hf_model, corrupted)
    assert torch.equal(got, cont)  # the continuation depends on the prefix only
    np.testing.assert_array_equal(scores, [(32 - k) / 32 for k in n_wrong])
    np.testing.assert_array_equal(memorization_score(hf_model, tokens), np.ones(9))


def test_free_generation(hf_model, prefixes):
    cont = greedy_continuation(hf_model, prefixes, 32)
    tokens = torch.cat([prefixes, cont], 1)
    tokens[1::2, 40] = (tokens[1::2, 40] + 1) % VOCAB  # odd rows not memorized
    scores = memorization_score(hf_model, tokens)
    assert (scores[0::2] == 1).all() and (scores[1::2] < 1).all()
    # Memorized rows are left untouched even when they hold text the model would not generate
    # (only rows with score < 1 are re-decoded).
    marked = tokens.clone()
    marked[0, 50] = (marked[0, 50] + 1) % VOCAB
    freed = free_generation(hf_model, marked, scores)
    assert torch.equal(freed[0], marked[0])
    assert torch.equal(freed[:, 32:], torch.where(torch.from_numpy(scores < 1)[:, None], cont, marked[:, 32:]))
    assert torch.equal(freed[:, :32], prefixes)
    # A precomputed continuation gives the same tokens without decoding.
    assert torch.equal(free_generation(None, marked, scores, continuation=cont), freed)


def test_bridge_decodes_like_its_hf_model(tiny_model, tiny_tokens):
    """The TransformerBridge path (compatibility mode folds weights) keeps the argmax."""
    prefixes = tiny_tokens[:4, :32]
    cached = greedy_continuation(tiny_model, prefixes, 5)
    full = greedy_continuation(tiny_model, prefixes, 5, use_cache=False)
    assert torch.equal(cached, full)
    seq = prefixes
    for i in range(5):  # the bridge's own forward (hooked, folded) agrees step by step
        nxt = tiny_model(seq)[:, -1].argmax(-1)
        assert torch.equal(cached[:, i], nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)


class _ForgetfulCache(torch.nn.Module):
    """A Hugging Face causal LM whose cached steps drop the cache, as TransformerBridge's attention
    modules for GPT-2 or Llama do (tests/test_architectures.py meets the real thing)."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.config, self.generate = hf, hf.config, hf.generate

    def forward(self, input_ids, use_cache=False, logits_to_keep=0, past_key_values=None):
        return self.hf(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_a_cache_that_is_not_exact_is_not_used(hf_model, prefixes):
    from mechmem.memorization import _cache_is_exact

    full = greedy_continuation(hf_model, prefixes, 8, use_cache=False)
    forgetful = _ForgetfulCache(hf_model)
    assert not _cache_is_exact(forgetful, prefixes) and forgetful._mechmem_cache_exact is False  # checked once
    assert torch.equal(greedy_continuation(forgetful, prefixes, 8, batch_size=4), full)
    assert _cache_is_exact(hf_model, prefixes)
    # what the check spares: the forgetful cache's own decoding is wrong from the second token on
    forgetful._mechmem_cache_exact = True
    wrong = greedy_continuation(forgetful, prefixes, 8)
    assert torch.equal(wrong[:, 0], full[:, 0]) and not torch.equal(wrong[:, 1:], full[:, 1:])


def test_bad_input(hf_model, prefixes):
    with pytest.raises(ValueError, match="integer token ids"):
        greedy_continuation(hf_model, prefixes.float())
    with pytest.raises(ValueError, match="integer token ids"):
        greedy_continuation(hf_model, prefixes[0])
    with pytest.raises(ValueError, match="one value per sample"):
        free_generation(hf_model, torch.cat([prefixes, prefixes], 1), np.ones(3))
    with pytest.raises(ValueError, match="prefix_len"):
        memorization_score(hf_model, prefixes[:, :16], prefix_len=16)
