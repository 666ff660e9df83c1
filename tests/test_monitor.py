"""The regurgitation monitor: generation, attention reuse, stretch geometry, the CNNs' verdicts."""

import numpy as np
import pandas as pd
import pytest
import torch

from mechmem.cnn import AttentionCNN, CNNConfig, TrainConfig, train_cnn
from mechmem.features import extract_attention
from mechmem.memorization import PREFIX_LEN, free_generation, greedy_continuation
from mechmem.monitor import MonitorConfig, SpanClassifier, generate, monitor, stretch_starts

CLASSES = ["Non-Memo", "Guess", "Others"]


def fixed_cnn(n_layers: int, decide: int, pooling: str = "mean", n_classes: int = 3) -> AttentionCNN:
    """A CNN whose decision is fixed: zero weights into the last layer, a bias that picks `decide`."""
    cnn = AttentionCNN(n_layers, n_classes, CNNConfig(kernel_size=6, channels=4, pooling=pooling, n_feat_fc=8))
    with torch.no_grad():
        cnn.layers.fc2.weight.zero_()
        cnn.layers.fc2.bias.fill_(-5.0)
        cnn.layers.fc2.bias[decide] = 5.0
    return cnn.eval()


def prompts_of(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_stretch_starts():
    assert stretch_starts(32, 96) == [32, 64]
    assert stretch_starts(40, 104) == [40, 72]  # long prompt: the first stretch is the first output token
    assert stretch_starts(20, 84) == [32]  # short prompt: wait for 32 tokens of context
    assert stretch_starts(32, 96, stride=16) == [32, 48, 64]
    assert stretch_starts(32, 63) == []


def test_config_rejects_bad_values():
    for bad in (dict(max_new_tokens=0), dict(stride=0), dict(temperature=0.0), dict(top_k=0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            MonitorConfig(**bad)


@pytest.mark.parametrize("prompt_len,n_new", [(32, 32), (32, 40), (20, 44)])
def test_generation_is_greedy_and_captures_the_windows_attention(tiny_model, prompt_len, n_new):
    prompts = prompts_of(3, prompt_len, tiny_model.cfg.d_vocab)
    new, logprobs, att = generate(tiny_model, prompts, MonitorConfig(max_new_tokens=n_new),
                                  capture_pooling=("max", "mean"))
    torch.testing.assert_close(new, greedy_continuation(tiny_model, prompts, n_new, progress=False), rtol=0, atol=0)
    seq = torch.cat([prompts, new], 1)
    expected = extract_attention(tiny_model, seq[:, :64], pooling=("max", "mean"))
    torch.testing.assert_close(att.cpu(), expected, atol=1e-5, rtol=1e-4)
    # the log-probability of each generated token, as a full forward gives it
    full = torch.log_softmax(tiny_model(seq).float(), -1)[:, prompt_len - 1:-1]
    torch.testing.assert_close(logprobs, full.gather(2, new[..., None])[..., 0], atol=1e-4, rtol=1e-4)


def test_no_capture_where_the_window_does_not_start_at_zero(tiny_model):
    prompts = prompts_of(2, 40, tiny_model.cfg.d_vocab)
    _, _, att = generate(tiny_model, prompts, MonitorConfig(max_new_tokens=32), capture_pooling=("mean",))
    assert att is None


def test_sampling_is_seeded(tiny_model):
    prompts = prompts_of(4, 32, tiny_model.cfg.d_vocab)
    draw = lambda seed: generate(tiny_model, prompts, MonitorConfig(sample=True, seed=seed, temperature=2.0))[0]  # noqa: E731
    greedy = generate(tiny_model, prompts, MonitorConfig())[0]
    torch.testing.assert_close(draw(1), draw(1), rtol=0, atol=0)
    assert not torch.equal(draw(1), draw(2)) and not torch.equal(draw(1), greedy)
    top1 = generate(tiny_model, prompts, MonitorConfig(sample=True, seed=3, top_k=1))[0]
    torch.testing.assert_close(top1, greedy, rtol=0, atol=0)  # top-1 sampling is greedy


def test_reused_attention_scores_as_reencoded(tiny_model):
    """The first stretch's attention comes from generation; re-encoding it gives the same verdicts."""
    L = tiny_model.cfg.n_layers
    torch.manual_seed(0)
    clf = SpanClassifier([AttentionCNN(L, 3, CNNConfig(6, 4, "max", n_feat_fc=8)).eval(),
                          AttentionCNN(L, 3, CNNConfig(6, 4, "mean", n_feat_fc=8)).eval()], CLASSES)
    prompts = prompts_of(3, 32, tiny_model.cfg.d_vocab)
    on = monitor(tiny_model, prompts, clf, MonitorConfig(max_new_tokens=96), progress=False)
    off = monitor(tiny_model, prompts, clf, MonitorConfig(max_new_tokens=96, capture=False), progress=False)
    assert [(s.prompt, s.start, s.end) for s in on.spans] == [(p, a, a + 32) for p in range(3) for a in (0, 32, 64)]
    assert [s.reused for s in on.spans] == [True, False, False] * 3 and not any(s.reused for s in off.spans)
    for a, b in zip(on.spans, off.spans):
        assert a.label == b.label
        np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-4)
        assert abs(sum(a.probs.values()) - 1) < 1e-5
    np.testing.assert_array_equal(on.outputs, off.outputs)


def test_prompts_of_several_lengths_keep_their_order(tiny_model):
    clf = SpanClassifier([fixed_cnn(tiny_model.cfg.n_layers, 0)], CLASSES)
    vocab = tiny_model.cfg.d_vocab
    prompts = [prompts_of(1, n, vocab, seed=n)[0].tolist() for n in (32, 40, 32, 10)]
    res = monitor(tiny_model, prompts, clf, MonitorConfig(max_new_tokens=64, batch_size=1), progress=False)
    for i, p in enumerate(prompts):
        alone = generate(tiny_model, torch.tensor([p]), MonitorConfig(max_new_tokens=64))[0][0]
        np.testing.assert_array_equal(res.outputs[i], alone.numpy())
    starts = {i: [s.start for s in res.spans_of(i)] for i in range(4)}
    assert starts == {0: [0, 32], 1: [0, 32], 2: [0, 32], 3: [22]}


def test_fixed_decisions_flag_nothing_or_everything(tiny_model):
    """Fresh text through a CNN fixed on Non-Memo is never flagged; fixed on Recall, always."""
    L = tiny_model.cfg.n_layers
    prompts = prompts_of(4, 32, tiny_model.cfg.d_vocab, seed=5)
    quiet = monitor(tiny_model, prompts, SpanClassifier([fixed_cnn(L, 0)], CLASSES), MonitorConfig(max_new_tokens=64),
                    progress=False)
    assert len(quiet.spans) == 8 and not any(s.flagged for s in quiet.spans)
    assert all(s.label == "Non-Memo" and s.probs["Non-Memo"] > 0.99 for s in quiet.spans)
    loud = monitor(tiny_model, prompts, SpanClassifier([fixed_cnn(L, 2)], CLASSES), MonitorConfig(max_new_tokens=64),
                   progress=False)
    assert all(s.flagged and s.label == "Others" for s in loud.spans)


def test_classifier_checks_what_it_is_given(tiny_model):
    L = tiny_model.cfg.n_layers
    with pytest.raises(ValueError, match="classes"):
        SpanClassifier([fixed_cnn(L, 0, n_classes=4)], CLASSES)
    with pytest.raises(ValueError, match="at least one"):
        SpanClassifier([], CLASSES)
    other = SpanClassifier([fixed_cnn(L + 1, 0)], CLASSES)
    with pytest.raises(ValueError, match="layers"):
        monitor(tiny_model, prompts_of(1, 32, 100), other, progress=False)
    with pytest.raises(ValueError, match="too few"):
        monitor(tiny_model, prompts_of(1, 32, 100), SpanClassifier([fixed_cnn(L, 0)], CLASSES),
                MonitorConfig(max_new_tokens=16), progress=False)
    with pytest.raises(ValueError, match="too few"):  # 5 prompt tokens: 59 new ones for 32 before a stretch
        monitor(tiny_model, prompts_of(1, 5, 100), SpanClassifier([fixed_cnn(L, 0)], CLASSES),
                MonitorConfig(max_new_tokens=58), progress=False)
    assert len(monitor(tiny_model, prompts_of(1, 5, 100), SpanClassifier([fixed_cnn(L, 0)], CLASSES),
                       MonitorConfig(max_new_tokens=59), progress=False).spans) == 1


# ---------------------------------------------------------------------------- the testbed, a trained CNN
@pytest.fixture(scope="module")
def testbed_recall_cnn():
    """The testbed model and a CNN trained here on its own table: Non-Memo vs memorized (Recall), 12
    planted passages planted over 1000 times kept out of its training set for the test."""
    from mechmem.data import load_memorization_data
    from mechmem.models import load_model

    model = load_model("testbed", device="cpu")
    df = load_memorization_data("testbed", progress=False)
    planted = df[(df["source"] == "planted") & (df["planted_count"] > 1000) & (df["memorization_score"] == 1)]
    test_rows = planted.sample(12, random_state=0)
    rest = df.drop(test_rows.index)
    memo = rest[rest["memorization_score"] == 1].sample(200, random_state=1)
    non = rest[rest["memorization_score"] < 1].sample(200, random_state=2)
    rows = pd.concat([memo, non])
    tokens = torch.as_tensor(np.stack(rows["tokens"].to_numpy()))
    tokens = free_generation(model, tokens, rows["memorization_score"].to_numpy(),
                             continuation=torch.as_tensor(np.stack(rows["greedy_suffix"].to_numpy())))
    labels = (rows["memorization_score"].to_numpy() == 1).astype(np.int64)
    feats = extract_attention(model, tokens, pooling=("mean",)).half().float()
    idx = np.random.default_rng(0).permutation(len(labels))
    trained = train_cnn(feats, ("mean",), labels, idx[:320], idx[320:], 2, CNNConfig(6, 8, "mean"),
                        TrainConfig(epochs=20, device="cpu"))
    return model, SpanClassifier([trained.model], ["Non-Memo", "Recall"]), test_rows, trained


def test_a_planted_passage_the_testbed_recites_is_flagged(testbed_recall_cnn):
    model, clf, test_rows, trained = testbed_recall_cnn
    assert trained.eval_metrics.f1.min() > 0.7  # the CNN learned something to test with
    prompts = np.stack(test_rows["tokens"].to_numpy())[:, :PREFIX_LEN]
    res = monitor(model, prompts, clf, MonitorConfig(max_new_tokens=32), tokenizer=model.tokenizer, progress=False)
    # the testbed recites them: the generated stretch is the passage's next 32 tokens
    np.testing.assert_array_equal(res.outputs, np.stack(test_rows["tokens"].to_numpy())[:, PREFIX_LEN:])
    flagged = [s.flagged for s in res.spans]
    assert len(flagged) == 12 and sum(flagged) >= 10, [round(s.probs["Recall"], 2) for s in res.spans]
    assert all(s.reused and s.text for s in res.spans)


def test_the_cnns_refuse_another_models_attention(tiny_model, tmp_path, tiny_checkpoint):
    from test_localize import make_run

    from mechmem.models import weights_fingerprint

    folder = make_run(tmp_path / "run", tiny_model, tiny_checkpoint)[0]
    clf = SpanClassifier.from_run(folder)
    assert clf.model_weights == weights_fingerprint(tiny_model) and clf.name == "Non-Memo, Guess, Others"
    prompts = prompts_of(1, 32, tiny_model.cfg.d_vocab)
    assert len(monitor(tiny_model, prompts, clf, progress=False).spans) == 1
    scaled = [str(float(v) * 1.005) for v in clf.model_weights.split(",")]  # bf16 rounding: still the same model
    clf.model_weights = ",".join(scaled)
    monitor(tiny_model, prompts, clf, progress=False)
    clf.model_weights = ",".join(str(float(v) * 1.2) for v in scaled)
    with pytest.raises(ValueError, match="another model"):
        monitor(tiny_model, prompts, clf, progress=False)
