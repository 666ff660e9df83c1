"""Where a run's time goes: named phases, summed over a run (`benchmarks/grid_timing.py` reports them).

    with phase("extraction"):
        ...

Off by default, and then free. `PHASES.start()` turns it on: each phase then waits for the GPU at
its start and end (`torch.cuda.synchronize`), so asynchronous kernels are charged to the phase that
queued them. Phases nest; a nested one is recorded under its path ("training/steps"), so a parent's
time includes its children's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Phases:
    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []

    def start(self) -> None:
        """Record from now on, from zero."""
        self.enabled = True
        self.seconds.clear()
        self.calls.clear()
        self._stack.clear()

    def stop(self) -> dict[str, float]:
        self.enabled = False
        return dict(self.seconds)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync()
        self._stack.append(name)
        path = "/".join(self._stack)
        self.seconds[path] += 0.0  # listed in the order phases first start: a parent before its children
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[path] += time.perf_counter() - t0
            self.calls[path] += 1
            self._stack.pop()

    def table(self) -> str:
        """The phases as indented lines, in the order they first ran: seconds, calls, share of the total."""
        top = sum(s for p, s in self.seconds.items() if "/" not in p) or 1.0
        return "\n".join(f"{'  ' * p.count('/')}{p.rsplit('/', 1)[-1]:<{40 - 2 * p.count('/')}} {s:9.2f} s "
                         f"{self.calls[p]:6d} {100 * s / top:5.1f}%" for p, s in self.seconds.items())


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


PHASES = Phases()
phase = PHASES.__call__
