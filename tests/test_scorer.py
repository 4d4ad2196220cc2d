"""padim.model.scorer and padim.model.whitening: batched Mahalanobis distances against a per-position
SciPy computation, and the anomaly maps made of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from padim.backbones.layout import trivial_layout
from padim.model import Whitening, whitening_factor
from padim.model.scorer import AnomalyMaps, GaussianBlur, blur_kernel_size


def whitening(mean: torch.Tensor, factor: torch.Tensor, grid: tuple[int, int], taps: list[int]) -> Whitening:
    """A per-position Whitening of ``mean`` and a (P, d, d) factor, the d channels split into ``taps``."""
    out = Whitening([trivial_layout(taps, grid)])
    out.fill(slice(0, mean.shape[0]), factor)
    out.finish(mean)
    return out


@pytest.mark.parametrize("taps", [[4], [16, 8]])
def test_distances_equal_scipy_mahalanobis_at_every_position(rng, taps):
    h, w, d = 2, 3, sum(taps)
    a = rng.normal(size=(h * w, d, d))
    cov = a @ a.transpose(0, 2, 1) + np.eye(d)
    mean = rng.normal(size=(h * w, d))
    factor = whitening_factor(torch.from_numpy(cov))
    white = whitening(torch.from_numpy(mean), factor, (h, w), taps)
    assert torch.equal(white.factor_of(slice(None)), factor.float())  # the blocks give back W, zeros included
    emb = torch.from_numpy(rng.normal(size=(5, d, h * w))).float()
    got = white.graph_distances(emb).numpy()
    blocks = [[emb[:, c].permute(2, 0, 1).contiguous() for c in (slice(0, taps[0]), slice(taps[0], d))[:len(taps)]]]
    np.testing.assert_allclose(white.distances(blocks).numpy(), got, rtol=1e-6)
    for b in range(5):
        for p in range(h * w):
            expected = mahalanobis(emb[b, :, p].double().numpy(), mean[p], np.linalg.inv(cov[p]))
            assert abs(got[b, p] - expected) < 1e-4 * max(1.0, expected)


def test_a_model_files_tensors_give_back_the_same_whitening(rng):
    d, positions = 24, 7
    a = rng.normal(size=(positions, d, d))
    factor = whitening_factor(torch.from_numpy(a @ a.transpose(0, 2, 1) + np.eye(d)))
    mean = torch.from_numpy(rng.normal(size=(positions, d)))
    whole = whitening(mean, factor, (7, 1), [16, 8])
    assert whole.storage == "positions" and whole.tensor_names() == {"mean", "factor_tril"}
    loaded = Whitening([trivial_layout([16, 8], (7, 1))])
    loaded.load_state(whole.state(torch.float32), torch.float32)
    for name, buffer in whole.named_buffers():
        assert torch.equal(buffer, loaded.get_buffer(name)), name
    assert torch.equal(loaded.factor_of(slice(2, 5)), factor[2:5].float())


def test_separable_blur_equals_scipy_gaussian_filter(rng):
    from scipy.ndimage import gaussian_filter

    image = rng.random((40, 50))
    got = GaussianBlur(2.5)(torch.from_numpy(image).float()[None, None])[0, 0].numpy()
    # torch's 'reflect' padding is scipy's 'mirror'; scipy truncates at 4 sigma as we do
    np.testing.assert_allclose(got, gaussian_filter(image, 2.5, mode="mirror"), atol=1e-5)
    assert blur_kernel_size(4.0) == 33


def test_top_k_image_score_is_the_mean_of_the_largest_values():
    d = 2
    white = whitening(torch.zeros(4, d), torch.eye(d).expand(4, d, d), (2, 2), [d])
    emb = torch.tensor([[[[3.0, 0.0], [4.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]]]])  # distances 5, 0, 4, 1
    scores, maps = AnomalyMaps([(2, 2)], (2, 2), 0.0, top_k=3)(white.graph_distances(emb.flatten(2)))
    assert maps.shape == (1, 2, 2) and scores.item() == pytest.approx((5 + 4 + 1) / 3)


def test_levels_image_score_ranks_each_levels_own_distances_not_the_blurred_map():
    # two levels: a 4x4 grid with two high neighbours and a 2x2 grid, on an 8x8 input
    fine = torch.zeros(1, 4, 4)
    fine[0, 1, 1], fine[0, 1, 2] = 12.0, 4.0
    coarse = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    dist = torch.cat([fine.flatten(1), coarse], dim=1)
    by_map, maps = AnomalyMaps([(4, 4), (2, 2)], (8, 8), 1.0)(dist)
    by_levels, levels_maps = AnomalyMaps([(4, 4), (2, 2)], (8, 8), 1.0, score="levels")(dist)
    torch.testing.assert_close(levels_maps, maps)  # the same pixel map
    # each level's largest 2x2 mean of its own distances ((12 + 4) / 4 and (1 + 2 + 3 + 6) / 4), averaged
    assert by_levels.item() == pytest.approx((16 / 4 + 12 / 4) / 2)
    assert by_map.item() == pytest.approx(maps.max().item()) and by_map.item() != pytest.approx(by_levels.item())
    top2, _ = AnomalyMaps([(4, 4), (2, 2)], (8, 8), 1.0, top_k=2, score="levels")(dist)
    assert top2.item() == pytest.approx((16 / 4 + 12 / 4) / 2)  # the coarse level has one 2x2 window
    one_row, _ = AnomalyMaps([(1, 3)], (4, 12), 0.0, score="levels")(torch.tensor([[1.0, 5.0, 2.0]]))
    assert one_row.item() == pytest.approx(3.5)  # a one-row grid: 1x2 windows
    with pytest.raises(ValueError, match="score"):
        AnomalyMaps([(4, 4)], (8, 8), 1.0, score="mean")


def test_deep_image_score_sums_the_standardized_map_and_deep_scores():
    dist = torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    deep = torch.arange(24, dtype=torch.float32).view(2, 12)  # 12 positions of the deep tap
    maps = AnomalyMaps([(2, 2)], (2, 2), 0.0, score="deep")
    normal_map, normal_deep = np.array([1.0, 2.0, 3.0, 4.0, 100.0]), np.array([10.0, 10.0, 12.0, 14.0, 14.0])
    maps.fit_fusion(normal_map, normal_deep)  # medians 3 and 12; 1.4826 x the median absolute deviation (1, 2)
    assert maps.fusion.tolist() == pytest.approx([3.0, 1.4826, 12.0, 2 * 1.4826, 1.0])
    scores, got = maps(dist, deep)
    top10 = torch.tensor([np.mean(np.arange(2, 12)), np.mean(np.arange(14, 24))], dtype=torch.float32)  # of 12
    torch.testing.assert_close(scores, (torch.tensor([9.0, 1.0]) - 3) / 1.4826 + (top10 - 12) / (2 * 1.4826))
    torch.testing.assert_close(got, AnomalyMaps([(2, 2)], (2, 2), 0.0)(dist)[1])  # the map is the map's
    maps.fit_fusion(np.ones(5), normal_deep)  # no spread: the standard deviation's, or a floor
    assert maps.fusion[1].item() == pytest.approx(1e-12) and maps.fusion[3].item() > 0
    maps.fit_fusion(normal_map, normal_deep, deep=False)  # too few images: the map's score alone
    torch.testing.assert_close(maps(dist, deep)[0], (torch.tensor([9.0, 1.0]) - 3) / 1.4826)
    with pytest.raises(ValueError, match="deep tap"):
        maps(dist)


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_matrix_smoothing_equals_upsample_then_blur(rng, sigma):
    import torch.nn.functional as F

    smoother = AnomalyMaps([(12, 20)], (48, 80), sigma)
    dist = torch.from_numpy(rng.random((3, 12, 20))).float()
    expected = F.interpolate(dist[:, None], size=(48, 80), mode="bilinear", align_corners=False)
    if sigma:
        expected = GaussianBlur(sigma)(expected)
    torch.testing.assert_close(smoother.smooth(dist), expected[:, 0], rtol=1e-5, atol=1e-5)


def test_pyramid_map_is_the_mean_of_each_levels_smoothed_map(rng):
    d, grids, size = 3, [(6, 8), (4, 5)], (24, 32)
    positions = sum(h * w for h, w in grids)
    mean = torch.from_numpy(rng.normal(size=(positions, d))).float()
    white = Whitening([trivial_layout([d], grid) for grid in grids])
    white.fill(slice(0, positions), torch.eye(d).expand(positions, d, d))
    white.finish(mean)
    anomaly_maps = AnomalyMaps(grids, size, 2.0)
    emb = torch.from_numpy(rng.normal(size=(2, d, positions))).float()
    scores, maps = anomaly_maps(white.graph_distances(emb))
    dist = (emb - mean.T).square().sum(1).sqrt()  # identity covariance: Euclidean distance
    fine = anomaly_maps.smooth(dist[:, :48].reshape(2, 6, 8))
    coarse = anomaly_maps.smooth(dist[:, 48:].reshape(2, 4, 5))
    torch.testing.assert_close(maps, (fine + coarse) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="positions"):
        anomaly_maps(dist[:, :48])
