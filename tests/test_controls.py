import itertools

import numpy as np
import pytest
import torch

from mechmem import alignment as al
from mechmem.cnn import CNNConfig, Task, TrainConfig, classification_metrics, train_cnn_tasks
from mechmem.controls import check_null, is_aligned, null_summary, permutation_null, shuffled_control, twin_epochs

POOLS = ("mean", "max")
CONFIGS = (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(5, 4, "max", n_feat_fc=16))


def test_permutation_null_matches_the_exact_distribution():
    """Every distinct guess of 6 labels with their class sizes enumerated: the sampled null has the
    exact mean and the exact chance of a perfect guess (1 in 90)."""
    y = np.array([0, 0, 1, 1, 2, 2])
    exact = np.array([100 * classification_metrics(y, np.array(g), 3).min_f1 for g in set(itertools.permutations(y))])
    assert len(exact) == 90
    null = permutation_null(y, n_permutations=20000, seed=1)
    assert null.mean() == pytest.approx(exact.mean(), abs=0.5)
    assert np.mean(null == 100) == pytest.approx(1 / 90, abs=0.004)


def test_permutation_null_is_seeded_and_sits_below_chance():
    y = np.repeat([0, 1, 2], 50)
    a, b = permutation_null(y, 300, seed=4), permutation_null(y, 300, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, permutation_null(y, 300, seed=5))
    null = permutation_null(y, 2000, seed=0)  # each class's F1 about 1/3, their minimum a little less
    assert 100 / 3 - 10 < null.mean() < 100 / 3 < np.percentile(null, 99) < 100 / 3 + 10


def test_null_summary_p_value():
    null = np.arange(100, dtype=float)
    s = null_summary(null, 97.5)
    assert s["min_f1_null_p95"] == pytest.approx(94.05)
    assert s["min_f1_null_p"] == pytest.approx(3 / 101)


@pytest.mark.parametrize("counts, permutations, ok", [
    ([1, 1, 1], 1000, False),     # 6 relabellings: 1 in 6 is perfect
    ([3, 3], 1000, False),        # 20: a perfect score sits exactly at the 95th percentile
    ([4, 4], 1000, True),         # 70
    ([2, 2, 2], 1000, True),      # 90
    ([150] * 3, 99, False),       # too few permutations for a 95th percentile
    ([2000] * 4, 1000, True),     # the paper's size: no overflow, at once
])
def test_check_null(counts, permutations, ok):
    if ok:
        check_null(counts, permutations)
    else:
        with pytest.raises(ValueError, match="permutation null"):
            check_null(counts, permutations)


def test_alignment_config_refuses_a_null_that_cannot_say_yes():
    rows = (al.Row("merge_2_other_guess_recollect_recite", 5),)
    with pytest.raises(ValueError, match="too few for the permutation null"):
        al.AlignmentConfig(rows=rows, train_per_class=10, eval_per_class=1)
    with pytest.raises(ValueError, match="control_seeds"):
        al.AlignmentConfig(rows=rows, cnn_seeds=2, control_seeds=3)


def test_shuffled_control_permutes_training_labels_only_and_carries_the_twins_epochs():
    labels = np.repeat([0, 1, 2], 10)
    task = Task(labels, np.arange(21), np.arange(21, 30))
    control = shuffled_control(task, seed=0, epochs=[5, 2])
    assert control.epochs == [5, 2]
    np.testing.assert_array_equal(control.labels[21:], labels[21:])
    assert sorted(control.labels[:21]) == sorted(labels[:21]) and not np.array_equal(control.labels[:21], labels[:21])


def test_is_aligned_needs_the_null_and_the_control():
    base = {"min_f1": 60.0, "min_f1_ci_low": 55.0, "min_f1_null_p95": 40.0}
    assert is_aligned(base)
    assert not is_aligned(base | {"min_f1_null_p95": 60.0})
    assert is_aligned(base | {"min_f1_control_ci_high": 50.0})
    assert not is_aligned(base | {"min_f1_control_ci_high": 56.0})


def features(n: int, labels: np.ndarray | None, seed: int, n_layers: int = 3, seq_len: int = 24) -> torch.Tensor:
    """Attention-like rows that vary by sample as real heads do (random weights on the diagonal, the
    previous and the first token, plus noise; causal softmax); with labels, class c brightens layer c's
    diagonal, else nothing in them depends on any label."""
    g = torch.Generator().manual_seed(seed)
    eye, prev = torch.eye(seq_len), torch.diag(torch.ones(seq_len - 1), -1)
    first = torch.zeros(seq_len, seq_len)
    first[:, 0] = 1
    w = 3 * torch.rand(n, 1, n_layers, 3, 1, 1, generator=g)
    scores = w[:, :, :, 0] * eye + w[:, :, :, 1] * prev + w[:, :, :, 2] * first
    scores = scores + torch.randn(n, len(POOLS), n_layers, seq_len, seq_len, generator=g)
    if labels is not None:
        scores[torch.arange(n), :, torch.from_numpy(labels)] += 6 * eye
    mask = torch.ones(seq_len, seq_len).tril().bool()
    return scores.masked_fill(~mask, -torch.inf).softmax(-1).half()


def run_row(feats: torch.Tensor, labels: np.ndarray, seed: int) -> dict:
    """A row as run_alignment scores it: CNNs, then their shuffled-label control on the twin's epochs."""
    n_train = len(labels) // 2
    task = Task(labels, np.arange(n_train), np.arange(n_train, len(labels)))
    train = TrainConfig(seed=seed, device="cpu", epochs=15)  # the converged protocol, a lower cap: a fast test
    cfg = al.AlignmentConfig(rows=(al.Row("merge_2_other_guess_recollect_recite", 5),), configs=CONFIGS, train=train,
                             train_per_class=n_train // 3, eval_per_class=(len(labels) - n_train) // 3,
                             n_boot=200, seed=seed, null_permutations=500)
    (cnns,) = train_cnn_tasks(feats, POOLS, [task], 3, CONFIGS, train, progress=False)
    (control,) = train_cnn_tasks(feats, POOLS, [shuffled_control(task, seed, twin_epochs(cnns))], 3, CONFIGS, train,
                                 progress=False)
    return al.score_row([cnns], [control], None, labels[task.eval_idx], 3, cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_without_label_information_are_not_aligned_and_the_control_lands_near_chance(seed):
    """Labels drawn independently of the features: the row is not flagged aligned, and the control,
    trained on its twin's budget and scored on centred logits, lands near chance, not at zero as its
    argmax does (the collapse that early stopping on shuffled labels gave)."""
    labels = np.random.default_rng(100 + seed).permutation(np.repeat([0, 1, 2], 120))
    s = run_row(features(360, None, seed), labels, seed)
    assert not s["aligned"]
    chance = s["min_f1_chance"]
    assert 0.55 * chance <= s["min_f1_control"] and s["min_f1_control_ci_low"] <= chance <= s["min_f1_control_ci_high"] + 8
    assert s["min_f1"] <= s["min_f1_null_p95"]  # the null alone says no


@pytest.mark.parametrize("seed", [0, 1])
def test_features_that_carry_the_label_are_aligned(seed):
    labels = np.random.default_rng(seed).permutation(np.repeat([0, 1, 2], 120))
    s = run_row(features(360, labels, seed), labels, seed)
    assert s["aligned"]
    assert s["min_f1"] > s["min_f1_null_p95"] + 20 and s["min_f1_ci_low"] > s["min_f1_control_ci_high"]


def test_centred_logits_spread_a_near_uniform_classifiers_decisions():
    from mechmem.controls import centred

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 0.05, -0.05]) + 0.01 * torch.randn(300, 3, generator=g)  # biases decide the argmax
    assert set(logits.argmax(-1).tolist()) == {1}
    counts = np.bincount(centred(logits).argmax(-1).numpy(), minlength=3)
    assert counts.min() > 60


def test_several_control_shuffles_are_averaged_and_their_spread_reported():
    from mechmem.cnn import ClassMetrics, TrainedCNN

    y = np.repeat([0, 1, 2], 40)
    g = torch.Generator().manual_seed(0)

    def fake(logits):
        return TrainedCNN(CONFIGS[0], None, logits, ClassMetrics.__new__(ClassMetrics), epochs_run=5)  # type: ignore[arg-type]

    real = [fake(torch.nn.functional.one_hot(torch.from_numpy(y), 3).float())]
    shuffles = [[fake(torch.randn(120, 3, generator=g))] for _ in range(2)]
    cfg = al.AlignmentConfig(rows=(al.Row("merge_2_other_guess_recollect_recite", 5),), configs=CONFIGS,
                             eval_per_class=40, n_boot=100)
    s = al.score_row([real], shuffles, None, y, 3, cfg)
    per = s["min_f1_control_per_seed"]
    assert len(per) == 2 and s["min_f1_control_seed_sd"] == pytest.approx(np.std(per, ddof=1))
    assert s["min_f1_control"] == pytest.approx(np.mean(per))  # one CNN a shuffle: the mean of theirs
    assert s["aligned"] and s["control_epochs"] == 5
