"""ROC and precision-recall curves for the report: computed once from all test pixels at evaluation
time and kept, thinned to a few thousand points, in ``curves.npz``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

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


def curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray] | None:
    """ROC (fpr, tpr), precision-recall (recall, precision) and average precision of binary
    labels and scores; None when only one class is present."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    ap = -np.sum(np.diff(recall) * precision[:-1])  # sklearn's average precision, from the same curve
    fpr, tpr = thin(fpr, tpr)
    recall, precision = thin(recall, precision)
    return {"fpr": fpr, "tpr": tpr, "recall": recall, "precision": precision, "ap": np.float64(ap)}


def save_pixel_curves(out_dir: Path, pixel_labels: np.ndarray | None, pixel_scores: np.ndarray | None) -> Path:
    """Write the pixel curves to ``out_dir/curves.npz`` (empty when they are undefined)."""
    found = curves(pixel_labels, pixel_scores) if pixel_labels is not None else None
    arrays = {f"pixel_{k}": v.astype(np.float32) for k, v in (found or {}).items()}
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
