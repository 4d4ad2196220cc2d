"""padim.metrics against independent computations: brute-force AUROC, F1 and AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from padim.metrics import aupro, auroc, compute_metrics, confusion, f1_max
from padim.metrics.evaluate import recall_at_fpr


def brute_auroc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def brute_aupro(masks, maps, limit=0.3):
    """Threshold sweep over every distinct score, regions by 8-connectivity, trapezoid to the limit."""
    regions = []
    for m, a in zip(masks, maps, strict=True):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == i] for i in range(1, n + 1)]
    normal = np.concatenate([a[~m] for m, a in zip(masks, maps, strict=True)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        points.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    fpr, pro = np.array(points).T
    grid_x, grid_y = [0.0], [0.0]
    for i in range(1, len(fpr)):
        if fpr[i] <= limit:
            grid_x.append(fpr[i])
            grid_y.append(pro[i])
        else:
            t = (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
            grid_x.append(limit)
            grid_y.append(pro[i - 1] + t * (pro[i] - pro[i - 1]))
            break
    return np.trapezoid(grid_y, grid_x) / limit


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 40))
def test_auroc_and_f1_max_match_brute_force(seed, n):
    r = np.random.default_rng(seed)
    labels = r.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(r.normal(size=n) + labels, 1)  # rounding makes ties
    assert auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores))
    best = max(confusion(labels, scores >= t)["f1"] or 0 for t in np.unique(scores))
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(best)
    assert confusion(labels, scores >= threshold)["f1"] == pytest.approx(best)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_aupro_matches_brute_force_on_tiny_maps(seed):
    r = np.random.default_rng(seed)
    masks = r.random((3, 6, 7)) > 0.8
    masks[0, 0, 0], masks[0, 5, 6] = True, False
    maps = np.round(r.random((3, 6, 7)) + masks * r.random(), 2)
    assert aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-9)


def test_aupro_perfect_and_undefined_cases():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))) is None
    assert auroc(np.zeros(5), np.arange(5)) is None


def test_diagonal_touching_pixels_form_one_region():
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 2, 3] = True  # one 8-connected region, two 4-connected
    maps = np.zeros((1, 5, 5))
    maps[0, 1, 1] = 1.0
    # curve (0, 1/3) -> (1, 1): PRO 1/3 at FPR 0 (4-connectivity would give 1/2), linear to FPR 0.3
    assert aupro(masks, maps) == pytest.approx((1 / 3 + 1 / 3 + 0.3 * 2 / 3) / 2)


def test_compute_metrics_per_defect_type_and_confusion():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.15, 0.2, 0.9])
    masks = [np.zeros((2, 2), bool), None, np.zeros((2, 2), bool), np.eye(2, dtype=bool)]
    maps = [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), np.eye(2)]
    out = compute_metrics(labels, scores, [(), ("a", "b"), (), ("a",)], masks, maps, threshold=0.5)
    assert out["overall"]["image_auroc"] == pytest.approx(0.75)
    assert out["overall"]["n_pixel_images"] == 3  # the anomaly without a mask is left out
    assert out["per_defect_type"]["b"]["image_auroc"] == pytest.approx(0.5)
    assert out["per_defect_type"]["b"]["pixel_auroc"] is None
    assert out["at_threshold"] == {"threshold": 0.5, "tp": 1, "fp": 0, "tn": 2, "fn": 1,
                                   "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                   "false_alarm_rate": 0.0}
    # normals 0.1, 0.2; anomalies 0.15, 0.9: no false alarm allowed -> above 0.2 -> one of two
    assert out["overall"]["recall_at_fpr"] == {"0.01": 0.5, "0.05": 0.5}


def test_recall_at_a_false_alarm_rate_allows_that_share_of_the_normal_images_above():
    normal = np.arange(100.0)  # 1% of 100: one normal image may score above the threshold (98)
    scores = np.concatenate([normal, [98.5, 97.0, 99.5]])
    labels = np.r_[np.zeros(100), np.ones(3)]
    assert recall_at_fpr(labels, scores, 0.01) == pytest.approx(2 / 3)
    assert recall_at_fpr(labels, scores, 0.0) == pytest.approx(1 / 3)
    assert recall_at_fpr(np.zeros(3), np.arange(3.0), 0.01) is None


def _labelled(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    labels = r.integers(0, 2, n)
    labels[:2] = [0, 1]
    return labels, np.round(r.normal(size=n) + labels, 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 60))
def test_auroc_is_rank_based_bounded_and_flips_with_the_scores(seed, n):
    labels, scores = _labelled(seed, n)
    a = auroc(labels, scores)
    assert 0.0 <= a <= 1.0
    assert auroc(labels, np.exp(scores) * 3 + 7) == pytest.approx(a)  # strictly increasing transform
    assert auroc(labels, -scores) == pytest.approx(1 - a)
    order = np.random.default_rng(seed + 1).permutation(n)
    assert auroc(labels[order], scores[order]) == pytest.approx(a)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 60), cut=st.floats(-3, 4))
def test_f1_max_bounds_every_threshold_and_confusion_counts_add_up(seed, n, cut):
    labels, scores = _labelled(seed, n)
    f1, _ = f1_max(labels, scores)
    counts = confusion(labels, scores >= cut)
    assert counts["tp"] + counts["fp"] + counts["tn"] + counts["fn"] == n
    assert 0.0 < f1 <= 1.0 and (counts["f1"] or 0.0) <= f1 + 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_aupro_is_bounded_rank_based_and_perfect_maps_score_one(seed, limit):
    r = np.random.default_rng(seed)
    masks = r.random((3, 6, 7)) > 0.8
    masks[0, 0, 0], masks[0, 5, 6] = True, False
    maps = np.round(r.random((3, 6, 7)) + masks * r.random(), 2)
    value = aupro(masks, maps, limit)
    assert 0.0 <= value <= 1.0
    assert aupro(masks, np.exp(2 * maps) - 1, limit) == pytest.approx(value, abs=1e-9)
    assert aupro(masks, masks + 0.1 * r.random(masks.shape), limit) == pytest.approx(1.0)
