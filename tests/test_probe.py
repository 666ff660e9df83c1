import numpy as np
import torch

from mechmem.cnn import classification_metrics
from mechmem.probe import STATISTICS, attention_statistics, train_probe


def causal_softmax(n, layers=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 2, layers, seq, seq, generator=g)
    mask = torch.ones(seq, seq).tril().bool()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def test_statistics_by_hand():
    a = causal_softmax(3)
    stats = attention_statistics(a.numpy().astype(np.float16), chunk=2)
    assert stats.shape == (3, 2 * 2 * len(STATISTICS) * 2)
    x = a.double()
    # sample 1, pool 1, layer 0: (stat, half) block
    block = stats[1].reshape(2, 2, len(STATISTICS), 2)[1, 0]
    rows = x[1, 1, 0]
    entropy = -(rows * torch.log(rows.clamp_min(1e-12))).sum(-1)
    np.testing.assert_allclose(block[0], [entropy[:4].mean(), entropy[4:].mean()], atol=2e-3)
    np.testing.assert_allclose(block[1], [rows.diagonal()[:4].mean(), rows.diagonal()[4:].mean()], atol=2e-3)
    prev = torch.cat([torch.zeros(1, dtype=x.dtype), rows.diagonal(-1)])
    np.testing.assert_allclose(block[2], [prev[:4].mean(), prev[4:].mean()], atol=2e-3)
    np.testing.assert_allclose(block[3], [rows[:4, 0].mean(), rows[4:, 0].mean()], atol=2e-3)


def test_probe_separates_a_statistic_and_never_sees_eval_labels():
    n = 300
    a = causal_softmax(n, seed=1)
    labels = np.arange(n) % 3
    # class 2: attention sinks on the first token in layer 1 (a statistic the probe reads)
    a[labels == 2, :, 1] = 0.5 * a[labels == 2, :, 1]
    a[labels == 2, :, 1, :, 0] += 0.5
    stats = attention_statistics(a)
    train, ev = np.arange(200), np.arange(200, n)
    out = train_probe(stats, labels, train, ev, 3)
    m = classification_metrics(labels[ev], out.eval_logits.argmax(-1), 3)
    assert m.f1[2] > 0.95  # the separable class
    # Eval labels do not enter the fit: scrambling them leaves the predictions unchanged.
    scrambled = labels.copy()
    scrambled[ev] = np.random.default_rng(0).permutation(scrambled[ev])
    again = train_probe(stats, scrambled, train, ev, 3)
    torch.testing.assert_close(again.eval_logits, out.eval_logits)


def test_probe_leaves_a_class_missing_from_training_unpredicted():
    stats = np.random.default_rng(0).normal(size=(60, 4))
    labels = np.arange(60) % 3
    train = np.flatnonzero(labels != 2)[:30]
    out = train_probe(stats, labels, train, np.arange(40, 60), 3)
    assert out.eval_logits.shape == (20, 3) and torch.isinf(out.eval_logits[:, 2]).all()
