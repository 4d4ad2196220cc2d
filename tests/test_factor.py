"""padim.model.factor: the whitening factor computed block by block of taps and cell by cell
equals the per-position Cholesky reference; the covariance estimators; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim.backbones.layout import trivial_layout
from padim.model import Whitening, whitening_factor
from padim.model.factor import factor_rows
from test_stats import NESTED, TRIVIAL, nested_embeddings, stats_of


def whitening_of(stats, eps: float = 0.01, estimator: str = "eps") -> Whitening:
    w = Whitening(stats.layouts)
    for s, i, cells, rows in factor_rows(stats, eps, estimator):
        w.set_rows(s, i, cells, rows)
    w.finish(stats.mean())
    return w


@pytest.mark.parametrize("layout, estimator", [(NESTED, "eps"), (TRIVIAL, "eps"), (TRIVIAL, "oas")])
def test_blocked_factor_equals_the_per_position_cholesky(rng, layout, estimator):
    x = nested_embeddings(rng, 9)  # fewer images than channels + 4: eps carries the small eigenvalues
    stats = stats_of(x, layout)
    expected = whitening_factor(stats.covariance(0.01, estimator)).float()
    got = whitening_of(stats, 0.01, estimator).factor_of(slice(None))
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_the_factor_whitens_and_the_distances_are_mahalanobis(rng):
    x = nested_embeddings(rng, 30)
    stats = stats_of(x, NESTED)
    cov = stats.covariance(0.01)
    w = whitening_factor(cov)
    eye = torch.eye(6, dtype=torch.float64).expand(96, 6, 6)
    torch.testing.assert_close(w @ cov @ w.transpose(1, 2), eye, rtol=1e-9, atol=1e-9)
    whitening = whitening_of(stats)
    y = nested_embeddings(rng, 3)
    diff = torch.from_numpy(y).float().double() - stats.mean().T.unsqueeze(0)  # (B, d, P)
    expected = torch.einsum("bip,pij,bjp->bp", diff, torch.linalg.inv(cov), diff).sqrt()
    from test_stats import blocks

    torch.testing.assert_close(whitening.distances(blocks(y, NESTED)).double(), expected, rtol=1e-4, atol=1e-4)
    traced = whitening.graph_distances(torch.from_numpy(y).float())
    torch.testing.assert_close(traced.double(), expected, rtol=1e-4, atol=1e-4)


def test_oas_needs_statistics_per_position(rng):
    with pytest.raises(ValueError, match="per position"):
        list(factor_rows(stats_of(nested_embeddings(rng, 5), NESTED), 0.01, "oas"))
    with pytest.raises(ValueError, match="covariance estimator"):
        list(factor_rows(stats_of(nested_embeddings(rng, 5), NESTED), 0.01, "ledoit"))


def test_a_singular_covariance_is_named_by_its_position(rng):
    layout = trivial_layout([2], (5, 1))
    x = rng.normal(size=(10, 2, 5))
    x[:, :, 3] = 1.0  # a constant feature: zero covariance at position 3
    with pytest.raises(FloatingPointError, match="position 3 is not positive definite"):
        list(factor_rows(stats_of(x, layout), eps=0.0))
    with pytest.raises(FloatingPointError):
        whitening_factor(torch.full((1, 2, 2), float("nan"), dtype=torch.float64))


def test_few_images_still_give_a_usable_factor(rng):
    stats = stats_of(nested_embeddings(rng, 2), NESTED, 1)  # 2 samples, 6 channels: singular without eps
    assert torch.isfinite(whitening_of(stats).factor_of(slice(None))).all()
    assert np.isfinite(stats.covariance(0.01).numpy()).all()
