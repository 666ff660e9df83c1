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
