"""padim benchmark: categories found under several roots, run in child processes, summarized, resumed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ARTIFACTS, make_folder_dataset, make_visa_dataset, require, texture, write_png
from padim.benchmark import discover, mean_rows
from padim.cli import _as_args, main, run_cmd
from padim.datasets import DatasetError

FAST = ["--image-size", "64", "--d", "16", "--no-progress", "--workers", "0", "--no-figures"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_roots(base: Path) -> tuple[Path, Path]:
    """A VisA root (widget) and a plant root: widget (MVTec layout), broken (one training image,
    so its run fails) and notes/ (no category)."""
    rng = np.random.default_rng(0)
    visa = make_visa_dataset(base / "visa", rng, n_normal=16, n_anomaly=4)
    plant = make_folder_dataset(base / "plant", rng, n_train=10, n_good=3, n_bad=3)
    write_png(plant / "broken" / "train" / "good" / "000.png", texture(rng))
    write_png(plant / "broken" / "test" / "good" / "000.png", texture(rng))
    (plant / "notes").mkdir()
    (plant / "notes" / "readme.txt").write_text("not a category")
    return visa, plant


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One benchmark over both roots (3 categories, one failing), then the same command again."""
    base = tmp_path_factory.mktemp("bench")
    visa, plant = make_roots(base)
    out = base / "out"
    first = invoke("benchmark", visa, plant, "--out", out, *FAST)
    model = out / "visa" / "widget" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    summary = json.loads((out / "summary.json").read_text())
    first_csv = list(csv.DictReader((out / "summary.csv").open()))
    first_md = (out / "summary.md").read_text()
    second = invoke("benchmark", visa, plant, "--out", out, *FAST)
    return {"out": out, "first": first, "second": second, "mtime": mtime, "model": model, "summary": summary,
            "csv": first_csv, "md": first_md, "roots": (visa, plant)}


def test_discovery_reads_the_visa_split_and_detects_folder_layouts(tmp_path):
    visa, plant = make_roots(tmp_path)
    with (visa / "split_csv" / "1cls.csv").open("a") as f:
        f.write("ghost,train,normal,ghost/Data/Images/Normal/000.JPG,\n")  # listed, but not on disk
    jobs = discover([visa, plant])
    assert [(j.dataset, j.category, j.layout) for j in jobs] == [
        ("visa", "widget", "visa"), ("plant", "broken", "folder"), ("plant", "widget", "mvtec")]
    assert [j.category for j in discover([visa, plant], ["widget"])] == ["widget", "widget"]
    with pytest.raises(DatasetError, match="nope"):
        discover([visa], ["widget", "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no category found"):
        discover([tmp_path / "empty"])


def test_options_are_handed_to_padim_run_unchanged(tmp_path):
    values = {"backbone": "mobilenet_v2", "image_size": (96, 128), "scales": (1.0, 0.7), "d": 16, "sigma": 2.5,
              "progress": False, "figures": False, "split": "seed", "workers": None, "top_k": 3}
    args = _as_args(run_cmd, values)
    parsed = run_cmd.make_context("run", [str(tmp_path), "--category", "c", "--out", str(tmp_path), *args]).params
    assert {k: parsed[k] for k in values} == values


def test_mean_rows_average_the_categories_that_ran():
    def row(dataset, status, auroc, seconds):
        return {"dataset": dataset, "status": status, "image_auroc": auroc, "pixel_auroc": None, "aupro": 0.5,
                "image_f1_max": 1.0, "fit_s": seconds, "predict_s": 1.0, "total_s": 2.0, "wall_s": 3.0,
                "peak_rss_mib": 100}

    rows = [row("a", "ok", 0.8, 10.0), row("a", "failed", None, None), row("b", "reused", 0.6, 20.0)]
    a, b, overall = mean_rows(rows)
    assert (a["dataset"], a["status"], a["image_auroc"], a["fit_s"]) == ("a", "1/2 ok", 0.8, 10.0)
    assert (b["status"], overall["dataset"], overall["status"]) == ("1/1 ok", "all", "2/3 ok")
    assert overall["image_auroc"] == pytest.approx(0.7) and overall["fit_s"] == 15.0
    assert overall["pixel_auroc"] is None


def test_failure_message_is_the_error_line_or_how_the_process_ended(tmp_path):
    from padim.benchmark import _failure

    log = tmp_path / "run.log"
    log.write_text("$ padim run ...\nstage data 0.1 s\nerror: data/cat: file not found\n")
    assert _failure(log, 3) == "data/cat: file not found"
    log.write_text("$ padim run ...\nstage fit 3.0 s\n")
    assert _failure(log, -9) == "killed by SIGKILL (out of memory?)"
    log.write_text("$ padim run ...\nTraceback (most recent call last):\nRuntimeError: boom\n")
    assert _failure(log, 1) == "exit code 1: RuntimeError: boom"


def test_summary_has_a_row_per_category_means_and_the_failure(bench):
    first, out = bench["first"], bench["out"]
    # the failing category sets the exit code (3: bad data) after the others ran
    assert first.exit_code == 3, first.output
    assert "1 of 3 categories failed (plant/broken)" in first.output
    rows = bench["csv"]
    assert [(r["dataset"], r["category"], r["status"]) for r in rows] == [
        ("visa", "widget", "ok"), ("visa", "mean", "1/1 ok"), ("plant", "broken", "failed"),
        ("plant", "widget", "ok"), ("plant", "mean", "1/2 ok"), ("all", "mean", "2/3 ok")]
    visa, broken = rows[0], rows[2]
    metrics = json.loads((out / "visa" / "widget" / "metrics.json").read_text())
    assert (int(visa["n_train"]), int(visa["n_test"])) == (metrics["model"]["n_train"], metrics["dataset"]["n_test"])
    assert float(visa["image_auroc"]) == round(metrics["overall"]["image_auroc"], 4)
    t = metrics["timings"]
    assert float(visa["fit_s"]) == pytest.approx(t["fit"] + t["calibrate"], abs=1e-3)
    assert float(visa["total_s"]) == pytest.approx(t["total"], abs=1e-3)
    assert 100 < int(visa["peak_rss_mib"]) < 20_000 and float(visa["wall_s"]) >= float(visa["total_s"])
    assert "need at least" in broken["error"] and broken["image_auroc"] == ""
    assert "need at least" in (out / "plant" / "broken" / "run.log").read_text()
    categories = [(r["dataset"], r["category"]) for r in bench["summary"]["categories"]]
    assert categories == [("visa", "widget"), ("plant", "broken"), ("plant", "widget")]
    assert [m["category"] for m in bench["summary"]["means"]] == ["mean"] * 3
    md = bench["md"]
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 6
    assert "| default | plant | widget | 10 | 6 |" in md
    assert "plant/broken: " in md and "need at least" in md
    # the run folder is what 'padim run' writes, and records its command
    marker = json.loads((out / "plant" / "widget" / "benchmark.json").read_text())
    assert marker["command"][:4] == ["run", str(bench["roots"][1].absolute()), "--category", "widget"]
    assert "--no-figures" in marker["command"] and (out / "plant" / "widget" / "report.html").is_file()


def test_a_second_run_reuses_complete_categories_and_retries_the_failed_one(bench):
    second, out = bench["second"], bench["out"]
    assert second.exit_code == 3, second.output
    assert "reusing 2 complete run folder(s): visa/widget, plant/widget" in second.output
    assert bench["model"].stat().st_mtime_ns == bench["mtime"]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows if r["category"] != "mean"] == ["reused", "failed", "reused"]
    before = {(r["dataset"], r["category"]): r for r in bench["summary"]["categories"]}
    for r in rows:
        if r["status"] == "reused":
            old = before[(r["dataset"], r["category"])]
            assert float(r["aupro"]) == round(old["aupro"], 4) and int(r["peak_rss_mib"]) == old["peak_rss_mib"]


def test_other_options_rerun_a_category(bench):
    from padim.benchmark import completed

    run_dir = bench["out"] / "visa" / "widget"
    command = json.loads((run_dir / "benchmark.json").read_text())["command"]
    assert completed(run_dir, command) is not None
    assert completed(run_dir, [*command, "--top-k", "2"]) is None
    assert completed(bench["out"] / "plant" / "broken", command) is None


def test_index_links_every_report_and_the_failed_log(bench):
    from html.parser import HTMLParser

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.links = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.links.append(dict(attrs)["href"])

    page = (bench["out"] / "index.html").read_text()
    parser = Links()
    parser.feed(page)
    assert {"visa/widget/report.html", "plant/widget/report.html", "plant/broken/run.log"} <= set(parser.links)
    assert all((bench["out"] / link).is_file() for link in parser.links)
    assert "http://" not in page and "https://" not in page


@pytest.mark.browser
def test_index_renders_in_headless_chromium(bench, driver):
    from selenium.webdriver.common.by import By

    driver.get((bench["out"] / "index.html").as_uri())
    table = driver.find_element(By.ID, "summary-table")
    assert table.is_displayed() and table.size["width"] > 600
    rows = driver.find_elements(By.CSS_SELECTOR, "#summary-table tr.category, #summary-table tr.mean")
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    assert {c[0] for c in cells} == {"default"}
    assert [c[1:3] for c in cells] == [["visa", "widget"], ["visa", "mean"], ["plant", "broken"],
                                      ["plant", "widget"], ["plant", "mean"], ["all", "mean"]]
    assert cells[3][3:6] == ["10", "6", "1.000"]  # train, test, image AUROC of plant/widget
    errors = driver.find_elements(By.CSS_SELECTOR, "tr.error")
    assert len(errors) == 1 and "need at least" in errors[0].text
    assert driver.find_element(By.CSS_SELECTOR, "tr.failed a.log").text == "failed"
    reports = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.report")]
    assert len(reports) == 2 and all(Path(h.removeprefix("file://")).is_file() for h in reports)
    driver.find_element(By.CSS_SELECTOR, "a.report").click()  # the link opens the category's report
    assert driver.find_element(By.ID, "headline").is_displayed()
    driver.back()
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(not name.startswith("http") for name in loaded)
    # the table fits its section at 1280 px: no side scrolling
    fits = "const s = document.getElementById('summary'); return s.scrollWidth <= s.clientWidth;"
    assert driver.execute_script(fits)
    driver.set_window_size(1280, driver.execute_script("return document.documentElement.scrollHeight;"))
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "benchmark-index.png"))


def test_dask_runs_categories_as_cluster_tasks(tmp_path):
    require("distributed")
    visa, _ = make_roots(tmp_path)
    result = invoke("benchmark", visa, "--out", tmp_path / "out", "--dask", "local:1", *FAST)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [(r["config"], r["category"], r["status"]) for r in rows] == [
        ("default", "widget", "ok"), ("default", "mean", "1/1 ok"), ("default", "mean", "1/1 ok")]
    assert (tmp_path / "out" / "visa" / "widget" / "report.html").is_file()


def test_missing_category_is_one_line_exit_3(tmp_path):
    visa, _ = make_roots(tmp_path)
    result = invoke("benchmark", visa, "--out", tmp_path / "out", "--categories", "nope", *FAST)
    assert result.exit_code == 3 and "nope" in result.output and "Traceback" not in result.output


def test_seed_split_gives_the_metrics_of_padim_run(tmp_path):
    visa, _ = make_roots(tmp_path)
    result = invoke("benchmark", visa, "--out", tmp_path / "bench", "--split", "seed", *FAST)
    assert result.exit_code == 0, result.output
    direct = invoke("run", visa, "--category", "widget", "--split", "seed", "--out", tmp_path / "run", *FAST)
    assert direct.exit_code == 0, direct.output
    bench = json.loads((tmp_path / "bench" / "visa" / "widget" / "metrics.json").read_text())
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert bench["dataset"]["split"] == "seed"
    # the same protocol; float32 features summed by torch's threads in another process can differ in
    # the last bits (seen: AUPRO 1.1e-6 relative), so the metrics agree to rounding, not bit for bit
    assert bench["overall"].keys() == run["overall"].keys()
    for key, value in run["overall"].items():
        assert bench["overall"][key] == (value if value is None or isinstance(value, dict)
                                         else pytest.approx(value, rel=1e-5)), key
    rows = list(csv.DictReader((tmp_path / "bench" / "summary.csv").open()))
    assert rows[0]["image_auroc"] == "" and float(rows[0]["pixel_auroc"]) == round(run["overall"]["pixel_auroc"], 4)


def test_configs_run_each_category_under_each_named_configuration(tmp_path):
    from padim.params import CONFIGS

    visa, _ = make_roots(tmp_path)
    out = tmp_path / "out"
    first = invoke("benchmark", visa, "--out", out, "--configs", "default,plain", *FAST)
    assert first.exit_code == 0, first.output
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["config"], r["dataset"], r["category"], r["status"]) for r in rows] == [
        ("default", "visa", "widget", "ok"), ("default", "visa", "mean", "1/1 ok"),
        ("default", "all", "mean", "1/1 ok"),
        ("plain", "visa", "widget", "ok"), ("plain", "visa", "mean", "1/1 ok"), ("plain", "all", "mean", "1/1 ok")]
    # each configuration has its own run folder; plain's options replace the command's own
    default, plain = (json.loads((out / c / "visa" / "widget" / "metrics.json").read_text())["model"]
                      for c in ("default", "plain"))
    assert default["image_size"] == [64, 64] and default["d"] == 16
    assert plain["image_size"] == [256, 256] and plain["d"] == 100 and plain["scales"] == [1.0]
    command = json.loads((out / "plain" / "visa" / "widget" / "benchmark.json").read_text())["command"]
    options = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    assert (options["--pool"], options["--top-k"], options["--aspect"]) == ("1", "1", "square")
    assert options["--out"] == str((out / "plain" / "visa" / "widget").absolute()) and CONFIGS["plain"]["pool"] == 1
    assert float(rows[3]["image_auroc"]) == round(json.loads(
        (out / "plain" / "visa" / "widget" / "metrics.json").read_text())["overall"]["image_auroc"], 4)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["configs"]) == {"default", "plain"} and "--pool" in summary["configs"]["plain"]
    assert [r["config"] for r in summary["categories"]] == ["default", "plain"]
    assert "| plain | visa | widget | " in (out / "summary.md").read_text()
    page = (out / "index.html").read_text()
    assert 'href="plain/visa/widget/report.html"' in page and 'data-config="plain"' in page
    # a rerun reuses both; one configuration alone reuses its own folder
    again = invoke("benchmark", visa, "--out", out, "--configs", "plain,default", *FAST)
    assert "reusing 2 complete run folder(s): plain/visa/widget, default/visa/widget" in again.output
    alone = invoke("benchmark", visa, "--out", out, "--configs", "plain", *FAST)
    assert alone.exit_code == 0 and "reusing 1 complete run folder(s): plain/visa/widget" in alone.output
    assert [r["config"] for r in csv.DictReader((out / "summary.csv").open())] == ["plain"] * 3


def test_unknown_config_is_a_usage_error(tmp_path):
    result = invoke("benchmark", tmp_path, "--out", tmp_path / "out", "--configs", "default,fancy")
    assert result.exit_code == 2 and "fancy" in result.output and "plain" in result.output
