"""Synthetic defects pasted into normal images, each with its exact mask: what ``--auto`` scores
configurations on when only normal images are at hand. Four kinds, sized by the image's shorter
side so they mean the same at any resolution: a patch cut from another normal image (CutPaste,
Li et al., 2021), a colour blob, a thin scratch and a small spot."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("patch", "blob", "scratch", "spot")


def paste_defect(image: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A copy of uint8 (H, W, 3) ``image`` with one defect of ``kind`` (see KINDS) and its bool (H, W)
    mask; ``donor``: the normal image a 'patch' is cut from (default: ``image`` itself)."""
    if kind not in KINDS:
        raise ValueError(f"defect kind must be one of {KINDS}, got {kind!r}")
    h, w = image.shape[:2]
    side = min(h, w)
    out = image.copy()
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "patch":
        source = image if donor is None else np.asarray(
            Image.fromarray(donor).resize((w, h), Image.Resampling.BILINEAR))
        ph, pw = (max(2, int(side * rng.uniform(0.08, 0.16))) for _ in range(2))
        y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        out[y1:y1 + ph, x1:x1 + pw] = source[y0:y0 + ph, x0:x0 + pw]
        draw.rectangle([x1, y1, x1 + pw - 1, y1 + ph - 1], fill=255)
        changed = np.asarray(mask) > 0
        return out, changed & (out != image).any(axis=2)  # where the pasted pixels differ
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    if kind == "blob":
        ry, rx = side * rng.uniform(0.03, 0.08), side * rng.uniform(0.03, 0.08)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "spot":
        r = max(1.5, side * rng.uniform(0.01, 0.02))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:  # a scratch: a thin line in a random direction
        length, angle = side * rng.uniform(0.15, 0.4), rng.uniform(0, np.pi)
        dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=255, width=max(1, round(side * 0.006)))
    region = np.asarray(mask) > 0
    # a colour far from the region's own: the inverse of its mean, pushed away from mid-grey
    mean = image[region].mean(axis=0) if region.any() else np.full(3, 128.0)
    colour = np.where(mean < 128, rng.uniform(170, 255, 3), rng.uniform(0, 85, 3))
    alpha = 1.0 if kind in ("scratch", "spot") else 0.7
    out[region] = np.clip((1 - alpha) * image[region] + alpha * colour, 0, 255).astype(np.uint8)
    return out, region
