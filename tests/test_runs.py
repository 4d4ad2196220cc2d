"""padim.runs and padim.reports.run_folder: the evaluation's per-image figures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import texture, write_png
from padim import Padim
from padim.datasets import Sample, Split
from padim.evaluation import evaluate
from padim.reports import run_folder
from padim.reports.figures import FivePanel, boundary


def test_figure_titles_give_the_image_score_not_the_map_maximum(tmp_path, rng, monkeypatch):
    model = Padim(image_size=64, d=8, top_k=10, pool=1, scales=(1.0,), image_score="map").fit(
        [texture(rng) for _ in range(6)])
    path = write_png(tmp_path / "a.png", texture(rng, defect=True))
    normal = write_png(tmp_path / "n.png", texture(rng))
    ev = evaluate(model, Split([], [Sample(normal, 0), Sample(path, 1, ("blob",))], "folder", "test"))
    assert ev.scores[1] < ev.maps[1].max()  # top_k = 10: the score is a mean, below the max
    titles = []
    monkeypatch.setattr(FivePanel, "save", lambda self, *args: titles.append(args[-1]))
    monkeypatch.setattr(run_folder, "write_galleries", lambda *args: None)
    run_folder.write_pictures(tmp_path, ev, figures=True, progress=False)
    assert len(titles) == 2 and any(f"score {ev.scores[1]:.2f}" in t for t in titles)


def test_five_panel_frame_is_drawn_once_and_each_image_fills_its_panels(tmp_path, rng):
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    amap = np.zeros((48, 64), np.float32)
    amap[10:20, 10:20] = 9.0
    panel = FivePanel((48, 64), threshold=5.0, vrange=(0.0, 10.0))
    first = panel.render(image, amap > 5, amap, "first")
    second = panel.render(image, None, amap, "second")
    assert first.shape == second.shape and first.dtype == np.uint8
    assert not np.array_equal(first, second)  # another title, and no ground truth
    (r0, r1, c0, c1) = panel.boxes[3]  # the predicted mask: white where the map passes the threshold
    predicted = first[r0:r1, c0:c1].mean(axis=2)
    assert predicted.max() > 200 and predicted.min() < 50
    path = panel.save(tmp_path / "f.png", image, None, amap, "t")
    assert np.asarray(Image.open(path)).shape == first.shape


def test_boundary_is_scikit_images_thick_boundary(rng):
    # the segmentation panel marks the predicted mask's boundary as mark_boundaries(mode='thick') did
    segmentation = pytest.importorskip("skimage.segmentation")
    image = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    for mask in (rng.random((40, 56)) > 0.7, np.zeros((40, 56), bool), np.ones((40, 56), bool),
                 np.pad(np.ones((10, 20), bool), ((0, 30), (36, 0)))):
        expected = np.rint(segmentation.mark_boundaries(image, mask, color=(1, 0, 0), mode="thick") * 255)
        marked = image.copy()
        marked[boundary(mask)] = (255, 0, 0)
        assert np.array_equal(marked, expected.astype(np.uint8))
