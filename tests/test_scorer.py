"""padim.model.scorer: batched Mahalanobis distances against a per-position SciPy computation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import mahalanobis

from padim.backbones import FeatureExtractor, channel_index
from padim.model import PadimScorer, whitening_factor
from padim.model.scorer import blur_kernel_size


def test_distances_equal_scipy_mahalanobis_at_every_position(rng):
    d, h, w = 4, 2, 3
    a = rng.normal(size=(h * w, d, d))
    cov = a @ a.transpose(0, 2, 1) + np.eye(d)
    mean = rng.normal(size=(h * w, d))
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, d, 0), pretrained=False)
    scorer = PadimScorer(extractor, torch.from_numpy(mean), whitening_factor(torch.from_numpy(cov)), (h, w), 0.0)
    emb = rng.normal(size=(5, d, h, w))
    got = scorer.distances(torch.from_numpy(emb).float()).numpy()
    for b in range(5):
        for p in range(h * w):
            y, x = divmod(p, w)
            expected = mahalanobis(emb[b, :, y, x], mean[p], np.linalg.inv(cov[p]))
            assert abs(got[b, y, x] - expected) < 1e-4 * max(1.0, expected)


def test_smooth_upsamples_blurs_and_keeps_the_peak_where_it_was():
    scorer = PadimScorer.__new__(PadimScorer)
    torch.nn.Module.__init__(scorer)
    scorer.sigma = 2.0
    dist = torch.zeros(1, 8, 8)
    dist[0, 2, 5] = 10.0
    out = scorer.smooth(dist, (32, 32))
    assert out.shape == (1, 32, 32)
    y, x = divmod(int(out[0].argmax()), 32)
    assert 8 <= y < 12 and 20 <= x < 24
    assert blur_kernel_size(4.0) == 33


def test_blur_equals_torchvision_gaussian_blur():
    from torchvision.transforms.v2.functional import gaussian_blur

    scorer = PadimScorer.__new__(PadimScorer)
    torch.nn.Module.__init__(scorer)
    scorer.sigma = 4.0
    dist = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 5
    k = blur_kernel_size(4.0)
    upsampled = torch.nn.functional.interpolate(dist[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, [k, k], [4.0, 4.0])[:, 0]
    assert torch.allclose(scorer.smooth(dist, (64, 64)), expected, atol=1e-5, rtol=0)
