"""padim.reports (html, gallery, curves): report.html from a run folder, checked in headless Chromium."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ARTIFACTS, make_visa_dataset
from padim.cli import main
from padim.metrics import Group, Ranking
from padim.reports.curves import thin
from padim.reports.gallery import CONTOUR_RGB, select, tile

FAST = ["--image-size", "64", "--d", "16", "--no-progress", "--workers", "0"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    data = make_visa_dataset(base / "data", np.random.default_rng(0), n_normal=24)
    result = invoke("run", data, "--category", "widget", "--out", base / "run", *FAST)
    assert result.exit_code == 0, result.output
    return base / "run"


def test_select_picks_lowest_anomalies_highest_normals_and_top_detections():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([1.0, 5.0, 3.0, 2.0, 9.0, 4.0, 2.0])
    chosen = select(labels, scores, k=2)
    assert chosen == {"misses": [3, 6], "false_alarms": [1, 2], "detections": [4, 5]}
    assert select(np.zeros(3), np.arange(3.0), k=5)["misses"] == []


def test_tile_outlines_the_ground_truth_around_the_defect_not_on_it():
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    out = tile(image, np.zeros((32, 32)), mask, (0.0, 1.0))
    line = (out == CONTOUR_RGB).all(axis=2)
    assert line[8, 15] and line[9, 15] and line[15, 20] and not line[10, 15] and not line[7, 15]
    assert not line[mask].any() and not line[0, 0]
    assert not (tile(image, np.zeros((32, 32)), None, (0.0, 1.0)) == CONTOUR_RGB).all(axis=2).any()


def curves(labels, scores):
    return Ranking([Group.of(scores, labels)]).curves()


def test_thin_keeps_ends_and_shape_and_curves_are_undefined_for_one_class():
    x = np.linspace(0, 1, 100_000)
    tx, ty = thin(x, x**2, n=500)
    assert len(tx) <= 502 and tx[0] == 0 and tx[-1] == 1
    assert np.allclose(ty, tx**2)
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.3
    c = curves(labels, labels + rng.normal(0, 0.5, 5000))
    assert c is not None and 0.7 < c["ap"] <= 1 and c["fpr"][0] == 0 and c["tpr"][-1] == 1
    assert curves(np.ones(10), np.arange(10.0)) is None


def test_run_writes_report_inputs_and_report_command_rewrites_it(run_dir, tmp_path):
    manifest = json.loads((run_dir / "tiles" / "galleries.json").read_text())
    assert set(manifest["galleries"]) == {"misses", "false_alarms", "detections"}
    misses = manifest["galleries"]["misses"]["images"]
    assert misses and all(e["label"] == 1 for e in misses)
    assert [e["score"] for e in misses] == sorted(e["score"] for e in misses)
    with np.load(run_dir / "curves.npz") as c:
        assert {"pixel_fpr", "pixel_tpr", "pixel_recall", "pixel_precision", "pixel_ap"} <= set(c.files)
        assert c["pixel_fpr"].size <= 2002
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    result = invoke("report", copy)
    assert result.exit_code == 0, result.output
    html = (copy / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert html.count("data:image/png;base64,") >= 3 + len(misses)
    assert "pyramid scales 1, 0.7" in html  # the default model's levels are named
    roc_uri = "data:image/png;base64," + base64.b64encode((copy / "roc_curve.png").read_bytes()).decode()
    assert roc_uri in html  # the run's ROC plot, shown as written, not drawn twice
    (copy / "roc_curve.png").unlink()  # without it the report draws its own
    assert invoke("report", copy).exit_code == 0
    assert (copy / "report.html").read_text().count("data:image/png;base64,") >= 3 + len(misses)


def test_report_without_figures_links_generated_figures_of_gallery_images(tmp_path):
    data = make_visa_dataset(tmp_path / "data", np.random.default_rng(1), n_normal=16, n_anomaly=3)
    result = invoke("run", data, "--category", "widget", "--out", tmp_path / "run", "--no-figures", *FAST)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "figures").exists()
    manifest = json.loads((tmp_path / "run" / "tiles" / "galleries.json").read_text())
    shown = {e["name"] for g in manifest["galleries"].values() for e in g["images"]}
    linked = {p.name for p in (tmp_path / "run" / "tiles" / "figures").glob("*.png")}
    assert linked == shown and shown
    assert 'href="tiles/figures/' in (tmp_path / "run" / "report.html").read_text()


def test_report_on_a_folder_without_a_run_is_one_line_exit_3(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 3 and "metrics.json" in result.output and "Traceback" not in result.output


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, driver):
    from selenium.webdriver.common.by import By

    driver.get((run_dir / "report.html").as_uri())
    metrics = json.loads((run_dir / "metrics.json").read_text())["overall"]
    cards = {c.get_attribute("data-metric"): c.find_element(By.CLASS_NAME, "value").text
             for c in driver.find_elements(By.CSS_SELECTOR, "#headline .metric")}
    assert cards == {"Image AUROC": f"{metrics['image_auroc']:.3f}", "Pixel AUROC": f"{metrics['pixel_auroc']:.3f}",
                     "AUPRO": f"{metrics['aupro']:.3f}", "Image F1-max": f"{metrics['image_f1_max']:.3f}"}
    for section in ("run", "confusion", "defects", "scores", "curves", "galleries"):
        assert driver.find_element(By.ID, section).is_displayed()
    for plot in ("histogram", "roc", "pr"):
        assert driver.find_element(By.ID, plot).size["width"] > 300
    rows = driver.find_elements(By.CSS_SELECTOR, "#defects tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:]] == ["blob", "scratch"]
    for key in ("misses", "false_alarms", "detections"):
        assert driver.find_elements(By.CSS_SELECTOR, f"#gallery-{key} figure.tile img")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(images) >= 3 + 3 and all(c and w > 0 and h > 0 for c, w, h in images)
    # every tile links to an existing full figure in the run folder
    links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "figure.tile a")]
    assert links and all(Path(link.removeprefix("file://")).is_file() for link in links)
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(not name.startswith("http") for name in loaded)
    height = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(1280, height)
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_per_defect_detection_rate_matches_scores_csv(run_dir):
    rows = list(csv.DictReader((run_dir / "scores.csv").open()))
    blob = [r for r in rows if "blob" in r["defect_type"].split("+")]
    hit = sum(r["predicted_label"] == "anomaly" for r in blob)
    html = (run_dir / "report.html").read_text()
    assert f"<td>blob</td><td class=\"num\">{len(blob)}</td>" in html
    assert f"{100 * hit / len(blob):.0f}%" in html


def test_report_of_seed_split_without_threshold_says_what_is_undefined(tmp_path):
    data = make_visa_dataset(tmp_path / "data", np.random.default_rng(2), n_normal=12, n_anomaly=3)
    result = invoke("run", data, "--category", "widget", "--split", "seed", "--calibration-images", "0",
                    "--out", tmp_path / "run", "--no-figures", *FAST)
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert "has no stored threshold" in html and "No such images in the test set" in html
    assert '<div class="value">n/a</div>' in html  # image AUROC: the test set has anomalies only
