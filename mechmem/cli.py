"""What the scripts in experiments/ share: bad input is one line on stderr and exit code 2, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class CliError(ValueError):
    """Bad input a script finds itself (the library's own ValueErrors are reported the same way)."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (exit 2) instead of a usage dump; the docstring as help."""

    def __init__(self, prog: str, description: str | None = None):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(prog: str, parse_args: Callable, run: Callable[..., int], argv: Sequence[str] | None = None) -> int:
    """run(parse_args(argv)); bad input (ValueError, FileNotFoundError, KeyError) -> one line, 2.

    Returns the exit code, also for argparse's own errors and --help, so callers in-process
    (tests, notebooks) get a code rather than a SystemExit."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # no KeyError quotes
        msg = text.splitlines()[0] if text.strip() else type(err).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
