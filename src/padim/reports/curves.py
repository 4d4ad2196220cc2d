"""The pixel ROC and precision-recall curves of an evaluation, kept for the report in ``curves.npz``
(thinned to a few thousand points; the maps are gone once the evaluation ends)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import write_bytes

CURVES_FILE = "curves.npz"
MAX_POINTS = 2000


def thin(x: np.ndarray, y: np.ndarray, n: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points of the polyline (x, y), evenly spaced along its length, ends kept, so the
    drawn curve keeps its shape."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size <= n:
        return x, y
    length = np.r_[0.0, np.cumsum(np.hypot(np.diff(x), np.diff(y)))]
    keep = np.unique(np.searchsorted(length, np.linspace(0, length[-1], n)).clip(0, x.size - 1))
    keep = np.unique(np.r_[0, keep, x.size - 1])
    return x[keep], y[keep]


def save_pixel_curves(out_dir: Path, curves: dict[str, np.ndarray] | None) -> Path:
    """Write the pixel curves (:meth:`padim.metrics.Ranking.curves`) to ``out_dir/curves.npz``,
    thinned (empty when they are undefined)."""
    arrays = {}
    if curves is not None:
        fpr, tpr = thin(curves["fpr"], curves["tpr"])
        recall, precision = thin(curves["recall"], curves["precision"])
        found = {"fpr": fpr, "tpr": tpr, "recall": recall, "precision": precision, "ap": np.float64(curves["ap"])}
        arrays = {f"pixel_{k}": np.asarray(v, np.float32) for k, v in found.items()}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = out_dir / CURVES_FILE
    write_bytes(path, buffer.getvalue())
    return path


def load_pixel_curves(path: Path) -> dict[str, np.ndarray] | None:
    """The pixel curves saved by :func:`save_pixel_curves`; None when undefined or missing."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        found = {k.removeprefix("pixel_"): data[k].astype(np.float64) for k in data.files}
    return found or None
