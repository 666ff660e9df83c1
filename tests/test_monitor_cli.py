"""experiments/monitor.py end to end on a miniature run folder, its bad input, and its page in chromium.

The model is the tiny random Pythia of conftest with the testbed's tokenizer (so that text prompts
encode to real tokens: the tiny checkpoint's placeholder tokenizer knows one token); the run is
test_localize's `make_run` made with it. `load_model` is replaced by one that returns that model and
records the name it was asked for (loading is tested in test_models)."""

import contextlib
import io
import json
import re
import shutil

import pytest
from conftest import TINY, load_experiment
from test_localize import make_run

from mechmem import viz
from mechmem.models import load_model, save_random_pythia
from mechmem.monitor import stretch_starts

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = "Hello <script>alert('x')</script> & world"
LONG = ('def read_values(base, key):\n    """Return dict of registry keys and values.\n\n'
        '    All names are converted to lowercase.\n    """\n    try')


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from mechmem.testbed import MODEL_DIR

    folder = save_random_pythia("14m", tmp_path_factory.mktemp("tiny-text"), seed=0, n_ctx=128,
                                **(TINY | {"vocab_size": 8192}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def text_model(text_checkpoint):
    return load_model(text_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_model, text_checkpoint):
    return make_run(tmp_path_factory.mktemp("run"), text_model, text_checkpoint)[0]


def _main(argv, model, monkeypatch, script=None):
    """The script in this process; returns (exit code, the names load_model was asked for)."""
    import mechmem.models

    asked = []
    monkeypatch.setattr(mechmem.models, "load_model", lambda name, **kw: asked.append(str(name)) or model)
    script = script or load_experiment("monitor")
    return script.main([str(a) for a in argv]), asked


def n_stretches(model, prompts, new=64, stride=32):
    lengths = [len(model.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    return sum(len(stretch_starts(n, n + new, stride)) for n in lengths)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, run_dir, text_model):
    """One run of the script, two prompts: its output folder, stdout and the model names asked for."""
    out = tmp_path_factory.mktemp("cli") / "monitor"
    argv = ["--run", run_dir, "--prompt", SHORT, "--prompt", LONG, "--out", out, "--quiet", "--no-color"]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        rc, asked = _main(argv, text_model, mp)
    assert rc == 0, stdout.getvalue()
    return out, stdout.getvalue(), asked, [str(a) for a in argv]


# ============================================================================ what it writes


def test_writes_page_records_and_config(cli_run, run_dir, text_checkpoint, text_model):
    out, stdout, asked, argv = cli_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "monitor.html", "spans.jsonl"]  # no temp files
    assert asked == [str(text_checkpoint)]  # --model defaults to the run's model
    records = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    expected = n_stretches(text_model, [SHORT, LONG])
    assert len(records) == expected and expected >= 3  # the long prompt has 2 stretches
    assert {r["prompt"] for r in records} == {0, 1}
    for r in records:
        assert r["end"] - r["start"] == 32 and len(r["tokens"]) == 32 and r["taxonomy"] == "Non-Memo, Guess, Others"
        assert set(r["probs"]) == {"Non-Memo", "Guess", "Others"} and abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probs"], key=r["probs"].get) and r["flagged"] == (r["label"] != "Non-Memo")
    config = json.loads((out / "config.json").read_text())
    assert config["argv"] == argv and config["run"] == str(run_dir) and config["model"] == str(text_checkpoint)
    assert config["taxonomy"] == "Non-Memo, Guess, Others" and config["prompts"] == [SHORT, LONG]
    assert config["config"]["max_new_tokens"] == 64 and config["config"]["stride"] == 32 and config["n_cnns"] == 2
    page = (out / "monitor.html").read_text()
    assert len(re.findall(r"<span class='stretch[^']*' id='stretch-\d+-\d+'", page)) == expected
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; world" in page and "<script" not in page
    flagged = sum(r["flagged"] for r in records)
    assert f"{expected} stretches in 2 prompts, {flagged} flagged" in stdout
    assert "legend: [[Guess› … ‹]] Guess, [[Others› … ‹]] Others" in stdout and "\x1b" not in stdout
    assert stdout.count("[[") == flagged + 2  # the marks, then the legend's two
    assert (out / "monitor.html").resolve().as_uri() in stdout


def test_prompts_files_and_model(tmp_path, run_dir, text_model, monkeypatch, capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n   \nsecond <prompt>\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "line one\\nline two"}\n\n{"prompt": "third", "note": 1}\n')
    for file, prompts in ((text, ["first prompt", "second <prompt>"]), (jsonl, ["line one\nline two", "third"])):
        out = tmp_path / f"out-{file.suffix[1:]}"
        rc, asked = _main(["--run", run_dir, "--prompts-file", file, "--model", "another", "--stride", 16, "--out",
                           out, "--quiet"], text_model, monkeypatch)
        assert rc == 0 and asked == ["another"], capsys.readouterr().err
        assert json.loads((out / "config.json").read_text())["prompts"] == prompts
        records = (out / "spans.jsonl").read_text().splitlines()
        assert len(records) == n_stretches(text_model, prompts, stride=16)


def test_row_slug_all_seeds_and_seeded_sampling(tmp_path, run_dir, text_model, monkeypatch, capsys):
    argv = ["--run", run_dir, "--prompt", LONG, "--taxonomy", "merge_2_other_guess_recollect_recite_t5", "--seeds",
            "all", "--sample", "--temperature", 0.7, "--top-k", 20, "--quiet"]
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _main([*argv, "--seed", seed, "--out", tmp_path / name], text_model, monkeypatch)[0] == 0
        runs.append((tmp_path / name / "spans.jsonl").read_text())
    assert runs[0] == runs[1] and runs[0] != runs[2]  # the seed decides the draw
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["seeds"] == "all" and config["taxonomy"] == "Non-Memo, Guess, Others"
    assert {k: config["config"][k] for k in ("sample", "temperature", "top_k", "seed")} == \
        {"sample": True, "temperature": 0.7, "top_k": 20, "seed": 3}
    assert "sampling (temperature 0.7, top-k 20, seed 3)" in (tmp_path / "a" / "monitor.html").read_text()


def test_defaults_run_and_builtin_prompts(tmp_path, run_dir, text_model, monkeypatch, capsys):
    script = load_experiment("monitor")
    script.DEFAULT_RUN = tmp_path / "nowhere"
    rc, _ = _main(["--out", tmp_path / "out", "--quiet"], text_model, monkeypatch, script)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "no trained CNNs for 'Non-Memo, Guess, Others'" in err[0]
    assert "`python experiments/run_alignment.py --grid quick --out runs/alignment-quick`" in err[0]
    assert not (tmp_path / "out").exists()

    script.DEFAULT_RUN = run_dir
    rc, asked = _main(["--out", tmp_path / "out", "--quiet", "--no-color"], text_model, monkeypatch, script)
    stdout = capsys.readouterr().out
    assert rc == 0 and "the 4 built-in testbed prompts" in stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["run"] == str(run_dir) and config["prompts"] == list(script.DEFAULT_PROMPTS)
    assert len((tmp_path / "out" / "spans.jsonl").read_text().splitlines()) == 8  # 2 a prompt of 32 tokens


def test_builtin_prompts_are_32_testbed_tokens_each():
    from transformers import AutoTokenizer

    from mechmem.testbed import MODEL_DIR

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    prompts = load_experiment("monitor").DEFAULT_PROMPTS
    assert [len(tok.encode(p, add_special_tokens=False)) for p in prompts] == [32] * 4


def test_colour_only_on_a_terminal_without_no_color():
    use_color = load_experiment("monitor").use_color

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert use_color(False, Tty(), {}) is True
    assert use_color(True, Tty(), {}) is False  # --no-color
    assert use_color(False, Tty(), {"NO_COLOR": "1"}) is False
    assert use_color(False, io.StringIO(), {}) is False  # a pipe or a file


# ============================================================================ bad input


def _bad_cases(tmp_path, run_dir):
    file = tmp_path / "a-file"
    file.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    (tmp_path / "not-a-run").mkdir()
    return [
        (["--prompts-file", tmp_path / "missing.txt"], "does not exist"),
        (["--prompts-file", empty], f"--prompts-file {empty} has no prompts"),
        (["--prompts-file", tmp_path], "is a folder, not a file"),
        (["--prompts-file", bad_jsonl], 'line 2: not a JSON object with a "prompt" string'),
        (["--prompt", ""], "--prompt 1 is empty"),
        (["--prompt", "fine", "--prompt", ""], "--prompt 2 is empty"),
        (["--prompt", "a", "--prompts-file", file], "not allowed with argument"),
        (["--run", tmp_path / "nowhere"], f"--run folder {tmp_path / 'nowhere'} does not exist"),
        (["--run", tmp_path / "not-a-run"], "is not a run_alignment output folder"),
        (["--run", file], "is a file, not a run_alignment output folder"),
        (["--taxonomy", "Non-Memo, Bogus, Others"], "unknown taxonomy name"),
        (["--taxonomy", "Non-Memo, Code, Others"], "no trained taxonomy 'Non-Memo, Code, Others'"),
        (["--max-new-tokens", 10], "--max-new-tokens 10 is too few"),
        (["--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
        (["--max-new-tokens", "many"], "invalid int value"),
        (["--max-new-tokens", 40, "--prompt", "Hi"], "--max-new-tokens 40 leaves no whole 32-token stretch"),
        (["--sample", "--temperature", 0], "--temperature must be a positive number"),
        (["--sample", "--temperature", "nan"], "--temperature must be a positive number"),
        (["--temperature", 0.5], "apply only with --sample"),
        (["--sample", "--top-k", 0], "--top-k must be >= 1"),
        (["--stride", 0], "--stride must be >= 1"),
        (["--batch-size", -1], "--batch-size must be >= 1"),
        (["--seeds", "some"], "invalid choice"),
        (["--out", file], "is a file, not a folder"),
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--prompt", "word " * 120], "more than the model's context of 128"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, run_dir, text_model, monkeypatch, capsys):
    for extra, message in _bad_cases(tmp_path, run_dir):
        out = tmp_path / "out"
        argv = [*(["--run", run_dir] if "--run" not in extra else []), "--out", out, "--quiet", *extra]
        rc, _ = _main(argv, text_model, monkeypatch)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2, (extra, err)
        assert len(lines) == 1 and lines[0].startswith("monitor: error: "), (extra, err)
        assert message in lines[0], (extra, lines[0])
        assert not out.exists(), extra  # nothing written


def test_a_short_prompt_needs_more_new_tokens(tmp_path, run_dir, text_model, monkeypatch, capsys):
    """The needed count is said, and it is enough."""
    n = len(text_model.tokenizer.encode("Hi", add_special_tokens=False))
    need = 32 + (32 - n)
    argv = ["--run", run_dir, "--prompt", "Hi", "--out", tmp_path / "out", "--quiet"]
    assert _main([*argv, "--max-new-tokens", need - 1], text_model, monkeypatch)[0] == 2
    assert f"it needs {need} (32 tokens of context, then 32)" in capsys.readouterr().err
    assert _main([*argv, "--max-new-tokens", need], text_model, monkeypatch)[0] == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "spans.jsonl").read_text().splitlines()]
    assert [(r["start"], r["end"]) for r in records] == [(32 - n, need)]


# ============================================================================ the page in a real browser


@pytest.mark.browser
def test_page_shows_every_stretch_offline_in_chromium(cli_run, tmp_path):
    from test_viz_spans import ByteTokenizer, hand_result

    out = cli_run[0]
    records = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    hand = tmp_path / "hand.html"  # known flagged and unflagged stretches, for their colours
    hand.write_text(viz.monitor_html(hand_result(), ByteTokenizer()), encoding="utf-8")
    report = """() => [...document.querySelectorAll('.generated .stretch')].map((el) => {
        const box = el.getBoundingClientRect(), style = getComputedStyle(el);
        return {label: el.dataset.label, start: +el.dataset.start, flagged: el.classList.contains('flagged'),
                width: box.width, height: box.height, shown: style.display !== 'none' && style.visibility === 'visible',
                background: style.backgroundColor, title: el.title, text: el.textContent};
    })"""
    pages = {}
    with viz.Browser(window=(1000, 800), timeout=60) as browser:
        for page in (out / "monitor.html", hand):
            tab = browser.open(page)
            pages[page.name] = (tab.evaluate(report), tab.title())
        requests, offsite = list(browser.requests), list(browser.offsite)
    assert offsite == [] and requests == [(out / "monitor.html").resolve().as_uri(), hand.resolve().as_uri()]

    shown, title = pages["monitor.html"]
    assert title == "mechmem · regurgitation monitor"
    assert len(shown) == len(records)
    for el, r in zip(shown, records):
        assert (el["label"], el["start"], el["flagged"]) == (r["label"], r["start"], r["flagged"])
        assert el["shown"] and el["width"] > 0 and el["height"] > 0 and el["text"], el
        for c, p in r["probs"].items():
            assert f"{c} {p:.3f}" in el["title"]

    transparent = "rgba(0, 0, 0, 0)"
    colours = {"Guess": "rgb(253, 230, 138)", "Others": "rgb(252, 165, 165)", "Non-Memo": transparent}
    shown, _ = pages["hand.html"]
    assert len(shown) == 8 and {el["label"] for el in shown} == set(colours)
    for el in shown:
        assert el["shown"] and el["width"] > 0 and el["height"] > 0
        assert el["background"] == colours[el["label"]], el
