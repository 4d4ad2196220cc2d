"""Rank metrics (AUROC, F1-max, average precision, AUPRO, curves) of any union of groups of scored
items, from counts per score bin: streamed in memory that does not grow with the number of items,
each with a proven bound on its distance from the exact value (:mod:`.ranks`).

The bins cut the float32 line: a score's bit pattern, made monotone, without its low
``DROP_BITS`` bits, so each bin holds 2**8 neighbouring float32 values, [e_b, e_{b+1}) with
e_{b+1} / e_b - 1 <= 2**-15 away from 0 (float64 scores are rounded to float32 first, which keeps
their order). Per bin a group counts its negatives and positives, sums its positives' region
weights (AUPRO), and notes whether the bin holds more than one distinct value ("mixed"). Storage
grows with the distinct bins only: blocks of 4096 bins, allocated when a score first falls in them.

Why the bound holds. A threshold at a bin edge sees exact counts, so every edge is an exact point
of every curve; only the order inside a mixed bin is unknown (a bin of one value is an exact tie,
and counted as the exact metrics count ties):

- AUROC counts a bin's positive-negative pairs as ties (1/2 each); each is really 0, 1/2 or 1:
  error <= sum over mixed bins of p_b n_b / 2, over P N.
- F1-max is the best F1 at the bin edges (an exact F1 at a real threshold); a threshold inside
  bin b has at most TP(>= e_b) true positives and at least FP(>= e_{b+1}) false ones, which caps its
  F1; the bound is the largest cap above the estimate.
- Average precision: each positive's precision lies between the precisions those counts allow;
  the midpoint is taken, the error is at most half the range, weighted by the bin's positives.
- AUPRO: between two edges the PRO curve is monotone, so its area lies in the rectangle spanned
  by the edges' points; the trapezoid is taken, the error is at most half the rectangle.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DROP_BITS = 8  # float32 values per bin: 2**8, relative width 2**-15
BLOCK_BITS = 12  # bins per storage block: 4096
BLOCK = 1 << BLOCK_BITS
_SIGN = np.uint32(0x80000000)


def ordered_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of the float32 scores: equal keys for equal scores (+0 and -0
    alike), larger keys for larger scores."""
    x = np.asarray(scores, dtype=np.float32).ravel() + np.float32(0.0)  # -0.0 + 0.0 is +0.0
    bits = x.view(np.uint32)
    return np.where(bits >= _SIGN, ~bits, bits | _SIGN)


def key_values(keys: np.ndarray) -> np.ndarray:
    """float32 values of :func:`ordered_keys` (its inverse)."""
    keys = np.asarray(keys, dtype=np.uint32)
    return np.where(keys >= _SIGN, keys & ~_SIGN, ~keys).view(np.float32)


class Bins:
    """One group's scored items, counted per bin (negatives, positives, positives' region weights)
    as they arrive; ``regions`` counts the defect regions the weights belong to (AUPRO)."""

    def __init__(self) -> None:
        self.slot = np.full(1 << (32 - DROP_BITS - BLOCK_BITS), -1, np.int64)  # block -> row, or -1
        self.blocks: list[int] = []  # the block of each row
        self.neg = np.zeros(0, np.int64)
        self.pos = np.zeros(0, np.int64)
        self.gain = np.zeros(0, np.float64)
        self.rep = np.zeros(0, np.int16)  # one value seen in the bin (its low key bits), -1: none yet
        self.mixed = np.zeros(0, bool)
        self.regions = 0
        self.weighted = True

    def _grow(self, blocks: np.ndarray) -> None:
        new = blocks[self.slot[blocks] < 0]
        if not new.size:
            return
        self.slot[new] = len(self.blocks) + np.arange(new.size)
        self.blocks.extend(int(b) for b in new)
        extra = new.size * BLOCK
        self.neg = np.r_[self.neg, np.zeros(extra, np.int64)]
        self.pos = np.r_[self.pos, np.zeros(extra, np.int64)]
        self.gain = np.r_[self.gain, np.zeros(extra, np.float64)]
        self.rep = np.r_[self.rep, np.full(extra, -1, np.int16)]
        self.mixed = np.r_[self.mixed, np.zeros(extra, bool)]

    def add(self, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, regions: int = 0) -> None:
        """Count flat ``scores`` with 0/1 ``labels``; ``weights`` (one per item, read on positives)
        give AUPRO the region weights of ``regions`` new defect regions."""
        keys = ordered_keys(scores)
        labels = np.ravel(labels).astype(bool)
        if keys.size != labels.size:
            raise ValueError("scores and labels differ in size")
        if not keys.size:
            return
        # gathers by np.take and in-place arithmetic: the same counts as plain indexing, in a fraction
        # of the time (an evaluation counts every pixel of every map)
        bins = keys >> DROP_BITS
        blocks = bins >> BLOCK_BITS
        index = self.slot.take(blocks)
        if index.min() < 0:  # blocks seen for the first time
            self._grow(np.unique(blocks[index < 0]))
            index = self.slot.take(blocks)
        index <<= BLOCK_BITS
        index |= bins & (BLOCK - 1)
        size = self.neg.size
        self.neg += np.bincount(index[~labels], minlength=size)
        if labels.any():
            self.pos += np.bincount(index[labels], minlength=size)
            if weights is None:
                self.weighted = False
            else:
                self.gain += np.bincount(index[labels], weights=np.ravel(weights)[labels], minlength=size)
        self.regions += int(regions)
        low = (keys & ((1 << DROP_BITS) - 1)).astype(np.int16)
        rep = self.rep.take(index)
        unseen = rep < 0
        if unseen.any():
            self.rep[index[unseen]] = low[unseen]  # any one of the bin's values: all others differ from it
            rep[unseen] = self.rep.take(index[unseen])
        self.mixed[index[low != rep]] = True

    @property
    def n_items(self) -> int:
        """Items counted so far."""
        return int(self.neg.sum() + self.pos.sum())


class BinnedRanking:
    """The metrics of the union of ``groups`` (:class:`Bins`), the same as
    :class:`~padim.metrics.ranks.Ranking`'s, with :meth:`error_bounds`."""

    def __init__(self, groups: Iterable[Bins]):
        groups = [g for g in groups if g.n_items]
        blocks = sorted({b for g in groups for b in g.blocks})
        row = {b: i for i, b in enumerate(blocks)}
        shape = (len(blocks), BLOCK)
        neg, pos, gain = np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape)
        rep, mixed = np.full(shape, -1, np.int16), np.zeros(shape, bool)
        for g in groups:
            rows = [row[b] for b in g.blocks]
            neg[rows] += g.neg.reshape(-1, BLOCK)
            pos[rows] += g.pos.reshape(-1, BLOCK)
            gain[rows] += g.gain.reshape(-1, BLOCK)
            grep = g.rep.reshape(-1, BLOCK)
            mixed[rows] |= g.mixed.reshape(-1, BLOCK) | ((rep[rows] >= 0) & (grep >= 0) & (rep[rows] != grep))
            rep[rows] = np.where(rep[rows] < 0, grep, rep[rows])
        keys = (np.asarray(blocks, np.int64)[:, None] << BLOCK_BITS) + np.arange(BLOCK)
        used = (neg + pos).ravel() > 0  # ascending score order, empty bins dropped
        self.edges = key_values((keys.ravel()[used] << DROP_BITS).astype(np.uint32))
        self.neg, self.pos, self.gain = neg.ravel()[used], pos.ravel()[used], gain.ravel()[used]
        self.mixed = mixed.ravel()[used]
        self.n_neg, self.n_pos = int(self.neg.sum()), int(self.pos.sum())
        self.regions = sum(g.regions for g in groups)
        self.weighted = all(g.weighted for g in groups)
        # per bin b: items at or above its lower edge e_b ('ge'), and above the bin ('gt')
        self.tp_ge = np.cumsum(self.pos[::-1])[::-1]
        self.fp_ge = np.cumsum(self.neg[::-1])[::-1]
        self.tp_gt, self.fp_gt = self.tp_ge - self.pos, self.fp_ge - self.neg

    @property
    def defined(self) -> bool:
        """Both classes present: the rank metrics exist."""
        return self.n_pos > 0 and self.n_neg > 0

    def _auroc(self) -> tuple[float, float]:
        pairs = float(self.n_pos) * self.n_neg
        ties = self.pos.astype(np.float64) * self.neg
        wins = np.dot(self.pos.astype(np.float64), self.n_neg - self.fp_ge) + 0.5 * ties.sum()
        return float(wins / pairs), float(0.5 * ties[self.mixed].sum() / pairs)

    def auroc(self) -> float | None:
        """Area under the ROC curve (ties count half); None without both classes."""
        return self._auroc()[0] if self.defined else None

    def _f1(self) -> tuple[float, float, float]:
        at_edges = 2 * self.tp_ge / (self.tp_ge + self.fp_ge + self.n_pos)
        best = int(np.argmax(at_edges))
        inside = self.mixed & (self.pos > 0)
        caps = 2 * self.tp_ge[inside] / (self.tp_ge[inside] + self.fp_gt[inside] + self.n_pos)
        cap = max(float(caps.max()) if caps.size else 0.0, float(at_edges[best]))
        return float(at_edges[best]), float(self.edges[best]), cap - float(at_edges[best])

    def f1_max(self) -> tuple[float, float] | tuple[None, None]:
        """Best F1 over the bin edges (score >= edge is flagged) and that edge; None without both
        classes."""
        return self._f1()[:2] if self.defined else (None, None)

    def _precision_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per bin: the lowest and highest precision a positive in it can have."""
        exact = self.tp_ge / np.maximum(self.tp_ge + self.fp_ge, 1)
        high = np.where(self.mixed, self.tp_ge / np.maximum(self.tp_ge + self.fp_gt, 1), exact)
        low = np.where(self.mixed, (self.tp_gt + 1) / (self.tp_gt + 1 + self.fp_ge), exact)
        return low, high

    def _ap(self) -> tuple[float, float]:
        low, high = self._precision_range()
        share = self.pos / self.n_pos
        return float(np.dot(share, (low + high) / 2)), float(np.dot(share, (high - low) / 2))

    def average_precision(self) -> float | None:
        """Average precision (scikit-learn's: recall gained times the precision there)."""
        return self._ap()[0] if self.defined else None

    def curves(self, points: int = 1000) -> dict[str, np.ndarray] | None:
        """ROC (fpr, tpr) and precision-recall (recall, precision) at the bin edges nearest to
        ``points`` quantiles of each class (exact points of the curves), with 'ap' the average
        precision; None without both classes."""
        if not self.defined:
            return None
        picks = [np.searchsorted(np.cumsum(counts), np.linspace(1, counts.sum(), points), side="left")
                 for counts in (self.pos, self.neg)]
        at = np.unique(np.concatenate(picks))[::-1]  # highest edge first
        tp, fp = self.tp_ge[at], self.fp_ge[at]
        return {"fpr": np.r_[0.0, fp / self.n_neg], "tpr": np.r_[0.0, tp / self.n_pos], "recall": tp / self.n_pos,
                "precision": tp / np.maximum(tp + fp, 1), "ap": np.float64(self._ap()[0])}

    def _aupro(self, fpr_limit: float) -> tuple[float, float]:
        budget = fpr_limit * self.n_neg  # in negatives
        pro_ge = np.cumsum(self.gain[::-1])[::-1] / self.regions
        pro_gt = pro_ge - self.gain / self.regions
        full = self.fp_ge <= budget
        area = np.dot(self.neg[full], (pro_ge[full] + pro_gt[full]) / 2)
        error = np.dot(self.neg[full & self.mixed], (pro_ge - pro_gt)[full & self.mixed] / 2)
        cut = np.flatnonzero(~full & (self.fp_gt < budget))  # the bin the limit falls in
        if cut.size:
            b = int(cut[0])
            step = budget - self.fp_gt[b]
            rise = pro_ge[b] - pro_gt[b]
            area += step * (pro_gt[b] + (pro_gt[b] + step / self.neg[b] * rise)) / 2
            error += step * rise if self.mixed[b] else 0.0
        return float(np.clip(area / budget, 0.0, 1.0)), float(error / budget)

    def aupro(self, fpr_limit: float = 0.3) -> float | None:
        """Area under the PRO curve for false-positive rates up to ``fpr_limit``, divided by the
        limit; None without defect regions or negatives."""
        if not self.regions or not self.weighted or not self.defined:
            return None
        return self._aupro(fpr_limit)[0]

    def error_bounds(self, fpr_limit: float = 0.3) -> dict[str, float | None]:
        """The most each metric can differ from its exact value (see the module's docstring)."""
        if not self.defined:
            return {"pixel_auroc": None, "pixel_f1_max": None, "aupro": None, "average_precision": None}
        aupro = self._aupro(fpr_limit)[1] if self.regions and self.weighted else None
        return {"pixel_auroc": self._auroc()[1], "pixel_f1_max": self._f1()[2], "aupro": aupro,
                "average_precision": self._ap()[1]}
