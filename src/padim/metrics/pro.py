"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit, normalized by
that limit (the MVTec AD definition; regions are 8-connected components of the ground truth)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .ranks import Group, Ranking

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def label_regions(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Flat region ids of all pixels of the (H, W) masks: each 8-connected defect region of each
    image gets its own id 1..R, normal pixels 0."""
    ids = []
    offset = 0
    for mask in masks:
        labelled, count = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
        ids.append(np.where(labelled > 0, labelled + offset, 0).ravel().astype(np.int32))
        offset += count
    return (np.concatenate(ids) if ids else np.empty(0, np.int32)), offset


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel of an (H, W) mask, flat: 1 / the size of its 8-connected defect region (0 off the
    defects), and the number of regions."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():  # a normal image: no regions to label
        return np.zeros(mask.size), 0
    labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    weights = 1.0 / np.maximum(np.bincount(labelled.ravel(), minlength=count + 1), 1)
    weights[0] = 0.0
    return weights.take(labelled.ravel()), count


def pixel_group(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> Group:
    """The pixels of (H, W) masks and maps (sizes may differ between images) as one scored group,
    with the defect regions AUPRO needs."""
    if [np.shape(m) for m in masks] != [np.shape(a) for a in maps]:
        raise ValueError("maps and masks differ in size")
    ids, _ = label_regions(masks)
    scores = np.concatenate([np.ravel(a) for a in maps]) if len(maps) else np.empty(0, np.float32)
    return Group.of(scores, ids > 0, ids)


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float | None:
    """Normalized area under the PRO curve for FPR in [0, fpr_limit], over (H, W) masks and maps
    (sizes may differ between images); None without defect regions or without normal pixels."""
    return Ranking([pixel_group(masks, maps)]).aupro(fpr_limit)
