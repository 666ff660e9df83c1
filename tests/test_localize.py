from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_experiment

from mechmem.cnn import AttentionCNN, CNNConfig, TrainConfig, save_cnns, train_cnns
from mechmem.features import build_feature_store, extract_attention
from mechmem.run import RunFolder
from mechmem.localize import (Localization, LocalizeConfig, decisive_region, guided_gradients, guided_relus,
                              head_coverage, localize, localize_run, pick_per_class, pool_heads,
                              weighted_by_heads)

CLASSES = ["Non-Memo", "Guess", "Others"]


# ----------------------------------------------------------------------------- a CNN checked by hand
@pytest.fixture
def hand_cnn():
    """1 input layer, 6x6 input, 1x1 kernels and 1 channel: the network is scalar enough to differentiate
    by hand. Pool windows: the 6x6 input -> 3x3 -> 1x1 keeps only the max of rows 0-3, cols 0-3."""
    cnn = AttentionCNN(1, 2, CNNConfig(kernel_size=1, channels=1, n_feat_fc=3), seq_len=6)
    L = cnn.layers
    with torch.no_grad():
        for conv in (L.conv1, L.conv2):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        L.fc1.weight.copy_(torch.tensor([[1.0], [-1.0], [1.0]]))
        L.fc1.bias.copy_(torch.tensor([0.0, 10.0, -100.0]))  # unit 3 is off in the forward pass
        L.fc2.weight.copy_(torch.tensor([[2.0, -1.0, 5.0], [-1.0, 1.0, 5.0]]))
        L.fc2.bias.zero_()
    return cnn.train()  # guided_gradients must switch dropout off itself


@pytest.fixture
def hand_input():
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0, 0, 2, 1] = 3.0  # the max of the region the last pool reads: a = 3
    x[0, 0, 5, 5] = 5.0  # larger, but outside that region: no gradient
    return x


def test_guided_gradients_by_hand(hand_cnn, hand_input):
    # a = 3, fc1 pre-activations [3, 7, -97] -> relu [3, 7, 0].
    # logit 0 = 2*h1 - h2 + 5*h3. Guided at relu3: unit 1 passes 2 (input > 0, grad > 0); unit 2's grad -1 is
    # cut; unit 3's grad 5 is cut because its input is negative. So dlogit0/da = 2, routed to x[2, 1].
    # logit 1 = -h1 + h2 + 5*h3: unit 2 passes 1, so dlogit1/da = -1, which relu2 cuts: all zero.
    grads = guided_gradients(hand_cnn, hand_input)
    assert grads.shape == (1, 2, 1, 6, 6)
    want0 = torch.zeros(6, 6)
    want0[2, 1] = 2.0
    torch.testing.assert_close(grads[0, 0, 0], want0)
    torch.testing.assert_close(grads[0, 1, 0], torch.zeros(6, 6))
    assert hand_cnn.training  # mode restored

    # plain gradients differ where the guided rule bites: 2 + 1 = 3 for logit 0, -1 - 1 = -2 for logit 1
    x = hand_input.clone().requires_grad_(True)
    hand_cnn.eval()
    logits = hand_cnn(x)
    plain0, = torch.autograd.grad(logits[0, 0], x, retain_graph=True)
    plain1, = torch.autograd.grad(logits[0, 1], x)
    assert plain0[0, 0, 2, 1] == pytest.approx(3.0) and plain1[0, 0, 2, 1] == pytest.approx(-2.0)


def test_guided_relus_leave_forward_unchanged_and_clean_up(hand_cnn, hand_input):
    hand_cnn.eval()
    before = hand_cnn(hand_input)
    with guided_relus(hand_cnn):
        torch.testing.assert_close(hand_cnn(hand_input), before)
    assert all(not m._forward_hooks for m in hand_cnn.modules())


def test_decisive_region_by_hand():
    # 3 destination classes, a 1x1x2 input. Sample 0 (origin 0): C = [2,-1] - mean([0,1],[1,1]) = [1.5, -2]
    # -> D = [1, 0]. Sample 1 (origin 1): C = [4, 2] - mean([2,-1],[0,0]) = [3, 2.5] -> D = [1, 5/6].
    # Sample 2 (origin 0): C nowhere positive -> D = 0.
    B = torch.tensor([
        [[2.0, -1.0], [0.0, 1.0], [1.0, 1.0]],
        [[2.0, -1.0], [4.0, 2.0], [0.0, 0.0]],
        [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]],
    ]).reshape(3, 3, 1, 1, 2)
    D = decisive_region(B, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(D.reshape(3, 2), torch.tensor([[1.0, 0.0], [1.0, 5 / 6], [0.0, 0.0]]))
    torch.testing.assert_close(decisive_region(B[:1], 0), D[:1])
    with pytest.raises(ValueError, match="class indices"):
        decisive_region(B, torch.tensor([0, 3, 0]))


def test_delta_and_head_coverage_by_hand():
    D = torch.tensor([1.0, 0.5]).reshape(1, 1, 1, 2)
    A = torch.tensor([[0.2, 0.8], [0.6, 0.4]]).reshape(1, 1, 2, 1, 2)  # [b, layer, head, q, k]
    # D * A = [[0.2, 0.4], [0.6, 0.2]]; max over heads [0.6, 0.4]; per head sums 0.6 and 0.8, shares of 1.4
    torch.testing.assert_close(weighted_by_heads(D, A).reshape(2), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(head_coverage(D, A).reshape(2), torch.tensor([0.6 / 1.4, 0.8 / 1.4]))
    torch.testing.assert_close(head_coverage(torch.zeros_like(D), A), torch.zeros(1, 1, 2))


def test_pool_heads_matches_features(tiny_model, tiny_tokens):
    patterns = extract_attention(tiny_model, tiny_tokens[:2], per_head=True)
    pooled = extract_attention(tiny_model, tiny_tokens[:2], pooling=("mean", "max"))
    torch.testing.assert_close(pool_heads(patterns, "mean"), pooled[:, 0])
    torch.testing.assert_close(pool_heads(patterns, "max"), pooled[:, 1])


# ----------------------------------------------------------------------------- localize on the tiny model
def _cnns(n_layers=3, n_classes=3, seeds=(0, 1)):
    out = []
    for s, pool in zip(seeds, ("mean", "max")):
        torch.manual_seed(s)
        out.append(AttentionCNN(n_layers, n_classes, CNNConfig(6, 4, pool, n_feat_fc=16)).eval())
    return out


@pytest.fixture(scope="module")
def labels10():
    return np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])


def test_localize_shapes_and_hook_names(tiny_model, tiny_tokens, labels10):
    loc = localize(tiny_model, _cnns(), tiny_tokens, labels10, CLASSES, cfg=LocalizeConfig(batch_size=4),
                   progress=False)
    L, H = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    assert loc.delta.shape == (3, L, 64, 64) and loc.head_scores.shape == (3, L, H)
    assert (loc.delta >= 0).all() and loc.delta.max() > 0
    assert np.triu(loc.delta, k=1).max() == 0  # attention is causal, so is Delta
    np.testing.assert_array_equal(loc.n_samples, [3, 3, 4])
    np.testing.assert_allclose(loc.layer_importance, loc.delta.sum((-2, -1)))
    # head scores are shares of the decisive attention: per class they sum to 1 over (layer, head)
    assert (loc.head_scores >= 0).all()
    np.testing.assert_allclose(loc.head_scores.sum((1, 2)), 1.0, atol=1e-6)
    assert (loc.head_ci[..., 0] <= loc.head_scores + 1e-12).all() and (loc.head_ci[..., 1] >= loc.head_scores - 1e-12).all()

    table = loc.head_table()
    assert len(table) == 3 * L * H
    for row in table.itertuples():  # every name points at a real hook, of the right layer
        assert row.hook_name in tiny_model.hook_dict
        assert row.hook_name == f"blocks.{row.layer}.attn.hook_pattern" and 0 <= row.head < H
    for name, part in table.groupby("class"):
        assert list(part["rank"]) == list(range(1, L * H + 1))
        assert (np.diff(part["score"].to_numpy()) <= 0).all()
        assert loc.top_heads(name, 2) == list(zip(part["layer"][:2], part["head"][:2]))
    layers = loc.layer_table()
    assert set(layers["hook_name"]) <= set(tiny_model.hook_dict)


def test_localize_by_hand_on_one_sample(tiny_model, tiny_tokens):
    """The pipeline equals the definitions applied step by step to one sample and one CNN."""
    cnn = _cnns()[1]  # max pooling
    labels = np.array([2, 0, 1])
    loc = localize(tiny_model, [cnn], tiny_tokens[:3], labels, CLASSES, progress=False)
    patterns = extract_attention(tiny_model, tiny_tokens[:1], per_head=True)  # the sample of class 2
    x = patterns.amax(2).requires_grad_(True)
    with guided_relus(cnn):
        logits = cnn(x)
        B = torch.stack([torch.autograd.grad(logits[0, d], x, retain_graph=True)[0][0] for d in range(3)])
    C = B[2] - (B[0] + B[1]) / 2
    D = (C / C.max()).clamp(min=0)
    delta = (D[:, None] * patterns[0]).amax(1)
    np.testing.assert_allclose(loc.delta[2], delta.numpy(), atol=1e-6)
    cover = (D[:, None] * patterns[0]).sum((-2, -1))
    cover = cover / cover.sum()
    np.testing.assert_allclose(loc.head_scores[2], cover.numpy(), atol=1e-6)


def test_localize_averages_cnns_and_ignores_batching(tiny_model, tiny_tokens, labels10):
    a, b = _cnns()
    both = localize(tiny_model, [a, b], tiny_tokens, labels10, CLASSES, cfg=LocalizeConfig(batch_size=3), progress=False)
    one = localize(tiny_model, [a], tiny_tokens, labels10, CLASSES, cfg=LocalizeConfig(batch_size=10), progress=False)
    two = localize(tiny_model, [b], tiny_tokens, labels10, CLASSES, progress=False)
    np.testing.assert_allclose(both.delta, (one.delta + two.delta) / 2, atol=1e-6)
    np.testing.assert_allclose(both.head_scores, (one.head_scores + two.head_scores) / 2, atol=1e-6)


def test_localize_bad_input(tiny_model, tiny_tokens, labels10):
    with pytest.raises(ValueError, match="no samples of class"):
        localize(tiny_model, _cnns(), tiny_tokens, np.zeros(10, dtype=int), CLASSES, progress=False)
    with pytest.raises(ValueError, match="layers"):
        localize(tiny_model, _cnns(n_layers=2), tiny_tokens, labels10, CLASSES, progress=False)
    with pytest.raises(ValueError, match="AttentionCNN"):
        localize(tiny_model, [], tiny_tokens, labels10, CLASSES, progress=False)
    loc = localize(tiny_model, _cnns(), tiny_tokens, labels10, CLASSES, progress=False)
    with pytest.raises(ValueError, match="unknown class"):
        loc.top_heads("Recite", 1)


def test_pick_per_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    picked = pick_per_class(labels, 3, 4, seed=1)
    np.testing.assert_array_equal(np.bincount(labels[picked]), [4, 3, 4])
    np.testing.assert_array_equal(picked, pick_per_class(labels, 3, 4, seed=1))
    with pytest.raises(ValueError, match="no samples"):
        pick_per_class(labels, 4, 2)


def test_save_load_round_trip(tmp_path, tiny_model, tiny_tokens, labels10):
    loc = localize(tiny_model, _cnns(), tiny_tokens, labels10, CLASSES, sequence_ids=np.arange(100, 110),
                   progress=False, meta={"row": "x"})
    loc.save(tmp_path)
    back = Localization.load(tmp_path)
    np.testing.assert_allclose(back.delta, loc.delta)
    np.testing.assert_array_equal(back.head_scores, loc.head_scores)
    assert back.class_names == CLASSES and back.meta["row"] == "x"
    assert (tmp_path / "heads.csv").is_file() and (tmp_path / "layers.csv").is_file()
    with pytest.raises(FileNotFoundError, match="no localization"):
        Localization.load(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- from a run_alignment folder
def make_run(folder: Path, model, checkpoint, n: int = 36, slug: str = "merge_2_other_guess_recollect_recite_t5",
             tokens=None, ids=None, labels=None, data: str = "unused", eval_labels: bool = True):
    """A run_alignment output folder in miniature: features, 2 CNNs, one row json, config.json.

    With `eval_labels=False` the row json holds only what run_alignment writes, so labels must be
    recomputed from `data`."""
    if tokens is None:
        tokens = torch.randint(0, 512, (n, 64), generator=torch.Generator().manual_seed(1))
        ids, labels = np.arange(1000, 1000 + n), np.arange(n) % 3
    n = len(tokens)
    run = RunFolder(folder)
    store = build_feature_store(run.features_dir, model, ids, tokens, chunk_size=16, progress=False)
    train, ev = np.arange(0, n, 2), np.arange(1, n, 2)
    trained = train_cnns(np.asarray(store.features), store.pooling, labels, train, ev, 3,
                         (CNNConfig(6, 4, "mean", n_feat_fc=16), CNNConfig(6, 4, "max", n_feat_fc=16)),
                         TrainConfig(protocol="paper", epochs=1, device="cpu"), progress=False)
    save_cnns(trained, run.cnn_folder(slug))
    run.write_row(slug, {
        "tax_name": "Non-Memo, Guess, Others", "class_names": CLASSES, "num_classes": 3,
        "row": {"tax_id": "merge_2_other_guess_recollect_recite", "threshold": 5, "rouge": "either",
                "rouge_threshold": 0.5},
        "train_sequence_ids": ids[train].tolist(), "eval_sequence_ids": ids[ev].tolist(),
        **({"eval_labels": labels[ev].tolist()} if eval_labels else {})})
    run.write_config(str(checkpoint), data, None)
    return folder, tokens, ids, labels


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, tiny_checkpoint):
    return make_run(tmp_path_factory.mktemp("run"), tiny_model, tiny_checkpoint)


def test_localize_run_uses_eval_split_and_store_tokens(tiny_run, tiny_model):
    folder, tokens, ids, labels = tiny_run
    loc = localize_run(folder, tiny_model, cfg=LocalizeConfig(samples_per_class=4), progress=False)
    assert loc.class_names == CLASSES and loc.n_samples.tolist() == [4, 4, 4]
    eval_ids = set(RunFolder(folder).split(loc.meta["row"]).eval_ids.tolist())
    assert set(loc.sequence_ids.tolist()) <= eval_ids
    np.testing.assert_array_equal(loc.labels, labels[loc.sequence_ids - 1000])
    assert len(loc.cnn_names) == 2 and loc.meta["row"].startswith("merge_2")
    # same samples, same CNNs, localized directly: same maps
    cnns = RunFolder(folder).load_cnns(loc.meta["row"])
    direct = localize(tiny_model, cnns, tokens[loc.sequence_ids - 1000], loc.labels, CLASSES, progress=False)
    np.testing.assert_allclose(direct.delta, loc.delta, atol=1e-6)


def test_localize_run_refuses_another_model(tiny_run, tmp_path):
    from mechmem.models import load_model, save_random_pythia
    tiny = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)
    other = load_model(save_random_pythia("14m", tmp_path / "other", seed=1, n_ctx=128, **tiny), device="cpu")
    with pytest.raises(ValueError, match="not the one"):
        localize_run(tiny_run[0], other, progress=False)
    with pytest.raises(ValueError, match="no trained taxonomy"):
        localize_run(tiny_run[0], other, taxonomy="Non-Memo, Code, Others", progress=False)



def test_experiment_writes_outputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "loc"
    rc = load_experiment("localize").main(["--run", str(tiny_run[0]), "--out", str(out), "--samples-per-class", "3", "--quiet"])
    assert rc == 0
    for f in ("heads.csv", "layers.csv", "localization.npz", "delta_maps.png", "layer_importance.png",
              "head_scores.png", "config.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert "top heads" in capsys.readouterr().out
    assert Localization.load(out).n_samples.tolist() == [3, 3, 3]


def test_experiment_bad_input(tmp_path, capsys):
    rc = load_experiment("localize").main(["--run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no trained CNNs" in capsys.readouterr().err
