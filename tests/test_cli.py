"""padim.cli: the command-line contract on small synthetic data sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_folder_dataset, make_visa_dataset, texture, write_png
from padim.cli import main

FAST = ["--image-size", "64", "--d", "16", "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def visa(tmp_path_factory):
    return make_visa_dataset(tmp_path_factory.mktemp("visa"), np.random.default_rng(0), n_normal=24)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_writes_model_metrics_scores_and_figures(visa, tmp_path):
    out = tmp_path / "run"
    result = invoke("run", visa, "--category", "widget", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "img AUROC" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["n_test"] == 10 and metrics["model"]["n_train"] == 20
    assert metrics["overall"]["image_auroc"] > 0.8 and metrics["overall"]["aupro"] is not None
    assert set(metrics["per_defect_type"]) == {"blob", "scratch"}
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 10 and set(rows[0]) == {"path", "label", "defect_type", "score", "predicted_label"}
    assert {r["defect_type"] for r in rows} == {"normal", "blob", "blob+scratch"}
    assert (out / "model.safetensors").is_file() and (out / "roc_curve.png").stat().st_size > 1000
    assert len(list((out / "figures").glob("*.png"))) == 10
    # the threshold's promise, stated in the model, metrics.json, the console and the report
    point = metrics["model"]["operating_point"]
    assert point["method"] == "out-of-fold" and point["n"] == 20 and point["rank"] == 1
    assert point["threshold"] == pytest.approx(metrics["model"]["threshold"])
    assert "from 20 out-of-fold scores; too few images to promise the target" in result.output
    assert "aims at 1.0% false alarms" in (out / "report.html").read_text()
    assert set(metrics["overall"]["recall_at_fpr"]) == {"0.01", "0.05"}
    assert (out / "model.stats.safetensors").is_file()


def test_fit_then_evaluate_then_predict(visa, tmp_path):
    assert invoke("fit", visa, "--category", "widget", "--out", tmp_path / "m", *FAST).exit_code == 0
    model = tmp_path / "m" / "model.safetensors"
    result = invoke("evaluate", visa, "--category", "widget", "--model", model, "--out", tmp_path / "e",
                    "--no-figures", "--no-progress", "--metrics-resolution", "original")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics_resolution"] == "original"
    folder = tmp_path / "new"
    rng = np.random.default_rng(9)
    write_png(folder / "a" / "ok.png", texture(rng))
    write_png(folder / "b" / "ok.png", texture(rng, defect=True))
    result = invoke("predict", "--model", model, folder, "--out", tmp_path / "p", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "p" / "scores.csv").open()))
    assert [r["path"].split("/")[-2] for r in rows] == ["a", "b"]
    assert float(rows[1]["score"]) > float(rows[0]["score"])
    assert sorted(p.name for p in (tmp_path / "p" / "heatmaps").iterdir()) == ["a__ok.png", "b__ok.png"]


def test_seed_split_reports_pixel_metrics_and_says_image_metrics_are_undefined(visa, tmp_path):
    result = invoke("run", visa, "--category", "widget", "--split", "seed", "--out", tmp_path, "--no-figures", *FAST)
    assert result.exit_code == 0, result.output
    assert "image-level metrics are undefined" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["overall"]["image_auroc"] is None and metrics["overall"]["pixel_auroc"] > 0.5


def test_mvtec_layout_runs(tmp_path):
    root = make_folder_dataset(tmp_path / "d", np.random.default_rng(0))
    result = invoke("run", root, "--category", "widget", "--out", tmp_path / "o", "--no-figures", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["dataset"]["layout"] == "mvtec"


def test_errors_are_one_line_with_documented_exit_codes(tmp_path, visa):
    result = invoke("fit", tmp_path, "--category", "fryum", "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 3 and "error:" in result.output and "fryum" in result.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    result = invoke("predict", "--model", bad, visa, "--out", tmp_path / "p")
    assert result.exit_code == 4 and "bad.safetensors" in result.output
    result = invoke("fit", visa, "--category", "widget", "--backbone", "resnet18", "--out", tmp_path / "r",
                    "--weights", tmp_path / "none.pth", *FAST)
    assert result.exit_code == 5 and "none.pth" in result.output
    assert "Traceback" not in result.output


def test_help_explains_every_option():
    for command in ("fit", "evaluate", "run", "predict"):
        text = invoke(command, "--help").output
        assert "--device" in text and "--out" in text
    assert "--backbone" in invoke("fit", "--help").output


def test_aspect_keep_and_square_set_the_model_input_size(tmp_path):
    from padim.model import read_model_file

    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(root / "wide" / "train" / "good" / f"{i}.png", np.resize(texture(rng, 96), (64, 96, 3)))
    write_png(root / "wide" / "test" / "good" / "0.png", np.resize(texture(rng, 96), (64, 96, 3)))
    for aspect, size in (("keep", [64, 96]), ("square", [64, 64])):
        out = tmp_path / aspect
        result = invoke("fit", root, "--category", "wide", "--image-size", "64", "--aspect", aspect, "--d", "8",
                        "--no-progress", "--workers", "0", "--out", out)
        assert result.exit_code == 0, result.output
        meta = read_model_file(out / "model.safetensors")[0]
        assert meta["image_size"] == size and meta["sigma"] == 1.0  # 4 px per 256 px of the shorter side


@pytest.mark.parametrize("scales", ["1", "1,0.5"])
def test_scales_option_sets_the_pyramid(visa, tmp_path, scales):
    out = tmp_path / "m"
    result = invoke("fit", visa, "--category", "widget", "--out", out, "--scales", scales, *FAST)
    assert result.exit_code == 0, result.output
    from padim import Padim

    model = Padim.load(out / "model.safetensors")
    assert model.params_.scales == tuple(float(s) for s in scales.split(","))
    assert len(model.meta_["grids"]) == len(model.params_.scales)


@pytest.mark.parametrize("bad", ["0", "1,1", "1,x", "1.5"])
def test_bad_scales_are_refused_with_a_usage_error(visa, tmp_path, bad):
    result = CliRunner().invoke(main, ["fit", str(visa), "--category", "widget", "--out", str(tmp_path / "m"),
                                       "--scales", bad])
    assert result.exit_code == 2 and "--scales" in result.output and "(0, 1]" in result.output


def test_run_prints_and_stores_one_timing_per_stage(visa, tmp_path):
    out = tmp_path / "timed"
    result = invoke("run", visa, "--category", "widget", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    stages = ["data", "fit", "calibrate", "save", "predict", "metrics", "figures", "report"]
    printed = [line.split()[1] for line in result.output.splitlines() if line.startswith("stage ")]
    assert printed == stages
    timings = json.loads((out / "metrics.json").read_text())["timings"]
    assert list(timings) == [*stages, "total"] and all(v >= 0 for v in timings.values())
    assert timings["total"] == pytest.approx(sum(timings[s] for s in stages), abs=0.01)


def test_run_reads_the_split_once(visa, tmp_path, monkeypatch):
    import padim.runs

    calls = []
    original = padim.runs.load_split
    monkeypatch.setattr(padim.runs, "load_split", lambda *a, **k: calls.append(a) or original(*a, **k))
    result = invoke("run", visa, "--category", "widget", "--out", tmp_path / "once", *FAST)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
