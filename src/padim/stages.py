"""Seconds per stage of a job (fit, calibrate, predict, metrics, figures, report, ...)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stages:
    """Wall-clock seconds of each stage of a job, in the order the stages ran; ``echo`` (if given)
    gets one line per finished stage."""

    def __init__(self, echo: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - start)

    def record(self, name: str, spent: float) -> None:
        """Add ``spent`` seconds to stage ``name`` (for stages that interleave, timed apart)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + spent
        if self.echo is not None:
            self.echo(f"{name:<10s}{spent:8.1f} s")

    def rounded(self) -> dict[str, float]:
        """The seconds per stage to milliseconds, and their total, for a JSON file."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["total"] = round(sum(self.seconds.values()), 3)
        return out
