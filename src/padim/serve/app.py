"""The HTTP API (FastAPI): score uploaded images, report the model, serve the page at ``/``.

POST /predict takes one image as a multipart upload (field ``file``) or as the raw request body;
``?overlay=true`` adds the heat-map overlay as a base64 PNG (``overlay_png``) to the JSON.
Errors are JSON ``{"detail": "..."}`` with a 4xx status; nothing answers with a stack trace.
"""

from __future__ import annotations

import logging
import time
from importlib.resources import files
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from .. import __version__
from .inspector import ImageRejected, Inspector, decode

log = logging.getLogger("padim.serve")


class Timing(BaseModel):
    decode_ms: float = Field(description="decoding and resizing the upload(s)")
    queue_ms: float = Field(description="waiting for the model (calls run one at a time)")
    inference_ms: float = Field(description="the model call")
    total_ms: float = Field(description="the whole request, as seen by the server")


class Prediction(BaseModel):
    filename: str | None = Field(description="the uploaded file's name, when it had one")
    score: float = Field(description="image anomaly score (max of the anomaly map)")
    label: Literal["anomaly", "normal"] | None = Field(description="verdict at the threshold; null without one")
    threshold: float | None = Field(description="the model's stored threshold (score > threshold = anomaly)")
    model_id: str
    width: int = Field(description="original image width in pixels")
    height: int = Field(description="original image height in pixels")
    overlay_png: str | None = Field(None, description="base64 PNG heat-map overlay at the model size (?overlay=true)")


class PredictResponse(Prediction):
    timing: Timing


class BatchResponse(BaseModel):
    model_id: str
    results: list[Prediction]
    timing: Timing


class Health(BaseModel):
    status: Literal["ok"]
    model_id: str


class Limits(BaseModel):
    max_bytes: int
    max_pixels: int
    max_batch: int


class ModelInfo(BaseModel):
    model_id: str = Field(description="first 12 hex digits of the fitted model file's sha256")
    format: Literal["safetensors", "onnx"]
    file: str
    source_sha256: str | None
    backbone: str | None
    image_size: list[int] = Field(description="[height, width] the images are resized to")
    threshold: float | None
    map_range: list[float] | None = Field(description="heat-map colour range [low, high]")
    n_train: int | None
    model_package_version: str | None
    server_version: str
    limits: Limits


class Error(BaseModel):
    detail: str


ERRORS = {400: {"model": Error, "description": "not an image, or no image sent"},
          413: {"model": Error, "description": "upload or image too large"}}

IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/png": IMAGE_BODY, "image/jpeg": IMAGE_BODY, "application/octet-stream": IMAGE_BODY,
}}}


def _prediction(inspector: Inspector, name: str | None, image, amap, score: float, width: int, height: int,
                with_overlay: bool) -> dict:
    return {"filename": name, "score": float(score), "label": inspector.label(float(score)),
            "threshold": inspector.threshold, "model_id": inspector.model_id, "width": width, "height": height,
            "overlay_png": inspector.overlay_png(image, amap) if with_overlay else None}


async def _read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"upload of {length} bytes is larger than the limit of {limit} bytes")


def create_app(inspector: Inspector) -> FastAPI:
    """The FastAPI application serving ``inspector``'s model."""
    # no /docs or /redoc: they load their scripts from a CDN and the service must work offline;
    # the schema itself is at /openapi.json
    app = FastAPI(title="VisA-PaDiM inspection service", version=__version__, docs_url=None, redoc_url=None,
                  description="Anomaly score, verdict and heat map for an image of a part. " + (__doc__ or ""))
    limits = inspector.limits

    @app.middleware("http")
    async def refuse_oversized(request: Request, call_next):
        # before any body is read: the largest legal request is a full batch of full-size images
        length = request.headers.get("content-length")
        cap = limits.max_bytes * limits.max_batch + 1024 * 1024
        if length is not None and length.isdigit() and int(length) > cap:
            return JSONResponse({"detail": f"request of {length} bytes is larger than the limit of {cap} bytes"},
                                status_code=413)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not bad input: log it here, answer without internals
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    async def _score(uploads: list[tuple[str | None, bytes]], with_overlay: bool) -> tuple[list[dict], Timing]:
        start = time.perf_counter()
        decoded = []
        for i, (name, data) in enumerate(uploads):
            label = name or (f"image {i + 1}" if len(uploads) > 1 else "upload")
            try:
                decoded.append(await run_in_threadpool(decode, data, label, inspector.image_size, limits))
            except ImageRejected as exc:
                raise HTTPException(exc.status, str(exc)) from None
        decoded_at = time.perf_counter()
        scores, maps, waited, computed = await run_in_threadpool(inspector.score, [d[0] for d in decoded])
        results = [
            _prediction(inspector, name, image, amap, score, w, h, with_overlay)
            for (name, _), (image, w, h), score, amap in zip(uploads, decoded, scores, maps, strict=True)
        ]
        timing = Timing(decode_ms=1000 * (decoded_at - start), queue_ms=1000 * waited, inference_ms=1000 * computed,
                        total_ms=1000 * (time.perf_counter() - start))
        return results, timing

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(files("padim.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health, summary="Liveness: the model is loaded")
    def health() -> dict:
        return {"status": "ok", "model_id": inspector.model_id}

    @app.get("/model", response_model=ModelInfo, summary="The served model's metadata and the upload limits")
    def model_info() -> dict:
        return inspector.info()

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
              summary="Score one image (multipart field 'file', or the raw image bytes as the body)")
    async def predict(request: Request, overlay: Annotated[bool, Query(
            description="also return the heat-map overlay as a base64 PNG in 'overlay_png'")] = False) -> dict:
        _check_length(request, limits.max_bytes + 64 * 1024)  # multipart framing on top of the image
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("file")
            if not isinstance(upload, StarletteUpload):
                raise HTTPException(400, "multipart request without a 'file' field; send the image as 'file'")
            name, data = upload.filename, await upload.read(limits.max_bytes + 1)
        else:
            name, data = None, await _read_limited(request, limits.max_bytes)
        results, timing = await _score([(name, data)], overlay)
        return {**results[0], "timing": timing}

    @app.post("/predict/batch", response_model=BatchResponse, responses=ERRORS,
              summary="Score several images (multipart, one 'files' field per image)")
    async def predict_batch(files: Annotated[list[UploadFile], File(description="the images")],
                            overlay: Annotated[bool, Query(description="add base64 PNG overlays")] = False) -> dict:
        if len(files) > limits.max_batch:
            raise HTTPException(413, f"{len(files)} images, the limit per batch is {limits.max_batch}")
        uploads = [(f.filename, await f.read(limits.max_bytes + 1)) for f in files]
        results, timing = await _score(uploads, overlay)
        return {"model_id": inspector.model_id, "results": results, "timing": timing}

    return app
