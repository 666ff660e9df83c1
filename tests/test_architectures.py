"""Architectures other than Pythia's, at toy size with random weights: GPT-2, Llama (grouped-query
attention: 2 key/value heads for 4 query heads), Qwen2 (grouped-query too) and OPT.

Each is an ordinary Hugging Face folder (the testbed's tokenizer beside a random model) loaded
through `load_model`. Its attention patterns must equal Hugging Face's eager `output_attentions`,
greedy decoding must equal Hugging Face's, and the alignment benchmark must run end to end on it.
The lean forward (`mechmem.fastpath`) stays GPT-NeoX-only: these take the bridge's own forward.
"""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

import mechmem.alignment as al
import mechmem.features as F
from mechmem import fastpath
from mechmem.cnn import CNNConfig, TrainConfig
from mechmem.features import extract_attention
from mechmem.memorization import _cache_is_exact, _cache_kwarg, greedy_continuation, memorization_score
from mechmem.models import load_model
from mechmem.run import RunFolder
from mechmem.testbed import MODEL_DIR

VOCAB = 8192  # the testbed tokenizer's
SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # the tokenizer's <|endoftext|>
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, **SPECIAL)
FAMILIES = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, **SPECIAL),
    "llama": lambda: LlamaConfig(intermediate_size=128, num_key_value_heads=2, **SHAPE),
    "qwen2": lambda: Qwen2Config(intermediate_size=128, num_key_value_heads=2, **SHAPE),
    "opt": lambda: OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SHAPE),
}
N_LAYERS, N_HEADS = 2, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def save_random(family: str, folder, seed: int = 0):
    """A random-weight model of `family` saved as a Hugging Face folder with the testbed's tokenizer.
    Weights are drawn wider than the default init (std 0.2), so that attention is far from uniform
    and greedy decoding is decided by the weights, not by float noise."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder, the bridge load_model gives, Hugging Face's own model with eager attention)."""
    folder = save_random(request.param, tmp_path_factory.mktemp(request.param))
    bridge = load_model(folder, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return request.param, folder, bridge, hf


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (6, 64), generator=torch.Generator().manual_seed(1))


def hf_patterns(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(hf(tokens, output_attentions=True).attentions, dim=1)  # [sample, layer, head, q, k]


def test_the_bridge_is_this_architecture(family):
    name, _, bridge, hf = family
    assert bridge.cfg.n_layers == N_LAYERS and bridge.cfg.n_heads == N_HEADS and bridge.cfg.d_vocab == VOCAB
    assert type(bridge.original_model).__name__ == type(hf).__name__
    if name in ("llama", "qwen2"):
        assert hf.config.num_key_value_heads == 2  # grouped-query attention: 2 key/value heads for 4 queries


def test_patterns_equal_hf_eager_attentions(family, tokens):
    _, _, bridge, hf = family
    reference = hf_patterns(hf, tokens)
    assert reference.shape == (6, N_LAYERS, N_HEADS, 64, 64)
    # far from uniform, so that equality means something: mean entropy well below uniform's
    entropy = -(reference.clamp_min(1e-12).log() * reference).sum(-1)[..., 16:].mean()
    uniform = torch.log(torch.arange(17, 65, dtype=torch.float)).mean()
    assert entropy < uniform - 0.5
    heads = extract_attention(bridge, tokens, per_head=True, batch_size=4)
    torch.testing.assert_close(heads, reference, atol=2e-5, rtol=1e-4)
    pooled = extract_attention(bridge, tokens, pooling=("mean", "max"), batch_size=4)
    torch.testing.assert_close(pooled[:, 0], reference.mean(2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pooled[:, 1], reference.amax(2), atol=2e-5, rtol=1e-4)


def test_the_lean_forward_stays_gpt_neox_only(family, tokens, tiny_model, monkeypatch):
    _, _, bridge, _ = family
    assert fastpath.supports(tiny_model)  # Pythia's architecture takes it
    assert not fastpath.supports(bridge)
    reference = extract_attention(bridge, tokens[:2], fastpath=False)
    monkeypatch.setattr(F, "pattern_forward", lambda *a, **k: pytest.fail("the lean forward ran"))
    torch.testing.assert_close(extract_attention(bridge, tokens[:2]), reference, atol=0, rtol=0)


def test_greedy_decoding_equals_hugging_faces(family, tokens):
    _, _, bridge, hf = family
    prefixes = tokens[:, :32]
    reference = greedy_continuation(hf, prefixes, use_cache=False, progress=False)  # full forwards, no cache
    assert reference.unique().numel() > 6  # not one token over and over
    assert torch.equal(greedy_continuation(bridge, prefixes, batch_size=4, progress=False), reference)
    # Cached decoding is used where, and only where, it gives a full forward's logits.
    original = bridge.original_model
    with torch.no_grad():
        out = original(input_ids=prefixes[:2], use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        past = {_cache_kwarg(original): out.past_key_values}
        step = original(input_ids=token, use_cache=True, **past).logits[:, -1]
        full = original(input_ids=torch.cat([prefixes[:2], token], 1)).logits[:, -1]
    assert _cache_is_exact(original, prefixes) == torch.allclose(step, full, atol=1e-4, rtol=1e-4)
    # Memorization scores: a suffix that is the model's own continuation is memorized, a random one not.
    memorized = torch.cat([prefixes, reference], dim=1)
    other = memorized.clone()
    other[:, 32:] = (reference + 1) % VOCAB
    scores = memorization_score(bridge, torch.cat([memorized, other]), progress=False)
    np.testing.assert_array_equal(scores, [1.0] * 6 + [0.0] * 6)


def test_pythia_bridges_keep_cached_decoding(tiny_model, tiny_tokens):
    """The check does not send the main model down the slow path."""
    assert _cache_is_exact(tiny_model.original_model, tiny_tokens[:, :32])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_alignment_runs_end_to_end(name, tmp_path):
    from test_alignment import synthetic_frame

    model = load_model(save_random(name, tmp_path / "model", seed=2), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager").eval()
    df = synthetic_frame(90)
    cfg = al.AlignmentConfig(rows=(al.Row("merge_2_other_guess_recollect_recite", 5),), train_per_class=8,
                             eval_per_class=4, configs=(CNNConfig(6, 4, "mean"),),
                             train=TrainConfig(epochs=1, device="cpu"), n_boot=20)
    table = al.run_alignment(model, df, cfg, tmp_path / "run", progress=False)
    assert table["tax_name"].tolist() == ["Non-Memo, Guess, Others"]
    assert 0 <= table["min_f1"].iloc[0] <= 100
    run = RunFolder(tmp_path / "run")
    row = run.read_row("merge_2_other_guess_recollect_recite_t5")
    assert len(row["eval_sequence_ids"]) == 3 * 4
    # What the CNNs read: non-memorized samples continued by this model's own greedy decoding, and
    # their pooled attention as Hugging Face computes it.
    store = run.feature_store()
    tokens = torch.from_numpy(store.tokens)
    by_id = df.set_index("sequence_id")
    non_memo = torch.from_numpy(by_id.loc[store.sequence_ids, "memorization_score"].to_numpy() < 1)
    assert non_memo.sum() >= 4
    np.testing.assert_array_equal(
        tokens[non_memo, 32:], greedy_continuation(hf, tokens[non_memo, :32], use_cache=False, progress=False))
    np.testing.assert_array_equal(
        tokens[~non_memo], np.stack(by_id.loc[store.sequence_ids[~non_memo.numpy()], "tokens"].to_numpy()))
    reference = hf_patterns(hf, tokens)
    features = torch.from_numpy(np.asarray(store.features, dtype=np.float32))
    torch.testing.assert_close(features[:, 0], reference.mean(2), atol=1e-3, rtol=0)  # float16 in the store
    torch.testing.assert_close(features[:, 1], reference.amax(2), atol=1e-3, rtol=0)
