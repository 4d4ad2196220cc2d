"""padim.serve's page at /, driven in headless Chromium (Playwright, the system's /usr/bin/chromium)
with a real fryum anomaly; the screenshot lands in test-artifacts/."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from conftest import require
from live_server import running_server
from padim import Padim

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = [pytest.mark.real_data, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser():
    playwright = require("playwright.sync_api")
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} missing; run scripts/ensure-chromium.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(fryum_small):
    require("fastapi")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    path, test = fryum_small
    with running_server(create_app(Inspector.open(path))) as url:
        yield url, path, test


def test_page_scores_a_real_fryum_anomaly_and_shows_the_overlay(browser, site):
    url, path, test = site
    # the clearest of the first anomalies for this small model, so the verdict is known to be 'anomaly'
    anomalies = [s.path for s in test if s.label == 1][:12]
    prediction = Padim.load(path).predict(anomalies)
    best = int(prediction.scores.argmax())
    assert prediction.labels[best] == 1
    page = browser.new_page(viewport={"width": 1100, "height": 860})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
    page.set_input_files("#file", str(anomalies[best]))
    page.wait_for_selector("#result.shown", timeout=60_000)
    page.wait_for_function("document.getElementById('overlay').complete", timeout=10_000)
    assert page.inner_text("#verdict").lower() == "anomaly"
    assert "anomaly" in page.get_attribute("#verdict", "class")
    assert float(page.inner_text("#score")) == pytest.approx(float(prediction.scores[best]), abs=1e-3)
    assert page.evaluate("document.getElementById('overlay').naturalWidth") == 128
    assert page.evaluate("document.getElementById('input').naturalWidth") > 0
    assert not page.is_visible("#error") and not errors
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
    page.close()


def test_dropping_an_image_scores_it(browser, site):
    url, path, test = site
    normal = next(s.path for s in test if s.label == 0)
    expected = Padim.load(path).predict([normal])
    page = browser.new_page()
    page.goto(url + "/")
    # what a drag from the file manager delivers: a 'drop' event whose DataTransfer holds the file
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", [normal.name, base64.b64encode(normal.read_bytes()).decode()])
    page.wait_for_selector("#result.shown", timeout=60_000)
    assert page.inner_text("#verdict").lower() == ("anomaly" if expected.labels[0] else "normal")
    assert float(page.inner_text("#score")) == pytest.approx(float(expected.scores[0]), abs=1e-3)
    page.close()


def test_page_explains_a_file_that_is_not_an_image(browser, site, tmp_path):
    url, _, _ = site
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    page = browser.new_page()
    page.goto(url + "/")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error.shown", timeout=30_000)
    assert "notes.png" in page.inner_text("#error") and "not an image format" in page.inner_text("#error")
    assert not page.is_visible("#result")
    page.close()
