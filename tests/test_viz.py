"""Inspection pages: content, self-containment, and a real headless chromium with no network."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_experiment
from PIL import Image

from mechmem import viz
from mechmem.cnn import AttentionCNN, ClassMetrics, CNNConfig, TrainedCNN, save_cnns
from mechmem.features import build_feature_store, extract_attention
from mechmem.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["Non-Memo", "Guess", "Others"]
TAXONOMY = "Non-Memo, Guess, Others"


def random_cnns(n_layers=3, n_classes=3):
    """Two untrained CNNs (one per pooling), seeded: enough to exercise every path a trained one takes."""
    out = []
    for seed, pooling in enumerate(("mean", "max")):
        torch.manual_seed(seed)
        cfg = CNNConfig(6, 4, pooling)
        metrics = ClassMetrics(np.zeros(n_classes), np.zeros(n_classes), np.zeros(n_classes),
                               np.zeros((n_classes, n_classes), dtype=np.int64))
        out.append(TrainedCNN(cfg, AttentionCNN(n_layers, n_classes, cfg).eval(), torch.zeros(1, n_classes), metrics))
    return out


def ranking_frame(n_layers=3, n_heads=4):
    """Every head of every class, ranked: class c ranks head (c, c) first."""
    rows = []
    for c, name in enumerate(CLASSES):
        scores = np.random.default_rng(c).random((n_layers, n_heads))
        scores[c % n_layers, c % n_heads] = 2.0
        order = np.argsort(-scores, axis=None)
        for rank, flat in enumerate(order, 1):
            l, h = np.unravel_index(flat, scores.shape)
            rows.append({"class": name, "layer": int(l), "head": int(h), "hook_name": f"blocks.{l}.attn.hook_pattern",
                         "score": float(scores[l, h]), "rank": rank})
    return pd.DataFrame(rows)


def facts_frame(ids):
    return pd.DataFrame({"sequence_id": ids, "memorization_score": [1.0, 0.25, 1.0][: len(ids)],
                         "sequence_duplicates": [2, 0, 40][: len(ids)]})


@pytest.fixture(scope="module")
def attention(tiny_model, tiny_tokens):
    return extract_attention(tiny_model, tiny_tokens[:3], per_head=True)


@pytest.fixture(scope="module")
def full_views(attention, tiny_tokens):
    maps = {name: np.tril(np.random.default_rng(c).random((3, 64, 64))).astype(np.float32)
            for c, name in enumerate(CLASSES)}
    cnns = random_cnns()
    labels = [1, 0, 2]
    return viz.sample_views(
        attention, tiny_tokens[:3].numpy(), facts_frame([101, 102, 103]), taxonomy=TAXONOMY, class_names=CLASSES,
        labels=labels, cnns=cnns, ranking=ranking_frame(), region_maps=maps,
        sample_region_maps=viz.sample_decisive_maps(cnns, attention, labels), splits={101: "eval", 102: "train"},
        top_heads=3, model_name="tiny")


@pytest.fixture(scope="module")
def pages(full_views, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages")
    viz.write_pages(full_views, out)
    return out


# ============================================================================ page content


def test_numbers_are_rounded_nested_json():
    a = np.array([[[0.12345, -0.00001], [1.0, 0.5]]])
    text = viz.pages._num_array(a, 3)
    assert text == "[[[0.123,0],[1,0.5]]]"
    assert np.allclose(json.loads(text), np.round(a, 3))
    with pytest.raises(ValueError, match="non-finite"):
        viz.pages._num_array(np.array([np.nan]), 3)


def test_page_is_self_contained_with_one_inlined_bundle(pages):
    text = (pages / "sample_101.html").read_text()
    assert text.count("var CircuitsVis=") == 1  # the bundle, once, however many views
    assert len(re.findall(r"</script", text, flags=re.I)) == 2  # the bundle's own "</script" was escaped
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "unpkg.com" not in text and "import " not in text.split("var CircuitsVis=")[0]
    size = len(text.encode())
    assert size < len(viz.circuitsvis_bundle().encode()) + 1_000_000, size


def test_page_shows_tokens_facts_probabilities_and_ranked_heads(full_views, pages, tiny_tokens):
    v = full_views[0]
    text = (pages / "sample_101.html").read_text()
    assert "Sample 101" in text and "1.000" in text and ">2<" in text and "<b>Guess</b>" in text
    assert text.count('class="tok prefix"') == 32 and text.count('class="tok suffix') == 32
    assert f"id {int(tiny_tokens[0, 0])}\"" in text  # hover shows each token id
    # CNN probabilities: one row per CNN plus the mean, summing to one.
    assert set(v.probabilities) == {"k6_c4_mean", "k6_c4_max"}
    assert all(abs(sum(p) - 1) < 1e-5 for p in v.probabilities.values())
    assert "mean over CNNs" in text and f"{v.mean_probabilities.max():.3f}" in text
    # Guess's best head is L1H1: marked in its layer's view and first in the top-heads view.
    assert "L1H1 ★#1" in text and '"#1 L1H1"' in text
    assert v.top_heads["rank"].tolist() == [1, 2, 3]
    views = re.findall(r'class="cv-view" id="([\w-]+)" data-kind="([\w-]+)"', text)
    assert [k for _, k in views].count("attention") == 3
    assert {"regions-class", "regions-sample", "top-heads"} <= {k for _, k in views}
    # Each view's render call carries this sample's rounded attention.
    calls = json.loads(re.search(r"const VIEWS = (\{.*?\n\});", text, flags=re.S).group(1))
    assert list(calls) == [vid for vid, _ in views]
    component, layer0 = calls["attn-l0"]
    assert component == "AttentionHeads"
    np.testing.assert_allclose(layer0["attention"], v.attention[0], atol=5e-4)
    assert layer0["maskUpperTri"] is True and len(layer0["tokens"]) == 64


def test_a_greedy_suffix_is_marked_with_the_datas_suffix(attention, tiny_tokens):
    original = tiny_tokens[:3].numpy().copy()
    shown = original.copy()
    shown[1, 32:] = 7  # sample 2 is non-memorized: the model saw its own continuation
    views = viz.sample_views(attention, shown, facts_frame([1, 2, 3]), original_tokens=original)
    assert views[0].original_suffix is None and views[1].original_suffix == [f"<{t}>" for t in original[1, 32:]]
    text = viz.sample_page(views[1])
    assert "greedy continuation" in text and text.count("tok suffix greedy") == 32


def test_missing_parts_are_named_not_failed(attention, tiny_tokens, tmp_path):
    notes = ["CNN probabilities: no run_alignment output at runs/nowhere"]
    views = viz.sample_views(attention, tiny_tokens[:3].numpy(), facts_frame([1, 2, 3]), class_names=CLASSES,
                             labels=[0, 1, 2], missing=notes)
    text = viz.sample_page(views[0])
    assert "No CNN predictions" in text and "No decisive-region map" in text
    assert "Missing on this page" in text and "runs/nowhere" in text
    assert 'data-kind="top-heads"' not in text and "★" not in text
    index = viz.write_pages(views, tmp_path, pngs=False).read_text()
    assert "runs/nowhere" in index


def test_index_lists_samples_by_class_with_links(full_views, pages):
    index = (pages / "index.html").read_text()
    headings = re.findall(r"<h2 id='class-([^']+)'>", index)
    assert headings == CLASSES
    links = re.findall(r"href='(sample_\d+\.html)'", index)
    assert sorted(links) == ["sample_101.html", "sample_102.html", "sample_103.html"]
    assert all((pages / link).is_file() for link in links)
    # Under its class heading, each sample: Non-Memo holds 102, Guess 101.
    assert index.index("sample_102.html") < index.index("class-Guess") < index.index("sample_101.html")
    summary = pd.read_csv(pages / "samples.csv")
    assert summary["class"].tolist() == ["Guess", "Non-Memo", "Others"]


def test_attention_grid_png_per_sample(pages, full_views):
    with Image.open(pages / "sample_101.png") as img:
        w, h = img.size
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert w > 400 and h > 300
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 200  # the ranked heads' red frames


def test_tokens_and_ids_with_html_are_escaped(attention, tiny_tokens):
    class Tok:
        def decode(self, ids):
            return "</script><b>" if ids[0] % 2 else "\n"

    v = viz.sample_views(attention[:1], tiny_tokens[:1].numpy(), facts_frame([1]), tokenizer=Tok())[0]
    text = viz.sample_page(v)
    odd = int((tiny_tokens[0] % 2).sum())
    assert "</script><b>" not in text and len(re.findall(r"</script", text, flags=re.I)) == 2
    assert text.count("&lt;/script&gt;&lt;b&gt;</span>") == odd  # token spans
    assert text.count('"\\u003c/script>\\u003cb>"') == 3 * odd  # axis labels of the 3 layers' views
    assert '"\\\\n"' in text  # a newline token is labelled \n on the axes, ↵ in the text
    assert text.count(">↵</span>") == 64 - odd


# ============================================================================ numbers behind the page


def test_cnn_probabilities_are_each_cnns_softmax_on_its_pooling(attention):
    cnns = random_cnns()
    probs = viz.cnn_probabilities(cnns, attention)
    for t in cnns:
        pooled = attention.amax(2) if t.config.pooling == "max" else attention.mean(2)
        expected = torch.softmax(t.model(pooled), -1).detach().numpy()
        np.testing.assert_allclose(probs[t.config.name], expected, atol=2e-3)
    with pytest.raises(ValueError, match="another model"):
        viz.cnn_probabilities(random_cnns(n_layers=2), attention)


def test_sample_map_is_localizations_delta_for_a_one_sample_class(tiny_model, tiny_tokens, attention):
    from mechmem.localize import LocalizeConfig, localize

    cnns = random_cnns()
    labels = np.array([2, 0, 1])
    mine = viz.sample_decisive_maps(cnns, attention, labels)
    loc = localize(tiny_model, cnns, tiny_tokens[:3], labels, CLASSES, cfg=LocalizeConfig(batch_size=3),
                   progress=False)
    for i, c in enumerate(labels):  # one sample per class: Delta[c] is that sample's map
        np.testing.assert_allclose(mine[i], loc.delta[c], atol=1e-5)
    assert mine.max() > 0


def test_heads_for_class_by_name_or_index_and_bad_ranking():
    r = ranking_frame()
    by_name = viz.heads_for_class(r, CLASSES, 2, 4)
    by_index = viz.heads_for_class(r.assign(**{"class": r["class"].map(CLASSES.index)}), CLASSES, 2, 4)
    assert by_name[["layer", "head", "rank"]].equals(by_index[["layer", "head", "rank"]])
    assert by_name.iloc[0][["layer", "head"]].tolist() == [2, 2]
    assert viz.heads_for_class(r[r["class"] != "Others"], CLASSES, 2, 4) is None
    with pytest.raises(ValueError, match="hook_name"):
        viz.heads_for_class(r.drop(columns="hook_name"), CLASSES, 0, 3)


def test_pick_samples_per_class_seeded_and_restricted():
    labels = np.repeat([0, 1, 2], 10)
    ids = np.arange(100, 130)
    picked = viz.pick_samples(labels, ids, 3, 4, seed=1)
    assert [len(picked[c]) for c in range(3)] == [4, 4, 4]
    assert all(labels[ids.searchsorted(picked[c])].tolist() == [c] * 4 for c in range(3))
    assert picked == viz.pick_samples(labels, ids, 3, 4, seed=1)
    among = viz.pick_samples(labels, ids, 3, 4, among=[100, 101, 125])
    assert among == {0: [100, 101], 1: [], 2: [125]}


# ============================================================================ reading a run folder


def memo_frame(n=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 512, size=(n, 64))
    tokens[1::3, 32:] = tokens[1::3, :32]
    return pd.DataFrame({
        "sequence_id": np.arange(500, 500 + n), "tokens": list(tokens), "text": ["x"] * n,
        "memorization_score": np.where(np.arange(n) % 3 == 0, 0.25, 1.0),
        "sequence_duplicates": rng.integers(0, 20, n), "is_incrementing": np.zeros(n, dtype=bool),
        "is_repeating": np.arange(n) % 3 == 1, "is_code": np.zeros(n, dtype=bool),
        "rouge_L_prefix_to_suffix": np.where(np.arange(n) % 3 == 1, 1.0, 0.1),
        "rouge_3_prefix_to_suffix": np.where(np.arange(n) % 3 == 1, 1.0, 0.0),
    })


@pytest.fixture(scope="module")
def run_folder(tiny_model, tmp_path_factory):
    """A run_alignment folder made by hand: one row, two CNNs, a store of 9 of the 12 samples."""
    folder = tmp_path_factory.mktemp("run")
    df = memo_frame()
    in_store = df.iloc[:9]
    shown = np.stack(in_store["tokens"].to_numpy())
    shown[0::3, 32:] = 3  # stand-in "greedy" suffixes: the pages must show the store's tokens
    run = RunFolder(folder)
    build_feature_store(run.features_dir, tiny_model, in_store["sequence_id"].to_numpy(), shown, progress=False)
    save_cnns(random_cnns(), run.cnn_folder("merge_2_other_guess_recollect_recite_t5"))
    run.write_row("merge_2_other_guess_recollect_recite_t5", {
        "tax_name": TAXONOMY, "class_names": CLASSES,
        "row": {"tax_id": "merge_2_other_guess_recollect_recite", "threshold": 5, "rouge": "either",
                "rouge_threshold": 0.5},
        "train_sequence_ids": [500, 501, 502, 503, 504, 505], "eval_sequence_ids": [506, 507, 508]})
    return folder, df, shown


def test_read_run_finds_the_row_cnns_and_store(run_folder, tiny_model):
    folder, _, _ = run_folder
    run = viz.read_run(folder, TAXONOMY, tiny_model)
    assert run.slug == "merge_2_other_guess_recollect_recite_t5" and run.missing == []
    assert [t.config.name for t in run.cnns] == ["k6_c4_mean", "k6_c4_max"]
    assert run.eval_ids == [506, 507, 508] and run.splits()[500] == "train" and run.splits()[507] == "eval"
    assert "no row" in viz.read_run(folder, "Non-Memo, Code, Others").missing[0]
    assert "no run_alignment output" in viz.read_run(folder / "nope", TAXONOMY).missing[0]


def test_read_run_refuses_another_models_run(run_folder, tmp_path):
    from mechmem.models import load_model, save_random_pythia

    from conftest import TINY

    other = load_model(save_random_pythia("14m", tmp_path / "other", seed=1, n_ctx=128, **TINY), device="cpu")
    with pytest.raises(ValueError, match="made with model"):
        viz.read_run(run_folder[0], TAXONOMY, other)


def test_lookup_model_view_from_the_store_else_greedy(run_folder, tiny_model, monkeypatch):
    import mechmem.memorization

    folder, df, shown = run_folder
    store = viz.read_run(folder, TAXONOMY).store
    calls = []

    def fake_free_generation(model, tokens, scores):  # greedy decoding itself is tested in test_memorization
        calls.append((tokens.clone(), list(scores)))
        out = tokens.clone()
        out[torch.as_tensor(scores) < 1, 32:] = 7
        return out

    monkeypatch.setattr(mechmem.memorization, "free_generation", fake_free_generation)
    positions = np.array([3, 9, 10])  # 503 is in the store (non-memo); 509 (non-memo) and 510 are not
    tokens = viz.lookup_model_view(tiny_model, df, positions, store)
    np.testing.assert_array_equal(tokens[0], shown[3])
    assert len(calls) == 1 and calls[0][1] == [0.25, 1.0]
    np.testing.assert_array_equal(calls[0][0].numpy(), np.stack(df["tokens"].to_numpy()[[9, 10]]))
    assert (tokens[1, 32:] == 7).all() and (tokens[2] == df["tokens"].iloc[10]).all()
    assert (tokens[1, :32] == df["tokens"].iloc[9][:32]).all()


def test_inspect_run_end_to_end(run_folder, tiny_model, tmp_path):
    from mechmem.localize import LocalizeConfig, localize

    folder, df, shown = run_folder
    cnns = viz.read_run(folder, TAXONOMY).cnns
    loc = localize(tiny_model, cnns, shown[6:9], np.array([0, 1, 2]), CLASSES, sequence_ids=[506, 507, 508],
                   cfg=LocalizeConfig(batch_size=3), progress=False, meta={"tax_name": TAXONOMY})
    loc.save(tmp_path / "loc")
    cfg = viz.InspectConfig(per_class=1, top_heads=2)
    views = viz.inspect_run(tiny_model, df, None, cfg, run_dir=folder, localization=tmp_path / "loc")
    assert all(v.split == "eval" for v in views)  # picked from the CNNs' held-out samples
    assert [v.class_name for v in views] == sorted({v.class_name for v in views}, key=CLASSES.index)
    v = views[0]
    assert v.probabilities and v.region_map is not None and v.sample_region_map is not None
    assert len(v.top_heads) == 2 and v.missing == []
    np.testing.assert_array_equal(v.token_ids, shown[df["sequence_id"].tolist().index(v.sequence_id)])
    # Asked-for ids outside the run: no split, labels still from the taxonomy.
    more = viz.inspect_run(tiny_model, df, [510], cfg, run_dir=folder, localization=None)
    assert more[0].split is None and any("no localization" in m for m in more[0].missing)
    with pytest.raises(ValueError, match="sequence_id 9999"):
        viz.inspect_run(tiny_model, df, [9999], cfg, run_dir=folder)


# ============================================================================ the command line


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "inspect_samples.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = _cli("--run", tmp_path / "nowhere", "--out", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert lines == [f"inspect_samples: error: --run folder {tmp_path}/nowhere does not exist"]



def _main(argv, monkeypatch, model):
    """The script in this process, with the session's tiny model (loading is tested in test_models)."""
    import mechmem.models

    monkeypatch.setattr(mechmem.models, "load_model", lambda name, **kw: model)
    return load_experiment("inspect_samples").main([str(a) for a in argv])


def test_cli_defaults_to_the_run_localization_used(tmp_path):
    script = load_experiment("inspect_samples")
    RunFolder(tmp_path / "run").rows_dir.mkdir(parents=True)
    (tmp_path / "loc").mkdir()
    assert script._localizations_run(tmp_path / "loc") is None
    (tmp_path / "loc" / "localization.json").write_text(json.dumps({"meta": {"run": str(tmp_path / "run")}}))
    assert script._localizations_run(tmp_path / "loc") == tmp_path / "run"
    (tmp_path / "loc" / "localization.json").write_text(json.dumps({"meta": {"run": str(tmp_path / "gone")}}))
    assert script._localizations_run(tmp_path / "loc") is None


def test_cli_writes_pages_for_chosen_ids(run_folder, tiny_model, tmp_path, monkeypatch, capsys):
    folder, df, _ = run_folder
    df.to_parquet(tmp_path / "memo.parquet")
    out = tmp_path / "pages"
    common = ["--data", tmp_path / "memo.parquet", "--run", folder, "--ids", 506, 508, "--no-png", "--quiet",
              "--out", out]
    assert _main([*common, "--localization", tmp_path / "nowhere"], monkeypatch, tiny_model) == 2
    assert capsys.readouterr().err.strip().endswith(f"--localization folder {tmp_path}/nowhere does not exist")
    assert _main([*common, "--localization", "none"], monkeypatch, tiny_model) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "sample_506.html", "sample_508.html"]
    assert "missing: class decisive-region map and head ranking: no localization was given" in stdout
    assert out.resolve().as_uri() + "/index.html" in stdout
    page = (out / "sample_506.html").read_text()
    assert "k6_c4_mean" in page and "held out" in page  # the run's CNNs scored it; it was in their eval split
    assert json.loads((out / "config.json").read_text())["run"] == str(folder)


# ============================================================================ a real browser, offline
# Each page is opened from disk in headless chromium (Playwright on the system's chromium) whose
# every request is routed: file:// and data: load, anything else is recorded and aborted. A script
# scrolls to each view, waits until it has drawn, and reads its canvases' pixels. Without chromium
# these tests skip (conftest.browser_gate), unless CI or MECHMEM_REQUIRE_BROWSER asks for them.


@pytest.fixture(scope="module")
def offline_check(pages, tmp_path_factory):
    shot = tmp_path_factory.mktemp("shot") / "sample_101.png"
    return viz.check_page(pages / "sample_101.html", screenshot=shot, window=(900, 1200), wait_s=90), shot


@pytest.mark.browser
def test_attention_views_draw_offline_in_chromium(offline_check):
    check, _ = offline_check
    kinds = [v["kind"] for v in check.views]
    assert kinds.count("attention") == 3 and {"regions-class", "regions-sample", "top-heads"} <= set(kinds)
    for v in check.views:
        # AttentionHeads: one thumbnail per head (or layer) plus the zoomed pattern, painted in colour.
        assert v["rendered"] == "1" and v["canvases"] >= 4 and v["coloured"] > 500, v
    assert check.drawn


@pytest.mark.browser
def test_screenshot_is_the_top_of_the_page(offline_check):
    _, shot = offline_check
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (900, 1200)
        pixels = np.asarray(img.convert("RGB")).astype(int)
    assert (pixels[:5] == 255).all()  # the white top margin: scrolled back to the top
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 235) & (pixels[..., 1] < 245)
    assert blue.sum() > 1000  # the prefix tokens' light-blue boxes and the links


@pytest.mark.browser
def test_pages_make_no_request_off_the_machine(offline_check, pages):
    check, _ = offline_check
    assert check.requests == [(pages / "sample_101.html").resolve().as_uri()]  # the page itself, from disk
    assert check.offsite == []
    index = viz.check_page(pages / "index.html", wait_s=5)
    assert index.offsite == [] and index.views == [] and index.requests == [(pages / "index.html").resolve().as_uri()]


@pytest.mark.browser
def test_a_cdn_page_is_caught(pages, tmp_path):
    """The check can fail: the same page loading circuitsvis from its CDN (circuitsvis's default)."""
    text = (pages / "sample_102.html").read_text()
    bundle = "<script>" + viz.circuitsvis_bundle() + "</script>"
    assert bundle in text
    cdn = tmp_path / "cdn.html"
    url = "https://unpkg.com/circuitsvis@1.43.3/dist/cdn/iife.js"
    cdn.write_text(text.replace(bundle, f'<script src="{url}"></script>'))
    check = viz.check_page(cdn, wait_s=10)
    assert not check.drawn and all(v["rendered"] == "error" and v["coloured"] == 0 for v in check.views)
    assert check.offsite == [url] and check.requests == [cdn.resolve().as_uri(), url]


@pytest.mark.browser
def test_every_kind_of_request_off_the_machine_is_recorded_and_local_ones_load(tmp_path):
    import base64
    import io

    Image.new("RGB", (7, 5), "red").save(tmp_path / "local.png")
    inline = io.BytesIO()
    Image.new("RGB", (3, 2), "blue").save(inline, format="PNG")
    offsite = ["http://example.com/a.png", "https://fonts.example.org/f.css", "https://api.example.net/data",
               "wss://socket.example.net/live"]
    page = tmp_path / "leaky.html"
    page.write_text(f"""<!doctype html><html><head><link rel="stylesheet" href="{offsite[1]}"></head><body>
<img id="remote" src="{offsite[0]}"><img id="local" src="local.png">
<img id="inline" src="data:image/png;base64,{base64.b64encode(inline.getvalue()).decode()}">
<script>
  fetch("{offsite[2]}").catch(() => {{}});
  try {{ new WebSocket("{offsite[3]}"); }} catch (e) {{}}
</script></body></html>""")
    with viz.Browser(window=(400, 300), timeout=30) as browser:
        tab = browser.open(page)
        tab.wait_for_timeout(1000)  # the fetch and the socket start after the load event
        sizes = tab.evaluate("[...document.images].map((i) => [i.id, i.naturalWidth])")
        assert sorted(browser.offsite) == sorted(offsite)
        assert (tmp_path / "local.png").resolve().as_uri() in browser.requests
    assert dict(sizes) == {"remote": 0, "local": 7, "inline": 3}  # aborted; from disk; data: URL


@pytest.mark.browser
def test_cli_check_and_screenshot(run_folder, tiny_model, tmp_path, monkeypatch, capsys):
    folder, df, _ = run_folder
    df.to_parquet(tmp_path / "memo.parquet")
    shot = tmp_path / "shots" / "first.png"
    argv = ["--data", tmp_path / "memo.parquet", "--run", folder, "--localization", "none", "--ids", 506,
            "--no-png", "--quiet", "--out", tmp_path / "pages", "--check", "--screenshot", shot]
    assert _main(argv, monkeypatch, tiny_model) == 0
    out = capsys.readouterr().out
    assert "ok: index.html: 0/0 views drawn offline, 0 requests off the machine" in out
    assert "ok: sample_506.html: 4/4 views drawn offline, 0 requests off the machine" in out
    with Image.open(shot) as img:
        assert img.size == (1280, 2200)


def test_browser_tests_skip_without_chromium_unless_asked_for(monkeypatch):
    from conftest import browser_gate, browser_required

    import mechmem.viz.browser as browser

    monkeypatch.delenv("MECHMEM_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)  # no chromium anywhere
    missing = viz.browser_missing()
    assert missing.startswith("no chromium found") and "apt-get install chromium" in missing
    for name in ("CI", "MECHMEM_REQUIRE_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium found"):
        browser_gate(missing)
    for value in ("", "0", "false"):  # set, but not asking
        monkeypatch.setenv("CI", value)
        assert not browser_required()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI or MECHMEM_REQUIRE_BROWSER asks"):
        browser_gate(missing)
    monkeypatch.delenv("CI")
    monkeypatch.setenv("MECHMEM_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception):
        browser_gate(missing)
    # A chromium found (here a stand-in path) and Playwright importable: nothing to skip or fail.
    monkeypatch.setattr(browser.shutil, "which", lambda name: f"/opt/{name}" if name == "chromium" else None)
    pytest.importorskip("playwright")
    assert viz.find_chromium() == "/opt/chromium" and viz.browser_missing() is None
    browser_gate(viz.browser_missing())
    monkeypatch.setattr(browser.importlib.util, "find_spec", lambda name: None)  # chromium, but no Playwright
    assert viz.browser_missing().startswith("Playwright is not installed")
    monkeypatch.undo()
    monkeypatch.setenv("MECHMEM_CHROMIUM", "my-chrome")
    monkeypatch.setattr(browser.shutil, "which", lambda name: "/x/my-chrome" if name == "my-chrome" else None)
    assert viz.find_chromium() == "/x/my-chrome"


def test_the_rule_applies_to_every_browser_marked_test(pytester, monkeypatch):
    """The conftest hook itself, in a pytest run of its own: skipped by default, an error under CI."""
    import mechmem.viz.browser as browser

    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_one="""
        import pytest

        @pytest.fixture
        def costly():
            raise AssertionError("fixtures of a skipped browser test are never set up")

        @pytest.mark.browser
        def test_needs_a_browser(costly):
            pass

        def test_plain():
            pass
    """)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("MECHMEM_CHROMIUM", raising=False)
    for name in ("CI", "MECHMEM_REQUIRE_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*no browser for the browser tests (no chromium found*"])
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # an error in setup: the run fails, its fixtures never ran
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*no browser, but CI or MECHMEM_REQUIRE_BROWSER asks*"])
