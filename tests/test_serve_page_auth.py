"""The page of a service with a token, in headless Chromium: it asks for the token once, keeps it
for the tab's session, asks again when the server refuses it, and scores an image picked before."""

from __future__ import annotations

import pytest

from conftest import require, write_png
from live_server import running_server
from test_serve_auth import AUTH, TOKEN, tiny  # noqa: F401 (fixture)
from test_serve_page import ARTIFACTS, browser  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def locked_site(tiny):  # noqa: F811
    require("fastapi")
    httpx = require("httpx")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    with running_server(create_app(Inspector.open(tiny[0]), token=TOKEN)) as url:
        yield url, httpx


def enter_token(page, token: str) -> None:
    page.wait_for_selector("#auth.shown")
    page.fill("#token", token)
    page.click("#auth button")


def test_page_asks_for_the_token_once_and_keeps_it_for_the_session(browser, locked_site, tiny, tmp_path):  # noqa: F811
    url, httpx = locked_site
    image = write_png(tmp_path / "part.png", tiny[1][2])
    expected = httpx.post(f"{url}/predict", content=image.read_bytes(), headers=AUTH).json()
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_selector("#auth.shown")
    assert "access token" in page.inner_text("#model") and not page.is_visible("#result")

    enter_token(page, "wrong-token-wrong-token")
    page.wait_for_function("document.getElementById('auth-note').textContent.includes('refused')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page_token.png"))
    assert page.is_visible("#auth") and page.evaluate("sessionStorage.length") == 0

    enter_token(page, TOKEN)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
    assert not page.is_visible("#auth") and page.input_value("#token") == ""
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result.shown", timeout=60_000)
    assert page.inner_text("#verdict").lower() == expected["label"]
    assert float(page.inner_text("#score")) == pytest.approx(expected["score"], abs=1e-3)

    page.reload()  # the same tab's session: not asked again
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
    assert not page.is_visible("#auth") and page.evaluate("sessionStorage.getItem('padim-serve-token')") == TOKEN
    assert not errors
    context.close()


def test_an_image_picked_before_the_token_is_scored_once_it_is_entered(browser, locked_site, tiny, tmp_path):  # noqa: F811
    url, httpx = locked_site
    image = write_png(tmp_path / "first.png", tiny[1][0])
    expected = httpx.post(f"{url}/predict", content=image.read_bytes(), headers=AUTH).json()
    page = browser.new_page()  # a new tab: a new session, so the token is asked for
    page.goto(url + "/")
    page.wait_for_selector("#auth.shown")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#error.shown")
    assert "access token" in page.inner_text("#error")
    enter_token(page, TOKEN)
    page.wait_for_selector("#result.shown", timeout=60_000)
    assert float(page.inner_text("#score")) == pytest.approx(expected["score"], abs=1e-3)
    assert not page.is_visible("#error")
    page.close()
