"""padim.backbones.layout, padim.model.cells and the cell form of padim.model.whitening and
padim.model.embedding: cell-by-cell statistics and distances under nearest tap resizing give the
numbers of the position-by-position computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim import Padim
from padim.backbones import FeatureExtractor, channel_index
from padim.backbones.layout import scale_layout
from padim.model import PadimScorer, read_model_file
from padim.model.embedding import embedding_for
from padim.params import PadimParams

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


def scorers(extractor, train: torch.Tensor, **params) -> dict[str, PadimScorer]:
    """The scorer of each form (nested cells, and per position) fitted on the same images."""
    p = PadimParams(image_size=SIZE, d=40, image_score="map", sigma=2.0, factor_dtype="float32",
                    scales=extractor.scales, pool=extractor.pool, **params).resolved()
    out = {}
    for storage in ("cells", "positions"):
        embedding = embedding_for(extractor, SIZE, storage=storage)
        stats = embedding.stats()
        with torch.inference_mode():
            stats.update(embedding(train))
            out[storage] = PadimScorer.fit(embedding, stats, p)
    return out


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.5)], ids=["one scale", "pyramid"])
@pytest.mark.parametrize("pool", [1, 3])
def test_cell_and_position_forms_give_the_same_distances(scales, pool):
    torch.manual_seed(0)
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, 40, 1), pretrained=False, pool=pool,
                                 tap_resize="nearest", scales=scales)
    fitted = scorers(extractor, images(30))
    assert fitted["cells"].storage == "cells" and fitted["positions"].storage == "positions"
    test = images(4, 9)
    with torch.inference_mode():
        (s_cells, m_cells), (s_pos, m_pos) = fitted["cells"](test), fitted["positions"](test)
        traced = fitted["cells"].whitening.graph_distances(extractor(test))
        direct = fitted["cells"].whitening.distances(fitted["cells"].embedding(test))
    assert float((m_cells - m_pos).abs().max()) < 1e-5 * float(m_pos.abs().max())
    assert float((s_cells - s_pos).abs().max()) < 1e-5 * float(s_pos.abs().max())
    assert float((traced - direct).abs().max()) < 1e-5 * float(direct.abs().max())
    factors = [f.whitening.factor_of(slice(None)) for f in fitted.values()]
    assert float((factors[0] - factors[1]).abs().max()) < 1e-5 * float(factors[1].abs().max())


def test_oas_is_fitted_per_position_and_equals_the_per_position_reference(extractor):
    """OAS shrinks each position's covariance by its own coefficient, which varies inside a cell:
    the estimator picks the per-position form, whose distances are the reference's."""
    assert embedding_for(extractor, SIZE, "oas").layouts != extractor.block_layouts(SIZE)
    assert embedding_for(extractor, SIZE, "eps").layouts == extractor.block_layouts(SIZE)
    p = PadimParams(image_size=SIZE, d=40, image_score="map", sigma=0.0, factor_dtype="float32", scales=(1.0, 0.5),
                    pool=3, covariance="oas").resolved()
    embedding = embedding_for(extractor, SIZE, "oas")
    stats = embedding.stats()
    test = images(3, 9)
    with torch.inference_mode():
        stats.update(embedding(images(30)))
        got = PadimScorer.fit(embedding, stats, p).whitening.distances(embedding(test))
        emb = extractor(test).double()
    cov = stats.covariance(0.01, "oas")
    diff = emb - stats.mean().T.unsqueeze(0)
    expected = torch.einsum("bip,pij,bjp->bp", diff, torch.linalg.inv(cov), diff).sqrt()
    assert float((got.double() - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_position_statistics_finished_by_a_cell_model_with_calibration_images():
    """Sums kept per position (e.g. from workers of another configuration) are converted to the
    model's cells; before, this crashed in the calibration merge ('list' object has no attribute 'flatten')."""
    train = images(24, 4)
    kw = {"image_size": SIZE, "scales": (1.0, 0.5), "d": 40, "pretrained": False, "factor_dtype": "float32"}
    model, reference = Padim(**kw), Padim(**kw)
    same_network(model, reference)
    positions = embedding_for(model.feature_extractor(), SIZE, storage="positions")
    stats = positions.stats()
    with torch.inference_mode():
        stats.update(positions(train))
    model.fit_from_stats(stats, train)
    reference.fit(train)
    assert model.scorer_.storage == reference.scorer_.storage == "cells"
    assert model.threshold_ == pytest.approx(reference.threshold_, rel=1e-3)
    test = images(3, 5)
    np.testing.assert_allclose(model.predict(test).maps, reference.predict(test).maps, rtol=1e-5, atol=1e-6)


def test_pyramid_levels_are_rounded_to_the_deepest_stride_so_their_grids_nest():
    extractor = FeatureExtractor("mobilenet_v2", torch.arange(152), pretrained=False, tap_resize="nearest",
                                 scales=(1.0, 0.7))
    assert extractor.level_sizes((256, 256)) == [(256, 256), (176, 176)]  # 179 px would give 45 / 23 / 12 cells
    assert extractor.level_sizes((320, 480)) == [(320, 480), (224, 336)]
    assert extractor.block_layouts((256, 256)) is not None
    assert extractor.block_layouts((250, 250)) is None  # the input itself is not resized


def test_files_keep_the_factor_per_cell_or_per_position_and_load_as_fitted(tmp_path):
    train = images(24, 4)
    kw = {"image_size": SIZE, "scales": (1.0, 0.5), "tap_resize": "nearest", "d": 40, "pretrained": False,
          "factor_dtype": "float32"}
    for covariance, storage in (("eps", "cells"), ("oas", "positions")):
        model = Padim(**kw, covariance=covariance).fit(train)
        path = model.save(tmp_path / f"{covariance}.safetensors")
        meta, tensors = read_model_file(path)
        assert meta["storage"] == storage and ("factor_tril" in tensors) == (storage == "positions")
        if storage == "cells":  # each factor row once per cell: W_ii as a triangle, no per-position factor
            cell_values = sum(t.numel() for k, t in tensors.items() if k.startswith("w"))
            positions = model.scorer_.whitening.mean.shape[0]
            assert cell_values < 0.6 * positions * 40 * 41 // 2
        loaded = Padim.load(path)  # (with the pretrained weights: compare the factor, not the maps)
        assert loaded.scorer_.storage == storage
        for name, buffer in model.scorer_.whitening.named_buffers():
            assert torch.equal(loaded.scorer_.whitening.get_buffer(name), buffer), name


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
