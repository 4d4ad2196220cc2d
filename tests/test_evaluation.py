"""padim.evaluation: the streamed evaluation gives the exact metrics within 1e-4 and keeps no map in
memory (maps and masks wait on disk for the figures)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_visa_dataset
from padim import Padim
from padim.datasets import load_split, read_mask
from padim.evaluation import _resize, evaluate
from padim.metrics import metrics_and_curves
from padim.spill import SpillArray


@pytest.mark.parametrize("resolution", ["model", "original"])
def test_streamed_evaluation_equals_the_exact_metrics_of_all_maps(tmp_path, rng, resolution, monkeypatch):
    monkeypatch.setattr("padim.evaluation.os.cpu_count", lambda: 2)  # masks on 2 threads: batches of 3 end mid-pair
    root = make_visa_dataset(tmp_path / "visa", rng, n_normal=16, n_anomaly=6, size=96)
    split = load_split(root, "widget", "1cls", "visa")
    model = Padim(image_size=64, d=8, pool=1, scales=(1.0,), batch_size=3, num_workers=0)
    model.fit([s.path for s in split.train])
    prediction = model.predict([s.path for s in split.test])
    size = (96, 96) if resolution == "original" else (64, 64)
    masks = [read_mask(s.mask, size) if s.mask is not None or s.label == 0 else None for s in split.test]
    maps = [m if resolution == "model" else _resize(m, size) for m in prediction.maps]
    exact, _ = metrics_and_curves([s.label for s in split.test], prediction.scores, [s.defects for s in split.test],
                                  masks, maps, model.threshold_)
    with evaluate(model, split, resolution, spill=tmp_path / "spill") as ev:
        assert isinstance(ev.maps, SpillArray) and ev.maps.shape == (len(split.test), 64, 64)
        assert np.allclose(ev.scores, prediction.scores) and np.allclose(ev.maps[3], prediction.maps[3])
        for i, s in enumerate(split.test):
            want = read_mask(s.mask, (64, 64)) if s.mask is not None else None
            assert (ev.mask(i) is None) if want is None else np.array_equal(ev.mask(i), want)
        assert set(ev.stages.seconds) == {"predict", "metrics"}
        for row in ["overall", *exact["per_defect_type"]]:
            got = ev.metrics["overall"] if row == "overall" else ev.metrics["per_defect_type"][row]
            want = exact["overall"] if row == "overall" else exact["per_defect_type"][row]
            for key, value in want.items():
                assert got[key] == pytest.approx(value, abs=1e-4), (row, key)
    assert list((tmp_path / "spill").iterdir()) == []
