import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_experiment
from transformers import GPTNeoXForCausalLM

from mechmem.ablation import (AblationConfig, Condition, head_ablation_hooks, head_means, held_out_sets, measure,
                              plan_conditions, summarize, teacher_forced)
from mechmem.hooks import z_hook
from mechmem.memorization import greedy_continuation, memorization_score

HEADS = [(1, 2), (0, 1), (1, 0)]


def log_softmax(x):
    return torch.log_softmax(x.double(), dim=-1)


@pytest.fixture(scope="module")
def hf_without_heads(tiny_checkpoint):
    """An independent reference: the HF model with the W_O columns of HEADS set to zero."""
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for layer, head in HEADS:
            hf.gpt_neox.layers[layer].attention.dense.weight[:, head * d_head:(head + 1) * d_head] = 0
    return hf


@pytest.fixture(scope="module")
def memorized_tokens(tiny_model, tiny_tokens):
    """Prefixes followed by the unablated model's own greedy continuation: every sample scores 1."""
    prefix = tiny_tokens[:4, :32]
    return torch.cat([prefix, greedy_continuation(tiny_model, prefix, 32, progress=False)], dim=1)


def test_no_heads_no_change(tiny_model, tiny_tokens):
    assert head_ablation_hooks(tiny_model, []) == []
    assert head_ablation_hooks(tiny_model, [], method="mean") == []  # no reference needed either
    clean = tiny_model(tiny_tokens)
    assert torch.equal(tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=head_ablation_hooks(tiny_model, [])), clean)


def test_zero_equals_zeroing_hook_z_by_hand(tiny_model, tiny_tokens, hf_without_heads):
    hooks = head_ablation_hooks(tiny_model, HEADS)
    assert sorted(name for name, _ in hooks) == [z_hook(0), z_hook(1)]  # one hook per layer, real hook names
    assert all(name in tiny_model.hook_dict for name, _ in hooks)
    ablated = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)

    def by_hand(z, hook):
        z = z.clone()
        for layer, head in HEADS:
            if hook.name == z_hook(layer):
                z[:, :, head] = 0
        return z

    manual = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[(z_hook(l), by_hand) for l in (0, 1)])
    assert torch.equal(ablated, manual)
    assert not torch.allclose(ablated, tiny_model(tiny_tokens))
    # and removing the heads' W_O columns in the HF weights gives the same distribution
    with torch.no_grad():
        ref = hf_without_heads(tiny_tokens).logits
    torch.testing.assert_close(log_softmax(ablated), log_softmax(ref), atol=1e-5, rtol=0)


def test_mean_ablation_sets_the_reference_mean(tiny_model, tiny_tokens):
    ref = tiny_tokens[:6]
    _, cache = tiny_model.run_with_cache(ref)
    mean = cache[z_hook(1)].mean(dim=(0, 1))[2]  # head 2 of layer 1, over samples and positions
    means = head_means(tiny_model, ref, [1], batch_size=4)
    torch.testing.assert_close(means[1][2], mean, atol=1e-6, rtol=1e-5)

    seen = {}

    def record(z, hook):
        seen["z"] = z.detach().clone()

    hooks = head_ablation_hooks(tiny_model, [(1, 2)], method="mean", reference=ref)
    tiny_model.run_with_hooks(tiny_tokens[6:], fwd_hooks=hooks + [(z_hook(1), record)])
    z = seen["z"]
    torch.testing.assert_close(z[:, :, 2], mean.expand_as(z[:, :, 2]), atol=1e-6, rtol=1e-5)
    _, clean = tiny_model.run_with_cache(tiny_tokens[6:])
    torch.testing.assert_close(z[:, :, [0, 1, 3]], clean[z_hook(1)][:, :, [0, 1, 3]])


def test_bad_heads_and_methods(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="does not exist"):
        head_ablation_hooks(tiny_model, [(3, 0)])
    with pytest.raises(ValueError, match="does not exist"):
        head_ablation_hooks(tiny_model, [(0, 4)])
    with pytest.raises(ValueError, match=r"\(layer, head\) pairs"):
        head_ablation_hooks(tiny_model, [(0,)])
    with pytest.raises(ValueError, match="unknown ablation method"):
        head_ablation_hooks(tiny_model, [(0, 0)], method="resample")
    with pytest.raises(ValueError, match="reference tokens"):
        head_ablation_hooks(tiny_model, [(0, 0)], method="mean")


def test_generation_under_ablation_goes_only_through_the_heads(tiny_model, memorized_tokens, hf_without_heads):
    """memorization_score decodes with the HF model's KV cache inside the hooks context: the hooks fire
    there, and the result equals decoding with the heads removed from the weights."""
    hooks = head_ablation_hooks(tiny_model, HEADS)
    assert (memorization_score(tiny_model, memorized_tokens, progress=False) == 1).all()
    with tiny_model.hooks(fwd_hooks=hooks):
        cached = greedy_continuation(tiny_model, memorized_tokens[:, :32], 32, progress=False)
        full = greedy_continuation(tiny_model, memorized_tokens[:, :32], 32, use_cache=False, progress=False)
    reference = greedy_continuation(hf_without_heads, memorized_tokens[:, :32], 32, progress=False)
    assert torch.equal(cached, reference) and torch.equal(full, reference)
    # add samples the ablated model does reproduce: measure() finds those with its teacher-forced pass
    mixed = torch.cat([memorized_tokens, torch.cat([memorized_tokens[:, :32], reference], dim=1)])
    result = measure(tiny_model, mixed, hooks, batch_size=3)
    want = memorization_score(hf_without_heads, mixed, progress=False)
    np.testing.assert_array_equal(result["memorization_score"], want)
    assert (want[:4] < 1).any() and (want[4:] == 1).all()
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())  # hooks removed afterwards


def test_teacher_forced_pass(tiny_model, tiny_tokens, tiny_checkpoint, memorized_tokens):
    hf = GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        want = [float(hf(t[None], labels=t[None]).loss) for t in tiny_tokens[:3]]
    leading, loss = teacher_forced(tiny_model, tiny_tokens[:3], batch_size=2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # leading suffix tokens reproduced: all 32 for the model's own continuations; for those with one token
    # changed at suffix position 5, exactly 5
    leading, _ = teacher_forced(tiny_model, memorized_tokens)
    assert (leading == 32).all()
    changed = memorized_tokens.clone()
    changed[:, 37] = (changed[:, 37] + 1) % 512
    assert (teacher_forced(tiny_model, changed)[0] == 5).all()


# ----------------------------------------------------------------------------- the experiment
def test_plan_conditions():
    cfg = AblationConfig(ks=(1, 2, 4), n_random=5, seed=3)
    ranked = {"Guess": [(0, 1), (2, 3), (1, 1), (0, 0)], "Others": [(1, 2), (0, 3), (2, 2), (1, 0)]}
    plan = plan_conditions(ranked, 3, 4, cfg)
    assert [c.kind for c in plan].count("baseline") == 1 and plan[0].heads == []
    targeted = [c for c in plan if c.kind == "targeted"]
    assert [(c.target, c.k) for c in targeted] == [(t, k) for t in ranked for k in (1, 2, 4)]
    assert targeted[1].heads == sorted([(0, 1), (2, 3)])
    randoms = [c for c in plan if c.kind == "random"]
    assert len(randoms) == 15 and all(len(set(c.heads)) == c.k for c in randoms)
    assert all(0 <= l < 3 and 0 <= h < 4 for c in randoms for l, h in c.heads)
    assert [c.heads for c in randoms] == [c.heads for c in plan_conditions(ranked, 3, 4, cfg) if c.kind == "random"]
    with pytest.raises(ValueError, match="fewer than k"):
        plan_conditions({"Guess": [(0, 1)]}, 3, 4, cfg)


def test_summarize_by_hand():
    cfg = AblationConfig(ks=(1,), n_random=2, n_boot=200)
    res = lambda scores, loss: {"memorization_score": np.array(scores, float), "loss": np.array(loss, float)}
    conds = [Condition("baseline", "", 0, 0, [], res([1, 1, 1, 1], [2.0, 2.0, 1.0, 1.0])),
             Condition("targeted", "Guess", 1, 0, [(0, 1)], res([0, 0.5, 1, 1], [2.5, 2.5, 1.0, 1.0])),
             Condition("random", "", 1, 0, [(1, 1)], res([1, 1, 1, 0.5], [2.0, 2.2, 1.0, 1.0])),
             Condition("random", "", 1, 1, [(1, 0)], res([1, 1, 1, 1], [2.0, 2.0, 1.0, 1.0]))]
    s = summarize(conds, {"Guess": np.array([0, 1]), "Others": np.array([2, 3])}, cfg)
    assert len(s) == 3 * 2 * 3  # (baseline, targeted, random draws pooled) x 2 sets x 3 metrics
    get = lambda cond, metric, eval_set: s[(s["condition"] == cond) & (s["metric"] == metric) & (s["eval_set"] == eval_set)].iloc[0]
    t = get("targeted", "extractable", "Guess")
    assert t.value == 0.0 and t.random_value == 1.0 and t.diff_vs_random == -1.0 and t.frac_random_below == 0
    assert t.rank_p_below == pytest.approx(1 / 3)  # below both draws: the smallest p two draws allow
    assert t.heads == "L0H1" and t.n == 2 and t.diff_ci_high < 0
    r = get("random", "memorization_score", "Others")
    assert r.value == pytest.approx(0.875) and r.n_draws == 2 and (r.draws_min, r.draws_max) == (0.75, 1.0)
    assert r.ci_low <= r.value <= r.ci_high
    loss = get("targeted", "loss", "Guess")
    assert loss.value == 2.5 and loss.diff_vs_random == pytest.approx(2.5 - 2.05) and loss.frac_random_below == 1
    assert loss.rank_p_below == 1.0
    b = get("baseline", "extractable", "Others")
    assert b.value == 1.0 and (b.ci_low, b.ci_high) == (1.0, 1.0) and np.isnan(b.diff_vs_random)


def synthetic_data(model, n_per_class: int = 8, seed: int = 0):
    """3 classes: Non-Memo (random suffix), and two memorized ones (the model's own continuation)."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * n_per_class
    tokens = torch.randint(0, 512, (n, 64), generator=g)
    labels = np.arange(n) % 3
    mem = torch.from_numpy(labels > 0)
    tokens[mem, 32:] = greedy_continuation(model, tokens[mem, :32], 32, progress=False)
    df = pd.DataFrame({"sequence_id": np.arange(500, 500 + n), "tokens": list(tokens.numpy()),
                       "memorization_score": memorization_score(model, tokens, progress=False),
                       "sequence_duplicates": np.where(np.arange(n) % 2 == 0, 100, 1)})
    return df, labels


@pytest.fixture(scope="module")
def synthetic(tiny_model):
    return synthetic_data(tiny_model)


def test_held_out_sets(synthetic):
    df, labels = synthetic
    names = ["Non-Memo", "Guess", "Others"]
    held = held_out_sets(df, labels, names, per_class=5, exclude_ids=[500, 501, 502, 503], duplicates_threshold=5)
    assert held.memorized == ["Guess", "Others"]
    assert all(len(t) == 5 for t in held.eval_sets.values())
    used = np.concatenate(list(held.sequence_ids.values()))
    assert not set(used) & {500, 501, 502, 503}
    assert held.non_memorized == ["Non-Memo"]
    assert len(held.reference) == 5 and not any((held.reference == t).all(1).any() for t in held.eval_sets.values())
    name, mask = held.subsets["Guess (dup > 5)"]
    assert name == "Guess" and mask.dtype == bool
    dup = df.set_index("sequence_id").loc[held.sequence_ids["Guess"], "sequence_duplicates"].to_numpy()
    np.testing.assert_array_equal(mask, dup > 5)
    with pytest.raises(ValueError, match="no held-out samples"):
        held_out_sets(df, labels, names, per_class=5, exclude_ids=df["sequence_id"][labels == 1])



def test_experiment_writes_outputs(tiny_model, synthetic, tmp_path):
    from mechmem.cnn import AttentionCNN, CNNConfig
    from mechmem.localize import localize

    df, labels = synthetic
    names = ["Non-Memo", "Guess", "Others"]
    torch.manual_seed(0)
    cnns = [AttentionCNN(3, 3, CNNConfig(6, 4, "mean", n_feat_fc=8)).eval()]
    first = np.arange(9)  # localize on 3 samples a class; they are then excluded from the ablation
    loc = localize(tiny_model, cnns, np.stack(df["tokens"].to_numpy()[first]), labels[first], names,
                   sequence_ids=df["sequence_id"].to_numpy()[first], progress=False)
    cfg = AblationConfig(ks=(1,), n_random=2, n_boot=50)
    summary, held = load_experiment("ablate_heads").ablate(tiny_model, df, labels, loc, cfg, tmp_path, per_class=4,
                                          exclude_ids=loc.sequence_ids, duplicates_threshold=5, progress=False)
    for f in ("ablation.csv", "ablation.png", "extraction.png", "samples.npz"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    csv = pd.read_csv(tmp_path / "ablation.csv")
    assert set(csv["condition"]) == {"baseline", "targeted", "random"}
    assert set(csv.loc[csv["condition"] == "targeted", "target_class"]) == {"Guess", "Others"}
    assert {"Non-Memo", "Guess", "Others", "Guess (dup > 5)"} <= set(csv["eval_set"])
    assert set(csv["metric"]) == {"extractable", "memorization_score", "loss"}
    assert csv.loc[csv["condition"] == "random", "n_draws"].eq(2).all()
    base = csv[(csv["condition"] == "baseline") & (csv["metric"] == "extractable") & (csv["eval_set"] == "Guess")]
    assert base["value"].iloc[0] == 1.0  # unablated, every memorized sample is still extractable
    top1 = csv[(csv["condition"] == "targeted") & (csv["k"] == 1) & (csv["target_class"] == "Guess")]
    assert top1["heads"].iloc[0] == "L{}H{}".format(*loc.top_heads("Guess", 1)[0])
    assert len(summary) == len(csv)


def run_from_table(tiny_model, tiny_checkpoint, synthetic, tmp_path):
    """A miniature run whose labels come from a data file (tmp_path/data.parquet): (run, df, table, labels)."""
    from mechmem.data import load_memorization_data
    from mechmem.taxonomy import assign_categories
    from test_localize import make_run

    df, labels = synthetic
    table = df.assign(tokens=[t.tolist() for t in df["tokens"]], text="some text", is_incrementing=False,
                      is_repeating=labels == 1, is_code=False,  # class 1 is guessed, class 2 recalled
                      rouge_L_prefix_to_suffix=0.0, rouge_3_prefix_to_suffix=0.0)
    table.to_parquet(tmp_path / "data.parquet")
    data = load_memorization_data(tmp_path / "data.parquet", progress=False)
    labels = assign_categories(data, "Non-Memo, Guess, Others")
    assert np.bincount(labels).tolist() == [8, 8, 8]
    run, *_ = make_run(tmp_path / "run", tiny_model, tiny_checkpoint, tokens=torch.from_numpy(np.stack(df["tokens"])),
                       ids=df["sequence_id"].to_numpy(), labels=labels, data=str(tmp_path / "data.parquet"),
                       eval_labels=False)
    return run, df, table, labels


def test_cli_end_to_end(tiny_model, tiny_checkpoint, synthetic, tmp_path, capsys):
    """localize.py on a run whose labels come from the data file, then ablate_heads.py on its output."""
    run, df, table, labels = run_from_table(tiny_model, tiny_checkpoint, synthetic, tmp_path)
    assert load_experiment("localize").main(["--run", str(run), "--out", str(tmp_path / "loc"), "--samples-per-class", "2",
                                  "--quiet"]) == 0
    rc = load_experiment("ablate_heads").main(["--localization", str(tmp_path / "loc"), "--out", str(tmp_path / "abl"),
                                    "--per-class", "2", "--ks", "1", "--n-random", "2", "--n-boot", "20", "--quiet"])
    assert rc == 0
    csv = pd.read_csv(tmp_path / "abl" / "ablation.csv")
    assert set(csv["condition"]) == {"baseline", "targeted", "random"} and (csv["n"] <= 2).all()
    used = set(np.load(tmp_path / "abl" / "samples.npz")["sequence_id"].tolist())
    loc_ids = set(np.load(tmp_path / "loc" / "localization.npz")["sequence_ids"].tolist())
    train_ids = set(json.loads(next((run / "rows").glob("*.json")).read_text())["train_sequence_ids"])
    assert used and not used & (loc_ids | train_ids)  # held out from the CNNs and from the ranking
    assert "random" in capsys.readouterr().out
    # the data changes under the localization: refused with one line
    table.assign(is_repeating=labels == 2).to_parquet(tmp_path / "data.parquet")
    rc = load_experiment("ablate_heads").main(["--localization", str(tmp_path / "loc"), "--out", str(tmp_path / "abl2"), "--quiet"])
    assert rc == 2 and "data changed since localization" in capsys.readouterr().err
    # a table made with another tokenizer (ids past the model's 512): refused before the model sees it
    table.assign(tokens=[np.r_[t[:63], 700] for t in df["tokens"]]).to_parquet(tmp_path / "foreign.parquet")
    rc = load_experiment("ablate_heads").main(["--localization", str(tmp_path / "loc"), "--out", str(tmp_path / "abl3"),
                                               "--data", str(tmp_path / "foreign.parquet"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"row 0 (sequence_id {df['sequence_id'].iloc[0]}) holds token id 700" in err, err


def test_without_a_localization_ablate_heads_runs_localize_first(tiny_model, tiny_checkpoint, synthetic, tmp_path,
                                                                 monkeypatch, capsys):
    """The default --localization folder absent: localize.py runs first as a subprocess (here in-process,
    on the miniature run standing in for runs/alignment-quick); its failure is ablate_heads' exit 2."""
    import subprocess
    import sys

    run, *_ = run_from_table(tiny_model, tiny_checkpoint, synthetic, tmp_path)
    ablate = load_experiment("ablate_heads")
    loc = tmp_path / "loc"
    monkeypatch.setattr(ablate, "DEFAULT_LOCALIZATION", loc)
    calls = []

    def fake_run(command, *args, **kwargs):
        calls.append(command)
        code = load_experiment("localize").main([*command[2:], "--run", str(run), "--samples-per-class", "2"])
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(subprocess, "run", fake_run)
    argv = ["--localization", str(loc), "--per-class", "2", "--ks", "1", "--n-random", "2", "--n-boot", "20", "--quiet"]
    assert ablate.main([*argv, "--out", str(tmp_path / "abl")]) == 0
    assert calls == [[sys.executable, str(ablate.ROOT / "experiments" / "localize.py"), "--out", str(loc), "--quiet"]]
    assert (loc / "localization.json").is_file() and (tmp_path / "abl" / "ablation.csv").is_file()
    assert "running experiments/localize.py" in capsys.readouterr().out
    # a localization there now: not run again
    assert ablate.main([*argv, "--out", str(tmp_path / "abl2")]) == 0 and len(calls) == 1
    # localize.py failing: ablate_heads stops with exit 2
    monkeypatch.setattr(ablate, "DEFAULT_LOCALIZATION", tmp_path / "none")
    monkeypatch.setattr(subprocess, "run", lambda command, *a, **k: subprocess.CompletedProcess(command, 2))
    assert ablate.main(["--localization", str(tmp_path / "none"), "--out", str(tmp_path / "abl3"), "--quiet"]) == 2
