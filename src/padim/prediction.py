"""What a model's predict gives, in NumPy only, shared by the native model and the ONNX runner."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    """Result of :meth:`padim.Padim.predict` for N images.

    scores: (N,) image scores (max of the map); maps: (N, H, W) anomaly maps at the model input
    size; labels: (N,) 1 = anomalous at the model's stored threshold (None when it has none).
    """

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray | None


def threshold_labels(scores: np.ndarray, threshold: float | None) -> np.ndarray | None:
    """1 where a score exceeds ``threshold``, else 0 (None without a threshold)."""
    if threshold is None:
        return None
    return (np.asarray(scores) > threshold).astype(np.int64)


def gather_prediction(parts: Iterable[tuple[np.ndarray, np.ndarray]], image_size: tuple[int, int],
                      labels: Callable[[np.ndarray], np.ndarray | None]) -> Prediction:
    """One Prediction from the (scores, maps) batches of an ``iter_predict``."""
    parts = list(parts)
    if not parts:
        h, w = image_size
        return Prediction(np.empty(0, np.float32), np.empty((0, h, w), np.float32), None)
    scores = np.concatenate([p[0] for p in parts])
    return Prediction(scores, np.concatenate([p[1] for p in parts]), labels(scores))
