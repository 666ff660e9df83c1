import numpy as np
import pytest

from mechmem import cli


def test_parser_errors_are_one_line_and_exit_2(capsys):
    p = cli.Parser("tool", "doc")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as exit_:
        p.parse_args(["--n", "x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool: error: argument --n") and err.count("\n") == 1


@pytest.mark.parametrize("error, line", [
    (cli.CliError("use 'quick' or 'paper'"), "tool: error: use 'quick' or 'paper'"),
    (KeyError("no row 'x'"), "tool: error: no row 'x'"),  # without the quotes str(KeyError) adds
    (FileNotFoundError("runs/x missing"), "tool: error: runs/x missing"),
    (ValueError("first line\nsecond line"), "tool: error: first line"),
    (ValueError(), "tool: error: ValueError"),
])
def test_bad_input_is_reported_on_one_line_with_exit_2(capsys, error, line):
    def run(args):
        raise error

    assert cli.main("tool", lambda argv: None, run, []) == 2
    assert capsys.readouterr().err == line + "\n"


def test_other_errors_are_not_hidden():
    def run(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.main("tool", lambda argv: None, run, [])


def test_run_gets_the_parsed_args_and_its_result_is_the_exit_code():
    assert cli.main("tool", lambda argv: len(argv), lambda n: n + 5, ["a", "b"]) == 7


# ============================================================================ shared checks


def test_check_device(monkeypatch):
    import torch

    cli.check_device(None)
    cli.check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cli.CliError, match="^--device cuda: this machine has no CUDA GPU"):
        cli.check_device("cuda")
    with pytest.raises(cli.CliError, match="is not a device"):
        cli.check_device("gpu0")
    with pytest.raises(cli.CliError, match="unsupported device type 'meta'"):
        cli.check_device("meta")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(cli.CliError, match="MPS is not available"):
        cli.check_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cli.check_device("cuda")
    cli.check_device("cuda:1")
    with pytest.raises(cli.CliError, match=r"has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        cli.check_device("cuda:2")


def test_check_out_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    cli.check_out_dir(None)
    cli.check_out_dir(tmp_path)
    cli.check_out_dir(tmp_path / "new" / "deeper")  # made later
    with pytest.raises(cli.CliError, match=f"^--out {tmp_path}/file is a file, not a folder$"):
        cli.check_out_dir(tmp_path / "file")
    with pytest.raises(cli.CliError, match=f"^--loc {tmp_path}/file/sub: {tmp_path}/file is a file"):
        cli.check_out_dir(tmp_path / "file" / "sub", "--loc")


def test_check_positive():
    from types import SimpleNamespace

    args = SimpleNamespace(n_boot=1, ks=[1, 2], train_per_class=None, batch_size=0)
    cli.check_positive(args, "n_boot", "ks", "train_per_class")
    with pytest.raises(cli.CliError, match="^--batch-size must be >= 1, got 0$"):
        cli.check_positive(args, "n_boot", "batch_size")
    args.ks = [4, -1]
    with pytest.raises(cli.CliError, match="^--ks must be >= 1, got -1$"):
        cli.check_positive(args, "ks")


# ============================================================================ every script: bad input, before any work
# Each case runs a script in this process with loading data and models made to fail loudly: the
# bad input must be reported (one line, exit 2) before either starts.


@pytest.fixture
def no_work(monkeypatch):
    import torch

    import mechmem.data
    import mechmem.models

    def work(*args, **kwargs):
        raise AssertionError("work began before the bad input was found")

    monkeypatch.setattr(mechmem.data, "load_memorization_data", work)
    monkeypatch.setattr(mechmem.models, "load_model", work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine


SCRIPTS = ("run_alignment", "localize", "ablate_heads", "inspect_samples")
BAD_INPUT = [
    *[(s, ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU") for s in SCRIPTS],
    *[(s, ["--device", "cuda:one"], "--device 'cuda:one' is not a device") for s in SCRIPTS],
    *[(s, ["--out", "{file}"], "--out {file} is a file, not a folder") for s in SCRIPTS],
    *[(s, ["--out", "{file}/out"], "--out {file}/out: {file} is a file, not a folder") for s in SCRIPTS],
    ("run_alignment", ["--configs", "k99_c10_mean"], "CNN config k99_c10_mean: seq_len 64 is too short for "
                                                     "kernel_size 99"),
    ("run_alignment", ["--configs", "k6_c4_mean", "k22_c4_max"], "CNN config k22_c4_max: seq_len 64"),
    ("run_alignment", ["--train-per-class", "0"], "--train-per-class must be >= 1, got 0"),
    ("run_alignment", ["--eval-per-class", "-5"], "--eval-per-class must be >= 1, got -5"),
    ("run_alignment", ["--dtype", "fp8"], "unknown dtype 'fp8'"),
    ("run_alignment", ["--eval-per-class", "1"], "1 eval samples a class are too few for the permutation null of a "
                                                 "3-class row"),
    ("run_alignment", ["--null-permutations", "50"], "the permutation null needs at least 100 permutations, got 50"),
    ("run_alignment", ["--control-seeds", "4"], "control_seeds must lie in [1, cnn_seeds = 3]"),
    ("run_alignment", ["--cnn-conv", "fast"], "argument --cnn-conv: invalid choice"),
    ("localize", ["--run", "{tmp}/nowhere"], "--run folder {tmp}/nowhere does not exist"),
    ("localize", ["--samples-per-class", "0"], "--samples-per-class must be >= 1, got 0"),
    ("localize", ["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    ("localize", ["--train", "--train-per-class", "-3"], "--train-per-class must be >= 1, got -3"),
    ("localize", ["--train", "--run", "{tmp}"], "--train and --run exclude each other"),
    ("ablate_heads", ["--per-class", "0"], "--per-class must be >= 1, got 0"),
    ("ablate_heads", ["--ks", "1", "0"], "--ks must be >= 1, got 0"),
    ("ablate_heads", ["--n-random", "-1"], "--n-random must be >= 1, got -1"),
    ("ablate_heads", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("ablate_heads", ["--n-boot", "0"], "--n-boot must be >= 1, got 0"),
    ("ablate_heads", ["--localization", "{file}"], "--localization {file} is a file, not a folder"),
    ("ablate_heads", ["--localization", "{tmp}/nowhere"], "no localization results in {tmp}/nowhere"),
    ("ablate_heads", ["--method", "half"], "argument --method: invalid choice"),
    ("inspect_samples", ["--taxonomy", "Non-Memo, Banana, Others"], "unknown taxonomy name 'Non-Memo, Banana, Others'"),
    ("inspect_samples", ["--per-class", "0"], "--per-class must be >= 1"),
    ("inspect_samples", ["--decimals", "9"], "--decimals in [0, 6]"),
    ("inspect_samples", ["--screenshot", "{tmp}/shot.jpg"], "--screenshot {tmp}/shot.jpg: the screenshot is a PNG"),
    ("inspect_samples", ["--screenshot", "{tmp}/folder.png"], "--screenshot {tmp}/folder.png is a folder"),
    ("inspect_samples", ["--screenshot", "{file}/shot.png"], "--screenshot {file}/shot.png: {file} is a file"),
    ("inspect_samples", ["--run", "{tmp}/nowhere"], "--run folder {tmp}/nowhere does not exist"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUT, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_before_any_work(script, args, message, tmp_path, no_work, capsys):
    from conftest import load_experiment

    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    fill = dict(tmp=tmp_path, file=tmp_path / "file")
    argv = [a.format(**fill) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert load_experiment(script).main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{script}: error: "), err
    assert message.format(**fill) in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_largest_kernel_passes_the_check(tmp_path, no_work):
    """k21 fits 64 tokens (a 1 x 1 map after two conv-and-pool steps): work begins."""
    from conftest import load_experiment

    with pytest.raises(AssertionError, match="work began"):
        load_experiment("run_alignment").main(["--configs", "k21_c4_mean", "--out", str(tmp_path / "o"), "--quiet"])


def test_check_and_screenshot_need_a_browser_before_any_work(tmp_path, no_work, monkeypatch, capsys):
    from conftest import load_experiment

    import mechmem.viz.browser as browser

    monkeypatch.delenv("MECHMEM_CHROMIUM", raising=False)
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    script = load_experiment("inspect_samples")
    for flag in (["--check"], ["--screenshot", str(tmp_path / "s.png")]):
        assert script.main([*flag, "--out", str(tmp_path / "out"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == f"inspect_samples: error: {flag[0]} needs a browser: no chromium found: " \
                      f"{browser.INSTALL_HINT}\n"


# ============================================================================ a table made with another tokenizer


@pytest.fixture
def foreign_table(tmp_path):
    """A table whose row 3 holds id 600, past the tiny model's vocabulary of 512."""
    from test_alignment import synthetic_frame

    df = synthetic_frame(30)
    df.at[3, "tokens"] = np.where(np.arange(64) == 40, 600, df.at[3, "tokens"])
    df.to_parquet(tmp_path / "foreign.parquet")
    return tmp_path / "foreign.parquet"


VOCAB = "column 'tokens': row 3 (sequence_id 1003) holds token id 600, outside the model's vocabulary (ids 0-511)"


@pytest.mark.parametrize("script, args", [
    ("run_alignment", ["--taxonomies", "Non-Memo, Guess, Others", "--configs", "k6_c4_mean"]),
    ("localize", ["--train"]),
    ("inspect_samples", ["--run", "none", "--localization", "none", "--ids", "1003"]),
])
def test_a_table_that_does_not_fit_the_vocabulary_is_refused(script, args, foreign_table, tiny_model, tmp_path,
                                                             monkeypatch, capsys):
    import mechmem.models
    from conftest import load_experiment

    monkeypatch.setattr(mechmem.models, "load_model", lambda *a, **kw: tiny_model)  # loading: test_models
    argv = [*args, "--data", str(foreign_table), "--out", str(tmp_path / "out"), "--quiet"]
    assert load_experiment(script).main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and VOCAB in err, err


def test_data_folder_with_other_files_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """`run_alignment.py --data /tmp`: the stray file and what a table is, before any model loads."""
    import mechmem.models
    from conftest import load_experiment

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(mechmem.models, "load_model", load_model)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet"]
    assert load_experiment("run_alignment").main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"run_alignment: error: {tmp_path / 'data' / 'tokenizer_config.json'} is not a JSON or "
                          "JSON-lines memorization table ("), err
    assert "expected rows with columns sequence_id, tokens" in err and "pass the table file" in err


# ----------------------------------------------------------------------------- one logging path

def test_library_modules_speak_through_logging_not_print():
    """Library messages go through logging.getLogger(__name__) (scripts show them, see
    cli.show_library_messages); print and warnings.warn are for scripts. cli prints the scripts'
    one-line errors; a module's `if __name__ == "__main__":` block is a script."""
    import ast
    from pathlib import Path

    import mechmem

    def is_main_block(node):
        return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)

    root = Path(mechmem.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        body = ast.Module([n for n in tree.body if not is_main_block(n)], [])
        for node in ast.walk(body):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("print", "warnings.warn"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert offenders == []


def test_scripts_show_library_messages_once(capsys):
    import logging

    from mechmem import cli

    cli.show_library_messages()
    cli.show_library_messages()
    logging.getLogger("mechmem.alignment").info("skipped X: too few")
    assert capsys.readouterr().out == "skipped X: too few\n"
