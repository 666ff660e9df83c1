"""What the scripts in experiments/ share: bad input is one line on stderr and exit code 2, no traceback.

The `check_*` helpers find bad input before any work (before data, models or minutes of
generation): a device this machine lacks, an output folder that is a file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from collections.abc import Callable, Sequence


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture replaces it between tests)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def show_library_messages(level: int = logging.INFO) -> None:
    """Library modules speak through `logging.getLogger(__name__)`; a script shows their messages
    on stdout, bare, beside its own prints. Idempotent (in-process callers run several scripts)."""
    root = logging.getLogger("mechmem")
    root.setLevel(level)
    if not any(isinstance(h, _StdoutHandler) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)


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
    show_library_messages()
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


DEVICES = "cpu, cuda, cuda:N or mps"


def check_device(device: str | None, flag: str = "--device") -> None:
    """`device` is one this machine has (None, the default, always is): without this, torch fails
    deep inside the first model move with an AssertionError."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CliError(f"{flag} {device!r} is not a device; use {DEVICES}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"{flag} {device}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                           "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise CliError(f"{flag} {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"{flag} {device}: MPS is not available on this machine; use --device cpu")
        return
    raise CliError(f"{flag} {device}: unsupported device type {dev.type!r}; use {DEVICES}")


def check_out_dir(path: str | os.PathLike | None, flag: str = "--out") -> None:
    """`path` is a folder or can be made one: neither it nor a folder above it is a file."""
    if path is None:
        return
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists():
            if above.is_dir():
                return
            inside = "" if above == path else f": {above}"
            raise CliError(f"{flag} {path}{inside} is a file, not a folder")


def check_positive(args, *names: str) -> None:
    """Each named option (argparse dest) is None (not given) or >= 1."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v is not None and v < 1]
        if bad:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {bad[0]}")
