"""Heat-map overlays: an anomaly map in the heat colour map, blended over its image."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path

HEAT_CMAP = "jet"


@cache
def heat_table() -> np.ndarray:
    """The heat colour map as a (256, 3) uint8 table: colouring a map is then one lookup per pixel."""
    import matplotlib  # here: scoring one image should not wait for matplotlib unless it draws

    return np.rint(matplotlib.colormaps[HEAT_CMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def map_range(stored: list[float] | None, maps: np.ndarray) -> tuple[float, float]:
    """The heat maps' colour range: the model's ``stored`` one (from its held-out normal images), else
    these maps' own."""
    if stored:
        return float(stored[0]), float(stored[1])
    return float(maps.min()), float(maps.max())


def heat_colors(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """uint8 (H, W, 3): the map in the heat colour map over ``vrange`` (clipped at both ends)."""
    lo, hi = vrange
    index = np.clip((np.asarray(amap, np.float32) - lo) * (255 / max(hi - lo, 1e-12)), 0, 255)
    return heat_table()[np.rint(index).astype(np.uint8)]


def overlay(image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image blended with the heat map coloured over ``vrange``."""
    blended = (1 - alpha) * np.asarray(image, np.float32) + alpha * heat_colors(amap, vrange)
    return np.rint(blended).astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float]) -> Path:
    """Write the heat-map overlay of one image as PNG."""
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, amap, vrange)).save(tmp, format="PNG")
    return path
