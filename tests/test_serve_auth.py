"""padim serve on a plant network: bearer token, refusal of an unsafe start, TLS options, Prometheus
metrics, request ids and request logs (FastAPI's test client; no real server here)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pytest

from conftest import require, texture
from padim import Padim
from test_serve import png_bytes

TOKEN = "s3cret-token-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Metric samples of a /metrics body, keyed by (sample name, labels), parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_total(values: dict, route: str, method: str, status: int) -> float:
    key = ("padim_serve_requests_total", frozenset({"route": route, "method": method, "status": str(status)}.items()))
    return values.get(key, 0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model path, [normal, normal, defect, defect] images) for a tiny synthetic model."""
    require("fastapi")
    require("prometheus_client")
    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, sigma=4.0, num_workers=0).fit(
        [texture(rng) for _ in range(16)])
    path = model.save(tmp_path_factory.mktemp("auth") / "model.safetensors")
    return path, [texture(rng), texture(rng), texture(rng, defect=True), texture(rng, defect=True)]


def make_client(path, token=None):
    from fastapi.testclient import TestClient

    from padim.serve import Inspector
    from padim.serve.app import create_app

    return TestClient(create_app(Inspector.open(path), token=token), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def locked(tiny):
    return make_client(tiny[0], TOKEN)


# --- authentication ------------------------------------------------------------------------------

def test_every_data_and_model_route_needs_the_token(locked, tiny):
    image = png_bytes(tiny[1][0])
    calls = {
        "GET /model": lambda h: locked.get("/model", headers=h),
        "POST /predict": lambda h: locked.post("/predict", content=image, headers=h),
        "POST /predict/batch": lambda h: locked.post("/predict/batch", files=[("files", ("a.png", image))],
                                                     headers=h),
        "GET /metrics": lambda h: locked.get("/metrics", headers=h),
        "GET /openapi.json": lambda h: locked.get("/openapi.json", headers=h),
    }
    refused = [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
               {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
               {"Authorization": "Bearer"}]
    for name, call in calls.items():
        for headers in refused:
            response = call(headers)
            assert response.status_code == 401, (name, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in response.json()["detail"]
        assert call(AUTH).status_code == 200, name
        assert call({"Authorization": f"bearer  {TOKEN} "}).status_code == 200, name  # scheme is case-insensitive
    wrong = locked.get("/model", headers={"Authorization": "Bearer nope-nope-nope-nope"})
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"] and "invalid token" in wrong.text
    assert locked.get("/no-such-route").status_code == 401  # unknown routes do not reveal themselves
    schema = locked.get("/openapi.json", headers=AUTH).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["security"] == [{"bearer": []}] and schema["paths"]["/health"]["get"]["security"] == []


def test_health_and_the_page_stay_open(locked):
    assert locked.get("/health").status_code == 200 and locked.get("/health").json()["status"] == "ok"
    page = locked.get("/")
    assert page.status_code == 200 and 'id="token"' in page.text and "sessionStorage" in page.text


def test_without_a_token_the_app_is_open_as_before(tiny):
    client = make_client(tiny[0])
    assert client.get("/model").status_code == 200 and client.get("/metrics").status_code == 200
    assert client.post("/predict", content=png_bytes(tiny[1][0])).status_code == 200


def test_tokens_are_compared_in_constant_time(locked, monkeypatch):
    import hmac

    from padim.serve import security

    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert locked.get("/model", headers={"Authorization": "Bearer short-but-wrong"}).status_code == 401
    assert locked.get("/model", headers=AUTH).status_code == 200
    assert calls == [(32, 32), (32, 32)]  # sha256 digests: the time depends on neither token's length
    assert not security.token_matches(None, TOKEN) and security.token_matches(TOKEN, TOKEN)


def test_bearer_header_parsing():
    from padim.serve.security import bearer_token

    assert bearer_token("Bearer abc") == "abc" and bearer_token("BEARER  abc ") == "abc"
    assert bearer_token(None) is bearer_token("") is bearer_token("Basic abc") is bearer_token("Bearer ") is None


# --- start-up settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.168.1.20", False),
    ("plant-server", False), ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_loopback_is_127_8_and_ipv6_one_and_localhost(host, loopback):
    from padim.serve.security import is_loopback

    assert is_loopback(host) is loopback


def test_token_from_the_environment_or_a_file(tmp_path):
    from padim.serve.security import ServeConfigError, read_token

    assert read_token(None, {}) is None and read_token(None, {"PADIM_SERVE_TOKEN": "  "}) is None
    assert read_token(None, {"PADIM_SERVE_TOKEN": f" {TOKEN}\n"}) == TOKEN
    file = tmp_path / "token"
    file.write_text(f"{TOKEN}-file\n")
    assert read_token(file, {"PADIM_SERVE_TOKEN": TOKEN}) == f"{TOKEN}-file"  # the explicit option wins
    cases = [("short", "fewer than 16"), ("", "is empty"), ("with a space inside it", "printable ASCII"),
             ("tökenwithumlaut-0123456789", "printable ASCII")]
    for content, says in cases:
        file.write_text(content)
        with pytest.raises(ServeConfigError, match=says):
            read_token(file, {})
    with pytest.raises(ServeConfigError, match="cannot read the token file"):
        read_token(tmp_path / "missing", {})
    with pytest.raises(ServeConfigError, match="PADIM_SERVE_TOKEN has 5 characters"):
        read_token(None, {"PADIM_SERVE_TOKEN": "short"})


def test_reachable_host_needs_a_token_or_the_explicit_override():
    from padim.serve.security import ServeConfigError, resolve_security

    assert resolve_security("127.0.0.1", environ={}).token is None  # loopback: open, as before
    assert resolve_security("::1", environ={}).warnings == []
    with pytest.raises(ServeConfigError, match="refusing to listen on 0.0.0.0 without a token: set PADIM_SERVE_TOKEN"):
        resolve_security("0.0.0.0", environ={})
    open_ = resolve_security("0.0.0.0", allow_unauthenticated=True, environ={})
    assert open_.token is None and "WITHOUT authentication" in open_.warnings[0]
    locked = resolve_security("0.0.0.0", environ={"PADIM_SERVE_TOKEN": TOKEN})
    assert locked.token == TOKEN and "clear text" in locked.warnings[0]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key (openssl command line)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_files_are_checked_at_start(certificate, tmp_path):
    from padim.serve.security import ServeConfigError, resolve_security

    cert, key = certificate
    good = resolve_security("0.0.0.0", ssl_certfile=cert, ssl_keyfile=key, environ={"PADIM_SERVE_TOKEN": TOKEN})
    assert good.ssl_certfile == cert and good.warnings == []
    with pytest.raises(ServeConfigError, match="needs both"):
        resolve_security("127.0.0.1", ssl_certfile=cert, environ={})
    with pytest.raises(ServeConfigError, match="no such file"):
        resolve_security("127.0.0.1", ssl_certfile=cert, ssl_keyfile=tmp_path / "none.pem", environ={})
    with pytest.raises(ServeConfigError, match="cannot use"):
        resolve_security("127.0.0.1", ssl_certfile=key, ssl_keyfile=cert, environ={})


def test_serve_passes_token_tls_and_drain_timeout_to_uvicorn_and_warns(tiny, certificate, monkeypatch, capsys):
    uvicorn = require("uvicorn")
    from padim.serve.run import serve
    from padim.serve.security import ServeConfigError, resolve_security

    monkeypatch.delenv("PADIM_SERVE_TOKEN", raising=False)
    served_log = logging.getLogger("padim.serve")
    monkeypatch.setattr(served_log, "handlers", [])  # serve() adds one on captured stderr; gone after the test
    monkeypatch.setattr(served_log, "level", served_log.level)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))  # binds nothing
    cert, key = certificate
    security = resolve_security("0.0.0.0", allow_unauthenticated=True, ssl_certfile=cert, ssl_keyfile=key,
                                environ={})
    serve(tiny[0], "0.0.0.0", 8123, 1 << 20, 10**6, security=security, shutdown_timeout=12)
    assert seen["ssl_certfile"] == str(cert) and seen["ssl_keyfile"] == str(key)
    assert seen["timeout_graceful_shutdown"] == 12 and seen["access_log"] is False and seen["host"] == "0.0.0.0"
    err = capsys.readouterr()
    warning = json.loads(next(line for line in err.err.splitlines() if "WITHOUT authentication" in line))
    assert warning["level"] == "WARNING" and "https://0.0.0.0:8123/" in err.out

    from fastapi.testclient import TestClient

    with pytest.raises(ServeConfigError, match="refusing"):
        serve(tiny[0], "10.1.2.3", 8123, 1 << 20, 10**6)  # no settings given: the same check, from the environment
    monkeypatch.setenv("PADIM_SERVE_TOKEN", TOKEN)
    serve(tiny[0], "127.0.0.1", 8123, 1 << 20, 10**6)
    client = TestClient(seen["app"])
    assert client.get("/model").status_code == 401 and client.get("/model", headers=AUTH).status_code == 200


def test_command_refuses_a_reachable_host_without_a_token_before_loading_the_model(tmp_path):
    from click.testing import CliRunner

    from padim.cli import main

    runner = CliRunner()
    missing = str(tmp_path / "none.safetensors")  # never opened: the refusal comes first (else exit 4)
    for host in ["0.0.0.0", "::", "192.168.10.20", "plant-server"]:
        result = runner.invoke(main, ["serve", "--model", missing, "--host", host], env={"PADIM_SERVE_TOKEN": None})
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: refusing to listen on {host} without a token")
        assert "PADIM_SERVE_TOKEN" in lines[0] and "--token-file" in lines[0] and "Traceback" not in result.output
    short = tmp_path / "token"
    short.write_text("abc\n")
    result = runner.invoke(main, ["serve", "--model", missing, "--host", "0.0.0.0", "--token-file", str(short)])
    assert result.exit_code == 2 and "fewer than 16" in result.output
    result = runner.invoke(main, ["serve", "--model", missing, "--token", TOKEN])
    assert result.exit_code == 2 and "No such option" in result.output  # never a token on the command line
    # with a token the start goes on to open the model
    result = runner.invoke(main, ["serve", "--model", missing, "--host", "0.0.0.0"], env={"PADIM_SERVE_TOKEN": TOKEN})
    assert result.exit_code == 4 and "none.safetensors" in result.output
    help_text = runner.invoke(main, ["serve", "--help"]).output
    for option in ["--token-file", "--allow-unauthenticated", "--ssl-certfile", "--ssl-keyfile", "--shutdown-timeout"]:
        assert option in help_text


def test_the_start_up_checks_import_no_web_framework():
    import subprocess
    import sys

    code = ("import sys, padim.serve.security; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'onnxruntime', "
            "'padim.serve.inspector') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- metrics ------------------------------------------------------------------------------------

def test_metrics_count_requests_images_anomalies_and_name_the_model(tiny):
    from padim.serve import Inspector

    client = make_client(tiny[0], TOKEN)
    inspector = Inspector.open(tiny[0])
    labels = [client.post("/predict", content=png_bytes(im), headers=AUTH).json()["label"] for im in tiny[1]]
    batch = client.post("/predict/batch", files=[("files", (f"{i}.png", png_bytes(im))) for i, im in
                                                  enumerate(tiny[1])], headers=AUTH).json()
    labels += [r["label"] for r in batch["results"]]
    client.post("/predict", content=b"not an image", headers=AUTH)
    client.post("/predict", content=png_bytes(tiny[1][0]))  # no token
    client.get("/health")
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE padim_serve_requests_total counter" in response.text
    values = samples(response.text)
    assert requests_total(values, "/predict", "POST", 200) == 4
    assert requests_total(values, "/predict/batch", "POST", 200) == 1
    assert requests_total(values, "/predict", "POST", 400) == 1
    assert requests_total(values, "/predict", "POST", 401) == 1
    assert requests_total(values, "/health", "GET", 200) == 1
    assert values[("padim_serve_images_scored_total", frozenset())] == 8
    assert values[("padim_serve_anomalies_flagged_total", frozenset())] == labels.count("anomaly") > 0
    latency = ("padim_serve_request_duration_seconds_count", frozenset({"route": "/predict"}.items()))
    assert values[latency] == 6
    info = next(dict(k[1]) for k in values if k[0] == "padim_serve_model_info")
    assert info["model_id"] == inspector.model_id and float(info["threshold"]) == inspector.threshold
    assert info["image_size"] == "64x64" and info["format"] == "safetensors"
    assert values[("padim_serve_requests_in_progress", frozenset())] == 1  # the /metrics request itself
    client.get("/whatever/../../etc", headers=AUTH)
    assert requests_total(samples(client.get("/metrics", headers=AUTH).text), "other", "GET", 404) == 1


def test_each_app_counts_in_its_own_registry(tiny):
    from prometheus_client import REGISTRY

    a, b = make_client(tiny[0]), make_client(tiny[0])
    a.post("/predict", content=png_bytes(tiny[1][0]))
    assert requests_total(samples(a.get("/metrics").text), "/predict", "POST", 200) == 1
    assert requests_total(samples(b.get("/metrics").text), "/predict", "POST", 200) == 0
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("padim")]


def test_metrics_speak_openmetrics_when_asked(locked):
    response = locked.get("/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


# --- request ids and logs --------------------------------------------------------------------------

def test_every_answer_carries_a_request_id(tiny):
    from padim.serve import Inspector
    from padim.serve.app import create_app

    client = make_client(tiny[0], TOKEN)
    ids = {client.get("/health").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert client.get("/model").headers["X-Request-ID"]  # 401
    assert client.post("/predict", content=b"x", headers=AUTH).headers["X-Request-ID"]  # 400
    big = client.post("/predict", content=b"x", headers={**AUTH, "Content-Length": str(10**10)})
    assert big.status_code == 413 and big.headers["X-Request-ID"]
    assert client.get("/health", headers={"X-Request-ID": "line-7.cam-2:0042"}).headers["X-Request-ID"] == \
        "line-7.cam-2:0042"  # a proxy's id is kept
    for bad in ["has space", "x" * 65, "new\\nline", "<script>"]:
        assert client.get("/health", headers={"X-Request-ID": bad}).headers["X-Request-ID"] != bad

    from fastapi.testclient import TestClient

    inspector = Inspector.open(tiny[0])
    inspector.score = lambda images: 1 / 0
    broken = TestClient(create_app(inspector, TOKEN), raise_server_exceptions=False)
    response = broken.post("/predict", content=png_bytes(tiny[1][0]), headers=AUTH)
    assert response.status_code == 500 and response.headers["X-Request-ID"] in response.json()["detail"]
    assert "ZeroDivision" not in response.text and "Traceback" not in response.text


def test_one_structured_log_line_per_request(tiny, caplog):
    from padim.serve.run import JsonLines

    client = make_client(tiny[0], TOKEN)
    with caplog.at_level(logging.INFO, logger="padim.serve.access"):
        ok = client.post("/predict", content=png_bytes(tiny[1][2]), headers=AUTH)
        client.post("/predict", content=png_bytes(tiny[1][2]))
        client.get("/health")
    records = [r for r in caplog.records if r.name == "padim.serve.access"]
    assert len(records) == 3
    line = json.loads(JsonLines().format(records[0]))
    assert line["request_id"] == ok.headers["X-Request-ID"] and line["route"] == "/predict"
    assert line["status"] == 200 and line["method"] == "POST" and line["ms"] > 0 and line["images"] == 1
    assert line["client"] == "testclient"
    assert line["score"] == pytest.approx(ok.json()["score"]) and line["flagged"] is (ok.json()["label"] == "anomaly")
    assert line["level"] == "INFO" and line["logger"] == "padim.serve.access" and line["time"].endswith("Z")
    refused, health = (json.loads(JsonLines().format(r)) for r in records[1:])
    assert refused["status"] == 401 and refused["score"] is None and refused["flagged"] is None
    assert health["route"] == "/health" and health["status"] == 200
