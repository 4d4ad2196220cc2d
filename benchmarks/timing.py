"""The timing loop the benchmark scripts share (imported from beside them)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call (first calls allocate
    and pick kernels)."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def timed_rounds(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns``, called in turn in each of ``repeats`` rounds (after one untimed
    warm-up round): a drift of the machine's speed then hits all of them alike, so ratios of the
    same round compare like with like."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out
