"""Evaluation of a fitted model on a test split: scores, maps and metrics in one result object,
nothing written (``padim.reports.run_folder`` puts it on disk)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .datasets import Sample, Split, image_size, read_mask
from .metrics import metrics_and_curves
from .reports.overlay import map_range
from .stages import Stages

if TYPE_CHECKING:
    from .model import Padim


@dataclass
class Evaluation:
    """What :func:`evaluate` found for each test image, and the metrics.

    maps: (N, H, W) at the model input size; masks: the ground truth the pixel metrics used (None
    for an anomaly without a mask), at the model input size or, with resolution 'original', at
    each image's own size; metrics: :func:`padim.metrics.metrics_and_curves`' dict;
    pixel_curves: the ROC and precision-recall curves of all test pixels (None when undefined).
    """

    test: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    predicted: np.ndarray | None
    masks: list[np.ndarray | None]
    resolution: str
    metrics: dict
    pixel_curves: dict | None
    threshold: float | None
    vrange: tuple[float, float]
    stages: Stages = field(default_factory=Stages)

    @property
    def labels(self) -> np.ndarray:
        """0/1 per test image."""
        return np.array([s.label for s in self.test], dtype=np.int64)

    def masks_at_model_size(self) -> list[np.ndarray | None]:
        """The masks at the maps' size (read again only where the metrics used another size)."""
        size = self.maps.shape[1:]
        return [m if m is None or m.shape == size else read_mask(s.mask, size)
                for s, m in zip(self.test, self.masks, strict=True)]


def _resize(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def _pixel_data(test: list[Sample], maps: np.ndarray, resolution: str,
                ) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Per image: ground truth (None for an anomaly without a mask) and map, both at the model
    input size or, with resolution='original', at the image's own size."""
    masks, out = [], []
    for s, m in zip(test, maps, strict=True):
        hw = tuple(m.shape) if resolution == "model" else image_size(s.path)
        masks.append(read_mask(s.mask, hw) if (s.mask is not None or s.label == 0) else None)
        out.append(m if hw == tuple(m.shape) else _resize(m, hw))
    return masks, out


def evaluate(model: Padim, split: Split, resolution: str = "model", stages: Stages | None = None) -> Evaluation:
    """Score the test split of ``split`` with ``model`` and compute the metrics (stages 'predict'
    and 'metrics').

    resolution: 'model' computes pixel metrics at the model input size (as anomalib does),
    'original' upsamples each map to its image's own size.
    """
    stages = stages if stages is not None else Stages()
    test = split.test
    with stages("predict"):
        prediction = model.predict([s.path for s in test])
    with stages("metrics"):
        masks, maps = _pixel_data(test, prediction.maps, resolution)
        metrics, curves = metrics_and_curves([s.label for s in test], prediction.scores, [s.defects for s in test],
                                             masks, maps, model.threshold_)
    return Evaluation(test, prediction.scores, prediction.maps, prediction.labels, masks, resolution, metrics, curves,
                      model.threshold_, map_range(model.info_.get("map_range"), prediction.maps), stages)
