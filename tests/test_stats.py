"""padim.model.stats: streaming Gaussian statistics against NumPy, and their merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padim.model import GaussianStats, whitening_factor
from padim.model import stats as stats_module
from padim.model.stats import StreamingStats, whitening_factors


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


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5), seed=st.integers(0, 2**16),
       order=st.randoms(use_true_random=False))
def test_merge_is_order_free_and_batching_free(sizes, seed, order):
    r = np.random.default_rng(seed)
    parts = [r.normal(r.uniform(-5, 5), r.uniform(0.1, 10), size=(n, 3, 1, 2)) for n in sizes]
    shuffled = parts[:]
    order.shuffle(shuffled)
    merged = _stats(parts[0])
    for p in parts[1:]:
        merged = merged + _stats(p)
    other = _stats(shuffled[0])
    for p in shuffled[1:]:
        other = _stats(p) + other
    one_batch = GaussianStats.empty(2, 3)
    one_batch.update(torch.from_numpy(np.concatenate(parts)))
    for s in (other, one_batch):
        assert s.count == merged.count == sum(sizes)
        torch.testing.assert_close(s.covariance(0.01), merged.covariance(0.01), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s.mean(), merged.mean(), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 8), dim=st.integers(1, 12), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_covariance_is_symmetric_positive_definite_even_with_fewer_samples_than_dimensions(n, dim, scale, seed):
    x = np.random.default_rng(seed).normal(0, scale, size=(n, dim, 1, 1))
    cov = _stats(x).covariance(0.01)
    torch.testing.assert_close(cov, cov.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(cov).min()) > 0.005
    assert torch.isfinite(whitening_factor(cov)).all()


def test_a_singular_covariance_is_named_by_its_position_across_chunks(rng):
    x = rng.normal(size=(10, 2, 5, 1))
    x[:, :, 3] = 1.0  # a constant feature: zero covariance at position 3
    with pytest.raises(FloatingPointError, match="position 3 is not positive definite"):
        list(whitening_factors(_stats(x), eps=0.0, chunk=2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_refused_and_leave_the_statistics_unchanged(rng, bad):
    s = _stats(rng.normal(size=(4, 3, 2, 2)))
    before = (s.count, s.total.clone(), s.outer.clone())
    x = torch.from_numpy(rng.normal(size=(2, 3, 2, 2)))
    x[1, 2, 0, 1] = bad
    with pytest.raises(FloatingPointError, match="1 NaN or inf"):
        s.update(x)
    assert s.count == before[0] and torch.equal(s.total, before[1]) and torch.equal(s.outer, before[2])


def test_non_finite_statistics_are_detected():
    s = GaussianStats.empty(1, 2)
    s.update(torch.ones(3, 2, 1, 1, dtype=torch.float64))
    s.outer[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        s.covariance(0.01)
    with pytest.raises(FloatingPointError):
        whitening_factor(torch.full((1, 2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot merge"):
        _ = s + GaussianStats.empty(1, 3)


def _streamed(x: np.ndarray, batches: int = 3) -> GaussianStats:
    s = StreamingStats(x.shape[2] * x.shape[3], x.shape[1])
    for batch in np.array_split(x, batches):
        if len(batch):
            s.update(torch.from_numpy(batch).float())
    return s.stats()


@pytest.mark.parametrize("mean, spread", [(0.0, 1.0), (300.0, 0.01)])
def test_streaming_stats_equal_the_float64_sums_to_float32_precision(rng, mean, spread):
    # a mean 30,000 spreads away from zero: unshifted float32 products would lose every digit
    x = rng.normal(mean, spread, (40, 6, 2, 3)).astype(np.float32).astype(np.float64)
    fast, exact = _streamed(x), _stats(x)
    assert fast.count == exact.count == 40
    torch.testing.assert_close(fast.mean(), exact.mean(), rtol=1e-7, atol=1e-6 * spread)
    cov = exact.covariance(0.0)
    assert ((fast.covariance(0.0) - cov).abs().amax() / cov.abs().amax()) < 1e-5


def test_streaming_stats_in_several_position_blocks_are_converted_once(rng, monkeypatch):
    monkeypatch.setattr(stats_module, "UPDATE_CHUNK", 4)  # 6 positions: blocks of 4 and 2
    x = rng.normal(size=(9, 5, 2, 3))
    s = StreamingStats(6, 5)
    for batch in np.array_split(x, 2):
        s.update(torch.from_numpy(batch).float())
    assert [len(o) for o in s.outer] == [4, 2]
    fast, exact = s.stats(), _stats(x)
    torch.testing.assert_close(fast.outer, exact.outer, rtol=1e-5, atol=1e-5)
    assert s.outer == []  # freed as converted
    with pytest.raises(ValueError, match="converted"):
        s.stats()
    with pytest.raises(ValueError, match="converted"):
        s.update(torch.from_numpy(x).float())


def test_streaming_stats_of_single_images_and_their_errors(rng):
    x = rng.normal(size=(5, 3, 1, 2)).astype(np.float32)
    one_by_one = _streamed(x.astype(np.float64), batches=5)  # first batch of one: its mean is the shift
    torch.testing.assert_close(one_by_one.covariance(0.01), _stats(x.astype(np.float64)).covariance(0.01),
                               rtol=1e-5, atol=1e-6)
    s = StreamingStats(2, 3)
    s.update(torch.zeros(0, 3, 2))
    with pytest.raises(ValueError, match="no samples"):
        s.stats()
    with pytest.raises(ValueError, match="do not match"):
        s.update(torch.zeros(1, 3, 3))
    bad = torch.from_numpy(x)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="1 NaN or inf"):
        s.update(bad)
    assert s.count == 0 and s.shift is None
