"""How closely an exported model reproduces the native one on the same images."""

from __future__ import annotations

import numpy as np

from ..prediction import Prediction


def parity(native: Prediction, exported: Prediction) -> dict:
    """Max abs differences of image scores and of maps, absolute and relative to the native image
    score range (max - min over these images), and how many predicted labels differ."""
    score_range = float(native.scores.max() - native.scores.min()) if native.scores.size else 0.0
    scale = score_range if score_range > 0 else 1.0
    score_diff = float(np.abs(native.scores.astype(np.float64) - exported.scores).max())
    map_diff = float(np.abs(native.maps.astype(np.float64) - exported.maps).max())
    if native.labels is None or exported.labels is None:
        label_mismatches = None
    else:
        label_mismatches = int((native.labels != exported.labels).sum())
    return {
        "n_images": int(native.scores.size),
        "score_range": score_range,
        "max_abs_score_diff": score_diff,
        "max_abs_map_diff": map_diff,
        "rel_score_diff": score_diff / scale,
        "rel_map_diff": map_diff / scale,
        "label_mismatches": label_mismatches,
    }
