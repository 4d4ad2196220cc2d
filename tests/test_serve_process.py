"""``padim serve`` as a real process on 127.0.0.1: the refused start, the token over real HTTP, request
logs on stderr, draining on SIGTERM; and TLS through uvicorn."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require
from live_server import free_port, running_server
from test_serve import png_bytes
from test_serve_auth import AUTH, TOKEN, certificate, requests_total, samples, tiny  # noqa: F401 (fixtures)


def command(model: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "padim.cli", "serve", "--model", str(model), *args]


def without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PADIM_SERVE_TOKEN"}


def log_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):  # noqa: F811
    """A ``padim serve`` process with a token on a free loopback port: (process, base URL, stderr file)."""
    httpx = require("httpx")
    port = free_port()
    folder = tmp_path_factory.mktemp("process")
    err = folder / "stderr.log"
    with (folder / "stdout.log").open("w") as out, err.open("w") as errors:
        process = subprocess.Popen(command(tiny[0], "--host", "127.0.0.1", "--port", str(port),
                                           "--shutdown-timeout", "30"),
                                   env={**os.environ, "PADIM_SERVE_TOKEN": TOKEN}, stdout=out, stderr=errors)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"padim serve exited with {process.returncode}: {err.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("padim serve did not answer /health in time")
        time.sleep(0.3)
    yield process, url, err
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)


def test_a_reachable_host_without_a_token_is_refused_at_start(tiny):  # noqa: F811
    port = free_port()
    result = subprocess.run(command(tiny[0], "--host", "0.0.0.0", "--port", str(port)), env=without_token(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to listen on 0.0.0.0 without a token"), lines
    assert "PADIM_SERVE_TOKEN" in lines[0] and "Traceback" not in result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing was left listening


def test_the_token_over_real_http_and_one_log_line_per_request(server, tiny):  # noqa: F811
    import httpx

    _, url, err = server
    image = png_bytes(tiny[1][2])
    assert httpx.post(f"{url}/predict", content=image).status_code == 401
    assert httpx.post(f"{url}/predict", content=image, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.post(f"{url}/predict", content=image, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["score"] > 0
    metrics = httpx.get(f"{url}/metrics", headers=AUTH)
    assert httpx.get(f"{url}/metrics").status_code == 401 and metrics.status_code == 200
    values = samples(metrics.text)
    assert requests_total(values, "/predict", "POST", 200) == 1 and requests_total(values, "/predict", "POST", 401) == 2
    request_id = ok.headers["X-Request-ID"]
    deadline = time.monotonic() + 10
    while not [e for e in log_lines(err) if e.get("request_id") == request_id] and time.monotonic() < deadline:
        time.sleep(0.1)
    entry = next(e for e in log_lines(err) if e.get("request_id") == request_id)
    assert entry["route"] == "/predict" and entry["status"] == 200 and entry["ms"] > 0
    assert entry["score"] == pytest.approx(ok.json()["score"]) and entry["flagged"] == (ok.json()["label"] == "anomaly")


def test_sigterm_lets_the_request_in_flight_finish(server, tiny):  # noqa: F811
    import httpx

    process, url, err = server
    port = int(url.rsplit(":", 1)[1])
    image = png_bytes(tiny[1][0])
    expected = httpx.post(f"{url}/predict", content=image, headers=AUTH).json()["score"]
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\nX-Request-ID: in-flight-1\r\n"
            "Connection: close\r\n\r\n").encode()
    # an upload still arriving when the signal comes: in flight, and deterministic on any machine
    client = socket.create_connection(("127.0.0.1", port), timeout=60)
    client.sendall(head + image[: len(image) // 2])
    deadline = time.monotonic() + 30
    in_progress = ("padim_serve_requests_in_progress", frozenset())
    while samples(httpx.get(f"{url}/metrics", headers=AUTH).text)[in_progress] < 2:  # it, and this /metrics
        assert time.monotonic() < deadline, "the half-sent request never reached the app"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:  # the listening socket closes: no new connections while draining
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.1)
    assert process.poll() is None  # still running: waiting for the request in flight
    client.sendall(image[len(image) // 2:])
    response = b""
    while chunk := client.recv(65536):
        response += chunk
    client.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    assert b"x-request-id: in-flight-1" in head.lower()
    assert json.loads(body)["score"] == expected
    process.wait(timeout=60)
    assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    entry = next(e for e in log_lines(err) if e.get("request_id") == "in-flight-1")
    assert entry["status"] == 200


def test_tls_through_uvicorn(tiny, certificate):  # noqa: F811
    httpx = require("httpx")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    cert, key = certificate
    app = create_app(Inspector.open(tiny[0]), token=TOKEN)
    with running_server(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        assert url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            assert client.get(f"{url}/model").status_code == 401
            assert client.get(f"{url}/model", headers=AUTH).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url.replace('https', 'http')}/health", timeout=5)  # plain HTTP is not answered


def test_a_client_leaving_mid_upload_is_counted_as_499_not_logged_as_a_bug(tiny, caplog):  # noqa: F811
    require("httpx")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    app = create_app(Inspector.open(tiny[0]), token=TOKEN)
    image = png_bytes(tiny[1][0])
    with caplog.at_level("INFO", logger="padim.serve"), running_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                            f"Content-Length: {len(image)}\r\n\r\n").encode() + image[:100])
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while not any(getattr(r, "fields", {}).get("status") == 499 for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.1)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert requests_total(samples(app.state.metrics.render()[0].decode()), "/predict", "POST", 499) == 1
