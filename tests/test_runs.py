"""padim.runs: the evaluation's per-image figures."""

from __future__ import annotations

import padim.runs as runs
from conftest import texture, write_png
from padim import Padim
from padim.datasets import Sample


def test_figure_titles_give_the_image_score_not_the_map_maximum(tmp_path, rng, monkeypatch):
    model = Padim(image_size=64, d=8, top_k=10, pool=1, scales=(1.0,)).fit([texture(rng) for _ in range(6)])
    path = write_png(tmp_path / "a.png", texture(rng, defect=True))
    prediction = model.predict([path])
    assert prediction.scores[0] < prediction.maps[0].max()  # top_k = 10: the score is a mean, below the max
    titles = []
    monkeypatch.setattr(runs, "five_panel", lambda *args: titles.append(args[-1]))
    runs.write_figures(model, [Sample(path, 1, ("blob",))], prediction.maps, prediction.scores, tmp_path / "f", False)
    assert titles and f"score {prediction.scores[0]:.2f}" in titles[0]
