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
from .overlay import overlay

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


def write_galleries(out_dir: Path, names: Sequence[str], labels: np.ndarray, scores: np.ndarray,
                    defect_types: Sequence[str], maps: np.ndarray, threshold: float | None,
                    vrange: tuple[float, float], load: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
                    figure: Callable[[int], str], k: int = GALLERY_SIZE) -> dict:
    """Write the tiles of every gallery image to ``out_dir/tiles/`` and the manifest beside them.

    names: a unique file name per test image; load(i) gives image i and its mask (or None) at the
    map size; figure(i) the path, relative to ``out_dir``, of its full figure ('' for none).
    """
    chosen = select(labels, scores, k)
    written: set[int] = set()
    manifest: dict = {"threshold": threshold, "galleries": {}}
    for key, indices in chosen.items():
        title, what, _ = GALLERIES[key]
        entries = []
        for i in indices:
            rel = f"{TILES_DIR}/{names[i]}"
            if i not in written:
                image, mask = load(i)
                with atomic_path(out_dir / rel) as tmp:
                    Image.fromarray(tile(image, maps[i], mask, vrange)).save(tmp, format="PNG")
                written.add(i)
            entries.append({"name": names[i], "tile": rel, "figure": figure(i), "score": float(scores[i]),
                            "label": int(labels[i]), "defect_type": defect_types[i],
                            "flagged": None if threshold is None else bool(scores[i] > threshold)})
        manifest["galleries"][key] = {"title": title, "what": what, "images": entries}
    write_text(out_dir / TILES_DIR / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
