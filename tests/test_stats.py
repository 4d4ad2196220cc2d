"""padim.model.stats: streaming Gaussian statistics against NumPy, and their merge."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padim.model import GaussianStats, whitening_factor


def _stats(x: np.ndarray) -> GaussianStats:
    """x: (N, D, h, w)."""
    s = GaussianStats.empty(x.shape[2] * x.shape[3], x.shape[1])
    for batch in np.array_split(x, 3):
        if len(batch):
            s.update(torch.from_numpy(batch))
    return s


def test_mean_and_covariance_match_numpy_per_position(rng):
    x = rng.normal(2.0, 3.0, (30, 5, 2, 3))
    s = _stats(x)
    flat = x.transpose(2, 3, 0, 1).reshape(6, 30, 5)
    np.testing.assert_allclose(s.mean().numpy(), flat.mean(axis=1), rtol=1e-12)
    expected = np.stack([np.cov(p, rowvar=False) + 0.01 * np.eye(5) for p in flat])
    np.testing.assert_allclose(s.covariance(0.01).numpy(), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n_a=st.integers(1, 12), n_b=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_fit_on_a_plus_fit_on_b_equals_fit_on_union(n_a, n_b, seed):
    r = np.random.default_rng(seed)
    a, b = r.normal(size=(n_a, 4, 2, 2)), r.normal(size=(n_b, 4, 2, 2)) * 5 + 1
    merged, union = _stats(a) + _stats(b), _stats(np.concatenate([a, b]))
    assert merged.count == union.count == n_a + n_b
    torch.testing.assert_close(merged.total, union.total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.outer, union.outer, rtol=1e-12, atol=1e-10)


def test_whitening_factor_inverts_the_covariance(rng):
    a = rng.normal(size=(3, 6, 6))
    cov = torch.from_numpy(a @ a.transpose(0, 2, 1) + 0.1 * np.eye(6))
    w = whitening_factor(cov)
    eye = torch.eye(6, dtype=torch.float64).expand(3, 6, 6)
    torch.testing.assert_close(w @ cov @ w.transpose(1, 2), eye, rtol=1e-9, atol=1e-9)
    assert torch.equal(w, w.tril())


def test_fewer_images_than_dimensions_still_gives_a_usable_factor(rng):
    s = _stats(rng.normal(size=(3, 50, 1, 2)))  # 3 samples, 50 channels: singular without eps
    w = whitening_factor(s.covariance(0.01))
    assert torch.isfinite(w).all()


def test_oas_matches_scikit_learn(rng):
    from sklearn.covariance import OAS

    x = rng.normal(size=(12, 8, 1, 1)) * np.linspace(0.5, 3, 8)[None, :, None, None]
    s = _stats(x)
    expected = OAS(assume_centered=False).fit(x[:, :, 0, 0]).covariance_
    np.testing.assert_allclose(s.covariance(0.0, "oas")[0].numpy(), expected, rtol=1e-10, atol=1e-12)
