"""padim.backbones.layout, padim.model.cells and the cell form of padim.model.whitening and
padim.model.embedding: cell-by-cell statistics and distances under nearest tap resizing give the
numbers of the position-by-position computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import padim.model.padim as padim_module
from padim import Padim
from padim.backbones import FeatureExtractor, channel_index
from padim.backbones.layout import scale_layout
from padim.model import CellWhitening, read_model_file
from padim.model.cells import BlockStats, CellStats
from padim.model.embedding import CellEmbedding, PositionEmbedding
from padim.model.scorer import build_scorer
from padim.model.stats import GaussianStats, whitening_factors

SIZE = (64, 96)  # grids 16x24, 8x12, 4x6; at scale 0.5: 8x12, 4x6, 2x3


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, *SIZE), dtype=np.uint8))


def factor(scorer) -> torch.Tensor:
    return scorer.whitening.factor_of(slice(None))


def same_network(*models: Padim) -> None:
    """Build each model's random backbone from the same seed: the same network."""
    for model in models:
        torch.manual_seed(0)
        model.feature_extractor()


def positions_only(monkeypatch) -> None:
    """Fit and score position by position, as off the CPU."""
    monkeypatch.setattr(padim_module, "embedding_for", lambda extractor, size: PositionEmbedding(extractor, size))


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("mobilenet_v2", channel_index(152, 40, 1), pretrained=False, pool=3,
                            tap_resize="nearest", scales=(1.0, 0.5))


def test_layout_needs_every_tap_and_grids_that_divide_evenly():
    layout = scale_layout([3, 2, 1], [(2, 3), (4, 6), (8, 12)])
    assert [lv.ratio for lv in layout.levels] == [4, 2, 1] and layout.positions == 96
    assert scale_layout([3, 0, 1], [(2, 3), (4, 6), (8, 12)]) is None  # a tap keeps no channel
    assert scale_layout([3, 2, 1], [(3, 3), (4, 6), (8, 12)]) is None  # 4 rows are not 2 x 3
    assert scale_layout([3, 2, 1], [(2, 2), (4, 6), (8, 12)]) is None  # x3 across, x2 down
    # position 30 = row 2, column 6 of the 8x12 grid: deepest cell (0, 1), mid cell (1, 3)
    row, col = layout.cell_of(0, torch.tensor([30]))
    assert (row.item(), col.item()) == (0, 1)
    row, col = layout.cell_of(1, torch.tensor([30]))
    assert (row.item(), col.item()) == (1, 3)
    above, sub = layout.under(1, 0, row, col)  # mid cell (1, 3) is the bottom-right one under deep cell 1
    assert (above.item(), sub.item()) == (1, 3)
    assert layout.first(0).tolist() == [0, 4, 8, 48, 52, 56]


def test_layouts_only_for_nearest_resizing_and_dividing_grids(extractor):
    assert [lay.levels[0].grid for lay in extractor.block_layouts(SIZE)] == [(4, 6), (2, 3)]
    assert extractor.block_layouts((64, 100)) is None  # 100 px: a 25-wide grid under a 7-wide one
    bilinear = FeatureExtractor("mobilenet_v2", channel_index(152, 40, 1), pretrained=False, tap_resize="bilinear")
    assert bilinear.block_layouts(SIZE) is None
    with pytest.raises(ValueError, match="no block layout"):
        bilinear.blocks(images(1))


@torch.inference_mode()
def test_blocks_hold_the_embedding_once_per_cell(extractor):
    batch = images(3)
    full = extractor(batch)
    start = 0
    for layout, taps in zip(extractor.block_layouts(SIZE), extractor.blocks(batch), strict=True):
        emb, channel = full[:, :, start:start + layout.positions], 0
        fine = torch.arange(layout.positions)
        for i, (level, tap) in enumerate(zip(layout.levels, taps, strict=True)):
            row, col = layout.cell_of(i, fine)
            expected = emb[:, channel:channel + level.channels].permute(2, 0, 1)  # every finest position
            assert torch.equal(tap[row * level.grid[1] + col], expected)
            channel += level.channels
        start += layout.positions


@torch.inference_mode()
def test_block_statistics_equal_the_float64_sums_of_the_full_embeddings(extractor):
    layouts = extractor.block_layouts(SIZE)
    blocked, exact = BlockStats(layouts), None
    for n, seed in [(5, 1), (2, 2), (4, 3)]:  # uneven batches
        batch = images(n, seed)
        blocked.update(extractor.blocks(batch))
        emb = extractor(batch)
        exact = exact or GaussianStats.empty(emb.shape[2], emb.shape[1])
        exact.update(emb)
    got = blocked.stats().expand()
    assert got.count == exact.count == 11
    torch.testing.assert_close(got.total, exact.total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.outer, exact.outer, rtol=1e-5, atol=1e-6 * float(exact.outer.abs().max()))
    with pytest.raises(ValueError, match="converted"):
        blocked.update(extractor.blocks(images(1)))
    bad = extractor.blocks(images(2))
    bad[1][0][3, 1, 0] = float("nan")
    fresh = BlockStats(layouts)
    with pytest.raises(FloatingPointError, match="1 NaN or inf"):
        fresh.update(bad)
    assert fresh.count == 0


@torch.inference_mode()
def test_cell_by_cell_distances_equal_the_full_scorer(extractor):
    layouts = extractor.block_layouts(SIZE)
    stats = GaussianStats.empty(sum(lay.positions for lay in layouts), 40)
    stats.update(extractor(images(30)))
    full = build_scorer(PositionEmbedding(extractor, SIZE), stats.mean(), whitening_factors(stats, 0.01), 2.0)
    cell_form = CellEmbedding(extractor, SIZE, layouts)
    cells = build_scorer(cell_form, stats.mean(), whitening_factors(stats, 0.01, chunk=100), 2.0)
    assert isinstance(cells.whitening, CellWhitening) and not hasattr(cells.whitening, "weight_head")
    torch.testing.assert_close(factor(cells), factor(full), rtol=0, atol=1e-5)  # rebuilt from the cells
    test = images(4, 9)
    maps, scores = cells(test)
    expected_maps, expected_scores = full(test)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # the traced form reads full embeddings at each cell; adopted position by position, the same maps
    emb = extractor(test)
    torch.testing.assert_close(cells.maps(cells.whitening.graph_distances(emb))[0], maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cells.maps(cells.whitening.distances(cells.whitening.gather(emb)))[0], maps)
    as_positions = PositionEmbedding(extractor, SIZE).adopt(cells.whitening)
    torch.testing.assert_close(full.maps(as_positions.distances(emb))[0], maps, rtol=1e-4, atol=1e-4)
    assert cell_form.adopt(cells.whitening) is cells.whitening


def test_padim_with_nearest_resizing_fits_and_scores_cell_by_cell(tmp_path):
    train, test = images(24, 4), images(3, 5)
    model = Padim(image_size=SIZE, scales=(1.0, 0.5), tap_resize="nearest", d=40, pretrained=False).fit(train)
    assert isinstance(model.scorer_.whitening, CellWhitening)
    fit_idx, cal_idx = model.calibration_split(len(train))
    stats = GaussianStats.empty(model.scorer_.whitening.mean.shape[0], 40)
    with torch.inference_mode():
        extractor = model.feature_extractor()
        stats.update(extractor(train[fit_idx]))
        stats.update(extractor(train[cal_idx]))
    full = build_scorer(PositionEmbedding(extractor, SIZE), stats.mean(),
                        whitening_factors(stats, model.params_.eps), model.params_.sigma)
    pred = model.predict(test)
    with torch.inference_mode():
        np.testing.assert_allclose(pred.maps, full(test)[0].numpy(), rtol=1e-4, atol=1e-4)
    loaded = Padim.load(model.save(tmp_path / "m.safetensors"))  # (with the pretrained weights)
    assert isinstance(loaded.scorer_.whitening, CellWhitening)
    for name, buffer in model.scorer_.whitening.named_buffers():
        assert torch.equal(loaded.scorer_.whitening.get_buffer(name), buffer), name


def test_pyramid_levels_are_rounded_to_the_deepest_stride_so_their_grids_nest():
    extractor = FeatureExtractor("mobilenet_v2", torch.arange(152), pretrained=False, tap_resize="nearest",
                                 scales=(1.0, 0.7))
    assert extractor.level_sizes((256, 256)) == [(256, 256), (176, 176)]  # 179 px would give 45 / 23 / 12 cells
    assert extractor.level_sizes((320, 480)) == [(320, 480), (224, 336)]
    assert extractor.block_layouts((256, 256)) is not None
    assert extractor.block_layouts((250, 250)) is None  # the input itself is not resized


@torch.inference_mode()
def test_cell_statistics_add_up_and_give_the_dense_covariances_chunk_by_chunk(extractor):
    layouts = extractor.block_layouts(SIZE)
    parts, exact = [], None
    for n, seed in [(6, 11), (5, 12)]:
        batch = images(n, seed)
        part = BlockStats(layouts)
        part.update(extractor.blocks(batch))
        parts.append(part.stats())
        emb = extractor(batch)
        exact = exact or GaussianStats.empty(emb.shape[2], emb.shape[1])
        exact.update(emb)
    merged = parts[0] + parts[1]
    assert isinstance(merged, CellStats) and merged.count == 11 and merged.positions == exact.positions
    torch.testing.assert_close(merged.mean(), exact.mean(), rtol=1e-6, atol=1e-6)
    for chunk in (slice(0, 100), slice(350, 400)):  # within a scale, and across the two
        torch.testing.assert_close(merged.covariance(0.01, positions=chunk), exact.covariance(0.01, positions=chunk),
                                   rtol=1e-5, atol=1e-5)
    # a block statistic converted into another adds to it
    into = parts[0]
    more = BlockStats(layouts)
    more.update(extractor.blocks(images(5, 12)))
    assert more.stats(into=into) is into and into.count == 11
    torch.testing.assert_close(into.expand().outer, merged.expand().outer, rtol=1e-9, atol=1e-9)


def test_cell_fit_equals_the_dense_fit_and_its_file_holds_the_cells(tmp_path, monkeypatch):
    train, test = images(24, 4), images(3, 5)
    kw = {"image_size": SIZE, "scales": (1.0, 0.5), "tap_resize": "nearest", "d": 40, "pretrained": False,
          "factor_dtype": "float32"}
    model, dense = Padim(**kw), Padim(**kw)
    same_network(model, dense)
    model.fit(train)
    fit_idx, cal_idx = model.calibration_split(len(train))
    with torch.inference_mode():
        stats = GaussianStats.empty(model.scorer_.whitening.mean.shape[0], 40)
        stats.update(dense.feature_extractor()(train[fit_idx]))
    positions_only(monkeypatch)
    dense.fit_from_stats(stats, train[cal_idx], n_train=len(train))
    assert not isinstance(dense.scorer_.whitening, CellWhitening)
    assert dense.threshold_ == pytest.approx(model.threshold_, rel=1e-5)
    np.testing.assert_allclose(model.predict(test).maps, dense.predict(test).maps, rtol=1e-4, atol=1e-5)
    # the file keeps each factor row once per cell: W_ii as a triangle, no per-position factor
    path = model.save(tmp_path / "m.safetensors")
    meta, tensors = read_model_file(path)
    assert meta["storage"] == "cells" and "factor_tril" not in tensors
    cell_values = sum(t.numel() for k, t in tensors.items() if k.startswith("w"))
    d, positions = 40, model.scorer_.whitening.mean.shape[0]
    assert cell_values < 0.6 * positions * d * (d + 1) // 2
    dense_path = dense.save(tmp_path / "dense.safetensors")
    assert read_model_file(dense_path)[0]["storage"] == "positions"
    loaded = Padim.load(dense_path)  # (with the pretrained weights: compare the factor, not the maps)
    assert torch.equal(loaded.scorer_.whitening.mean, dense.scorer_.whitening.mean)
    torch.testing.assert_close(factor(loaded.scorer_), factor(dense.scorer_), rtol=0, atol=1e-4)


def test_float16_factor_scores_within_a_bounded_error_and_round_trips_exactly(tmp_path):
    train, test = images(24, 4), images(4, 5)
    kw = {"image_size": SIZE, "scales": (1.0, 0.5), "tap_resize": "nearest", "d": 40, "pretrained": False}
    full = Padim(**kw, factor_dtype="float32")
    half = Padim(**kw)
    same_network(full, half)
    full.fit(train)
    half.fit(train)
    assert half.params_.factor_dtype == "float16"
    a, b = full.predict(test), half.predict(test)
    assert np.abs(b.maps - a.maps).max() < 2e-3 * a.maps.max()
    assert np.abs(b.scores - a.scores).max() < 2e-3 * a.scores.max()
    path = half.save(tmp_path / "half.safetensors")
    assert path.stat().st_size < 0.6 * full.save(tmp_path / "full.safetensors").stat().st_size
    assert all(t.dtype == torch.float16 for k, t in read_model_file(path)[1].items() if k.startswith("w"))
    loaded = Padim.load(path)  # (with the pretrained weights: compare the factor, not the maps)
    for name, buffer in half.scorer_.whitening.named_buffers():
        assert torch.equal(loaded.scorer_.whitening.get_buffer(name), buffer), name
    assert Padim(eps=1e-9).model_params().factor_dtype == "float32"  # |W| up to 1/sqrt(eps) would overflow float16
