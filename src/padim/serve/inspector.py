"""The model behind the service: decode uploaded bytes exactly as the CLI decodes files, score them
one call at a time, draw heat-map overlays. No web framework here, so it is tested on its own."""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..checksums import sha256_of
from ..datasets.images import draft_jpeg, read_image, swaps_sides
from ..export import ExportedModel, OnnxModel, model_id, open_model
from ..reports.overlay import OVERLAY_PNG, overlay

if TYPE_CHECKING:
    from ..model import Padim


class ImageRejected(ValueError):
    """An upload that is not an acceptable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What the service accepts: bytes per image, pixels per image (width x height), images per batch."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_batch: int = 32


@dataclass
class Scored:
    """One scored image: score, verdict, original size, the input-size RGB image and its map."""

    score: float
    label: str | None
    width: int
    height: int
    image: np.ndarray
    amap: np.ndarray


def decode(data: bytes, name: str, size: tuple[int, int], limits: Limits) -> tuple[np.ndarray, int, int]:
    """Uploaded bytes -> (uint8 (h, w, 3) at the model size, original width, original height, upright).

    Follows :func:`padim.datasets.images.read_image` on a file (JPEG draft scale, EXIF rotation,
    bilinear resize), so a served image scores the same as ``padim predict`` on the same file.
    """
    if not data:
        raise ImageRejected(400, f"{name}: empty upload; send the image bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected(413, f"{name}: {len(data)} bytes, the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: refuse huge images before decoding them
            if width * height > limits.max_pixels:
                raise ImageRejected(413, f"{name}: {width}x{height} pixels, the limit is {limits.max_pixels}")
            if swaps_sides(image):
                width, height = height, width
            draft_jpeg(image, size)
            image.load()
            array = np.asarray(read_image(image, size))
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, f"{name}: too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageRejected(400, f"{name}: not an image format this server reads; send a PNG, JPEG, BMP or "
                                 "TIFF file") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise ImageRejected(400, f"{name}: cannot decode image ({exc}); send a PNG, JPEG, BMP or TIFF file") from None
    return array, width, height


class Inspector:
    """A loaded model (native or ONNX) with its id; ``score`` runs one model call at a time, so
    concurrent requests never share or interleave a call."""

    def __init__(self, model: Padim | ExportedModel, path: Path, limits: Limits = Limits(),
                 weights: str | Path | None = None):
        self.model = model
        self.path = path
        self.limits = limits
        self.weights = weights
        self.format = ("onnx" if isinstance(model, OnnxModel) else "openvino" if isinstance(model, ExportedModel)
                       else "safetensors")
        meta = model.meta_
        if self.format != "safetensors" and meta.get("model_id"):
            self.model_id = meta["model_id"]  # the id of the fitted model it was exported from
            self.source_sha256 = meta.get("source_sha256")
        else:
            self.source_sha256 = sha256_of(path)
            self.model_id = model_id(self.source_sha256)
        self.meta = meta
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, limits: Limits = Limits(), weights: str | Path | None = None) -> Inspector:
        """Load a .safetensors, .onnx or .xml (OpenVINO) model file."""
        path = Path(path)
        return cls(open_model(path, weights=weights), path, limits, weights)

    def reopen(self) -> Inspector:
        """The file at the same path loaded again, with the same limits and backbone weights."""
        return Inspector.open(self.path, self.limits, self.weights)

    def warm_up(self) -> None:
        """Score one blank image: a model that loads but cannot score fails here, not on a request
        (and the first request does not pay a runtime's first-call set-up)."""
        h, w = self.image_size
        scores, _, _, _ = self.score([np.zeros((h, w, 3), np.uint8)])
        if scores.shape != (1,) or not np.isfinite(scores).all():
            raise ValueError(f"{self.path}: scoring a blank image gave {scores!r}, not one finite score")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.model.image_size_

    @property
    def threshold(self) -> float | None:
        return self.model.threshold_

    def info(self) -> dict:
        """What GET /model reports."""
        h, w = self.image_size
        return {
            "model_id": self.model_id,
            "format": self.format,
            "file": self.path.name,
            "source_sha256": self.source_sha256,
            "backbone": self.meta.get("backbone", getattr(self.model, "backbone", None)),
            "image_size": [h, w],
            "threshold": self.threshold,
            "map_range": self.model.info_.get("map_range"),
            "n_train": self.model.info_.get("n_train"),
            "model_package_version": self.meta.get("package_version"),
            "server_version": __version__,
            "limits": {"max_bytes": self.limits.max_bytes, "max_pixels": self.limits.max_pixels,
                       "max_batch": self.limits.max_batch},
        }

    def score(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float, float]:
        """uint8 (h, w, 3) images at the model size -> (scores, maps, seconds waited, seconds computed)."""
        batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
        if not isinstance(self.model, ExportedModel):  # an exported model runs without torch
            import torch

            batch = torch.from_numpy(batch)
        asked = time.perf_counter()
        with self._lock:
            start = time.perf_counter()
            parts = list(self.model.iter_predict(batch))
            done = time.perf_counter()
        scores = np.concatenate([p[0] for p in parts])
        maps = np.concatenate([p[1] for p in parts])
        return scores, maps, start - asked, done - start

    def label(self, score: float) -> str | None:
        """'anomaly' above the stored threshold, else 'normal'; None when the model has no threshold."""
        if self.threshold is None:
            return None
        return "anomaly" if score > self.threshold else "normal"

    def overlay_png(self, image: np.ndarray, amap: np.ndarray) -> str:
        """Base64 PNG of the heat map over the image, coloured over the model's stored map range."""
        stored = self.model.info_.get("map_range")
        vrange = (float(stored[0]), float(stored[1])) if stored else (float(amap.min()), float(amap.max()))
        buffer = io.BytesIO()
        Image.fromarray(overlay(image, amap, vrange)).save(buffer, format="PNG", **OVERLAY_PNG)
        return base64.b64encode(buffer.getvalue()).decode("ascii")
