"""Figures: the seed's 5-panel picture per image."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from .overlay import HEAT_CMAP, overlay  # noqa: E402


def boundary(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels whose 4-neighbourhood (edges repeated outward) holds both values of
    ``mask``: the thick boundary of scikit-image's ``mark_boundaries(mode='thick')``."""
    padded = np.pad(np.asarray(mask, bool), 1, mode="edge")
    centre, up, down = padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1]
    left, right = padded[1:-1, :-2], padded[1:-1, 2:]
    return (centre | up | down | left | right) & ~(centre & up & down & left & right)


class FivePanel:
    """The seed's per-image figure: image, ground truth, heat map with colour bar, predicted mask,
    segmentation boundary on the image (prediction = map above the stored threshold).

    matplotlib lays the figure out and draws its frame (panel titles, the colour bar of the one
    colour range all images share) once; each image then only fills the five panels' pixel boxes
    with its own pictures, resized as matplotlib would show them, and gets its title in the
    figure's font. Drawing a whole matplotlib figure per image cost most of an evaluation.
    """

    DPI = 80
    TITLE_PT = 10

    def __init__(self, size: tuple[int, int], threshold: float | None, vrange: tuple[float, float]):
        self.size, self.threshold, self.vrange = tuple(size), threshold, vrange
        fig, axes = plt.subplots(1, 5, figsize=(15, 3.4), dpi=self.DPI)
        blank = np.zeros(self.size)
        for ax, name in zip(axes, ["Image", "Ground truth", "Heat map", "Predicted mask", "Segmentation result"],
                            strict=True):
            ax.axis("off")
            ax.set_title(name)
            ax.imshow(blank, cmap=HEAT_CMAP if name == "Heat map" else "gray", vmin=0, vmax=1)
        heat = axes[2].images[0]
        heat.set_clim(*vrange)
        heat.set_alpha(0.5)  # as the heat map is shown over the image: the colour bar takes its alpha
        fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
        title = fig.suptitle("Title", fontsize=self.TITLE_PT)
        for ax in axes:
            for image in ax.images:
                image.set_visible(False)  # the frame has white panels; each figure fills them
        fig.draw_without_rendering()  # lays the figure out for the measures below; the frames are drawn after
        renderer = fig.canvas.get_renderer()
        height = fig.bbox.height
        crop = fig.get_tightbbox(renderer).padded(0.1).transformed(fig.dpi_scale_trans)
        x0, top = int(np.floor(crop.x0)), int(np.floor(height - crop.y1))
        x1, bottom = int(np.ceil(crop.x1)), int(np.ceil(height - crop.y0))
        x0, top = max(x0, 0), max(top, 0)

        def box(extent) -> tuple[int, int, int, int]:
            return (int(round(height - extent.y1)) - top, int(round(height - extent.y0)) - top,
                    int(round(extent.x0)) - x0, int(round(extent.x1)) - x0)

        self.boxes = [box(ax.get_window_extent(renderer)) for ax in axes]
        title_box = title.get_window_extent(renderer)
        self.title_xy = ((title_box.x0 + title_box.x1) / 2 - x0, height - title_box.y1 - top)
        title.set_visible(False)  # each image's own title is written into the frame
        frames = {}
        for has_mask in (True, False):
            axes[1].title.set_text("Ground truth" if has_mask else "Ground truth (none)")
            fig.canvas.draw()
            frames[has_mask] = np.asarray(fig.canvas.buffer_rgba())[top:bottom, x0:x1, :3].copy()
        self.frames = frames
        font = font_manager.findfont(title.get_fontproperties())
        self.font = ImageFont.truetype(font, size=round(self.TITLE_PT * self.DPI / 72))
        plt.close(fig)

    def render(self, image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, title: str) -> np.ndarray:
        """uint8 (H, W, 3): the figure of one image (uint8 RGB at the map's size), its mask (None:
        none) and map."""
        predicted = amap > self.threshold if self.threshold is not None else np.zeros(amap.shape, bool)
        segmented = image.copy()
        segmented[boundary(predicted)] = (255, 0, 0)
        # the masks are resized as one grey channel (the same bytes as each of three, a third of the work)
        panels = [image, np.asarray(mask if mask is not None else np.zeros(amap.shape, bool), np.uint8) * np.uint8(255),
                  overlay(image, amap, self.vrange), predicted.astype(np.uint8) * np.uint8(255), segmented]
        canvas = self.frames[mask is not None].copy()
        for (r0, r1, c0, c1), panel in zip(self.boxes, panels, strict=True):
            shown = np.asarray(Image.fromarray(panel).resize((c1 - c0, r1 - r0), Image.Resampling.BILINEAR))
            canvas[r0:r1, c0:c1] = shown if shown.ndim == 3 else shown[..., None]
        picture = Image.fromarray(canvas)
        ImageDraw.Draw(picture).text(self.title_xy, title, fill=(0, 0, 0), font=self.font, anchor="ma")
        return np.asarray(picture)

    def save(self, path: Path, image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, title: str) -> Path:
        """Write :meth:`render`'s figure as PNG."""
        with atomic_path(path) as tmp:
            Image.fromarray(self.render(image, mask, amap, title)).save(tmp, format="PNG", compress_level=1)
        return path

