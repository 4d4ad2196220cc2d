"""The HTTP API (FastAPI): score uploaded images, report the model, serve the page at ``/``.

POST /predict takes one image as a multipart upload (field ``file``) or as the raw request body;
``?overlay=true`` adds the heat-map overlay as a base64 PNG (``overlay_png``) to the JSON.
Errors are JSON ``{"detail": "..."}`` with a 4xx status; nothing answers with a stack trace.
With a token, every route but ``/`` (the page) and ``/health`` needs ``Authorization: Bearer <token>``
(else 401). ``/metrics`` is the Prometheus text format. Every answer carries an ``X-Request-ID``.
A request is answered by the model served when it started, also when the model file is reloaded meanwhile.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .inspector import ImageRejected, Inspector, decode
from .metrics import ServeMetrics
from .reload import ModelSlot
from .security import bearer_token, token_matches
from .window import ScoreWindow, target_fpr

log = logging.getLogger("padim.serve")
access_log = logging.getLogger("padim.serve.access")

OPEN_PATHS = frozenset({"/", "/health"})  # the page must load to ask for the token; liveness probes carry none
REQUEST_ID = "X-Request-ID"
# an id from a proxy in front is kept so logs line up; anything else is replaced, never echoed into the log
_GOOD_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
    format: Literal["safetensors", "onnx", "openvino"]
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
    loaded_at: str = Field(description="when this model was loaded (UTC, ISO 8601)")
    file_fingerprint: str = Field(description="mtime_ns:size:inode of the model file when it was loaded")
    reloads: int = Field(description="model reloads since the service started (the file replaced, or SIGHUP)")


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


class Gate:
    """The outermost layer: request id, bearer-token check, metrics and one log line per request.

    Pure ASGI rather than ``@app.middleware``, so it sees the status of every answer, the 401s it
    gives itself and the 500 of a bug included, and can put the request id on all of them.
    """

    def __init__(self, app: ASGIApp, token: str | None, metrics: ServeMetrics, routes: frozenset[str]):
        self.app, self.token, self.metrics, self.routes = app, token, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        offered = headers.get(REQUEST_ID.lower(), "")
        request_id = offered if _GOOD_ID.fullmatch(offered) else uuid.uuid4().hex
        path, method = scope["path"], scope["method"]
        route = path if path in self.routes else "other"  # bounded label values, whatever clients ask for
        state = scope.setdefault("state", {})  # the routes leave the scores here for the log line
        status = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID] = request_id
            await send(message)

        self.metrics.in_progress.inc()
        try:
            if self.token is not None and path not in OPEN_PATHS:
                presented = bearer_token(headers.get("authorization"))
                if not token_matches(presented, self.token):
                    detail = "missing bearer token" if presented is None else "invalid token"
                    challenge = 'Bearer realm="padim"' + ("" if presented is None else ', error="invalid_token"')
                    response = JSONResponse({"detail": f"{detail}; send the header 'Authorization: Bearer <token>'"},
                                            status_code=401, headers={"WWW-Authenticate": challenge})
                    await response(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = status or 499  # the client left before its upload arrived: nobody to answer, no bug
        except Exception:
            # a bug, not bad input: the log gets the traceback and the id, the client only the id
            log.exception("internal error on %s %s (request %s)", method, path, request_id)
            if status is not None:
                raise  # the answer has started; the server closes the connection
            response = JSONResponse({"detail": f"internal error; the server log has the details (request "
                                               f"{request_id})"}, status_code=500)
            await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            final = 500 if status is None else status
            self.metrics.in_progress.dec()
            self.metrics.observe(route, method, final, seconds)
            scores, labels = state.get("scores"), state.get("labels")
            client = scope.get("client")
            access_log.info("%s %s %s", method, path, final, extra={"fields": {
                "request_id": request_id, "method": method, "route": route, "status": final,
                "client": client[0] if client else None,
                "ms": round(1000 * seconds, 2),
                "score": max(scores) if scores else None,
                "flagged": None if not labels or None in labels else "anomaly" in labels,
                "images": len(scores) if scores else 0,
            }})


def create_app(model: Inspector | ModelSlot, token: str | None = None, window: int = 500) -> FastAPI:
    """The FastAPI application serving ``model`` (an inspector, or a slot whose model can be replaced);
    with ``token``, all routes but the page and /health need it as a bearer token. Metrics go to the
    app's own registry (``app.state.metrics``); ``window`` images make the recent window
    (``app.state.window``), started over when a reload brings another model."""
    # no /docs or /redoc: they load their scripts from a CDN and the service must work offline;
    # the schema itself is at /openapi.json
    app = FastAPI(title="VisA-PaDiM inspection service", version=__version__, docs_url=None, redoc_url=None,
                  description="Anomaly score, verdict and heat map for an image of a part. " + (__doc__ or ""))
    slot = model if isinstance(model, ModelSlot) else ModelSlot(model)
    limits = slot.current.limits  # a reload opens the file with the same limits
    recent = ScoreWindow(window, target_fpr(slot.current.meta), slot.current.model_id)

    def new_model(old: Inspector, new: Inspector) -> None:
        if new.model_id != old.model_id:  # another model's scores and threshold: not comparable
            recent.reset(new.model_id, target_fpr(new.meta))

    slot.listeners.append(new_model)
    metrics = ServeMetrics(slot, recent)
    app.state.metrics, app.state.window, app.state.slot = metrics, recent, slot

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
        # Gate answers a route's bug itself (with the request id); this catches a bug in Gate
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500)

    async def _score(request: Request, inspector: Inspector, uploads: list[tuple[str | None, bytes]],
                     with_overlay: bool) -> tuple[list[dict], Timing]:
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
        labels = [r["label"] for r in results]
        metrics.scored(labels)
        request.state.scores, request.state.labels = [r["score"] for r in results], labels
        recent.add(inspector.model_id, request.state.scores, [None if x is None else x == "anomaly" for x in labels])
        timing = Timing(decode_ms=1000 * (decoded_at - start), queue_ms=1000 * waited, inference_ms=1000 * computed,
                        total_ms=1000 * (time.perf_counter() - start))
        return results, timing

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(files("padim.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health, summary="Liveness: the model is loaded")
    def health() -> dict:
        return {"status": "ok", "model_id": slot.current.model_id}

    @app.get("/model", response_model=ModelInfo, summary="The served model's metadata and the upload limits")
    def model_info() -> dict:
        loaded = slot.loaded
        stamp = loaded.fingerprint[0]
        return {**loaded.inspector.info(), "reloads": slot.reloads,
                "loaded_at": datetime.fromtimestamp(loaded.at, UTC).isoformat(timespec="milliseconds"),
                "file_fingerprint": "missing" if stamp is None else ":".join(map(str, stamp))}

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
        results, timing = await _score(request, slot.current, [(name, data)], overlay)
        return {**results[0], "timing": timing}

    @app.post("/predict/batch", response_model=BatchResponse, responses=ERRORS,
              summary="Score several images (multipart, one 'files' field per image)")
    async def predict_batch(request: Request, files: Annotated[list[UploadFile], File(description="the images")],
                            overlay: Annotated[bool, Query(description="add base64 PNG overlays")] = False) -> dict:
        if len(files) > limits.max_batch:
            raise HTTPException(413, f"{len(files)} images, the limit per batch is {limits.max_batch}")
        uploads = [(f.filename, await f.read(limits.max_bytes + 1)) for f in files]
        inspector = slot.current  # this request's model, from decoding to the answer
        results, timing = await _score(request, inspector, uploads, overlay)
        return {"model_id": inspector.model_id, "results": results, "timing": timing}

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    if token is not None:
        _declare_bearer(app)
    routes = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    app.add_middleware(Gate, token=token, metrics=metrics, routes=routes)
    return app


def _declare_bearer(app: FastAPI) -> None:
    """Say in /openapi.json that the API takes a bearer token (Gate enforces it), /health excepted."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()  # FastAPI caches it; the edits below are idempotent
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        for operation in schema["paths"].get("/health", {}).values():
            operation["security"] = []
        return schema

    app.openapi = openapi
