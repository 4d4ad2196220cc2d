"""All metrics of one evaluation, overall and per defect type, as a JSON-ready dict.

The test images are split into groups by kind (the normal images; the anomalous images of each
defect-type combination), and every row of the table (all images, or the normal images plus one
defect type's) is a union of groups. Two ways to the pixel metrics: exact, each group's pixels
sorted once with every map in memory (:func:`metrics_and_curves`, :mod:`.ranks`), or streamed,
each image's pixels counted per score bin as it arrives, in memory that does not grow with the
test set, within a bound reported beside them (:class:`MetricStream`, :mod:`.binned`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .binary import confusion
from .binned import BinnedRanking, Bins
from .pro import pixel_group, region_weights
from .ranks import Group, Ranking

FPR_LIMIT = 0.3
RECALL_AT_FPR = (0.01, 0.05)  # false-alarm rates at which the recall on the test set is reported


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float | None:
    """Share of the anomalous images scored above the highest threshold that flags at most ``fpr``
    of the normal ones (test labels: an evaluation figure, never a threshold to store)."""
    labels = np.asarray(labels).astype(bool)
    normal, anomalous = np.sort(scores[~labels]), scores[labels]
    if normal.size == 0 or anomalous.size == 0:
        return None
    allowed = int(np.floor(fpr * normal.size))  # normal images that may score above the threshold
    return float(np.mean(anomalous > normal[normal.size - 1 - allowed]))


def _block(images: Ranking, pixels: Ranking | None) -> dict:
    f1, threshold = images.f1_max()
    block: dict = {"image_auroc": images.auroc(), "image_f1_max": f1, "image_f1_max_threshold_oracle": threshold}
    if pixels is not None and pixels.n_pos + pixels.n_neg:
        block.update(pixel_auroc=pixels.auroc(), aupro=pixels.aupro(FPR_LIMIT), pixel_f1_max=pixels.f1_max()[0])
    else:
        block.update(pixel_auroc=None, aupro=None, pixel_f1_max=None)
    return block


Kind = tuple[int, tuple[str, ...]]  # (label, defect types): the images of one kind form a group


def _table(labels: np.ndarray, scores: np.ndarray, defects: Sequence[Sequence[str]], has_mask: Sequence[bool],
           pixel_groups: dict, rank: Callable, threshold: float | None) -> tuple[dict, dict[str, np.ndarray] | None]:
    """The metrics dict and the pixel curves, from per-kind pixel groups ranked by ``rank``
    (:class:`Ranking` of :class:`Group` s, or :class:`BinnedRanking` of :class:`Bins`)."""
    kinds = [(int(lab), tuple(d)) for lab, d in zip(labels, defects, strict=True)]
    image_groups = {}
    for kind in sorted(set(kinds)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        image_groups[kind] = Group.of(scores[members], labels[members])
    bounds: list[dict] = []

    def block(chosen: list[Kind]) -> dict:
        pixels = [pixel_groups[k] for k in chosen if k in pixel_groups]
        ranking = rank(pixels) if pixels else None
        out = _block(Ranking(image_groups[k] for k in chosen), ranking)
        if ranking is not None and hasattr(ranking, "error_bounds"):
            bounds.append(ranking.error_bounds(FPR_LIMIT))
        counts = {k: sum(1 for x in kinds if x == k) for k in chosen}
        out["n_normal"] = sum(n for (lab, _), n in counts.items() if lab == 0)
        out["n_anomalous"] = sum(n for (lab, _), n in counts.items() if lab == 1)
        out["n_pixel_images"] = sum(1 for k, m in zip(kinds, has_mask, strict=True) if k in counts and m)
        return out

    everything = sorted(image_groups)
    result = {"overall": block(everything), "fpr_limit": FPR_LIMIT}
    result["overall"]["recall_at_fpr"] = {f"{f:g}": recall_at_fpr(labels, scores, f) for f in RECALL_AT_FPR}
    types = sorted({t for d in defects for t in d})
    normal = [k for k in everything if k[0] == 0]
    result["per_defect_type"] = {
        t: block(normal + [k for k in everything if k[0] == 1 and t in k[1]]) for t in types
    }
    if bounds:  # the binned metrics' largest distance from the exact ones, over all rows
        result["pixel_metrics_max_error"] = {
            name: max((b[name] for b in bounds if b[name] is not None), default=None)
            for name in ("pixel_auroc", "pixel_f1_max", "aupro")}
    if threshold is not None:
        counts = confusion(labels, scores > threshold)
        normals = counts["fp"] + counts["tn"]
        result["at_threshold"] = {"threshold": threshold, **counts,
                                  "false_alarm_rate": counts["fp"] / normals if normals else None}
    curves = rank(list(pixel_groups.values())).curves() if pixel_groups else None
    return result, curves


def metrics_and_curves(labels: Sequence[int], scores: np.ndarray, defects: Sequence[Sequence[str]],
                       masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                       threshold: float | None) -> tuple[dict, dict[str, np.ndarray] | None]:
    """Image and pixel metrics of a test set, exact, and the ROC / precision-recall curves of all
    its pixels (None when undefined); every map is held at once (:class:`MetricStream` takes them
    one at a time).

    labels: 0/1 per image; scores: image scores; defects: defect types per image (empty = normal);
    masks/maps: per image, the bool ground truth (None for an anomaly without a mask: left out of
    the pixel metrics) and the anomaly map of the same size; threshold: the model's stored
    threshold, for the confusion counts. Per-type blocks compare the normal images with the
    anomalies of that type (an image with two types counts in both).
    """
    labels = np.asarray(labels, dtype=np.int64)
    kinds = [(int(lab), tuple(d)) for lab, d in zip(labels, defects, strict=True)]
    pixel_groups = {}
    for kind in sorted(set(kinds)):
        with_mask = [i for i, k in enumerate(kinds) if k == kind and masks[i] is not None]
        if with_mask:
            pixel_groups[kind] = pixel_group([masks[i] for i in with_mask], [maps[i] for i in with_mask])
    return _table(labels, np.asarray(scores, dtype=np.float64), defects, [m is not None for m in masks],
                  pixel_groups, Ranking, threshold)


class MetricStream:
    """The metrics of :func:`metrics_and_curves` for test images fed one at a time: image scores
    are kept (a few bytes each), pixels are counted per score bin (:mod:`.binned`), so memory does
    not grow with the number of images; the pixel metrics are within ``pixel_metrics_max_error``
    (reported with them) of the exact ones."""

    def __init__(self) -> None:
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.defects: list[tuple[str, ...]] = []
        self.has_mask: list[bool] = []
        self.pixels: dict[Kind, Bins] = {}

    def add(self, label: int, score: float, defects: Sequence[str], mask: np.ndarray | None, amap: np.ndarray) -> None:
        """One image: its 0/1 label, score, defect types, bool ground truth (None for an anomaly
        without a mask: left out of the pixel metrics) and its map of the mask's size."""
        self.labels.append(int(label))
        self.scores.append(float(score))
        self.defects.append(tuple(defects))
        self.has_mask.append(mask is not None)
        if mask is None:
            return
        if np.shape(mask) != np.shape(amap):
            raise ValueError("maps and masks differ in size")
        weights, regions = region_weights(mask)
        kind = (int(label), tuple(defects))
        self.pixels.setdefault(kind, Bins()).add(amap, mask, weights, regions)

    def result(self, threshold: float | None) -> tuple[dict, dict[str, np.ndarray] | None]:
        """The metrics dict and the pixel curves, as :func:`metrics_and_curves` gives them, with
        ``pixel_metrics_max_error``."""
        return _table(np.asarray(self.labels, dtype=np.int64), np.asarray(self.scores, dtype=np.float64),
                      self.defects, self.has_mask, self.pixels, BinnedRanking, threshold)


def compute_metrics(labels: Sequence[int], scores: np.ndarray, defects: Sequence[Sequence[str]],
                    masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray],
                    threshold: float | None) -> dict:
    """The metrics of :func:`metrics_and_curves`, without the curves."""
    return metrics_and_curves(labels, scores, defects, masks, maps, threshold)[0]
