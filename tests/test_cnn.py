import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechmem.cnn import (
    PAPER_GRID,
    QUICK_GRID,
    AttentionCNN,
    ClassMetrics,
    CNNConfig,
    Task,
    TrainConfig,
    TrainedCNN,
    _CNNStack,
    alignment_summary,
    classification_metrics,
    load_cnns,
    save_cnns,
    train_cnn_tasks,
    train_cnns,
)

POOLS = ("mean", "max")


def diagonal_toy(n: int, n_layers: int = 3, seq_len: int = 64, seed: int = 0):
    """Class c = the layer channel that carries a bright diagonal, on top of uniform noise; both pools alike."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % n_layers
    feats = 0.3 * torch.rand(n, len(POOLS), n_layers, seq_len, seq_len, generator=g)
    feats[torch.arange(n), :, labels] += torch.eye(seq_len)
    return feats.half(), labels


def small_run(configs, n=40, seq_len=32, epochs=1, **kw):
    feats, labels = diagonal_toy(n, seq_len=seq_len)
    return train_cnns(feats, POOLS, labels, np.arange(n - 8), np.arange(n - 8, n), 3, configs,
                      TrainConfig(protocol="paper", epochs=epochs, **kw), progress=False)


# ----------------------------------------------------------------------------- configs and model


def test_grids():
    names = [c.name for c in PAPER_GRID]
    assert len(set(names)) == 8 and "k6_c10_mean" in names and "k8_c16_max" in names
    assert {c.n_feat_fc for c in PAPER_GRID} == {64}
    assert [c.name for c in QUICK_GRID] == ["k6_c10_mean", "k6_c10_max"]


def test_model_shapes():
    x = torch.rand(5, 4, 64, 64)
    for k, c, side in ((6, 10, 12), (8, 16, 10)):  # 64-k+1 -> /2 -> -k+1 -> /2
        model = AttentionCNN(4, 3, CNNConfig(kernel_size=k, channels=c))
        assert model.layers.fc1.in_features == c * side * side
        assert model(x).shape == (5, 3)


@pytest.mark.parametrize("make", [
    lambda: CNNConfig(pooling="median"),
    lambda: CNNConfig(dropout=1.0),
    lambda: AttentionCNN(4, 3, CNNConfig(kernel_size=8), seq_len=20),
    lambda: AttentionCNN(4, 1),
])
def test_bad_model_args(make):
    with pytest.raises(ValueError):
        make()


def test_stack_matches_members():
    torch.manual_seed(0)
    members = [AttentionCNN(3, 4, CNNConfig(pooling=p)) for p in POOLS]
    stack = _CNNStack(members).eval()
    xs = [torch.rand(6, 3, 64, 64) for _ in members]
    out = stack(torch.cat(xs, dim=1))
    for g, (m, x) in enumerate(zip(members, xs)):
        torch.testing.assert_close(out[:, g], m.eval()(x))
        torch.testing.assert_close(stack.unstack()[g](x), m(x))
    with pytest.raises(ValueError):
        _CNNStack([AttentionCNN(3, 4, CNNConfig(kernel_size=6)), AttentionCNN(3, 4, CNNConfig(kernel_size=8))])


def test_stack_reads_a_shared_transform_of_its_scaled_inputs():
    """What the fleet feeds its stacks (inputs scaled, and on the FFT path transformed, once for all
    stacks): the same output as the stack scaling and transforming its own inputs, bit for bit; a
    Spectrum's members picked out equal the transform of those members' inputs."""
    from mechmem.cnn.model import Spectrum, scale_input

    torch.manual_seed(0)
    members = [AttentionCNN(3, 4, CNNConfig(pooling=p), input_scaling="log-pixel") for p in POOLS]
    for m in members:
        m.scale.mean.normal_()
        m.scale.std.uniform_(0.5, 2)
    stack = _CNNStack(members).eval()
    stack.fft = True
    x = torch.rand(5, 2 * 3, 64, 64)
    scaled = scale_input(x, stack.scale_mean, stack.scale_std, log=True)
    out = stack(x)
    assert torch.equal(stack(scaled, scaled=True), out)
    assert torch.equal(stack(Spectrum.of(scaled)), out)
    assert not torch.equal(stack(x, scaled=True), out)  # (unscaled inputs are another thing)
    picked = Spectrum.of(scaled).select(torch.tensor([1]), 2)
    torch.testing.assert_close(picked.freq, Spectrum.of(scaled[:, 3:]).freq, rtol=0, atol=1e-5)
    assert picked.size == (64, 64)
    stack.fft = False
    with pytest.raises(ValueError, match="FFT path"):
        stack(Spectrum.of(scaled))


# ----------------------------------------------------------------------------- metrics


def test_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, 3, logits=torch.zeros(6, 3))
    np.testing.assert_array_equal(m.confusion, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_allclose(m.precision, [1, 1 / 2, 1 / 2])
    np.testing.assert_allclose(m.recall, [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(m.f1, [0.8, 0.5, 2 / 3])
    assert m.min_f1 == pytest.approx(0.5) and m.mean_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m.min_precision == 0.5 and m.min_recall == 0.5 and m.accuracy == pytest.approx(4 / 6)
    assert m.loss == pytest.approx(math.log(3))  # uniform logits
    np.testing.assert_array_equal(m.support, [3, 2, 1])


def test_metrics_loss_from_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    m = classification_metrics([0, 0], [0, 1], 2, logits)
    expected = (-torch.log_softmax(logits, -1)[[0, 1], [0, 0]]).mean()
    assert m.loss == pytest.approx(float(expected))


def test_metrics_zero_division():
    # class 2 is never true and never predicted; class 1 is true but never predicted
    m = classification_metrics([0, 0, 1], [0, 0, 0], 3)
    np.testing.assert_allclose(m.precision, [2 / 3, 0, 0])
    np.testing.assert_allclose(m.recall, [1, 0, 0])
    np.testing.assert_allclose(m.f1, [0.8, 0, 0])
    assert math.isnan(m.loss)


@pytest.mark.parametrize("args", [
    ([0, 3], [0, 1], 3, None),  # label out of range
    ([0, -1], [0, 1], 3, None),
    ([0, 1], [0], 3, None),  # length mismatch
    ([], [], 3, None),
    ([0, 1], [0, 1], 3, torch.zeros(2, 2)),  # logits shape
    ([0.0, 1.0], [0, 1], 3, None),  # not integers
])
def test_metrics_bad_inputs(args):
    with pytest.raises(ValueError):
        classification_metrics(*args)


# ----------------------------------------------------------------------------- alignment summary


def fake_trained(y: np.ndarray, pred: np.ndarray, n_classes: int, name_pooling="mean") -> TrainedCNN:
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred), n_classes).float() * 3
    config = CNNConfig(pooling=name_pooling)
    return TrainedCNN(config, AttentionCNN(2, n_classes, config), logits,
                      classification_metrics(y, pred, n_classes, logits))


def noisy_predictions(n: int, n_classes: int = 3, seed: int = 0, accuracy: float = 0.8):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    pred = np.where(rng.random(n) < accuracy, y, rng.integers(0, n_classes, n))
    return y, pred


def test_alignment_summary_point_estimates():
    y, p1 = noisy_predictions(90, seed=1)
    _, p2 = noisy_predictions(90, seed=2)
    t1, t2 = fake_trained(y, p1, 3), fake_trained(y, p2, 3, "max")
    s = alignment_summary([t1, t2], y, n_boot=200)
    m1, m2 = t1.eval_metrics, t2.eval_metrics
    assert s["min_f1"] == pytest.approx(50 * (m1.min_f1 + m2.min_f1))
    assert s["mean_rec"] == pytest.approx(50 * (m1.mean_recall + m2.mean_recall))
    assert s["min_prec"] == pytest.approx(50 * (m1.min_precision + m2.min_precision))
    assert s["mean_eval_loss"] == pytest.approx((m1.loss + m2.loss) / 2)
    assert s["min_f1_ci_low"] <= s["min_f1"] <= s["min_f1_ci_high"]


def test_bootstrap_matches_naive_loop():
    y, p1 = noisy_predictions(50, seed=3)
    _, p2 = noisy_predictions(50, seed=4)
    s = alignment_summary([fake_trained(y, p1, 3), fake_trained(y, p2, 3, "max")], y, n_boot=300, seed=7)
    idx = np.random.default_rng(7).integers(0, 50, size=(300, 50))  # one chunk: same draws
    stats = [100 * np.mean([classification_metrics(y[i], p[i], 3).min_f1 for p in (p1, p2)]) for i in idx]
    assert s["min_f1_ci_low"] == pytest.approx(np.percentile(stats, 2.5))
    assert s["min_f1_ci_high"] == pytest.approx(np.percentile(stats, 97.5))


def test_bootstrap_uses_same_resample_for_all_configs():
    y, p = noisy_predictions(120)
    one = alignment_summary([fake_trained(y, p, 3)], y, n_boot=300)
    two = alignment_summary([fake_trained(y, p, 3), fake_trained(y, p, 3, "max")], y, n_boot=300)
    # identical configs resampled together must give the single config's interval exactly
    assert (one["min_f1_ci_low"], one["min_f1_ci_high"]) == (two["min_f1_ci_low"], two["min_f1_ci_high"])


def test_grouped_bootstrap_resamples_documents_not_their_copies():
    """Fifty windows of each document say no more than the document once: the sample bootstrap
    shrinks its interval about sqrt(50) times, the one over documents (`groups`) keeps it."""
    y, p = noisy_predictions(60)
    once = alignment_summary([fake_trained(y, p, 3)], y, n_boot=2000)
    y_big, p_big, doc = np.repeat(y, 50), np.repeat(p, 50), np.repeat(np.arange(60), 50)
    windows = alignment_summary([fake_trained(y_big, p_big, 3)], y_big, n_boot=2000)
    documents = alignment_summary([fake_trained(y_big, p_big, 3)], y_big, n_boot=2000, groups=doc)
    width = {k: s["min_f1_ci_high"] - s["min_f1_ci_low"] for k, s in
             (("once", once), ("windows", windows), ("documents", documents))}
    assert documents["min_f1"] == pytest.approx(once["min_f1"]) and documents["interval_unit"] == "documents (60)"
    assert width["windows"] < width["once"] / 4
    assert width["documents"] == pytest.approx(width["once"], rel=0.25)
    assert "interval_unit" not in once
    with pytest.raises(ValueError, match="groups for"):
        alignment_summary([fake_trained(y, p, 3)], y, n_boot=10, groups=doc)


def test_bootstrap_ci_shrinks_with_more_samples():
    y, p = noisy_predictions(60)
    small = alignment_summary([fake_trained(y, p, 3)], y, n_boot=500)
    y_big, p_big = np.tile(y, 50), np.tile(p, 50)  # same point estimate, 50x the samples
    big = alignment_summary([fake_trained(y_big, p_big, 3)], y_big, n_boot=500)
    assert big["min_f1"] == pytest.approx(small["min_f1"])
    for s in (small, big):
        assert s["min_f1_ci_low"] <= s["min_f1"] <= s["min_f1_ci_high"]
    width = lambda s: s["min_f1_ci_high"] - s["min_f1_ci_low"]
    assert width(big) < width(small) / 4


def test_alignment_summary_bad_inputs():
    y, p = noisy_predictions(30)
    t = fake_trained(y, p, 3)
    with pytest.raises(ValueError):
        alignment_summary([t], y[:-1])
    with pytest.raises(ValueError):
        alignment_summary([t], np.full(30, 3))
    with pytest.raises(ValueError):
        alignment_summary([], y)


# ----------------------------------------------------------------------------- training


def test_learns_separable_toy():
    """Class = which layer carries a bright diagonal: every config of the quick grid must learn it."""
    feats, labels = diagonal_toy(240)
    trained = train_cnns(feats, POOLS, labels, np.arange(180), np.arange(180, 240), 3, QUICK_GRID,
                         TrainConfig(protocol="paper", epochs=3), progress=False)
    assert [t.config for t in trained] == list(QUICK_GRID)
    for t in trained:
        assert t.eval_metrics.min_f1 > 0.95, (t.config.name, t.eval_metrics.f1)
        assert t.eval_logits.shape == (60, 3) and not t.model.training
        assert len(t.train_losses) == 3 and t.train_losses[-1] < t.train_losses[0]
    summary = alignment_summary(trained, labels[180:], n_boot=200)
    assert summary["min_f1"] > 95


def test_each_config_reads_its_own_pool():
    """Pools are picked by name: the pool named "mean" is blank here, so the mean CNN cannot learn."""
    feats, labels = diagonal_toy(120, seq_len=32)
    feats[:, 1] = 0  # pool axis named ("max", "mean") below: the "mean" image is all zeros
    trained = train_cnns(feats, ("max", "mean"), labels, np.arange(90), np.arange(90, 120), 3,
                         [CNNConfig(pooling="max"), CNNConfig(pooling="mean")], TrainConfig(protocol="paper", epochs=6),
                         progress=False)
    by_pool = {t.config.pooling: t.eval_metrics for t in trained}
    assert by_pool["max"].min_f1 > 0.9
    assert by_pool["mean"].min_f1 == 0  # constant input -> constant prediction -> some class never predicted


def device_of(model):
    return next(model.parameters()).device


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, exact=False):
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_config_independent_of_its_neighbours():
    a, b, c = CNNConfig(6, 10, "mean"), CNNConfig(6, 10, "max"), CNNConfig(8, 16, "max")
    alone = small_run([a])[0]
    for together in (small_run([b, a, c], fuse=True), small_run([a, b], fuse=False)):
        mine = next(t for t in together if t.config == a)
        assert_same_weights(state(alone.model), state(mine.model))
        torch.testing.assert_close(alone.eval_logits, mine.eval_logits, rtol=1e-4, atol=1e-5)
        assert alone.train_losses == pytest.approx(mine.train_losses, rel=1e-5)
    # ...and training actually moved the weights away from the shared init
    moved = small_run([a], seed=1)[0]
    assert not torch.allclose(moved.model.layers.fc2.weight, alone.model.layers.fc2.weight)


def three_tasks(n=48):
    """Three taxonomies over one feature array: other labels, other (equal-sized) training sets, other eval sets."""
    feats, diag = diagonal_toy(n, seq_len=32)
    rng = np.random.default_rng(0)
    tasks = []
    for t, n_eval in zip(range(3), (8, 5, 8)):
        order = rng.permutation(n)
        labels = diag.numpy() if t == 0 else (diag.numpy() + t) % 3
        tasks.append(Task(labels, order[:30], order[30:30 + n_eval]))
    return feats, tasks


@pytest.mark.parametrize("fuse", [False, True])
def test_tasks_trained_together_equal_tasks_trained_alone(fuse):
    feats, tasks = three_tasks()
    configs = (CNNConfig(6, 4, "mean"), CNNConfig(6, 4, "max"), CNNConfig(8, 4, "mean"))
    train = TrainConfig(protocol="paper", epochs=2, fuse=fuse, device="cpu")
    together = train_cnn_tasks(feats, POOLS, tasks, 3, configs, train, progress=False)
    for task, mine in zip(tasks, together):
        alone = train_cnns(feats, POOLS, task.labels, task.train_idx, task.eval_idx, 3, configs,
                           TrainConfig(protocol="paper", epochs=2, fuse=False, device="cpu"), progress=False)
        for a, b in zip(alone, mine):
            assert a.config == b.config and b.eval_logits.shape == (len(task.eval_idx), 3)
            assert_same_weights(state(a.model), state(b.model), exact=not fuse)
            # (weights exact unfused; eval logits to float rounding: eval batches are padded to the longest task)
            torch.testing.assert_close(b.eval_logits, a.eval_logits, rtol=1e-4, atol=1e-6 if not fuse else 1e-5)
            assert b.train_losses == pytest.approx(a.train_losses, rel=1e-5)
    # the tasks differ, so their CNNs do
    assert not torch.allclose(together[0][0].eval_logits[:5], together[1][0].eval_logits[:5])


@pytest.mark.parametrize("fuse", [False, True])
def test_training_seeds_in_one_pass_equal_one_pass_each(fuse):
    """`Task.seed`: a task's training seeds train together (with a follower each) as each does alone
    under `TrainConfig.seed` - initialisation, dropout, validation split, batch order and early stopping."""
    feats, tasks = three_tasks()
    configs = (CNNConfig(6, 4, "mean"), CNNConfig(8, 4, "max"))
    train = TrainConfig(protocol="converged", epochs=5, patience=1, fuse=fuse, device="cpu")
    task = tasks[1]
    control = Task(task.labels[::-1].copy(), task.train_idx, task.eval_idx)
    seeds = (0, 3, 7)
    together = train_cnn_tasks(feats, POOLS, [replace(task, seed=k) for k in seeds]
                               + [replace(control, follows=i, seed=k) for i, k in enumerate(seeds)],
                               3, configs, replace(train, seed=99), progress=False)
    for i, k in enumerate(seeds):
        alone = train_cnn_tasks(feats, POOLS, [task, replace(control, follows=0)], 3, configs,
                                replace(train, seed=k), progress=False)
        for a, b in zip(alone[0] + alone[1], together[i] + together[len(seeds) + i]):
            assert (a.config, a.epochs_run, a.best_epoch) == (b.config, b.epochs_run, b.best_epoch)
            assert a.val_losses == pytest.approx(b.val_losses, rel=1e-5)
            assert_same_weights(state(a.model), state(b.model), exact=not fuse)
            torch.testing.assert_close(b.eval_logits, a.eval_logits, rtol=1e-4, atol=1e-5)
    # the seeds differ, so their CNNs do
    assert not torch.allclose(together[0][0].eval_logits, together[1][0].eval_logits)


@pytest.mark.parametrize("fuse", [False, True])
def test_tasks_that_do_not_fit_one_step_train_in_halves_with_the_same_results(fuse, monkeypatch, caplog):
    """Out of device memory, train_cnn_tasks splits the tasks (each follower with its twin) until a
    step fits; every task's CNNs come out as in one pass, in the tasks' order. One unit that does not
    fit raises."""
    import mechmem.cnn.training as training

    feats, tasks = three_tasks()
    tasks = [tasks[0], tasks[1], Task(tasks[1].labels[::-1].copy(), tasks[1].train_idx, tasks[1].eval_idx, follows=1),
             tasks[2]]
    configs = (CNNConfig(6, 4, "mean"), CNNConfig(8, 4, "max"))
    train = TrainConfig(protocol="converged", epochs=4, patience=1, fuse=fuse, device="cpu")
    whole = train_cnn_tasks(feats, POOLS, tasks, 3, configs, train, progress=False)
    lockstep, sizes = training._train_in_lockstep, []

    def small_device(features, pools, part, *args):
        sizes.append([t.follows for t in part])
        if len(part) > 1 and not (len(part) == 2 and part[1].follows == 0):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return lockstep(features, pools, part, *args)

    monkeypatch.setattr(training, "_train_in_lockstep", small_device)
    with caplog.at_level("WARNING", logger="mechmem"):
        split = train_cnn_tasks(feats, POOLS, tasks, 3, configs, train, progress=False)
    # 4 tasks -> (0, 1 + its follower) and (3); then 0 and (1 + follower), the follower's twin renumbered
    assert sizes == [[None, None, 1, None], [None, None, 1], [None], [None, 0], [None]]
    assert "4 tasks' CNNs do not fit one step" in caplog.text
    for a_task, b_task in zip(whole, split):
        for a, b in zip(a_task, b_task):
            assert (a.config, a.epochs_run, a.best_epoch) == (b.config, b.epochs_run, b.best_epoch)
            assert_same_weights(state(a.model), state(b.model), exact=not fuse)
            torch.testing.assert_close(b.eval_logits, a.eval_logits, rtol=1e-4, atol=1e-5)
    assert [m.epochs_run for m in split[2]] == [m.epochs_run for m in split[1]]  # the follower stopped with its twin
    monkeypatch.setattr(training, "_train_in_lockstep", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        train_cnn_tasks(feats, POOLS, tasks[1:3], 3, configs, train, progress=False)  # a twin and its follower: no split


def test_tasks_trained_together_need_equal_training_sets():
    feats, tasks = three_tasks()
    tasks[1] = Task(tasks[1].labels, tasks[1].train_idx[:20], tasks[1].eval_idx)
    with pytest.raises(ValueError, match="as many training samples"):
        train_cnn_tasks(feats, POOLS, tasks, 3, QUICK_GRID, TrainConfig(protocol="paper", device="cpu"), progress=False)


def test_deterministic_on_cpu():
    first, second = small_run(QUICK_GRID, device="cpu"), small_run(QUICK_GRID, device="cpu")
    for t1, t2 in zip(first, second):
        assert_same_weights(state(t1.model), state(t2.model), exact=True)
        assert torch.equal(t1.eval_logits, t2.eval_logits)


@pytest.mark.parametrize("fuse", [False, True])
def test_bf16_precision_trains_in_bfloat16_and_still_learns(fuse):
    """precision="bf16" must change the arithmetic (else it is a no-op flag), keep float32 weights,
    stay deterministic, and learn the separable toy as float32 does."""
    feats, labels = diagonal_toy(240)
    run = lambda precision: train_cnns(feats, POOLS, labels, np.arange(180), np.arange(180, 240), 3, QUICK_GRID,
                                       TrainConfig(protocol="paper", epochs=3, device="cpu", fuse=fuse, precision=precision),
                                       progress=False)
    full, half, again = run("float32"), run("bf16"), run("bf16")
    for f, h, a in zip(full, half, again):
        assert all(p.dtype == torch.float32 for p in h.model.parameters()) and h.eval_logits.dtype == torch.float32
        assert not torch.allclose(f.eval_logits, h.eval_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(h.eval_logits, a.eval_logits)
        assert h.eval_metrics.min_f1 > 0.95, (h.config.name, h.eval_metrics.f1)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown CNN precision 'fp8'"):
        TrainConfig(precision="fp8")


def test_numpy_memmap_features_give_same_result(tmp_path):
    feats, labels = diagonal_toy(40, seq_len=32)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=tuple(feats.shape))
    mm[:] = feats.numpy()
    mm.flush()
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    args = (POOLS, labels.numpy(), np.arange(32), np.arange(32, 40), 3, QUICK_GRID, TrainConfig(protocol="paper", epochs=1, device="cpu"))
    from_memmap = train_cnns(mm, *args, progress=False)
    from_tensor = train_cnns(feats, *args, progress=False)
    for t1, t2 in zip(from_memmap, from_tensor):
        assert_same_weights(state(t1.model), state(t2.model), exact=True)


@pytest.mark.parametrize("deterministic", [True, False])
def test_training_sets_cudnn_deterministic_and_restores_it(monkeypatch, deterministic):
    """On a GPU only deterministic cuDNN kernels make a rerun (or another rank) train the same CNNs."""
    import mechmem.cnn.training as cnn

    cudnn, seen = torch.backends.cudnn, []
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "benchmark", True)
    real = cnn._Fleet.train_epoch
    monkeypatch.setattr(cnn._Fleet, "train_epoch",
                        lambda *a: seen.append((cudnn.deterministic, cudnn.benchmark)) or real(*a))
    small_run(QUICK_GRID, deterministic=deterministic)
    assert seen and set(seen) == {(True, False) if deterministic else (False, True)}
    assert (cudnn.deterministic, cudnn.benchmark) == (False, True)


def test_model_logits_match_eval_logits():
    feats, labels = diagonal_toy(40, seq_len=32)
    t = train_cnns(feats, POOLS, labels, np.arange(32), np.arange(32, 40), 3, [CNNConfig(pooling="max")],
                   TrainConfig(protocol="paper", epochs=1), progress=False)[0]
    x = feats[32:, POOLS.index("max")].float().to(device_of(t.model))
    torch.testing.assert_close(t.model(x).cpu(), t.eval_logits)


@pytest.mark.parametrize("change", [
    dict(labels=torch.tensor([0, 1, 2, 3] * 4)),  # label 3 with n_classes=3
    dict(labels=torch.zeros(15, dtype=torch.long)),  # one label short
    dict(pools=("mean",)),  # features hold 2 pools
    dict(pools=("mean", "median")),  # config k6_c10_max reads a pool the features lack
    dict(configs=[CNNConfig(), CNNConfig()]),  # duplicate names
    dict(configs=[]),
    dict(train_idx=[0, 16]),  # out of range
    dict(eval_idx=[]),
    dict(features=torch.zeros(16, 2, 3, 32, 30)),  # not square
    dict(features=torch.zeros(16, 2, 32, 32)),  # not 5-D
    dict(features=torch.zeros(16, 2, 3, 16, 16)),  # too short for kernel 6
    dict(n_classes=1),
])
def test_train_bad_inputs(change):
    kw = dict(features=torch.zeros(16, 2, 3, 32, 32), pools=POOLS, labels=torch.arange(16) % 3,
              train_idx=np.arange(12), eval_idx=np.arange(12, 16), n_classes=3, configs=QUICK_GRID)
    kw.update(change)
    with pytest.raises(ValueError):
        train_cnns(**kw, progress=False)


def test_overlapping_split_warns(caplog):
    feats, labels = diagonal_toy(12, seq_len=32)
    with caplog.at_level("WARNING", logger="mechmem"):
        train_cnns(feats, POOLS, labels, np.arange(10), np.arange(8, 12), 3, QUICK_GRID[:1],
                   TrainConfig(protocol="paper", epochs=1), progress=False)
    assert [r.name for r in caplog.records if "overlap" in r.getMessage()] == ["mechmem.cnn.training"]


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    trained = small_run([CNNConfig(8, 16, "max"), CNNConfig(6, 10, "mean")])
    save_cnns(trained, tmp_path / "cnns")
    assert not list((tmp_path / "cnns").glob(".*tmp*"))  # no temporary files left behind
    loaded = load_cnns(tmp_path / "cnns", device=device_of(trained[0].model))
    assert [t.config for t in loaded] == [t.config for t in trained]
    x = torch.rand(4, 3, 32, 32, device=device_of(trained[0].model))
    for t, l in zip(trained, loaded):
        assert not l.model.training
        assert torch.equal(t.model(x), l.model(x))
        assert torch.equal(t.eval_logits, l.eval_logits)
        assert t.train_losses == l.train_losses
        np.testing.assert_array_equal(t.eval_metrics.confusion, l.eval_metrics.confusion)
        np.testing.assert_array_equal(t.eval_metrics.f1, l.eval_metrics.f1)
        assert t.eval_metrics.loss == pytest.approx(l.eval_metrics.loss)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_cnns(tmp_path / "nothing")


def test_class_metrics_dict_round_trip():
    m = classification_metrics([0, 1, 1], [0, 1, 0], 2)
    back = ClassMetrics.from_dict(m.to_dict())
    np.testing.assert_array_equal(back.confusion, m.confusion)
    np.testing.assert_array_equal(back.f1, m.f1)


# ----------------------------------------------------------------------------- training protocols


def test_protocols_fill_their_defaults():
    paper, converged = TrainConfig(protocol="paper"), TrainConfig()
    assert (paper.epochs, paper.batch_size, paper.input_scaling, paper.val_fraction) == (3, 16, "raw", 0.0)
    assert not paper.early_stopping
    assert converged.protocol == "converged" and converged.early_stopping
    assert converged.input_scaling == "log-pixel" and converged.val_fraction > 0
    assert TrainConfig(protocol="paper", epochs=15).epochs == 15  # an explicit field wins
    for bad in (dict(protocol="sgd"), dict(input_scaling="zscore"), dict(val_fraction=1.0), dict(patience=-1)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_validation_part_is_stratified_and_inside_the_training_split():
    from mechmem.cnn import split_validation

    labels = np.repeat([0, 1, 2], 100)
    train = np.arange(0, 300, 2)  # 50 a class
    fit, val = split_validation(labels, train, 0.2, seed=0)
    assert len(val) == 30 and set(fit) | set(val) == set(train) and not set(fit) & set(val)
    assert np.bincount(labels[val]).tolist() == [10, 10, 10]
    again, _ = split_validation(labels, train, 0.2, seed=0)
    np.testing.assert_array_equal(fit, again)
    assert not np.array_equal(split_validation(labels, train, 0.2, seed=1)[1], val)


@pytest.mark.parametrize("scaling", ["pixel", "layer", "log-pixel"])
def test_input_statistics_come_from_the_training_split_only(scaling):
    feats, labels = diagonal_toy(48, seq_len=16)
    feats = feats.float()
    train_idx, eval_idx = np.arange(32), np.arange(32, 48)
    feats[eval_idx] += 50.0  # eval samples far away: any leak moves the statistics
    t = train_cnns(feats, POOLS, labels, train_idx, eval_idx, 3, [CNNConfig(4, 4, "max", n_feat_fc=8)],
                   TrainConfig(epochs=1, input_scaling=scaling, device="cpu"), progress=False)[0]
    x = feats[train_idx, 1].double()  # the "max" pool
    if scaling == "log-pixel":
        x = torch.log(x + 1e-4)
    dims = (0, 2, 3) if scaling == "layer" else (0,)
    mean = x.mean(dims, keepdim=scaling == "layer").squeeze(0) if scaling == "layer" else x.mean(0)
    torch.testing.assert_close(t.model.layers.scale.mean.double(), mean.reshape(t.model.layers.scale.mean.shape),
                               atol=1e-4, rtol=1e-4)
    std = x.std(dims, unbiased=False).reshape(t.model.layers.scale.std.shape).clamp_min(1e-3)
    torch.testing.assert_close(t.model.layers.scale.std.double(), std, atol=1e-4, rtol=1e-3)


def test_early_stopping_keeps_the_best_epoch():
    from mechmem.cnn import split_validation

    # Labels are noise: validation loss bottoms out early and rises as the CNN memorises.
    g = torch.Generator().manual_seed(0)
    n = 120
    feats = torch.rand(n, 2, 3, 16, 16, generator=g).half()
    labels = np.random.default_rng(0).integers(0, 3, n)
    train = TrainConfig(epochs=40, patience=3, batch_size=8, lr=3e-3, weight_decay=0.0, device="cpu")
    t = train_cnns(feats, POOLS, labels, np.arange(100), np.arange(100, n), 3, [CNNConfig(3, 8, "mean", 32, 0.0)],
                   train, progress=False)[0]
    assert t.best_epoch == int(np.argmin(t.val_losses)) + 1
    assert t.epochs_run == t.best_epoch + 3 < 40  # stopped after 3 epochs without improvement
    assert len(t.val_losses) == len(t.train_losses) == t.epochs_run
    # The kept weights are the best epoch's: their validation loss is the minimum recorded.
    _, val = split_validation(labels, np.arange(100), train.val_fraction, train.seed)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(t.model(feats[val, 0].float()).double(), torch.from_numpy(labels[val]))
    assert float(loss) == pytest.approx(min(t.val_losses), rel=1e-4)
    assert float(loss) < t.val_losses[-1]


def test_scaled_cnns_save_and_load(tmp_path):
    feats, labels = diagonal_toy(40, seq_len=16)
    trained = train_cnns(feats, POOLS, labels, np.arange(32), np.arange(32, 40), 3,
                         [CNNConfig(4, 4, "mean", n_feat_fc=8)], TrainConfig(epochs=2, device="cpu"), progress=False)
    save_cnns(trained, tmp_path)
    loaded = load_cnns(tmp_path)[0]
    assert loaded.model.input_scaling == "log-pixel" and loaded.epochs_run == trained[0].epochs_run
    x = feats[:5, 0].float()
    torch.testing.assert_close(loaded.model(x), trained[0].model(x))
    assert loaded.val_losses == trained[0].val_losses and loaded.best_epoch == trained[0].best_epoch


def test_fused_stack_equals_members_with_input_scaling():
    feats, labels = diagonal_toy(48, seq_len=16)
    tasks = [Task(labels, np.arange(32), np.arange(32, 48)), Task(np.roll(labels, 1), np.arange(32), np.arange(32, 48))]
    configs = [CNNConfig(4, 4, "mean", n_feat_fc=8), CNNConfig(4, 4, "max", n_feat_fc=8)]
    train = TrainConfig(epochs=4, device="cpu", fuse=True)
    fused = train_cnn_tasks(feats, POOLS, tasks, 3, configs, train, progress=False)
    alone = train_cnn_tasks(feats, POOLS, tasks, 3, configs, TrainConfig(epochs=4, device="cpu", fuse=False),
                            progress=False)
    for a_row, b_row in zip(fused, alone):
        for a, b in zip(a_row, b_row):
            torch.testing.assert_close(a.eval_logits, b.eval_logits, atol=1e-4, rtol=1e-4)
            assert a.epochs_run == b.epochs_run and a.best_epoch == b.best_epoch


# ----------------------------------------------------------------------------- config names

@pytest.mark.parametrize("config", [*PAPER_GRID, CNNConfig(3, 4, "max", n_feat_fc=32), CNNConfig(5, 2, "mean", dropout=0.3),
                                    CNNConfig(7, 8, "max", n_feat_fc=16, dropout=0.0), CNNConfig(6, 10, "mean", dropout=1e-5)])
def test_config_name_round_trips(config):
    assert CNNConfig.from_name(config.name) == config


@pytest.mark.parametrize("name", ["k6_c10", "k6_c10_median", "k6_c10_mean_fc", "x6_c10_mean", "k6_c10_mean_d0.5x", ""])
def test_config_from_a_bad_name_is_a_value_error(name):
    with pytest.raises(ValueError):
        CNNConfig.from_name(name)


# ----------------------------------------------------------------------------- the plain loop

@pytest.mark.parametrize("train, stops", [
    (TrainConfig(protocol="paper", epochs=2, device="cpu"), False),
    (TrainConfig(protocol="converged", epochs=12, patience=2, batch_size=8, lr=3e-3, device="cpu"), True),
    (TrainConfig(protocol="converged", epochs=3, input_scaling="log-pixel", device="cpu"), False),
], ids=["paper", "converged-early-stopping", "log-pixel"])
@pytest.mark.parametrize("fuse", [False, True])
def test_plain_loop_equals_lockstep_and_fused_training(train, stops, fuse, monkeypatch):
    """train_cnn (one CNN, a plain loop) is what train_cnns gives for each config, trained beside
    others, fused or not: same weights, eval logits, losses, epochs and best epoch. Fused, CNNs that
    stop leave their stack (`_CNNStack.keep`) and the others train on as before."""
    from dataclasses import replace

    from mechmem.cnn import train_cnn

    kept = []
    real_keep = _CNNStack.keep
    monkeypatch.setattr(_CNNStack, "keep", lambda self, members: kept.append(list(members)) or real_keep(self, members))

    feats, labels = diagonal_toy(60, seq_len=32)
    labels = labels.numpy().copy()
    labels[::4] = (labels[::4] + 1) % 3  # noise, so that validation loss turns and early stopping acts
    configs = (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(6, 4, "max", n_feat_fc=16), CNNConfig(5, 2, "max"))
    train_idx, eval_idx = np.arange(44), np.arange(44, 60)
    together = train_cnns(feats, POOLS, labels, train_idx, eval_idx, 3, configs, replace(train, fuse=fuse),
                          progress=False)
    for config, t in zip(configs, together):
        plain = train_cnn(feats, POOLS, labels, train_idx, eval_idx, 3, config, train)
        assert (plain.epochs_run, plain.best_epoch) == (t.epochs_run, t.best_epoch)
        assert plain.train_losses == pytest.approx(t.train_losses, rel=1e-5)
        assert plain.val_losses == pytest.approx(t.val_losses, rel=1e-5)
        assert_same_weights(state(plain.model), state(t.model))
        torch.testing.assert_close(plain.eval_logits, t.eval_logits, rtol=1e-4, atol=1e-5)
    if stops:  # early stopping was exercised, at different epochs for different CNNs
        assert any(t.epochs_run < train.epochs for t in together)
        assert bool(kept) == fuse  # and stopped CNNs left a fused stack


@pytest.mark.parametrize("k, side, groups", [(6, 64, 3), (8, 64, 2), (6, 29, 4)])
def test_fft_convolution_is_the_direct_one(k, side, groups):
    """fft_conv2d computes F.conv2d's grouped valid cross-correlation, values and gradients."""
    from mechmem.cnn.model import fft_conv2d

    g = torch.Generator().manual_seed(k)
    x = torch.rand(3, groups * 5, side, side, generator=g, requires_grad=True)
    w = (torch.randn(groups * 4, 5, k, k, generator=g) / 10).requires_grad_()
    b = torch.randn(groups * 4, generator=g, requires_grad=True)
    direct, fft = F.conv2d(x, w, b, groups=groups), fft_conv2d(x, w, b, groups)
    torch.testing.assert_close(fft, direct, rtol=1e-5, atol=1e-5)
    for a, c in zip(torch.autograd.grad(direct.square().sum(), (x, w, b)), torch.autograd.grad(fft.square().sum(), (x, w, b))):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-3 * a.abs().max().item())
    assert not torch.equal(fft_conv2d(x, w.flip(-1), b, groups), direct)  # (a flipped kernel is another function)


def test_fused_training_through_the_fft_is_the_plain_loop_to_float_rounding():
    """TrainConfig.fft (the default on a GPU): fused CNNs convolving through the FFT train what the
    plain loop (direct convolutions) trains, to float rounding: same epochs, close weights and logits."""
    from mechmem.cnn import train_cnn

    feats, labels = diagonal_toy(60, seq_len=32)
    labels = labels.numpy().copy()
    labels[::4] = (labels[::4] + 1) % 3
    configs = (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(6, 4, "max", n_feat_fc=16))
    train = TrainConfig(protocol="converged", epochs=6, patience=2, batch_size=8, device="cpu")
    train_idx, eval_idx = np.arange(44), np.arange(44, 60)
    fft = train_cnns(feats, POOLS, labels, train_idx, eval_idx, 3, configs, TrainConfig(
        protocol="converged", epochs=6, patience=2, batch_size=8, device="cpu", fuse=True, fft=True), progress=False)
    for config, t in zip(configs, fft):
        plain = train_cnn(feats, POOLS, labels, train_idx, eval_idx, 3, config, train)
        assert (plain.epochs_run, plain.best_epoch) == (t.epochs_run, t.best_epoch)
        assert plain.val_losses == pytest.approx(t.val_losses, rel=1e-4)
        torch.testing.assert_close(t.eval_logits, plain.eval_logits, rtol=1e-3, atol=1e-4)


def test_dropout_masks_come_from_the_cnns_own_generator():
    model = AttentionCNN(3, 3, CNNConfig(6, 4, "mean"), seq_len=32).train()
    x = torch.rand(4, 3, 32, 32)
    outs = []
    for _ in range(2):
        model.set_dropout_generator(torch.Generator().manual_seed(5))
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    model.set_dropout_generator(torch.Generator().manual_seed(6))
    assert not torch.equal(model(x), outs[0])


@pytest.mark.parametrize("fuse", [False, True])
def test_fixed_epoch_task_trains_exactly_its_count_and_keeps_its_last_weights(fuse):
    """Task.epochs (the shuffled-label control's rule): exactly that many epochs per config, never
    early-stopped, last weights kept; equal to the plain loop's `epochs`, and its neighbour task (which
    early-stops) trains as it would alone."""
    from dataclasses import replace

    from mechmem.cnn import Task, train_cnn

    feats, labels = diagonal_toy(60, seq_len=32)
    labels = labels.numpy().copy()
    labels[::4] = (labels[::4] + 1) % 3
    shuffled = labels.copy()
    shuffled[:44] = np.random.default_rng(0).permutation(labels[:44])
    configs = (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(5, 2, "max"))
    train = TrainConfig(protocol="converged", epochs=12, patience=2, batch_size=8, lr=3e-3, device="cpu", fuse=fuse)
    train_idx, eval_idx = np.arange(44), np.arange(44, 60)
    real, control = train_cnn_tasks(feats, POOLS, [Task(labels, train_idx, eval_idx),
                                                   Task(shuffled, train_idx, eval_idx, epochs=[7, 3])],
                                    3, configs, train, progress=False)
    alone = train_cnns(feats, POOLS, labels, train_idx, eval_idx, 3, configs, replace(train, fuse=False),
                       progress=False)
    for a, r in zip(alone, real):
        assert (a.epochs_run, a.best_epoch) == (r.epochs_run, r.best_epoch)
        torch.testing.assert_close(a.eval_logits, r.eval_logits, rtol=1e-4, atol=1e-5)
    for config, c, n in zip(configs, control, (7, 3)):
        assert (c.epochs_run, c.best_epoch, len(c.train_losses), len(c.val_losses)) == (n, n, n, n)
        plain = train_cnn(feats, POOLS, shuffled, train_idx, eval_idx, 3, config, replace(train, fuse=None), epochs=n)
        assert (plain.epochs_run, plain.best_epoch) == (n, n)
        assert plain.val_losses == pytest.approx(c.val_losses, rel=1e-5)
        assert_same_weights(state(plain.model), state(c.model))
        torch.testing.assert_close(plain.eval_logits, c.eval_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_follower_trains_as_a_fixed_count_of_its_twins_epochs(fuse):
    """Task.follows (the control beside its twin, in one pass) gives what a separate call with the
    twin's epoch counts gives (`Task.epochs`): same epochs, weights, losses, eval logits."""
    from dataclasses import replace

    from mechmem.cnn import Task
    from mechmem.controls import twin_epochs

    feats, labels = diagonal_toy(60, seq_len=32)
    labels = labels.numpy().copy()
    labels[::4] = (labels[::4] + 1) % 3
    shuffled = labels.copy()
    shuffled[:44] = np.random.default_rng(0).permutation(labels[:44])
    configs = (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(6, 4, "max", n_feat_fc=16), CNNConfig(5, 2, "max"))
    train = TrainConfig(protocol="converged", epochs=12, patience=2, batch_size=8, lr=3e-3, device="cpu", fuse=fuse)
    train_idx, eval_idx = np.arange(44), np.arange(44, 60)
    real, follower = train_cnn_tasks(feats, POOLS, [Task(labels, train_idx, eval_idx),
                                                    Task(shuffled, train_idx, eval_idx, follows=0)],
                                     3, configs, train, progress=False)
    epochs = twin_epochs(real)
    assert len(set(epochs)) > 1 and min(epochs) < train.epochs  # the twins stopped early, at different epochs
    (fixed,) = train_cnn_tasks(feats, POOLS, [Task(shuffled, train_idx, eval_idx, epochs=epochs)], 3, configs,
                               replace(train, fuse=False), progress=False)
    for f, x, n in zip(follower, fixed, epochs):
        assert (f.epochs_run, f.best_epoch, len(f.train_losses)) == (x.epochs_run, x.best_epoch, n) == (n, n, n)
        assert f.val_losses == pytest.approx(x.val_losses, rel=1e-5)
        assert_same_weights(state(f.model), state(x.model))
        torch.testing.assert_close(f.eval_logits, x.eval_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("follows, epochs", [(1, None), (5, None), (0, 3)])  # itself, no such task, both rules
def test_a_bad_twin_is_refused(follows, epochs):
    from mechmem.cnn import Task

    feats, labels = diagonal_toy(20, seq_len=32)
    tasks = [Task(labels, np.arange(12), np.arange(12, 20)),
             Task(labels, np.arange(12), np.arange(12, 20), epochs=epochs, follows=follows)]
    with pytest.raises(ValueError, match="follow"):
        train_cnn_tasks(feats, POOLS, tasks, 3, QUICK_GRID, TrainConfig(epochs=12, device="cpu"), progress=False)


@pytest.mark.parametrize("epochs", [0, 13, [3], [1, 2, 3]])
def test_fixed_epochs_outside_the_cap_or_of_the_wrong_length_are_refused(epochs):
    from mechmem.cnn import Task

    feats, labels = diagonal_toy(20, seq_len=32)
    configs = (CNNConfig(6, 4, "mean"), CNNConfig(5, 2, "max"))
    with pytest.raises(ValueError, match="epochs"):
        train_cnn_tasks(feats, POOLS, [Task(labels, np.arange(12), np.arange(12, 20), epochs=epochs)], 3, configs,
                        TrainConfig(epochs=12, device="cpu"), progress=False)
