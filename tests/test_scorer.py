"""padim.model.scorer: batched Mahalanobis distances against a per-position SciPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from padim.backbones import FeatureExtractor, channel_index
from padim.model import PadimScorer, whitening_factor
from padim.model.scorer import GaussianBlur, blur_kernel_size


@pytest.mark.parametrize("d", [4, 24])  # 24: the factor is kept as a head and a tail block
def test_distances_equal_scipy_mahalanobis_at_every_position(rng, d):
    h, w = 2, 3
    a = rng.normal(size=(h * w, d, d))
    cov = a @ a.transpose(0, 2, 1) + np.eye(d)
    mean = rng.normal(size=(h * w, d))
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, d, 0), pretrained=False)
    factor = whitening_factor(torch.from_numpy(cov))
    scorer = PadimScorer(extractor, torch.from_numpy(mean), factor, [(h, w)], (4 * h, 4 * w), 0.0)
    assert torch.equal(scorer.factor, factor.float())  # the blocks give back W, zeros included
    emb = rng.normal(size=(5, d, h, w))
    got = scorer.distances(torch.from_numpy(emb).float()).numpy()
    for b in range(5):
        for p in range(h * w):
            y, x = divmod(p, w)
            expected = mahalanobis(emb[b, :, y, x], mean[p], np.linalg.inv(cov[p]))
            assert abs(got[b, y, x] - expected) < 1e-4 * max(1.0, expected)


def test_a_factor_given_in_chunks_builds_the_same_scorer(rng):
    d, positions = 24, 7
    a = rng.normal(size=(positions, d, d))
    factor = whitening_factor(torch.from_numpy(a @ a.transpose(0, 2, 1) + np.eye(d)))
    mean = torch.from_numpy(rng.normal(size=(positions, d)))
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, d, 0), pretrained=False)
    whole = PadimScorer(extractor, mean, factor, [(1, 7)], (4, 28), 0.0)
    chunks = [(slice(i, min(i + 3, positions)), factor[i:i + 3]) for i in range(0, positions, 3)]
    pieces = PadimScorer(extractor, mean, chunks, [(1, 7)], (4, 28), 0.0)
    for name, buffer in whole.named_buffers():
        assert torch.equal(buffer, pieces.get_buffer(name)), name
    assert torch.equal(pieces.factor_of(slice(2, 5)), factor[2:5].float())
    with pytest.raises(ValueError, match="covers 6 positions, the mean 7"):
        PadimScorer(extractor, mean, chunks[:2], [(1, 7)], (4, 28), 0.0)


def test_separable_blur_equals_scipy_gaussian_filter(rng):
    from scipy.ndimage import gaussian_filter

    image = rng.random((40, 50))
    got = GaussianBlur(2.5)(torch.from_numpy(image).float()[None, None])[0, 0].numpy()
    # torch's 'reflect' padding is scipy's 'mirror'; scipy truncates at 4 sigma as we do
    np.testing.assert_allclose(got, gaussian_filter(image, 2.5, mode="mirror"), atol=1e-5)
    assert blur_kernel_size(4.0) == 33


def test_top_k_image_score_is_the_mean_of_the_largest_values():
    d = 2
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, d, 0), pretrained=False)
    eye = torch.eye(d).expand(4, d, d)
    scorer = PadimScorer(extractor, torch.zeros(4, d), eye, [(2, 2)], (2, 2), 0.0, top_k=3)
    emb = torch.tensor([[[[3.0, 0.0], [4.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]]]])  # distances 5, 0, 4, 1
    maps, scores = scorer.score_embeddings(emb.flatten(2), (2, 2))
    assert maps.shape == (1, 2, 2) and scores.item() == pytest.approx((5 + 4 + 1) / 3)


@pytest.mark.parametrize("sigma", [0.0, 4.0])
def test_matrix_smoothing_equals_upsample_then_blur(rng, sigma):
    import torch.nn.functional as F

    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, 2, 0), pretrained=False)
    scorer = PadimScorer(extractor, torch.zeros(12 * 20, 2), torch.eye(2).expand(12 * 20, 2, 2), [(12, 20)],
                         (48, 80), sigma)
    dist = torch.from_numpy(rng.random((3, 12, 20))).float()
    expected = F.interpolate(dist[:, None], size=(48, 80), mode="bilinear", align_corners=False)
    if sigma:
        expected = GaussianBlur(sigma)(expected)
    torch.testing.assert_close(scorer.smooth(dist, (48, 80)), expected[:, 0], rtol=1e-5, atol=1e-5)


def test_pyramid_map_is_the_mean_of_each_levels_smoothed_map(rng):
    d, grids, size = 3, [(6, 8), (4, 5)], (24, 32)
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, d, 0), pretrained=False, scales=(1.0, 0.7))
    positions = sum(h * w for h, w in grids)
    mean = torch.from_numpy(rng.normal(size=(positions, d))).float()
    scorer = PadimScorer(extractor, mean, torch.eye(d).expand(positions, d, d), grids, size, 2.0)
    emb = torch.from_numpy(rng.normal(size=(2, d, positions))).float()
    maps, scores = scorer.score_embeddings(emb, size)
    dist = (emb - mean.T).square().sum(1).sqrt()  # identity covariance: Euclidean distance
    fine = scorer.smooth(dist[:, :48].reshape(2, 6, 8), size)
    coarse = scorer.smooth(dist[:, 48:].reshape(2, 4, 5), size)
    torch.testing.assert_close(maps, (fine + coarse) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="positions"):
        scorer.score_embeddings(emb[:, :, :48], size)
