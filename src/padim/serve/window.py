"""The recent window of scored images: share flagged, score quantiles, and the drift warning.

The warning is a one-sided binomial test: with ``n`` images with a verdict in the window and ``k`` of
them flagged, it fires when P(X >= k) < ``alpha`` for X ~ Binomial(n, target), the model's stated
false-alarm rate; it fires once per episode and clears when that probability is back above
``clear_alpha`` (the gap between the two keeps a share near the edge from warning on and off).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("padim.serve")

DEFAULT_TARGET_FPR = 0.01  # a model without a stated target: the 0.99 quantile threshold promises about 1%
QUANTILES = (0.5, 0.9, 0.99)


def target_fpr(meta: dict) -> float:
    """The model's stated false-alarm rate (metadata ``target_fpr``), else :data:`DEFAULT_TARGET_FPR`."""
    value = meta.get("target_fpr")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_TARGET_FPR
    return value if 0.0 < value < 1.0 else DEFAULT_TARGET_FPR


def tail_probability(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    from scipy.special import bdtrc  # P(X > k - 1), exact in the tail where a sum of terms would round to 1

    return float(bdtrc(k - 1, n, p))


@dataclass(frozen=True)
class WindowStats:
    """A snapshot of the window. ``share`` and the quantiles are NaN while there is nothing to count."""

    model_id: str | None
    images: int
    judged: int  # images with a verdict (a model without a threshold gives none)
    flagged: int
    share: float
    quantiles: dict[float, float]
    target: float
    p_value: float
    drifting: bool


class ScoreWindow:
    """The last ``size`` images scored by one model: (score, flagged or None) pairs, thread-safe.

    ``add`` drops images scored by another model than the current one (a request that started
    before a reload and ends after it); :meth:`reset` starts the window over for a new model.
    """

    def __init__(self, size: int = 500, target: float = DEFAULT_TARGET_FPR, model_id: str | None = None,
                 min_images: int = 50, alpha: float = 1e-3, clear_alpha: float = 0.05):
        if size < 1 or min_images < 1 or not 0 < alpha < clear_alpha < 1 or not 0 < target < 1:
            raise ValueError("window: need size >= 1, min_images >= 1, 0 < alpha < clear_alpha < 1, 0 < target < 1")
        self.size, self.min_images, self.alpha, self.clear_alpha = size, min_images, alpha, clear_alpha
        self._lock = threading.Lock()
        self.reset(model_id, target)

    def reset(self, model_id: str | None, target: float) -> None:
        """Empty the window for ``model_id`` with false-alarm target ``target``; clears the warning."""
        with self._lock:
            self.model_id, self.target = model_id, target
            self._scores: deque[float] = deque(maxlen=self.size)
            self._flags: deque[bool | None] = deque(maxlen=self.size)
            self._flagged = self._judged = 0
            self._drifting = False

    def add(self, model_id: str | None, scores: Sequence[float], flags: Sequence[bool | None]) -> None:
        """Record images scored by ``model_id`` (flag None: no verdict); logs a warning when the drift
        episode starts and an info line when it ends."""
        with self._lock:
            if model_id != self.model_id:
                return
            for score, flag in zip(scores, flags, strict=True):
                if len(self._flags) == self.size:  # the oldest one leaves the counts
                    old = self._flags[0]
                    self._judged -= old is not None
                    self._flagged -= old is True
                self._scores.append(float(score))
                self._flags.append(flag)
                self._judged += flag is not None
                self._flagged += flag is True
            k, n, p = self._flagged, self._judged, self._p_value()
            started = not self._drifting and n >= self.min_images and p < self.alpha
            ended = self._drifting and p > self.clear_alpha
            self._drifting = (self._drifting or started) and not ended
            target = self.target
        if started:
            log.warning("flagged share %.1f%% (%d of the last %d images) is far above the model's target false-alarm "
                        "rate of %.1f%% (one-sided binomial p = %.1e): drift or a wave of real defects: check the line",
                        100 * k / n, k, n, 100 * target, p)
        elif ended:
            log.info("flagged share back to %.1f%% (%d of the last %d images; target %.1f%%)",
                     100 * k / n, k, n, 100 * target)

    def _p_value(self) -> float:
        return tail_probability(self._flagged, self._judged, self.target) if self._judged else 1.0

    def stats(self) -> WindowStats:
        """The window now."""
        with self._lock:
            scores = np.fromiter(self._scores, float, len(self._scores))
            k, n, drifting, p = self._flagged, self._judged, self._drifting, self._p_value()
            model_id, target = self.model_id, self.target
        quantiles = dict(zip(QUANTILES, np.quantile(scores, QUANTILES).tolist() if scores.size
                             else [math.nan] * len(QUANTILES), strict=True))
        return WindowStats(model_id, int(scores.size), n, k, k / n if n else math.nan, quantiles, target, p, drifting)
