"""padim.model.stats: streaming Gaussian statistics per cell against NumPy, their merge, their
conversion between layouts, and their precision over many images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from padim.backbones.layout import scale_layout, trivial_layout
from padim.model.stats import GaussianStats

NESTED = scale_layout([3, 2, 1], [(2, 3), (4, 6), (8, 12)])  # ratios 4, 2, 1: 96 finest positions
TRIVIAL = trivial_layout([3, 2, 1], (8, 12))


def nested_embeddings(rng: np.random.Generator, n: int, mean: float = 0.0, spread: float = 1.0) -> np.ndarray:
    """(n, 6, 96) float64 embeddings with NESTED's structure: each tap constant over its cells."""
    out = np.empty((n, 6, 8, 12))
    channel = 0
    for level in NESTED.levels:
        h, w = level.grid
        values = rng.normal(mean, spread, (n, level.channels, h, w))
        out[:, channel:channel + level.channels] = values.repeat(level.ratio, 2).repeat(level.ratio, 3)
        channel += level.channels
    return out.reshape(n, 6, 96)


def blocks(x: np.ndarray, layout) -> list[list[torch.Tensor]]:
    """(B, d, P) embeddings -> one scale's blocks of ``layout``, each tap read at its cells' top-left."""
    t, out, channel = torch.from_numpy(x).float(), [], 0
    for i, level in enumerate(layout.levels):
        out.append(t[:, channel:channel + level.channels][:, :, layout.first(i)].permute(2, 0, 1).contiguous())
        channel += level.channels
    return [out]


def stats_of(x: np.ndarray, layout, batches: int = 3) -> GaussianStats:
    s = GaussianStats([layout])
    for batch in np.array_split(x, batches):
        s.update(blocks(batch, layout))
    return s


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position mean (P, d) and unbiased covariance (P, d, d) of float32-rounded values."""
    x = x.astype(np.float32).astype(np.float64).transpose(2, 0, 1)
    return x.mean(axis=1), np.stack([np.cov(p, rowvar=False) for p in x])


@pytest.mark.parametrize("layout", [NESTED, TRIVIAL], ids=["nested", "trivial"])
@pytest.mark.parametrize("mean, spread", [(0.0, 1.0), (300.0, 0.01)])
def test_mean_and_covariance_equal_numpy_at_every_position(rng, layout, mean, spread):
    # a mean 30,000 spreads away from zero: unshifted float32 products would lose every digit
    x = nested_embeddings(rng, 40, mean, spread)
    s = stats_of(x, layout)
    mu, cov = reference(x)
    assert s.count == 40 and s.positions == 96 and s.dim == 6
    np.testing.assert_allclose(s.mean().numpy(), mu, rtol=0, atol=1e-7 * (abs(mean) + spread))  # float32 input
    got = s.covariance(0.0).numpy()
    assert np.abs(got - cov).max() < 1e-6 * np.abs(cov).max()
    total, outer = s.sums(slice(10, 30))
    xs = x.astype(np.float32).astype(np.float64)[:, :, 10:30].transpose(2, 0, 1)
    np.testing.assert_allclose(total.numpy(), xs.sum(axis=1), rtol=0, atol=40e-7 * (abs(mean) + spread))
    exact = np.einsum("pni,pnj->pij", xs, xs)
    assert np.abs(outer.numpy() - exact).max() < 1e-6 * np.abs(exact).max()


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), seed=st.integers(0, 2**16),
       order=st.randoms(use_true_random=False))
def test_merge_is_exact_order_free_and_batching_free(sizes, seed, order):
    r = np.random.default_rng(seed)
    parts = [nested_embeddings(r, n, r.uniform(-5, 5), r.uniform(0.1, 10)) for n in sizes]
    shuffled = parts[:]
    order.shuffle(shuffled)
    merged = stats_of(parts[0], NESTED, 1)
    for p in parts[1:]:
        merged = merged + stats_of(p, NESTED, 1)  # each part about its own shift
    other = stats_of(shuffled[0], NESTED, 1)
    for p in shuffled[1:]:
        other += stats_of(p, NESTED, 1)
    whole = stats_of(np.concatenate(parts), NESTED, 1)
    for s in (other, whole):
        assert s.count == merged.count == sum(sizes)
        # each part's float32 values minus its own shift: equal to float32 rounding of the data
        assert float((s.mean() - merged.mean()).abs().max()) < 1e-6 * float(merged.mean().abs().max())
        cov = merged.covariance(0.01)
        assert float((s.covariance(0.01) - cov).abs().max()) < 1e-6 * float(cov.abs().max())


def test_statistics_convert_between_layouts_exactly(rng):
    x = nested_embeddings(rng, 12)
    nested, trivial = stats_of(x, NESTED), stats_of(x, TRIVIAL)
    as_trivial, as_nested = nested.to_layouts([TRIVIAL]), trivial.to_layouts([NESTED])
    assert nested.to_layouts([NESTED]) is nested
    for got, want in ((as_trivial, trivial), (as_nested, nested)):
        assert got.layouts == want.layouts and got.count == 12
        torch.testing.assert_close(got.mean(), want.mean(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got.covariance(0.01), want.covariance(0.01), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="do not fit a model"):
        nested.to_layouts([trivial_layout([3, 2, 1], (8, 8))])
    with pytest.raises(ValueError, match="different layouts"):
        nested += trivial


def test_sums_of_a_million_images_stay_exact(rng):
    """10^6 images in batches of 64, about a mean 10^3 spreads away: float64 sums of float32 batch
    products lose nothing that grows with the count (float32 running sums would drift by ~1e-4)."""
    layout = trivial_layout([2], (1, 1))
    s, n, batch = GaussianStats([layout]), 1_000_000, 64
    x = (1000.0 + rng.normal(size=(n, 2)) * np.array([1.0, 0.5])).astype(np.float32)
    data = torch.from_numpy(x)
    for start in range(0, n, batch):
        s.update([[data[start:start + batch].unsqueeze(0)]])
    exact = np.cov(x.astype(np.float64), rowvar=False)
    got = s.covariance(0.0)[0].numpy()
    assert s.count == n
    assert np.abs(got - exact).max() < 1e-6 * np.abs(exact).max()
    np.testing.assert_allclose(s.mean()[0].numpy(), x.astype(np.float64).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("layout", [NESTED, TRIVIAL], ids=["nested", "trivial"])
def test_state_round_trips_in_float32_and_refuses_a_damaged_one(rng, layout):
    s = stats_of(nested_embeddings(rng, 10, 5.0), layout)
    back = GaussianStats.from_state([layout], s.count, s.state())
    torch.testing.assert_close(back.covariance(0.01), s.covariance(0.01), rtol=1e-6, atol=1e-7)  # entries ~1
    torch.testing.assert_close(back.mean(), s.mean(), rtol=1e-7, atol=1e-9)
    state = s.state()
    state["total0_0"] = state["total0_0"][:1]
    with pytest.raises(ValueError, match=r"tensor 'total0_0' is torch.float32 \(1, "):
        GaussianStats.from_state([layout], s.count, state)
    with pytest.raises(ValueError, match="unexpected tensor"):
        GaussianStats.from_state([layout], s.count, {**s.state(), "extra": torch.zeros(1)})


def test_scale_weighs_every_image_alike(rng):
    x = nested_embeddings(rng, 12)
    s = stats_of(x, NESTED)
    mean, cov = s.mean().clone(), s.covariance(0.0)
    s.scale(0.5)
    assert s.count == 6
    torch.testing.assert_close(s.mean(), mean)  # the same images, each weighing half
    torch.testing.assert_close(s.covariance(0.0), cov * (11 / 2) / 5, rtol=1e-9, atol=1e-12)  # S / (n - 1)
    with pytest.raises(ValueError, match="decay"):
        s.scale(0.0)


def test_oas_matches_scikit_learn(rng):
    from sklearn.covariance import OAS

    x = rng.normal(size=(12, 6, 1)) * np.linspace(0.5, 3, 6)[None, :, None]
    s = stats_of(x, trivial_layout([3, 2, 1], (1, 1)))
    expected = OAS(assume_centered=False).fit(x[:, :, 0].astype(np.float32)).covariance_
    np.testing.assert_allclose(s.covariance(0.0, "oas")[0].numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bad_batches_are_refused_and_leave_the_statistics_unchanged(rng, bad):
    s = stats_of(nested_embeddings(rng, 4), NESTED)
    before = (s.count, [t.clone() for t in s.total[0]], [p.clone() for row in s.pairs[0] for p in row])
    batch = blocks(nested_embeddings(rng, 2), NESTED)
    batch[0][1][3, 1, 0] = bad
    with pytest.raises(FloatingPointError, match="1 NaN or inf"):
        s.update(batch)
    with pytest.raises(ValueError, match="do not match"):
        s.update(blocks(nested_embeddings(rng, 2), TRIVIAL))
    assert s.count == before[0]
    assert all(torch.equal(a, b) for a, b in zip(s.total[0], before[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip((p for row in s.pairs[0] for p in row), before[2], strict=True))
    empty = GaussianStats([NESTED])
    empty.update(blocks(nested_embeddings(rng, 0), NESTED))
    with pytest.raises(ValueError, match="no samples"):
        empty.mean()
    with pytest.raises(ValueError, match="at least 2"):
        stats_of(nested_embeddings(rng, 1), NESTED, 1).covariance(0.01)
