"""padim.serve.reload and padim.serve.window: the served model replaced while requests run, the recent
window's metrics and the drift warning (tiny synthetic models, no real data)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import require, texture
from live_server import free_port, running_server
from padim import Padim
from padim.atomic import atomic_path
from test_serve import png_bytes
from test_serve_auth import samples


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny models (64 px; 48 px with a stated target_fpr of 5%), their ONNX exports,
    and four images with each model's scores of them."""
    require("fastapi")
    require("prometheus_client")
    folder = tmp_path_factory.mktemp("reload")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("a", 64), ("b", 48)):
        model = Padim(image_size=size, d=16, sigma=4.0, num_workers=0).fit(
            [texture(rng) for _ in range(16)])
        if name == "b":
            model.meta_["target_fpr"] = 0.05
        paths[name] = model.save(folder / f"{name}.safetensors")
    images = [texture(rng), texture(rng), texture(rng, defect=True), texture(rng, defect=True)]
    return paths, images


def replace(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` as the project writes model files: temporary + rename."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def served_copy(models, tmp_path, name: str = "a") -> Path:
    path = tmp_path / "model.safetensors"
    replace(models[0][name], path)
    return path


def expected_scores(models) -> dict[str, list[float]]:
    """Each model's id -> its scores of the test images, as the service computes them."""
    from padim.serve import Inspector, Limits, decode

    out = {}
    for path in models[0].values():
        inspector = Inspector.open(path)
        out[inspector.model_id] = [
            float(inspector.score([decode(png_bytes(im), "image", inspector.image_size, Limits())[0]])[0][0])
            for im in models[1]]
    return out


def make_slot(path: Path):
    from padim.serve import Inspector
    from padim.serve.reload import ModelSlot

    return ModelSlot(Inspector.open(path))


def client_of(app):
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def reload_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not reloaded" in r.getMessage()]


# --- the reload ----------------------------------------------------------------------------------

def test_a_replaced_file_is_served_after_a_reload_with_its_own_size_and_scores(models, tmp_path):
    from padim.serve.app import create_app

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    client = client_of(create_app(slot))
    expected = expected_scores(models)
    before = client.get("/model").json()
    assert before["reloads"] == 0 and before["image_size"] == [64, 64]
    assert slot.reload(force=False) is False  # nothing changed
    replace(models[0]["b"], path)
    assert slot.reload(force=False) is True and slot.reload(force=False) is False
    after = client.get("/model").json()
    assert after["model_id"] != before["model_id"] and after["image_size"] == [48, 48] and after["reloads"] == 1
    assert after["loaded_at"] > before["loaded_at"] and after["file_fingerprint"] != before["file_fingerprint"]
    assert after["file_fingerprint"].split(":")[2] == str(path.stat().st_ino)
    body = client.post("/predict", content=png_bytes(models[1][2])).json()
    assert body["model_id"] == after["model_id"] == client.get("/health").json()["model_id"]
    assert body["score"] == pytest.approx(expected[after["model_id"]][2], rel=1e-5)
    values = samples(client.get("/metrics").text)
    assert values[("padim_serve_model_reloads_total", frozenset({("result", "loaded")}))] == 1
    assert values[("padim_serve_model_reloads_total", frozenset({("result", "failed")}))] == 0
    info = next(dict(k[1]) for k in values if k[0] == "padim_serve_model_info")
    assert info["model_id"] == after["model_id"] and info["image_size"] == "48x48"


def test_the_watcher_reloads_a_replaced_file(models, tmp_path):
    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    old = slot.current.model_id
    slot.watch(0.05)
    try:
        replace(models[0]["b"], path)
        wait_for(lambda: slot.reloads == 1)
        assert slot.current.model_id != old and slot.current.image_size == (48, 48)
        time.sleep(0.3)
        assert slot.reloads == 1  # the same file is not loaded again
    finally:
        slot.stop()


def test_the_sighup_handler_reloads_in_process(models, tmp_path):
    from padim.serve.reload import reload_on_sighup

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    previous = reload_on_sighup(slot)
    slot.watch(0)  # no polling: only the signal
    # the installed handler, called as the interpreter would: a real signal to the test process itself
    # can land in a native thread of a library an earlier test loaded (it crashed a full run); the
    # real signal is sent to a real 'padim serve' in test_padim_serve_reloads_a_replaced_file_and_on_sighup
    handler = signal.getsignal(signal.SIGHUP)
    try:
        handler(signal.SIGHUP, None)
        wait_for(lambda: slot.reloads == 1)  # same file: SIGHUP reloads it anyway
        replace(models[0]["b"], path)
        time.sleep(0.2)
        assert slot.current.image_size == (64, 64)  # not polled
        handler(signal.SIGHUP, None)
        wait_for(lambda: slot.reloads == 2)
        assert slot.current.image_size == (48, 48)
    finally:
        signal.signal(signal.SIGHUP, previous)
        slot.stop()


def test_a_file_that_does_not_load_keeps_the_old_model_with_one_warning(models, tmp_path, caplog):
    from padim.serve.app import create_app

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    client = client_of(create_app(slot))
    old = slot.current.model_id
    whole = models[0]["a"].read_bytes()
    bad = {"garbage": b"not a model at all", "half-written": whole[: len(whole) // 2], "an image": png_bytes(
        models[1][0])}
    with caplog.at_level(logging.INFO, logger="padim.serve"):
        for i, (kind, data) in enumerate(bad.items(), 1):
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            assert slot.reload(force=False) is False, kind
            assert slot.reload(force=False) is False  # the same bad file is not tried again
            warnings = reload_warnings(caplog)
            assert len(warnings) == i and str(path) in warnings[-1] and old in warnings[-1], warnings
            assert len(warnings[-1].split(": not reloaded, still serving model ")[1]) > len(old) + 3  # a reason
            response = client.post("/predict", content=png_bytes(models[1][0]))
            assert response.status_code == 200 and response.json()["model_id"] == old
        replace(models[0]["b"], path)
        assert slot.reload(force=False) is True and slot.current.model_id != old
    assert "\n" not in "".join(reload_warnings(caplog))
    values = samples(client.get("/metrics").text)
    assert values[("padim_serve_model_reloads_total", frozenset({("result", "failed")}))] == 3
    assert client.get("/model").json()["reloads"] == 1


def test_a_model_that_loads_but_cannot_score_is_not_swapped_in(models, tmp_path, caplog):
    from padim.serve.reload import ModelSlot

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    broken = make_slot(models[0]["b"]).current

    def fails(images):
        raise RuntimeError("graph cannot run")

    broken.score = fails
    slot = ModelSlot(slot.current, opener=lambda: broken)
    with caplog.at_level(logging.WARNING, logger="padim.serve"):
        assert slot.reload() is False
    assert "graph cannot run" in reload_warnings(caplog)[0] and slot.failures == 1


def test_a_request_in_flight_finishes_on_the_old_model(models, tmp_path):
    httpx = require("httpx")
    from padim.serve.app import create_app

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    old = slot.current
    entered, release = threading.Event(), threading.Event()
    score = old.score

    def held(images):
        entered.set()
        assert release.wait(30)
        return score(images)

    old.score = held
    expected = expected_scores(models)
    image = png_bytes(models[1][3])
    with running_server(create_app(slot)) as url, httpx.Client(base_url=url, timeout=60) as http:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(http.post, "/predict", content=image)
            assert entered.wait(30)
            replace(models[0]["b"], path)
            assert slot.reload(force=False)
            new = http.post("/predict", content=image).json()
            release.set()
            first = in_flight.result()
    assert first.status_code == 200 and first.json()["model_id"] == old.model_id
    assert first.json()["score"] == pytest.approx(expected[old.model_id][3], rel=1e-5)
    assert new["model_id"] == slot.current.model_id != old.model_id
    assert new["score"] == pytest.approx(expected[new["model_id"]][3], rel=1e-5)


def test_no_failed_request_while_the_file_is_replaced_under_load(models, tmp_path, capsys):
    httpx = require("httpx")
    from padim.serve.app import create_app

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    expected = expected_scores(models)
    bodies = [png_bytes(image) for image in models[1]]
    stop = threading.Event()

    def hammer(worker: int) -> list[tuple[int, int, dict]]:
        answers = []
        with httpx.Client(base_url=url, timeout=60) as http:
            i = worker
            while not stop.is_set():
                k = i % len(bodies)
                if i % 5 == 0:
                    r = http.post("/predict/batch", files=[("files", (f"{k}.png", bodies[k]))])
                else:
                    r = http.post("/predict", content=bodies[k])
                answers.append((k, r.status_code, r.json()))
                i += 1
        return answers

    slot.watch(0.02)
    try:
        with running_server(create_app(slot)) as url, ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(hammer, w) for w in range(4)]
            for n, name in enumerate(["b", "a", "b", "a"], 1):
                time.sleep(0.15)
                replace(models[0][name], path)
                wait_for(lambda n=n: slot.reloads == n)
            time.sleep(0.15)
            stop.set()
            answers = [a for w in workers for a in w.result()]
    finally:
        slot.stop()
    assert len(answers) > 20 and [a for a in answers if a[1] != 200] == []
    seen = set()
    for k, _, body in answers:
        result = body["results"][0] if "results" in body else body
        seen.add(result["model_id"])
        assert result["score"] == pytest.approx(expected[result["model_id"]][k], rel=1e-5)  # one model per request
    assert seen == set(expected)
    with capsys.disabled():
        print(f"\nreload under load: {len(answers)} requests from 4 clients, 4 reloads, every answer 200 and scored "
              "by one model")


def test_an_onnx_model_is_reloaded_too(models, tmp_path):
    require("onnxruntime")
    from padim.export import export_onnx
    from padim.serve.reload import fingerprint, model_files

    path = tmp_path / "model.onnx"
    other = export_onnx(Padim.load(models[0]["b"]), tmp_path / "other.onnx", source=models[0]["b"])
    export_onnx(Padim.load(models[0]["a"]), path, source=models[0]["a"])
    assert model_files(path) == [path, tmp_path / "model.onnx.data"] and fingerprint(path)[1] is None
    slot = make_slot(path)
    first = slot.current.model_id
    replace(other, path)
    assert slot.reload(force=False) and slot.current.format == "onnx" and slot.current.model_id != first


# --- the recent window ---------------------------------------------------------------------------

def test_window_share_quantiles_and_eviction():
    from padim.serve.window import ScoreWindow

    window = ScoreWindow(size=100, target=0.01, model_id="m")
    empty = window.stats()
    assert empty.images == 0 and np.isnan(empty.share) and all(np.isnan(v) for v in empty.quantiles.values())
    rng = np.random.default_rng(0)
    scores = rng.normal(10, 2, 250)
    flags = scores > 13
    for start in range(0, 250, 7):  # requests of a few images
        window.add("m", scores[start:start + 7], flags[start:start + 7].tolist())
    window.add("old", [99.0] * 5, [True] * 5)  # a request that started on the previous model
    stats = window.stats()
    assert stats.images == stats.judged == 100 and stats.flagged == int(flags[-100:].sum())
    assert stats.share == pytest.approx(flags[-100:].mean())
    assert [stats.quantiles[q] for q in (0.5, 0.9, 0.99)] == pytest.approx(np.quantile(scores[-100:], [0.5, 0.9,
                                                                                                        0.99]))
    window.add("m", [1.0, 2.0], [None, None])  # a model without a threshold: no verdict
    assert window.stats().judged == 98 and window.stats().images == 100


def test_binomial_tail_and_target_from_the_metadata():
    from scipy.stats import binom

    from padim.serve.window import DEFAULT_TARGET_FPR, tail_probability, target_fpr

    for k, n, p in [(0, 50, 0.01), (5, 50, 0.01), (14, 500, 0.01), (60, 500, 0.05), (500, 500, 0.01)]:
        assert tail_probability(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9)
    assert target_fpr({"target_fpr": 0.05}) == 0.05 and target_fpr({}) == DEFAULT_TARGET_FPR == 0.01
    assert target_fpr({"target_fpr": "nonsense"}) == target_fpr({"target_fpr": 1.5}) == 0.01


def test_the_drift_warning_fires_once_per_episode(caplog):
    from padim.serve.window import ScoreWindow

    window = ScoreWindow(size=200, target=0.01, model_id="m")
    rng = np.random.default_rng(1)

    def feed(n: int, rate: float) -> None:
        for _ in range(n):
            window.add("m", [float(rng.normal())], [bool(rng.random() < rate)])

    def drift_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.INFO, logger="padim.serve"):
        window.add("m", [5.0] * 40, [True] * 40)  # all flagged, but too few images to judge
        assert not drift_warnings() and not window.stats().drifting
        window.reset("m", 0.01)
        feed(400, 0.01)  # at the target: quiet
        assert not drift_warnings()
        feed(200, 0.15)  # a wave: one warning, not one per request
        warnings = drift_warnings()
        assert len(warnings) == 1 and window.stats().drifting
        assert "drift or a wave of real defects: check the line" in warnings[0]
        assert "of the last 200 images" in warnings[0] and "1.0%" in warnings[0]
        feed(400, 0.0)  # recovered
        assert not window.stats().drifting and any("back to" in r.getMessage() for r in caplog.records)
        feed(200, 0.15)  # the next episode warns again
        assert len(drift_warnings()) == 2


def test_the_window_starts_over_when_a_reload_brings_another_model(models, tmp_path):
    from padim.serve.app import create_app

    path = served_copy(models, tmp_path)
    slot = make_slot(path)
    app = create_app(slot, window=50)
    client = client_of(app)
    for image in models[1]:
        assert client.post("/predict", content=png_bytes(image)).status_code == 200
    values = samples(client.get("/metrics").text)
    assert values[("padim_serve_window_images", frozenset())] == 4
    assert values[("padim_serve_window_target_fpr", frozenset())] == 0.01  # no target in the metadata
    share = values[("padim_serve_window_flagged_ratio", frozenset())]
    assert share == app.state.window.stats().share and 0 < share < 1
    assert values[("padim_serve_window_score", frozenset({("quantile", "0.5")}))] == pytest.approx(
        app.state.window.stats().quantiles[0.5])
    assert values[("padim_serve_window_drift", frozenset())] == 0
    assert slot.reload()  # the same file again: the window is kept
    assert app.state.window.stats().images == 4
    replace(models[0]["b"], path)
    assert slot.reload()
    values = samples(client.get("/metrics").text)
    assert values[("padim_serve_window_images", frozenset())] == 0
    assert values[("padim_serve_window_target_fpr", frozenset())] == 0.05  # the new model's stated target


# --- the command ---------------------------------------------------------------------------------

def test_padim_serve_reloads_a_replaced_file_and_on_sighup(models, tmp_path):
    httpx = require("httpx")
    path = served_copy(models, tmp_path)
    port = free_port()
    err = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "PADIM_SERVE_TOKEN"}
    with err.open("w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "padim.cli", "serve", "--model", str(path), "--port",
                                    str(port), "--reload-interval", "0.1", "--window", "50"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=errors)
    url = f"http://127.0.0.1:{port}"

    def model() -> dict | None:
        try:
            return httpx.get(f"{url}/model", timeout=5).json()
        except httpx.HTTPError:
            assert process.poll() is None, err.read_text()[-2000:]
            return None

    try:
        wait_for(lambda: model() is not None, 120)
        first = model()
        replace(models[0]["b"], path)
        wait_for(lambda: model()["reloads"] == 1)
        assert model()["model_id"] != first["model_id"]
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: model()["reloads"] == 2)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "reloaded, now serving model" in err.read_text()


def test_serve_help_names_the_reload_and_window_options():
    from click.testing import CliRunner

    from padim.cli import main

    text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--reload-interval" in text and "--window" in text and "SIGHUP" in text
