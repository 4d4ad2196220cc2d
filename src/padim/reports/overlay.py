"""Heat-map overlays: an anomaly map in the heat colour map, blended over its image."""

from __future__ import annotations

import zlib
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path

# PNG options for heat-map overlays (photographs): zlib's Huffman-only strategy (Pillow's
# compress_type) encodes several times faster than the default level and, as LZ matching finds
# little in a photograph, into files no larger (smaller than level 1's by a sixth)
OVERLAY_PNG = {"compress_type": zlib.Z_HUFFMAN_ONLY}
HEAT_CMAP = "jet"  # the reports' matplotlib figures use it by name; JET below is the same map
# matplotlib's "jet" as (position, value) knots per channel, linear in between; written out so that
# colouring a heat map does not import matplotlib (tests compare the table with matplotlib's)
JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _ramp(knots: tuple[tuple[float, float], ...], n: int = 256) -> np.ndarray:
    """``n`` evenly spaced samples of the piecewise-linear map through ``knots``, in the order of
    operations matplotlib uses (np.interp's differs in the last bit, which moves exact halves of
    the uint8 table's rounding)."""
    x = np.array([k[0] for k in knots]) * (n - 1)
    y = np.array([k[1] for k in knots])
    at = (n - 1) * np.linspace(0, 1, n)
    j = np.clip(np.searchsorted(x, at), 1, len(x) - 1)
    return (at - x[j - 1]) / (x[j] - x[j - 1]) * (y[j] - y[j - 1]) + y[j - 1]


@cache
def heat_table() -> np.ndarray:
    """The heat colour map as a (256, 3) uint8 table: colouring a map is then one lookup per pixel."""
    rgb = np.stack([_ramp(JET[channel]) for channel in ("red", "green", "blue")], axis=1)
    return np.rint(rgb * 255).astype(np.uint8)


def map_range(stored: list[float] | None, maps: np.ndarray) -> tuple[float, float]:
    """The heat maps' colour range: the model's ``stored`` one (from its normal images' out-of-fold maps), else
    these maps' own."""
    if stored:
        return float(stored[0]), float(stored[1])
    return float(maps.min()), float(maps.max())


def heat_colors(amap: np.ndarray, vrange: tuple[float, float]) -> np.ndarray:
    """uint8 (H, W, 3): the map in the heat colour map over ``vrange`` (clipped at both ends)."""
    lo, hi = vrange
    index = np.clip((np.asarray(amap, np.float32) - lo) * (255 / max(hi - lo, 1e-12)), 0, 255)
    return heat_table().take(np.rint(index).astype(np.uint8), axis=0)  # take: a few times faster than []


@cache
def _blend_table(alpha: float) -> np.ndarray:
    """(65536,) uint8: at ``image value * 256 + heat value``, the two blended as ``overlay`` blends
    them (image weighted 1 - alpha in float32, heat alpha), rounded."""
    values = np.arange(256)
    blended = (1 - alpha) * values.astype(np.float32)[:, None] + alpha * values.astype(np.uint8)[None, :]
    return np.rint(blended).astype(np.uint8).ravel()


def overlay(image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the uint8 RGB ``image`` blended with the heat map coloured over ``vrange``."""
    # a lookup of each (image, heat) byte pair: the same bytes as blending in floating point, without
    # its temporary arrays (several times faster; the figures blend every test image)
    pairs = np.asarray(image, np.uint8).astype(np.uint16) << 8
    pairs |= heat_colors(amap, vrange)
    return _blend_table(float(alpha)).take(pairs)


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float]) -> Path:
    """Write the heat-map overlay of one image as PNG."""
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, amap, vrange)).save(tmp, format="PNG", **OVERLAY_PNG)
    return path
