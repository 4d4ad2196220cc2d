"""The threshold of a fitted model and what it says of its training images: a hold-out of the
training images, scored by the model fitted without them, sets the threshold and the heat-map
colour range."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..datasets.images import ImageSource
from .batches import image_batches
from .scorer import PadimScorer
from .stats import GaussianStats


def calibration_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, calibration) of ``n`` training images; the hold-out is fixed by ``seed``."""
    n_cal = int(round(fraction * n)) if fraction > 0 else 0
    if fraction > 0 and n >= 3:
        n_cal = max(n_cal, 1)
    if n - n_cal < 2:
        raise ValueError(f"need at least {n_cal + 2} training images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


def calibrate(scores: np.ndarray, maps: np.ndarray, n_train: int, quantile: float) -> tuple[float | None, dict]:
    """(threshold, info) from the held-out images' ``scores`` and ``maps``: the threshold is the
    ``quantile`` of the scores; info has the training counts, the held-out scores' summary and the
    heat-map colour range (the median normal pixel at the bottom, the threshold mid-scale)."""
    threshold = float(np.quantile(scores, quantile)) if scores.size else None
    low = float(np.median(maps)) if maps.size else None
    high = None
    if threshold is not None and low is not None:
        high = threshold + max(threshold - low, 1e-6)
    info = {
        "n_train": n_train,
        "n_calibration": int(scores.size),
        "calibration_scores": {
            "min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max()),
        } if scores.size else None,
        "map_range": [low, high] if high is not None else None,
    }
    return threshold, info


def score_and_add(scorer: PadimScorer, stats: GaussianStats, images: Sequence[ImageSource] | torch.Tensor,
                  batch_size: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, maps) of held-out ``images`` by ``scorer`` (fitted without them), each batch added to
    ``stats`` once scored. ``scorer`` is released on return, before the caller builds the final one."""
    embedding, parts = scorer.embedding, []
    # decoded here: with forked decoders alive, each page the update writes would first be copied
    for batch, out in image_batches(images, embedding, batch_size, desc="calibrate", progress=progress, fork=False):
        blocks = embedding(batch, out)
        parts.append([t.cpu().numpy() for t in scorer.score(blocks)])
        stats.update(blocks)
    del scorer
    return tuple(np.concatenate(part) for part in zip(*parts, strict=True))
