"""Evaluation of a fitted model on a test split: scores, maps and metrics in one result object.

The test images stream through: each batch's maps go to a file without a name (the maps and the
masks the figures need, :class:`~padim.spill.SpillArray`) and into the pixel metrics' counts
(:class:`~padim.metrics.MetricStream`), so memory does not grow with the test set. Nothing is
written where the user sees it (``padim.reports.run_folder`` puts the result on disk).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .datasets import Sample, Split, image_size, read_mask
from .metrics import MetricStream
from .reports.overlay import map_range
from .spill import SpillArray, release_freed_memory
from .stages import Stages

if TYPE_CHECKING:
    from .model import Padim

logger = logging.getLogger(__name__)
PROMISED_ERROR = 1e-4  # the streamed pixel metrics' largest distance from the exact ones, where the bound allows


@dataclass
class Evaluation:
    """What :func:`evaluate` found for each test image, and the metrics; :meth:`close` (or a
    ``with`` block) frees the spilled maps and masks.

    maps: (N, H, W) at the model input size, on disk (index one image at a time); masks: per image,
    its ground truth at the model input size, bit-packed on disk (read with :meth:`mask`);
    has_mask: per image, whether the pixel metrics used it (False for an anomaly without a mask);
    resolution: the pixel metrics' ('model' or 'original'); metrics:
    :meth:`padim.metrics.MetricStream.result`'s dict; pixel_curves: the ROC and precision-recall
    curves of all test pixels (None when undefined).
    """

    test: list[Sample]
    scores: np.ndarray
    maps: SpillArray
    predicted: np.ndarray | None
    masks: SpillArray
    has_mask: list[bool]
    resolution: str
    metrics: dict
    pixel_curves: dict | None
    threshold: float | None
    vrange: tuple[float, float]
    stages: Stages = field(default_factory=Stages)
    map_threshold: float | None = None  # the maps' own (predicted masks); None: ``threshold``

    @property
    def labels(self) -> np.ndarray:
        """0/1 per test image."""
        return np.array([s.label for s in self.test], dtype=np.int64)

    def mask(self, i: int) -> np.ndarray | None:
        """Test image ``i``'s ground truth at the maps' size; None where it has no mask file."""
        if self.test[i].mask is None:
            return None
        h, w = self.maps.shape[1:]
        return np.unpackbits(self.masks[i], count=h * w).reshape(h, w).astype(bool)

    def close(self) -> None:
        """Free the files of the maps and masks."""
        self.maps.close()
        self.masks.close()

    def __enter__(self) -> Evaluation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resize(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def _pixel_data(sample: Sample, amap: np.ndarray, resolution: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """One image's ground truth (None for an anomaly without a mask) and map, both at the model
    input size or, with resolution='original', at the image's own size; and the bit-packed mask
    the figures show, at the model input size (all False without a mask file)."""
    size = tuple(amap.shape)
    hw = size if resolution == "model" else image_size(sample.path)
    mask = read_mask(sample.mask, hw) if (sample.mask is not None or sample.label == 0) else None
    if sample.mask is None:  # Evaluation.mask gives None: nothing to keep
        shown = np.zeros(size, bool)
    else:
        shown = mask if resolution == "model" else read_mask(sample.mask, size)
    return mask, (amap if hw == size else _resize(amap, hw)), np.packbits(shown)


def evaluate(model: Padim, split: Split, resolution: str = "model", stages: Stages | None = None,
             spill: Path | str | None = None) -> Evaluation:
    """Score the test split of ``split`` with ``model`` and compute the metrics (stages 'predict'
    and 'metrics').

    resolution: 'model' computes pixel metrics at the model input size (as anomalib does),
    'original' upsamples each map to its image's own size. spill: the folder of the maps' and
    masks' temporary files (None: the system's temp folder).
    """
    stages = stages if stages is not None else Stages()
    test = split.test
    size = tuple(model.image_size_)
    maps = SpillArray(size, np.float32, spill)
    masks = SpillArray(((size[0] * size[1] + 7) // 8,), np.uint8, spill)
    stream = MetricStream()
    scores: list[np.ndarray] = []
    low, high = np.inf, -np.inf
    start, metric_seconds = time.perf_counter(), 0.0
    # the masks are decoded on a thread per core (decoding releases the GIL): between the network's
    # calls its cores would otherwise wait on this one. One image per thread at a time, so that full-size
    # maps and masks (resolution 'original') are held for a few images, not a whole batch
    threads = max(1, min(4, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(threads)
    try:
        done = 0
        for batch_scores, batch_maps in model.iter_predict([s.path for s in test]):
            tick = time.perf_counter()
            maps.append(batch_maps)
            scores.append(batch_scores)
            low, high = min(low, float(batch_maps.min())), max(high, float(batch_maps.max()))
            packed = []
            for i in range(0, len(batch_scores), threads):
                end = min(i + threads, len(batch_scores))
                batch = test[done + i:done + end]
                pixels = pool.map(_pixel_data, batch, batch_maps[i:end], [resolution] * len(batch))
                for sample, score, (mask, at, shown) in zip(batch, batch_scores[i:end], pixels, strict=True):
                    stream.add(sample.label, score, sample.defects, mask, at)
                    packed.append(shown)
            masks.append(np.stack(packed))
            done += len(batch_scores)
            release_freed_memory()
            metric_seconds += time.perf_counter() - tick
        stages.record("predict", time.perf_counter() - start - metric_seconds)
        tick = time.perf_counter()
        all_scores = np.concatenate(scores) if scores else np.empty(0, np.float32)
        metrics, curves = stream.result(model.threshold_)
        stages.record("metrics", metric_seconds + time.perf_counter() - tick)
    except BaseException:
        maps.close()
        masks.close()
        raise
    finally:
        pool.shutdown()
    worst = max((v for v in metrics.get("pixel_metrics_max_error", {}).values() if v is not None), default=0.0)
    if worst > PROMISED_ERROR:  # the scores crowd into few bins (ties of both classes at nearby values)
        logger.warning("the pixel metrics are within %.2g of their exact values (pixel_metrics_max_error in "
                       "metrics.json), more than the usual %g", worst, PROMISED_ERROR)
    vrange = map_range(model.info_.get("map_range"), np.array([low, high]))
    return Evaluation(test, all_scores, maps, model.labels(all_scores), masks, stream.has_mask, resolution, metrics,
                      curves, model.threshold_, vrange, stages, model.info_.get("map_threshold"))
