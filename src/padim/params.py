"""What the command line needs before any heavy import: checks of model parameters, run folder names."""

from __future__ import annotations

from collections.abc import Sequence


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Validated pyramid scales: each in (0, 1], no repeats."""
    out = tuple(float(s) for s in scales)
    if not out or any(not 0.0 < s <= 1.0 for s in out) or len(set(out)) != len(out):
        raise ValueError(f"scales must be distinct numbers in (0, 1], got {list(scales)}")
    return out


# the model file in a run folder (padim fit / run write it, the other commands read it)
MODEL_FILE = "model.safetensors"
