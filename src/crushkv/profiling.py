"""Opt-in wall-clock accounting of crushkv's own work (scoring, selection, gather), for ``crushkv bench``.

Disabled by default: a disabled section costs one attribute check. When enabled, CUDA is synchronised around each
section so the times are real.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Profiler:
    """Accumulates seconds and call counts per named section."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    @contextmanager
    def recording(self) -> Iterator[Profiler]:
        """Enable, reset, and restore the previous state on exit."""
        previous = self.enabled
        self.reset()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = previous


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


PROFILER = Profiler()
