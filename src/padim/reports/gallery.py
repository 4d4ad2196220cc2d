"""Gallery tiles for the HTML report, written at evaluation time (the maps are gone afterwards): the
worst misses, the worst false alarms and the top detections, each an image with its heat-map overlay
and ground-truth contour, listed in ``tiles/galleries.json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..atomic import atomic_path, write_text
from .overlay import OVERLAY_PNG, overlay

TILES_DIR = "tiles"
MANIFEST = "galleries.json"
GALLERY_SIZE = 8
CONTOUR_RGB = (255, 0, 255)  # magenta: not in the jet colour map, visible on light and dark parts

# name -> (title shown in the report, which images, highest scores first?)
GALLERIES = {
    "misses": ("Worst misses", "anomalous test images with the lowest scores", False),
    "false_alarms": ("Worst false alarms", "normal test images with the highest scores", True),
    "detections": ("Top detections", "anomalous test images with the highest scores", True),
}


def select(labels: np.ndarray, scores: np.ndarray, k: int = GALLERY_SIZE) -> dict[str, list[int]]:
    """Indices of the images in each gallery, most telling first (ties broken by index)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)

    def pick(idx: np.ndarray, highest: bool) -> list[int]:
        order = np.lexsort((idx, -scores[idx] if highest else scores[idx]))
        return [int(i) for i in idx[order][:k]]

    return {"misses": pick(anomalous, False), "false_alarms": pick(normal, True), "detections": pick(anomalous, True)}


def tile(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, vrange: tuple[float, float]) -> np.ndarray:
    """uint8 (H, W, 3): the heat-map overlay with the ground-truth outline drawn around (not on) each
    defect region, two pixels wide."""
    out = overlay(image, amap, vrange)
    if mask is not None and mask.any():
        mask = np.asarray(mask, bool)
        out[ndimage.binary_dilation(mask, iterations=2) & ~mask] = CONTOUR_RGB
    return out


def save_tile(out_dir: Path, name: str, image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None,
              vrange: tuple[float, float]) -> Path:
    """Write one gallery image's :func:`tile` to ``out_dir/tiles/name`` (PNG)."""
    path = out_dir / TILES_DIR / name
    with atomic_path(path) as tmp:
        Image.fromarray(tile(image, amap, mask, vrange)).save(tmp, format="PNG", **OVERLAY_PNG)
    return path


def write_galleries(out_dir: Path, names: Sequence[str], labels: np.ndarray, scores: np.ndarray,
                    defect_types: Sequence[str], threshold: float | None, figure: Callable[[int], str],
                    k: int = GALLERY_SIZE) -> dict:
    """Write the manifest of every gallery to ``out_dir/tiles/``, listing the tiles of the images
    :func:`select` chose (written by :func:`save_tile` as the figures are drawn).

    names: a unique file name per test image (its tile's too); figure(i) the path, relative to
    ``out_dir``, of image i's full figure ('' for none).
    """
    manifest: dict = {"threshold": threshold, "galleries": {}}
    for key, indices in select(labels, scores, k).items():
        title, what, _ = GALLERIES[key]
        entries = [{"name": names[i], "tile": f"{TILES_DIR}/{names[i]}", "figure": figure(i),
                    "score": float(scores[i]), "label": int(labels[i]), "defect_type": defect_types[i],
                    "flagged": None if threshold is None else bool(scores[i] > threshold)} for i in indices]
        manifest["galleries"][key] = {"title": title, "what": what, "images": entries}
    write_text(out_dir / TILES_DIR / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
