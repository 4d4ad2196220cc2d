"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit, normalized by
that limit (the MVTec AD definition; regions are 8-connected components of the ground truth)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Flat region ids of all pixels of the (H, W) masks: each 8-connected defect region of each
    image gets its own id 1..R, normal pixels 0."""
    ids = []
    offset = 0
    for mask in masks:
        labelled, count = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
        ids.append(np.where(labelled > 0, labelled + offset, 0).ravel())
        offset += count
    return np.concatenate(ids), offset


def _flat(arrays: Sequence[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])


def pro_curve(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from high to low threshold, starting at (0, 0).

    PRO is the mean over regions of the share of the region's pixels above the threshold; FPR the
    share of normal pixels above it. Computed for all thresholds at once with one sort.
    """
    ids, regions = label_regions(masks)
    normal = int((ids == 0).sum())
    if regions == 0 or normal == 0:
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    sizes = np.bincount(ids)
    scores = _flat(maps, np.float64)
    if scores.shape != ids.shape:
        raise ValueError("maps and masks differ in size")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_ids = ids[order]
    in_region = sorted_ids > 0
    fpr = np.cumsum(~in_region) / normal
    gain = np.where(in_region, 1.0 / (sizes[sorted_ids] * regions), 0.0)
    pro = np.cumsum(gain)
    # one point per distinct score: the curve after all pixels with that score are counted
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float | None:
    """Normalized area under the PRO curve for FPR in [0, fpr_limit], over (H, W) masks and maps
    (sizes may differ between images); None without defect regions or without normal pixels."""
    flat = _flat(masks, bool)
    if not flat.any() or flat.all():
        return None
    fpr, pro = pro_curve(masks, maps)
    n = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n], pro[:n]
    if x[-1] < fpr_limit:
        # close the curve exactly at the limit, interpolating towards the next point (fpr > limit)
        t = (fpr_limit - fpr[n - 1]) / (fpr[n] - fpr[n - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[n - 1] + t * (pro[n] - pro[n - 1])]
    # the cumulative PRO sums can overshoot 1 by a rounding error; the area is a share, so clip it
    return float(np.clip(np.trapezoid(y, x) / fpr_limit, 0.0, 1.0))
