"""The stored threshold and what it promises.

A threshold is set from normal images' scores for a target false-alarm rate: the k-th largest of n
scores, k = floor(target (n + 1)) (at least 1). For a new normal image exchangeable with those n,
the chance its score exceeds that order statistic is Beta(k, n + 1 - k) distributed over the draw of
the n images (mean k / (n + 1) <= target): the stated interval is its 5% and 95% quantiles, with no
assumption on the scores' distribution.

At fit time the n scores are out of fold: each training image of a sample is scored by the model of
all the other training images. For the 'eps' covariance that model follows in closed form from the
one fit (Sherman-Morrison; :func:`leave_one_out`), so no image is held out and nothing is refitted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..datasets.images import ImageSource
from ..spill import SpillArray
from .batches import image_batches
from .cells import Blocks
from .scorer import PadimScorer, image_scores
from .stats import GaussianStats, JointStats

HISTORY = 20  # calibrations a model file remembers
INTERVAL = (0.05, 0.95)  # the stated false-alarm interval: a 90% interval
MAP_SAMPLE = 4  # every 4th pixel in each direction of the normal maps gives the colour scale's low end


def calibration_sample(n: int, max_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the training images scored out of fold: all ``n`` up to ``max_images``,
    else a random sample of that many, fixed by ``seed``."""
    if n <= max_images:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_images])


class KeptEmbeddings:
    """The embedding blocks of chosen images of a stream of batches, kept until the model is
    factored: about the statistics' shift (where float16 keeps their digits), in an anonymous
    temporary file (:class:`~padim.spill.SpillArray`), so a fit's memory does not grow with them."""

    def __init__(self, indices: np.ndarray | None = None):
        self.indices = None if indices is None else np.asarray(indices)
        self.seen, self.shift, self.store = 0, None, None

    def __len__(self) -> int:
        return 0 if self.store is None else len(self.store)

    def offer(self, blocks: Blocks, shift: Blocks) -> None:
        """Keep the chosen ones of the next B images of the stream (all of them with no indices);
        ``shift``: the statistics' (the same for the whole stream)."""
        b = blocks[0][0].shape[1]
        if self.indices is None:
            rows = np.arange(b)
        else:
            rows = self.indices[(self.indices >= self.seen) & (self.indices < self.seen + b)] - self.seen
        self.seen += b
        if not len(rows):
            return
        if self.store is None:
            self.shift = [[x.clone() for x in scale] for scale in shift]
            self.store = SpillArray((sum(x.numel() for scale in shift for x in scale),), np.float16)
        index = torch.as_tensor(rows, dtype=torch.long, device=blocks[0][0].device)
        flat = torch.cat([(x.index_select(1, index) - s.unsqueeze(1)).transpose(0, 1).reshape(len(rows), -1)
                          for scale, shifts in zip(blocks, self.shift, strict=True)
                          for x, s in zip(scale, shifts, strict=True)], dim=1)
        self.store.append(flat.half().cpu().numpy())

    def batches(self, size: int) -> Iterator[Blocks]:
        """The kept blocks back in float32, up to ``size`` images at a time."""
        for start in range(0, len(self), size):
            items = range(start, min(start + size, len(self)))
            flat = torch.from_numpy(np.stack([self.store[i] for i in items])).to(self.shift[0][0].device).float()
            out, offset = [], 0
            for scale in self.shift:
                out.append([])
                for s in scale:  # each (cells, C)
                    part = flat[:, offset:offset + s.numel()].view(-1, *s.shape)
                    out[-1].append(part.transpose(0, 1).add(s.unsqueeze(1)))
                    offset += s.numel()
            yield out

    def close(self) -> None:
        """Free the temporary file."""
        if self.store is not None:
            self.store.close()


def leave_one_out(distances: torch.Tensor, count: float) -> torch.Tensor:
    """Distances of training images (of a model of ``count`` images) -> their distances to the
    model of the other ``count - 1``. With the covariance S / (n - 1) + eps I, removing image x
    gives (n - 1) / (n - 2) (cov - n / (n - 1)^2 d d^T), d = x - mean, when its eps is scaled by
    (n - 1) / (n - 2) alike (one part in n - 2), and mean' = mean - d / (n - 1); Sherman-Morrison
    turns g = d^T cov^-1 d into g' = (n / (n - 1))^2 (n - 2) / (n - 1) g / (1 - n g / (n - 1)^2).
    Under 'oas' the shrinkage is taken as none here, which can only raise g' (a stricter threshold)."""
    n = float(count)
    if n < 3:
        raise ValueError(f"out-of-fold scores need at least 3 training images, got {count}")
    g = distances.square()
    rest = (1 - (n / (n - 1) ** 2) * g).clamp_min_(1e-6)  # > 0 in exact arithmetic: the rest is positive definite
    return (g.div_(rest).mul_((n / (n - 1)) ** 2 * (n - 2) / (n - 1))).sqrt_()


@torch.inference_mode()
def out_of_fold(scorer: PadimScorer, kept: KeptEmbeddings | Sequence[ImageSource] | torch.Tensor,
                stats: GaussianStats | JointStats, batch_size: int,
                ) -> tuple[np.ndarray, float | None, tuple[np.ndarray, np.ndarray | None] | None]:
    """(scores, median map value, parts) of training images, each scored by the model of the other
    ``stats.count - 1`` images (see :func:`leave_one_out`): their ``kept`` embeddings, or the images
    (counted in ``stats``), run through the backbone here. No images: no scores. ``parts``: the
    maps' own scores (their max, or top-k mean) and the deep tap's (None without the deep image
    score, whose fusion is fitted to both here first: ``PadimScorer.fit_fusion``)."""
    if not isinstance(kept, KeptEmbeddings):
        images, kept, embedding = kept, KeptEmbeddings(), scorer.embedding
        for batch, out in image_batches(images, embedding, batch_size, desc="calibrate", fork=False):
            kept.offer(embedding(batch, out), stats.shift)
    if not len(kept):
        return np.empty(0), None, None
    deep: list[np.ndarray] = []

    def batches():
        for blocks in kept.batches(batch_size):
            dist, far = scorer.distances(blocks)
            scores, deep_scores, maps = scorer.maps.parts(leave_one_out(dist, stats.count),
                                                          None if far is None else leave_one_out(far, stats.count))
            if deep_scores is not None:
                deep.append(deep_scores.cpu().numpy())
            yield scores, maps

    scores, median, map_scores = normal_summary(batches(), scorer.maps.top_k)
    if not deep:
        return scores, median, (map_scores, None)
    parts = (map_scores, np.concatenate(deep))
    return scorer.fit_fusion(*parts, stats.count), median, parts


def normal_summary(batches: Iterable[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]], top_k: int = 1,
                   ) -> tuple[np.ndarray, float, np.ndarray]:
    """(scores, median map value, map scores) of normal images from their batches of (scores,
    maps): the median of every MAP_SAMPLE-th pixel in each direction; each map's own score (its
    max, or the mean of its ``top_k`` largest values), which sets the map's threshold. ValueError
    for no images."""
    scores, pixels, tops = [], [], []
    for batch_scores, maps in batches:
        scores.append(_host(batch_scores))
        pixels.append(_host(maps[:, ::MAP_SAMPLE, ::MAP_SAMPLE]).ravel())
        tops.append(_host(image_scores(torch.as_tensor(maps), top_k)))
    if not scores:
        raise ValueError("no normal images to calibrate on")
    return np.concatenate(scores), float(np.median(np.concatenate(pixels))), np.concatenate(tops)


def _host(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def operating_point(scores: np.ndarray, target_fpr: float) -> dict:
    """The threshold for ``target_fpr`` from normal images' ``scores`` and what it promises: the
    k-th largest score, the false-alarm rate expected on new normal images, k / (n + 1), and its
    90% interval (see the module's docstring)."""
    from scipy.special import betaincinv

    n = int(scores.size)
    k = max(1, math.floor(target_fpr * (n + 1)))
    low, high = (float(betaincinv(k, n + 1 - k, q)) for q in INTERVAL)
    return {"threshold": float(np.sort(scores)[n - k]), "target_fpr": float(target_fpr), "n": n, "rank": k,
            "expected_fpr": k / (n + 1), "fpr_interval": [low, high]}


def calibration_info(scores: np.ndarray, median_pixel: float | None, target_fpr: float, method: str,
                     history: list | None = None, at: str | None = None,
                     parts: tuple[np.ndarray, np.ndarray | None] | None = None,
                     fusion_scores: dict | None = None) -> tuple[float | None, dict]:
    """(threshold, info) from normal images' ``scores`` (none: no threshold) set by ``method``
    ('out-of-fold', 'normal images', ...): the operating point, the scores kept (a later merge
    thresholds on them), the map's own threshold (for masks: from ``parts[0]``, the same images'
    map scores; without parts, the threshold), the heat-map colour range (the median
    normal pixel at the bottom, the map's threshold mid-scale), the calibration history, newest
    last (this one dated ``at``), and the scores the deep score's fusion was fitted to (``parts``
    with the deep tap's, else ``fusion_scores`` as they were)."""
    if parts is not None and parts[1] is not None:
        fusion_scores = {"map": [float(x) for x in parts[0]], "deep": [float(x) for x in parts[1]]}
    if scores.size == 0:
        return None, {"n_calibration": 0, "calibration_scores": None, "map_range": None, "calibration": None,
                      "calibration_history": list(history or []), "map_threshold": None,
                      "fusion_scores": fusion_scores}
    point = operating_point(scores, target_fpr)
    threshold = point["threshold"]
    at_map = threshold if parts is None else operating_point(np.asarray(parts[0]), target_fpr)["threshold"]
    entry = {**({"at": at} if at else {}), "method": method, "n": point["n"], "target_fpr": target_fpr,
             "threshold": threshold}
    return threshold, {
        "n_calibration": int(scores.size),
        "calibration_scores": {"min": float(scores.min()), "median": float(np.median(scores)),
                               "max": float(scores.max())},
        "map_range": None if median_pixel is None else [median_pixel, at_map + max(at_map - median_pixel, 1e-6)],
        "map_threshold": at_map,
        "fusion_scores": fusion_scores,
        "calibration": {"method": method, **point, "scores": [float(s) for s in np.sort(scores)]},
        "calibration_history": [*(history or []), entry][-HISTORY:],
    }
