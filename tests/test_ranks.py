"""padim.metrics.ranks: the grouped, sort-once metrics equal the exact computations (scikit-learn,
brute force) on every union of groups, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from padim.metrics import compute_metrics
from padim.metrics.pro import label_regions, pixel_group
from padim.metrics.ranks import Group, Ranking
from test_metrics import brute_aupro

TOLERANCE = 1e-4  # the bound the evaluation promises; the sums are exact up to float rounding


def _sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    return f1[:-1].max()


def _images(r, n, shape=(9, 11)):
    masks = r.random((n, *shape)) > 0.85
    masks[: n // 2] = False  # the first half: normal images
    maps = np.round(r.random((n, *shape)) + masks * r.random((n, 1, 1)), 2).astype(np.float32)  # ties
    return masks, maps


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n_groups=st.integers(1, 4))
def test_union_of_groups_equals_the_metrics_of_its_pooled_pixels(seed, n_groups):
    r = np.random.default_rng(seed)
    parts = [_images(r, int(r.integers(2, 6))) for _ in range(n_groups)]
    parts[0][0][-1, 0, 0] = True  # at least one defect pixel
    ranking = Ranking(pixel_group(list(m), list(a)) for m, a in parts)
    masks = np.concatenate([m for m, _ in parts])
    maps = np.concatenate([a for _, a in parts])
    labels, scores = masks.ravel(), maps.ravel().astype(np.float64)
    assert ranking.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=TOLERANCE)
    assert ranking.f1_max()[0] == pytest.approx(_sklearn_f1_max(labels, scores), abs=TOLERANCE)
    assert ranking.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=TOLERANCE)
    assert ranking.aupro() == pytest.approx(brute_aupro(list(masks), list(maps)), abs=TOLERANCE)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), limit=st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0]))
def test_aupro_at_any_limit_equals_the_threshold_sweep(seed, limit):
    r = np.random.default_rng(seed)
    masks, maps = _images(r, 6, (7, 8))
    masks[-1, 0, 0] = True
    groups = [pixel_group(list(masks[:3]), list(maps[:3])), pixel_group(list(masks[3:]), list(maps[3:]))]
    assert Ranking(groups).aupro(limit) == pytest.approx(brute_aupro(list(masks), list(maps), limit), abs=TOLERANCE)


def test_curves_are_points_of_the_exact_roc_curve_from_corner_to_corner():
    r = np.random.default_rng(3)
    labels = r.random(20_000) < 0.2
    scores = np.round(labels + r.normal(0, 0.7, labels.size), 2)
    c = Ranking([Group.of(scores[:9000], labels[:9000]), Group.of(scores[9000:], labels[9000:])]).curves()
    assert (c["fpr"][0], c["tpr"][0]) == (0.0, 0.0) and (c["fpr"][-1], c["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    exact = set(zip(np.round(fpr, 12), np.round(tpr, 12), strict=True))
    assert all((round(x, 12), round(y, 12)) in exact for x, y in zip(c["fpr"], c["tpr"], strict=True))
    assert c["ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOLERANCE)


def test_group_regions_are_counted_per_group_and_undefined_cases_give_none():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1:3, 1:3] = masks[1, 4:, 4:] = masks[1, 0, 0] = True
    group = pixel_group(list(masks), list(masks.astype(np.float32)))
    assert group.regions == label_regions(masks)[1] == 3
    assert np.isclose(group.weights.sum(), 3.0)  # each region's weights add up to one
    only_normal = Ranking([Group.of(np.arange(5.0), np.zeros(5))])
    assert only_normal.auroc() is None and only_normal.f1_max() == (None, None) and only_normal.aupro() is None
    assert only_normal.curves() is None


def test_per_defect_type_rows_equal_metrics_of_their_own_images():
    r = np.random.default_rng(7)
    masks, maps = _images(r, 12)
    masks[6:, 0, 0] = True
    defects = [()] * 6 + [("a",), ("b",), ("a", "b"), ("a",), ("b",), ("b",)]
    labels = [0] * 6 + [1] * 6
    scores = maps.reshape(12, -1).max(axis=1)
    out = compute_metrics(labels, scores, defects, list(masks), list(maps), threshold=None)
    for name in ("a", "b"):
        keep = [i for i in range(12) if labels[i] == 0 or name in defects[i]]
        row = out["per_defect_type"][name]
        pixels_l, pixels_s = masks[keep].ravel(), maps[keep].ravel().astype(np.float64)
        assert row["pixel_auroc"] == pytest.approx(roc_auc_score(pixels_l, pixels_s), abs=TOLERANCE)
        assert row["pixel_f1_max"] == pytest.approx(_sklearn_f1_max(pixels_l, pixels_s), abs=TOLERANCE)
        assert row["aupro"] == pytest.approx(brute_aupro(list(masks[keep]), list(maps[keep])), abs=TOLERANCE)
        image_labels = np.array(labels)[keep]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(image_labels, scores[keep]), abs=TOLERANCE)
        assert row["n_normal"] == 6 and row["n_anomalous"] == len(keep) - 6
