"""padim.metrics.binned and MetricStream: the streamed per-bin metrics stay within their stated
bound of the exact ones (padim.metrics.ranks), the bound holds where the bins do hide an order,
and the counts' memory does not grow with the number of images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from padim.metrics import MetricStream, metrics_and_curves
from padim.metrics.binned import BLOCK, BinnedRanking, Bins, key_values, ordered_keys
from padim.metrics.pro import pixel_group, region_weights
from padim.metrics.ranks import Ranking

TOLERANCE = 1e-4  # what the evaluation promises against the exact metrics


def _bins(masks, maps) -> Bins:
    b = Bins()
    for m, a in zip(masks, maps, strict=True):
        weights, regions = region_weights(m)
        b.add(a, m, weights, regions)
    return b


def _images(r, n, shape, ties: bool, scale: float):
    masks = r.random((n, *shape)) > 0.9
    masks[: n // 2] = False  # the first half: normal images
    maps = r.random((n, *shape)) + masks * r.random((n, 1, 1))
    if ties:
        maps = np.round(maps, 2)
    return masks, (maps * scale).astype(np.float32)


def _metrics(ranking, limit):
    return {"pixel_auroc": ranking.auroc(), "pixel_f1_max": ranking.f1_max()[0], "aupro": ranking.aupro(limit),
            "average_precision": ranking.average_precision()}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_groups=st.integers(1, 4), ties=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 37.0, 1e4]), limit=st.sampled_from([0.01, 0.3, 1.0]))
def test_union_of_binned_groups_is_within_its_bound_of_the_exact_metrics(seed, n_groups, ties, scale, limit):
    r = np.random.default_rng(seed)
    parts = [_images(r, int(r.integers(2, 6)), (24, 32), ties, scale) for _ in range(n_groups)]
    parts[-1][0][-1, 0, 0] = True  # at least one defect pixel
    exact = _metrics(Ranking(pixel_group(list(m), list(a)) for m, a in parts), limit)
    binned = BinnedRanking(_bins(m, a) for m, a in parts)
    bounds = binned.error_bounds(limit)
    for name, value in _metrics(binned, limit).items():  # on few pixels the bound can pass 1e-4: see below
        assert abs(value - exact[name]) <= bounds[name] + 1e-12, name
        if ties:  # every bin holds one value: the counts are exact
            assert bounds[name] == 0.0 and value == pytest.approx(exact[name], abs=1e-12), name


def test_the_bound_covers_an_order_the_bins_hide():
    # 100 neighbouring float32 values in one bin, the upper 50 positive: exact AUROC 1, F1 1
    steps = (np.array([3.0], np.float32).view(np.uint32) + np.arange(100, dtype=np.uint32)).view(np.float32)
    neg, pos = steps[:50], steps[50:]
    assert np.all((ordered_keys(pos) >> 8) == (ordered_keys(neg) >> 8))
    b = Bins()
    b.add(np.r_[neg, pos], np.r_[np.zeros(50), np.ones(50)], np.full(100, 1 / 50), 1)
    ranking = BinnedRanking([b])
    exact = Ranking([pixel_group([np.r_[np.zeros(50), np.ones(50)].astype(bool)[None]], [np.r_[neg, pos][None]])])
    bounds = ranking.error_bounds()
    assert exact.auroc() == 1.0 and ranking.auroc() < 1.0
    assert exact.auroc() - ranking.auroc() <= bounds["pixel_auroc"]
    assert exact.f1_max()[0] - ranking.f1_max()[0] <= bounds["pixel_f1_max"] + 1e-12
    assert abs(exact.aupro(1.0) - ranking.aupro(1.0)) <= ranking.error_bounds(1.0)["aupro"] + 1e-12
    assert bounds["pixel_auroc"] > TOLERANCE  # such data is flagged, not hidden


@pytest.mark.parametrize("seed", [5, 6])
def test_metric_stream_equals_the_exact_table_row_by_row(seed):
    # test images of a realistic number of pixels, each twice (ties, as a test set with repeated
    # images has): all within 1e-4
    r = np.random.default_rng(seed)
    n, shape = 36, (96, 128)
    masks, maps = _images(r, n, shape, ties=False, scale=20.0)
    masks[1::2], maps[1::2] = masks[::2], maps[::2]
    kinds = [(), ("crack",), ("hole",), ("crack", "hole")]
    defects = [() if i < n // 2 else kinds[1 + i % 3] for i in range(n)]
    labels = [int(bool(d)) for d in defects]
    mask_list: list = list(masks)
    mask_list[-1] = None  # an anomaly without a mask: left out of the pixel metrics
    scores = maps.reshape(n, -1).max(axis=1)
    exact, exact_curves = metrics_and_curves(labels, scores, defects, mask_list, list(maps), 10.0)
    stream = MetricStream()
    for i in range(n):
        stream.add(labels[i], scores[i], defects[i], mask_list[i], maps[i])
    streamed, curves = stream.result(10.0)
    assert set(streamed["per_defect_type"]) == {"crack", "hole"}
    for row, block in [("overall", streamed["overall"])] + list(streamed["per_defect_type"].items()):
        want = exact["overall"] if row == "overall" else exact["per_defect_type"][row]
        assert set(block) == set(want)
        for key, value in block.items():
            assert value == pytest.approx(want[key], abs=TOLERANCE), (row, key)
    assert streamed["at_threshold"] == exact["at_threshold"]
    bound = streamed["pixel_metrics_max_error"]
    assert set(bound) == {"pixel_auroc", "pixel_f1_max", "aupro"} and max(bound.values()) <= TOLERANCE
    assert curves["ap"] == pytest.approx(exact_curves["ap"], abs=TOLERANCE)


def test_curves_are_exact_points_from_corner_to_corner():
    r = np.random.default_rng(2)
    masks, maps = _images(r, 8, (30, 30), ties=False, scale=1.0)
    masks[-1, 0, 0] = True
    curves = BinnedRanking([_bins(masks, maps)]).curves(200)
    labels, scores = masks.ravel(), maps.ravel()
    assert curves["fpr"][0] == curves["tpr"][0] == 0.0 and curves["fpr"][-1] == curves["tpr"][-1] == 1.0
    assert np.all(np.diff(curves["fpr"]) >= 0) and np.all(np.diff(curves["tpr"]) >= 0)
    # every point is (false, true positives) at some threshold: in the sweep over every distinct score
    values = np.unique(scores)
    sweep = set(zip(np.searchsorted(np.sort(scores[~labels]), values)[::-1].tolist(),
                    np.searchsorted(np.sort(scores[labels]), values)[::-1].tolist(), strict=True))
    n_neg, n_pos = int((~labels).sum()), int(labels.sum())
    for fpr, tpr in zip(curves["fpr"][1:], curves["tpr"][1:], strict=True):
        fp, tp = round(fpr * n_neg), round(tpr * n_pos)
        assert abs(fp - fpr * n_neg) < 1e-6 and abs(tp - tpr * n_pos) < 1e-6
        assert (n_neg - fp, n_pos - tp) in sweep  # items below the threshold, per class


def test_counts_do_not_grow_with_the_number_of_images():
    r = np.random.default_rng(0)
    b = Bins()
    sizes = []
    for _ in range(40):
        masks, maps = _images(r, 4, (64, 64), ties=False, scale=5.0)
        for m, a in zip(masks, maps + 1, strict=True):  # scores in [1, 11): 3.5 octaves
            weights, regions = region_weights(m)
            b.add(a, m, weights, regions)
        sizes.append(b.neg.nbytes + b.pos.nbytes + b.gain.nbytes + b.rep.nbytes + b.mixed.nbytes)
    assert sizes[-1] == sizes[9]  # the range is covered after 10 batches: no more blocks
    assert sizes[-1] <= 8 * 4 * BLOCK * 27  # 8 blocks of 4096 bins per octave, 27 bytes a bin
    assert b.n_items == 160 * 64 * 64


def test_ordered_keys_follow_the_float_order_and_invert():
    values = np.array([-np.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 1.0000001, 3e38, np.inf],
                      np.float32)
    keys = ordered_keys(values)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0) and keys[4] == keys[5]
    assert np.all(np.diff(keys[5:].astype(np.int64)) > 0) and np.all(np.diff(keys[:5].astype(np.int64)) > 0)
    back = key_values(keys)
    assert np.array_equal(back[values != 0], values[values != 0]) and np.all(back[4:6] == 0)


def test_undefined_metrics_are_none_as_in_the_exact_ranking():
    only_normal = Bins()
    only_normal.add(np.arange(10, dtype=np.float32), np.zeros(10))
    ranking = BinnedRanking([only_normal])
    assert not ranking.defined and ranking.auroc() is None and ranking.f1_max() == (None, None)
    assert ranking.aupro() is None and ranking.curves() is None
    assert ranking.error_bounds()["pixel_auroc"] is None
    unweighted = Bins()
    unweighted.add(np.arange(10, dtype=np.float32), np.arange(10) > 6)
    assert BinnedRanking([unweighted]).aupro() is None and BinnedRanking([unweighted]).auroc() == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        Bins().add(np.zeros(3, np.float32), np.zeros(4))
