"""padim.auto: the label-free choice among named configurations (--auto)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from conftest import make_visa_dataset, texture, write_png
from padim import Padim
from padim.auto import choose_config
from padim.cli import main


def test_the_choice_is_the_best_on_the_held_out_images_with_synthetic_defects(tmp_path):
    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / f"{i}.png", texture(rng, 64)) for i in range(15)]
    made = []

    def make(options):
        made.append(options)
        return Padim(image_size=64, d=8, num_workers=0, image_score=options.get("image_score"))

    name, record = choose_config(paths, make, {}, configs=("map", "levels"), log=lambda line: None)
    assert [m.get("image_score") for m in made] == [None, "map", "levels"]  # the size, then each config
    scores = record["synthetic"]
    assert set(scores) == {"map", "levels"} and record["fit_images"] + record["held_out"] == 15
    assert name == record["chosen"] == max(scores, key=lambda c: (scores[c]["image_auroc"], scores[c]["pixel_auroc"]))
    assert all(0.5 < s["image_auroc"] <= 1 and 0.5 < s["pixel_auroc"] <= 1 for s in scores.values())  # seen
    with pytest.raises(ValueError, match="at least"):
        choose_config(paths[:4], make, {}, configs=("map",))


def test_run_auto_records_its_choice_in_the_model_file_metrics_and_report(tmp_path):
    root = make_visa_dataset(tmp_path / "visa", np.random.default_rng(0), n_normal=24)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(root), "--category", "widget", "--out", str(out), "--auto",
                                       "--image-size", "64", "--d", "16", "--no-progress", "--workers", "0",
                                       "--no-figures"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "auto: chose" in result.output and "stage auto" in result.output
    with safe_open(out / "model.safetensors", "pt") as f:
        record = json.loads(f.metadata()["padim"])["auto"]
    assert set(record["synthetic"]) == {"default", "map", "plain"} and record["chosen"] in record["synthetic"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["auto"] == record
    assert "Configuration (--auto)" in (out / "report.html").read_text()
