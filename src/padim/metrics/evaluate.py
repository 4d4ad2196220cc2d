"""All metrics of one evaluation, overall and per defect type, as a JSON-ready dict."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .curves import auroc, confusion, f1_max
from .pro import aupro

FPR_LIMIT = 0.3


def _metric_block(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray],
                  maps: list[np.ndarray]) -> dict:
    block: dict = {"image_auroc": auroc(labels, scores)}
    f1, thr = f1_max(labels, scores)
    block["image_f1_max"] = f1
    block["image_f1_max_threshold_oracle"] = thr
    if masks:
        pixel_labels = np.concatenate([m.ravel() for m in masks])
        pixel_scores = np.concatenate([a.ravel() for a in maps])
        block["pixel_auroc"] = auroc(pixel_labels, pixel_scores)
        block["aupro"] = aupro(masks, maps, FPR_LIMIT)
        block["pixel_f1_max"] = f1_max(pixel_labels, pixel_scores)[0]
    else:
        block.update(pixel_auroc=None, aupro=None, pixel_f1_max=None)
    return block


def compute_metrics(labels: Sequence[int], scores: np.ndarray, defects: Sequence[Sequence[str]],
                    masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                    threshold: float | None) -> dict:
    """Image and pixel metrics of a test set.

    labels: 0/1 per image; scores: image scores; defects: defect types per image (empty = normal);
    masks/maps: per image, the bool ground truth (None for an anomaly without a mask: left out of
    the pixel metrics) and the anomaly map of the same size; threshold: the model's stored
    threshold, for the confusion counts. Per-type blocks compare the normal images with the
    anomalies of that type (an image with two types counts in both).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    has_mask = np.array([m is not None for m in masks], dtype=bool)

    def block(sel: np.ndarray) -> dict:
        pix = np.flatnonzero(sel & has_mask)
        out = _metric_block(labels[sel], scores[sel], [masks[i] for i in pix], [maps[i] for i in pix])
        out["n_normal"] = int(np.sum(labels[sel] == 0))
        out["n_anomalous"] = int(np.sum(labels[sel] == 1))
        out["n_pixel_images"] = int(pix.size)
        return out

    everything = np.ones(len(labels), bool)
    result = {"overall": block(everything), "fpr_limit": FPR_LIMIT}
    types = sorted({t for d in defects for t in d})
    normal = labels == 0
    result["per_defect_type"] = {
        t: block(normal | np.array([t in d for d in defects])) for t in types
    }
    if threshold is not None:
        result["at_threshold"] = {"threshold": threshold, **confusion(labels, scores > threshold)}
    return result
