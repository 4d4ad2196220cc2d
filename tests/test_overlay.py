"""padim.reports.overlay: the heat colour table (matplotlib's jet, without importing matplotlib)."""

from __future__ import annotations

import numpy as np

from padim.reports.overlay import HEAT_CMAP, heat_colors, heat_table, overlay


def test_heat_table_is_matplotlibs_jet_to_the_last_uint8_step():
    import matplotlib

    reference = np.rint(matplotlib.colormaps[HEAT_CMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)
    table = heat_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert np.abs(table.astype(int) - reference).max() == 0


def test_heat_colors_clip_to_the_range_ends_and_overlay_blends_half():
    amap = np.array([[-1.0, 0.0], [10.0, 99.0]])
    colors = heat_colors(amap, (0.0, 10.0))
    assert (colors[0, 0] == colors[0, 1]).all() and (colors[1, 0] == colors[1, 1]).all()
    assert tuple(colors[0, 0]) == (0, 0, 128) and tuple(colors[1, 1]) == (128, 0, 0)  # jet's dark blue, dark red
    image = np.full((2, 2, 3), 100, np.uint8)
    assert tuple(overlay(image, amap, (0.0, 10.0))[0, 0]) == (50, 50, 114)


def test_saved_overlay_is_a_lossless_png_of_the_overlay(tmp_path):
    from PIL import Image

    from padim.reports.overlay import save_overlay

    rng = np.random.default_rng(0)
    image, amap = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), rng.random((24, 40)) * 10
    path = save_overlay(tmp_path / "o.png", image, amap, (2.0, 8.0))
    with Image.open(path) as saved:
        assert saved.format == "PNG" and np.array_equal(np.asarray(saved), overlay(image, amap, (2.0, 8.0)))


def test_overlay_gives_the_bytes_of_blending_in_floating_point():
    # overlay looks each (image, heat) byte pair up in a table; the reference blends as the table does
    rng = np.random.default_rng(1)
    image, amap = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), rng.normal(5, 3, (30, 50))
    for alpha in (0.5, 0.3, 0.75):
        expected = np.rint((1 - alpha) * image.astype(np.float32) + alpha * heat_colors(amap, (1.0, 9.0)))
        assert np.array_equal(overlay(image, amap, (1.0, 9.0), alpha), expected.astype(np.uint8))
