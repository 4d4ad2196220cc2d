"""Rank metrics (AUROC, F1-max, average precision, AUPRO) of any union of groups of scored items,
exact, from one sort of each group's negatives.

An evaluation asks for the same pixel metrics on several overlapping sets: all test images, and per
defect type the normal images plus that type's anomalies. Sorting every set's pixels again costs a
full sort each. Here each group (e.g. the normal test images, or the anomalous images of one
defect type) sorts its negatives once; a union of groups then needs no sort of its negatives at
all, since every metric below is a sum over positives (or over negatives) of counts found by
binary search in each member group's sorted negatives. Only the positives of a union, a small share
of its pixels, are sorted again.

All results equal the threshold sweep over every distinct score (scikit-learn's ROC and
precision-recall curves, the MVTec AD PRO curve), ties included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)  # compared by identity: a group is a key of the others' rank caches
class Group:
    """Scored items of one group: sorted negatives, positives, and for AUPRO the positives' region
    weights (1 / size of the defect region each positive pixel belongs to) and region count."""

    negatives: np.ndarray
    positives: np.ndarray
    weights: np.ndarray | None = None
    regions: int = 0
    # per other group: this group's positives' ranks among its negatives (left, right), found once
    # for all the unions both groups are in
    _ranks: dict = field(default_factory=dict, compare=False, repr=False)

    def ranks_in(self, other: Group) -> tuple[np.ndarray, np.ndarray]:
        """Per positive of this group: the negatives of ``other`` below it, and at or below it."""
        if other not in self._ranks:
            self._ranks[other] = (np.searchsorted(other.negatives, self.positives, side="left"),
                                  np.searchsorted(other.negatives, self.positives, side="right"))
        return self._ranks[other]

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray, region_ids: np.ndarray | None = None) -> Group:
        """A group from flat scores and 0/1 labels; ``region_ids`` (int, 1..R on positives, 0 on
        negatives, R regions of this group) give AUPRO its weights."""
        scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
        negatives = np.sort(scores[~labels])
        positives = scores[labels]
        order = np.argsort(positives, kind="stable")  # sorted keys make the binary searches faster
        if region_ids is None:
            return cls(negatives, positives[order])
        ids = np.ravel(region_ids)[labels][order]
        sizes = np.bincount(ids, minlength=1)  # ids 1..R on positives: R + 1 bins, none when no positive
        return cls(negatives, positives[order], 1.0 / sizes[ids], int(sizes.size - 1))


def _count_below(groups: Sequence[Group], values: np.ndarray, side: str) -> np.ndarray:
    """Per value (ascending): negatives of all groups below it ('left') or at most it ('right')."""
    total = np.zeros(values.size, np.int64)
    for g in groups:
        total += np.searchsorted(g.negatives, values, side=side)
    return total


class Ranking:
    """The metrics of the union of ``groups``: its negatives stay in their groups, its positives are
    sorted once (ascending) with their region weights, and each positive's rank among the
    negatives is found once, by binary search in every group, for all the metrics."""

    def __init__(self, groups: Iterable[Group]):
        self.groups = [g for g in groups if g.negatives.size or g.positives.size]
        self.n_neg = sum(g.negatives.size for g in self.groups)
        positives = [g.positives for g in self.groups]
        self.positives = np.concatenate(positives) if positives else np.empty(0)
        # the groups' positives are sorted runs: a stable sort merges them
        self._order = order = np.argsort(self.positives, kind="stable")
        self.positives = self.positives[order]
        self.n_pos = self.positives.size
        self.regions = sum(g.regions for g in self.groups)
        if self.regions and all(g.weights is not None for g in self.groups):
            self.weights = np.concatenate([g.weights for g in self.groups])[order]
            self._gain = np.r_[0.0, np.cumsum(self.weights)]  # region weights of the positives below an index
        else:
            self.weights = None
        self._ranks: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def defined(self) -> bool:
        """Both classes present: the rank metrics exist."""
        return self.n_pos > 0 and self.n_neg > 0

    def _negatives_below(self) -> tuple[np.ndarray, np.ndarray]:
        """Per positive (ascending): the negatives below it, and at or below it."""
        if self._ranks is None:
            per_group = [[g.ranks_in(other) for other in self.groups] for g in self.groups]
            left = np.concatenate([sum(r[0] for r in ranks) for ranks in per_group])[self._order]
            right = np.concatenate([sum(r[1] for r in ranks) for ranks in per_group])[self._order]
            self._ranks = (left, right)
        return self._ranks

    def _at_positives(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At each distinct positive score (descending): the score, positives and negatives at or
        above it."""
        values, first = np.unique(self.positives, return_index=True)
        tp = self.n_pos - first  # positives >= value
        fp = self.n_neg - self._negatives_below()[0][first]
        return values[::-1], tp[::-1], fp[::-1]

    def auroc(self) -> float | None:
        """Area under the ROC curve (ties count half); None without both classes."""
        if not self.defined:
            return None
        below, at_most = self._negatives_below()
        wins = below.sum(dtype=np.float64) + 0.5 * (at_most - below).sum(dtype=np.float64)
        return float(wins / (self.n_pos * self.n_neg))

    def f1_max(self) -> tuple[float, float] | tuple[None, None]:
        """Best F1 over all thresholds (score >= threshold is flagged) and its threshold. The best
        threshold is always a positive's score: lowering it to the next one adds a true positive."""
        if not self.defined:
            return None, None
        values, tp, fp = self._at_positives()
        f1 = 2 * tp / (tp + fp + self.n_pos)
        best = int(np.argmax(f1))
        return float(f1[best]), float(values[best])

    def average_precision(self) -> float | None:
        """Sum over thresholds of the recall gained times the precision there (scikit-learn's AP)."""
        if not self.defined:
            return None
        _, tp, fp = self._at_positives()
        gained = np.diff(np.r_[0, tp]) / self.n_pos
        return float(np.sum(gained * tp / (tp + fp)))

    def curves(self, points: int = 1000) -> dict[str, np.ndarray] | None:
        """ROC (fpr, tpr) and precision-recall (recall, precision) at thresholds spread over the
        quantiles of both classes (exact points of the curves, up to ~2 x ``points`` of them), with
        'ap' the exact average precision; None without both classes."""
        if not self.defined:
            return None
        # any threshold gives an exact point: take the positives' quantiles and, from each group's
        # sorted negatives, evenly spaced ones in proportion to its size
        picks = [np.quantile(self.positives, np.linspace(0, 1, points))]
        for g in self.groups:
            if g.negatives.size:
                n = max(2, round(points * g.negatives.size / self.n_neg))
                picks.append(g.negatives[np.linspace(0, g.negatives.size - 1, n).round().astype(np.int64)])
        values = np.unique(np.concatenate(picks))[::-1]
        tp = self.n_pos - np.searchsorted(self.positives, values, side="left")
        fp = self.n_neg - _count_below(self.groups, values[::-1], "left")[::-1]
        tpr, fpr = np.r_[0.0, tp / self.n_pos], np.r_[0.0, fp / self.n_neg]
        flagged = np.maximum(tp + fp, 1)
        return {"fpr": fpr, "tpr": tpr, "recall": tp / self.n_pos, "precision": tp / flagged,
                "ap": np.float64(self.average_precision())}

    def _pro(self, value: float, side: str) -> float:
        """The mean over regions of the share of the region's pixels above ``value`` ('right':
        strictly above, 'left': at or above)."""
        return float(self._gain[-1] - self._gain[np.searchsorted(self.positives, value, side=side)]) / self.regions

    def aupro(self, fpr_limit: float = 0.3) -> float | None:
        """Area under the PRO curve for false-positive rates up to ``fpr_limit``, divided by the
        limit; None without defect regions or negatives.

        The curve's trapezoids have area only where the false-positive rate grows, i.e. at the
        negatives: each negative with score v adds 1/N of rate while PRO goes from PRO(> v) to
        PRO(>= v). Summed over the negatives above the limit's score v*, that is a sum over the
        positives p of their region weight times the negatives in (v*, p) and in (v*, p], counts
        the AUROC already found; the last step is cut at the limit.
        """
        if self.weights is None or not self.defined:
            return None
        budget = fpr_limit * self.n_neg  # negatives counted before the rate passes the limit
        # v*: the highest negative score at which the rate passes the limit (none at a limit of 1)
        k = int(np.floor(budget)) + 1  # v* is the k-th largest negative
        cut = -np.inf
        if k <= self.n_neg:
            cut = float(np.partition(np.concatenate([g.negatives[-k:] for g in self.groups]), -k)[-k])
        at_most_cut = int(_count_below(self.groups, np.array([cut]), "right")[0])
        below, at_most = self._negatives_below()
        above_cut = np.maximum(below - at_most_cut, 0) + np.maximum(at_most - at_most_cut, 0)
        area = float(np.dot(self.weights, above_cut)) / (2 * self.regions)
        step = budget - (self.n_neg - at_most_cut)  # negatives' worth of the last step inside the limit
        if step > 0:
            at = at_most_cut - float(_count_below(self.groups, np.array([cut]), "left")[0])
            pro_gt, pro_ge = self._pro(cut, "right"), self._pro(cut, "left")
            area += step * (pro_gt + (pro_gt + step / at * (pro_ge - pro_gt))) / 2
        # the summed region shares can overshoot 1 by a rounding error; the area is a share, so clip it
        return float(np.clip(area / budget, 0.0, 1.0))
