"""A fitted model following its production line: re-set the threshold from today's normal images
(:func:`recalibrate`), add new normal images without the old ones (:func:`update`, optionally
down-weighting the old: ``decay``), and join models fitted apart (:func:`merge`). Update and merge
work on the fit's statistics (the sidecar file, see :mod:`padim.model.io`): sums that add, so an
update equals a fit on the union."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelFileError
from .calibration import KeptEmbeddings, calibration_sample, normal_summary
from .io import read_stats_file, stats_path
from .padim import Images, Padim
from .stats import GaussianStats, JointStats

logger = logging.getLogger(__name__)


def now() -> str:
    """The time of a calibration, as the history records it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_stats(model: Padim, path: str | Path) -> GaussianStats | JointStats:
    """The statistics ``model`` (loaded from ``path``) was fitted from, read from its sidecar;
    ModelFileError when it is missing or belongs to another fit."""
    path = Path(path)
    count, tensors = read_stats_file(stats_path(path), model.params_)
    try:
        stats = model.scorer_.embedding.stats_from_state(count, tensors)
    except ValueError as exc:
        raise ModelFileError(f"{stats_path(path)}: {exc}; re-run 'padim fit'") from exc
    if round(stats.count) != model.info_.get("n_train"):
        raise ModelFileError(f"{stats_path(path)}: statistics of {stats.count:g} images, the model says "
                             f"{model.info_.get('n_train')}: not this model's; re-run 'padim fit'")
    return stats


def recalibrate(model: Padim, normal: Images, target_fpr: float | None = None) -> Padim:
    """Set ``model``'s threshold from ``normal`` images it was not fitted on (the line today), for
    ``target_fpr`` (default: the model's); in place."""
    if target_fpr is not None:
        model.params_, model.target_fpr = replace(model.params_, target_fpr=target_fpr), target_fpr
    scores, median_pixel, map_scores = normal_summary(model.iter_predict(normal, desc="calibrate"), model.params_.top_k)
    return model.set_threshold(scores, median_pixel, (map_scores, None), "normal images", now())


@torch.inference_mode()
def update(model: Padim, stats: GaussianStats | JointStats, images: Images, decay: float = 1.0) -> Padim:
    """Add normal ``images`` to ``model`` fitted from ``stats`` (the old images weighed by
    ``decay``), in place: the model of the (weighted) union, its threshold from the new images'
    out-of-fold scores (the line as it is now)."""
    if len(images) == 0:
        raise ValueError("no new images to add")
    stats.scale(decay)
    kept = KeptEmbeddings(calibration_sample(len(images), model.params_.calibration_images, model.seed))
    model.accumulate(images, desc="update", kept=kept, into=stats)  # one set of sums in memory, as in a fit
    return model.fit_from_stats(stats, kept, model.info_.get("calibration_history"), "update", now())


@torch.inference_mode()
def merge(models: Sequence[Padim], stats: Sequence[GaussianStats | JointStats]) -> Padim:
    """One model from ``models`` fitted apart with the same parameters, from their summed
    ``stats``: the fit on the union of their images; its threshold from all their out-of-fold
    scores (each from its own model: slightly high, a stricter threshold)."""
    first = models[0]
    for other in models[1:]:
        a, b = first.params_.model_state(), other.params_.model_state()
        differ = [k for k in a if a[k] != b[k]]
        if differ:
            raise ValueError("models fitted with different settings cannot be merged: "
                             + ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in differ))
    total = stats[0]
    for s in stats[1:]:
        total += s
    history = [e for m in models for e in m.info_.get("calibration_history") or []]
    scores = np.concatenate([np.asarray((m.info_.get("calibration") or {}).get("scores", []), dtype=float)
                             for m in models])
    lows = [m.info_["map_range"][0] for m in models if m.info_.get("map_range")]
    fusion = [m.info_.get("fusion_scores") for m in models]
    first.fit_from_stats(total, (), history)
    parts = None
    if first.params_.image_score == "deep":  # the scores the models' fusions were fitted to, fitted again
        if any(f is None for f in fusion):
            raise ValueError("a model with the deep image score keeps no out-of-fold scores to merge; refit it")
        parts = tuple(np.concatenate([np.asarray(f[k], dtype=np.float32) for f in fusion]) for k in ("map", "deep"))
        scores = first.scorer_.fit_fusion(*parts, total.count)
        logger.warning("merged deep image score: standardized by the models' own out-of-fold scores, which a fit on "
                       "fewer images makes larger; re-set its threshold with 'padim calibrate' on normal images")
    return first.set_threshold(scores, float(np.mean(lows)) if lows else None, parts, "merge", now())
