"""padim.serve: the HTTP API on a small synthetic model (and the real one where it matters)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import require, texture, write_png
from live_server import running_server
from padim import Padim
from padim.export import export_onnx


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model path, ONNX path, native model, test images) for a tiny synthetic model."""
    require("fastapi")
    require("onnxruntime")
    rng = np.random.default_rng(0)
    model = Padim(image_size=64, d=16, sigma=4.0, num_workers=0).fit(
        [texture(rng) for _ in range(16)])
    folder = tmp_path_factory.mktemp("served")
    path = model.save(folder / "model.safetensors")
    onnx_path = export_onnx(model, folder / "model.onnx", source=path)
    images = [texture(rng), texture(rng), texture(rng, defect=True), texture(rng, defect=True)]
    return path, onnx_path, Padim.load(path), images


def client_for(path, **limits):
    from fastapi.testclient import TestClient

    from padim.serve import Inspector, Limits
    from padim.serve.app import create_app

    return TestClient(create_app(Inspector.open(path, Limits(**limits))), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(served):
    return client_for(served[0])


def test_health_and_model_metadata(client, served):
    from padim.checksums import sha256_of

    model_id = sha256_of(served[0])[:12]
    assert client.get("/health").json() == {"status": "ok", "model_id": model_id}
    info = client.get("/model").json()
    assert info["model_id"] == model_id and info["format"] == "safetensors" and info["image_size"] == [64, 64]
    assert info["threshold"] == served[2].threshold_ and info["limits"]["max_batch"] == 32


def test_predict_raw_and_multipart_score_like_the_cli_path(client, served, tmp_path):
    _, _, model, images = served
    files = [write_png(tmp_path / f"{i}.png", image) for i, image in enumerate(images)]
    expected = model.predict(files)
    for i, f in enumerate(files):
        raw = client.post("/predict", content=f.read_bytes(), headers={"Content-Type": "image/png"})
        multi = client.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
        assert raw.status_code == multi.status_code == 200, raw.text
        a, b = raw.json(), multi.json()
        # the deep image score is a sum of z-scores: compared near 0 on its own scale
        assert a["score"] == pytest.approx(float(expected.scores[i]), rel=1e-5, abs=1e-4) and a["score"] == b["score"]
        assert a["label"] == ("anomaly" if expected.labels[i] else "normal") and b["filename"] == f.name
        assert a["threshold"] == model.threshold_ and (a["width"], a["height"]) == (64, 64)
        assert a["overlay_png"] is None and a["timing"]["total_ms"] >= a["timing"]["inference_ms"] > 0
    assert {r["label"] for r in [client.post("/predict", content=f.read_bytes()).json() for f in files]} == {
        "normal", "anomaly"}


def test_overlay_is_a_png_at_the_model_size(client, served):
    body = client.post("/predict?overlay=true", content=png_bytes(served[3][2])).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (64, 64) and overlay.mode == "RGB"


def test_batch_scores_each_image_in_order(client, served):
    images = served[3]
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    body = client.post("/predict/batch", files=files).json()
    singles = [client.post("/predict", content=png_bytes(im)).json()["score"] for im in images]
    assert [r["filename"] for r in body["results"]] == ["0.png", "1.png", "2.png", "3.png"]
    assert np.allclose([r["score"] for r in body["results"]], singles, rtol=1e-5, atol=1e-4)


def test_bad_uploads_get_a_clear_4xx(served):
    client = client_for(served[0], max_bytes=20_000, max_pixels=100 * 100, max_batch=2)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8))
    jpeg = png_bytes(texture(np.random.default_rng(1)), "JPEG")
    cases = [
        (client.post("/predict", content=b""), 400, "empty upload"),
        (client.post("/predict", content=b"hello, not an image"), 400, "not an image format"),
        (client.post("/predict", content=jpeg[:-300]), 400, "cannot decode"),
        (client.post("/predict", content=big), 413, "limit"),
        (client.post("/predict", content=png_bytes(np.zeros((101, 100, 3), np.uint8))), 413, "101 pixels"),
        (client.post("/predict", files={"other": ("x.png", jpeg, "image/png")}), 400, "'file' field"),
        (client.post("/predict/batch", files=[("files", ("a.png", jpeg)), ("files", ("b.txt", b"nope"))]), 400,
         "b.txt: not an image"),
        (client.post("/predict/batch", files=[("files", (f"{i}.jpg", jpeg)) for i in range(3)]), 413,
         "limit per batch"),
        (client.post("/predict", content=jpeg, headers={"Content-Length": str(10**9)}), 413, "larger than"),
    ]
    for response, status, says in cases:
        assert response.status_code == status, response.text
        assert says in response.json()["detail"] and "Traceback" not in response.text
    assert client.post("/predict", content=jpeg).status_code == 200  # still serving


def test_openapi_schema_lists_routes_with_their_bodies_and_responses(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {"/health", "/model", "/predict", "/predict/batch"}
    assert set(paths["/health"]) == set(paths["/model"]) == {"get"}
    predict = paths["/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/octet-stream"} <= set(content)
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert [p["name"] for p in predict["parameters"]] == ["overlay"]

    def ref(op, code):
        return op["responses"][code]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]

    assert ref(predict, "200") == "PredictResponse" and ref(predict, "400") == ref(predict, "413") == "Error"
    batch = paths["/predict/batch"]["post"]
    assert ref(batch, "200") == "BatchResponse" and "multipart/form-data" in batch["requestBody"]["content"]
    assert ref(paths["/model"]["get"], "200") == "ModelInfo" and ref(paths["/health"]["get"], "200") == "Health"
    components = schema["components"]["schemas"]
    assert {"score", "label", "threshold", "model_id", "timing", "overlay_png"} <= set(
        components["PredictResponse"]["properties"])
    assert components["PredictResponse"]["required"][:2] == ["filename", "score"]


def test_page_is_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "http://" not in page.text and "https://" not in page.text


def test_onnx_model_serves_the_same_scores(client, served):
    onnx_client = client_for(served[1])
    assert onnx_client.get("/model").json()["format"] == "onnx"
    assert onnx_client.get("/health").json() == client.get("/health").json()  # same fitted model, same id
    for image in served[3]:
        a = client.post("/predict", content=png_bytes(image)).json()
        b = onnx_client.post("/predict", content=png_bytes(image)).json()
        assert b["score"] == pytest.approx(a["score"], rel=1e-4) and a["label"] == b["label"]


def test_concurrent_requests_get_the_single_request_scores(served):
    httpx = require("httpx")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    bodies = [png_bytes(im) for im in served[3]]
    with running_server(create_app(Inspector.open(served[0]))) as url, httpx.Client(base_url=url) as http:
        reference = [http.post("/predict", content=b).json()["score"] for b in bodies]

        def call(i: int) -> tuple[int, float]:
            r = http.post("/predict", content=bodies[i % len(bodies)], timeout=60)
            return i % len(bodies), r.json()["score"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(32)))
    assert all(score == reference[k] for k, score in results), (reference, results)


def test_reports_the_upright_original_size_of_a_jpeg(client):
    image = Image.fromarray(np.full((200, 300, 3), 128, np.uint8))
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": shown as 200 wide, 300 high
    image.save(buffer, format="JPEG", exif=exif)
    body = client.post("/predict", content=buffer.getvalue()).json()
    assert (body["width"], body["height"]) == (200, 300)


@pytest.mark.parametrize("size", [(100, 400), (400, 100)])
def test_an_upload_decodes_to_the_pixels_read_image_gives_its_file(tmp_path, size):
    from padim.datasets import read_image
    from padim.serve.inspector import Limits, decode

    y, x = np.mgrid[0:800, 0:1600]
    path = tmp_path / "wide.jpg"
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)).save(path, quality=90)
    served, width, height = decode(path.read_bytes(), path.name, size, Limits())
    assert (width, height) == (1600, 800)
    assert np.array_equal(served, np.asarray(read_image(path, size)))  # the same JPEG draft scale too


def test_serve_command_help_and_missing_model(tmp_path):
    from click.testing import CliRunner

    from padim.cli import main

    text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--host" in text and "--port" in text and "--max-upload-mb" in text
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "none.onnx")])
    assert result.exit_code == 4 and "none.onnx" in result.output and "Traceback" not in result.output


def test_a_bug_is_a_500_without_internals(served):
    from fastapi.testclient import TestClient

    from padim.serve import Inspector
    from padim.serve.app import create_app

    inspector = Inspector.open(served[0])

    def broken(images):
        raise RuntimeError("secret internals")

    inspector.score = broken
    client = TestClient(create_app(inspector), raise_server_exceptions=False)
    response = client.post("/predict", content=png_bytes(served[3][0]))
    assert response.status_code == 500 and "internal error" in response.json()["detail"]
    assert "secret" not in response.text and "Traceback" not in response.text
