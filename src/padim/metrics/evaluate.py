"""All metrics of one evaluation, overall and per defect type, as a JSON-ready dict.

The test images are split into groups by kind (the normal images; the anomalous images of each
defect-type combination); each group's pixels are sorted once, and every row of the table (all
images, or the normal images plus one defect type's) is a union of groups (see :mod:`.ranks`).
Memory per test pixel beyond the maps and masks themselves: a sorted float32 copy of its score and
an int32 region id while its group is built, then 4 bytes for the sorted score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .binary import confusion
from .pro import pixel_group
from .ranks import Group, Ranking

FPR_LIMIT = 0.3


def _block(images: Ranking, pixels: Ranking | None) -> dict:
    f1, threshold = images.f1_max()
    block: dict = {"image_auroc": images.auroc(), "image_f1_max": f1, "image_f1_max_threshold_oracle": threshold}
    if pixels is not None and pixels.n_pos + pixels.n_neg:
        block.update(pixel_auroc=pixels.auroc(), aupro=pixels.aupro(FPR_LIMIT), pixel_f1_max=pixels.f1_max()[0])
    else:
        block.update(pixel_auroc=None, aupro=None, pixel_f1_max=None)
    return block


def metrics_and_curves(labels: Sequence[int], scores: np.ndarray, defects: Sequence[Sequence[str]],
                       masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                       threshold: float | None) -> tuple[dict, dict[str, np.ndarray] | None]:
    """Image and pixel metrics of a test set, and the ROC / precision-recall curves of all its
    pixels (None when undefined).

    labels: 0/1 per image; scores: image scores; defects: defect types per image (empty = normal);
    masks/maps: per image, the bool ground truth (None for an anomaly without a mask: left out of
    the pixel metrics) and the anomaly map of the same size; threshold: the model's stored
    threshold, for the confusion counts. Per-type blocks compare the normal images with the
    anomalies of that type (an image with two types counts in both).
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    kinds = [(int(lab), tuple(d)) for lab, d in zip(labels, defects, strict=True)]
    image_groups, pixel_groups = {}, {}
    for kind in sorted(set(kinds)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        image_groups[kind] = Group.of(scores[members], labels[members])
        with_mask = [i for i in members if masks[i] is not None]
        if with_mask:
            pixel_groups[kind] = pixel_group([masks[i] for i in with_mask], [maps[i] for i in with_mask])

    def block(chosen: list[tuple[int, tuple[str, ...]]]) -> dict:
        pixels = [pixel_groups[k] for k in chosen if k in pixel_groups]
        out = _block(Ranking(image_groups[k] for k in chosen), Ranking(pixels) if pixels else None)
        counts = {k: sum(1 for x in kinds if x == k) for k in chosen}
        out["n_normal"] = sum(n for (lab, _), n in counts.items() if lab == 0)
        out["n_anomalous"] = sum(n for (lab, _), n in counts.items() if lab == 1)
        out["n_pixel_images"] = sum(1 for i, k in enumerate(kinds) if k in counts and masks[i] is not None)
        return out

    everything = sorted(image_groups)
    result = {"overall": block(everything), "fpr_limit": FPR_LIMIT}
    types = sorted({t for d in defects for t in d})
    normal = [k for k in everything if k[0] == 0]
    result["per_defect_type"] = {
        t: block(normal + [k for k in everything if k[0] == 1 and t in k[1]]) for t in types
    }
    if threshold is not None:
        result["at_threshold"] = {"threshold": threshold, **confusion(labels, scores > threshold)}
    curves = Ranking(pixel_groups.values()).curves() if pixel_groups else None
    return result, curves


def compute_metrics(labels: Sequence[int], scores: np.ndarray, defects: Sequence[Sequence[str]],
                    masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                    threshold: float | None) -> dict:
    """The metrics of :func:`metrics_and_curves`, without the curves."""
    return metrics_and_curves(labels, scores, defects, masks, maps, threshold)[0]
