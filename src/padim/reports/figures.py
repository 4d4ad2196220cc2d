"""Figures: the ROC plot of an evaluation, the seed's 5-panel picture per image, heat-map overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.segmentation import mark_boundaries  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..atomic import atomic_path  # noqa: E402

HEAT_CMAP = "jet"


def _save(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_figure(path: Path, image_labels: np.ndarray, image_scores: np.ndarray,
               pixel_labels: np.ndarray | None, pixel_scores: np.ndarray | None,
               image_auroc: float | None, pixel_auroc: float | None, title: str = "") -> Path:
    """Image ROC and pixel ROC side by side, AUROC in each legend; undefined curves say so."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    curves = [("Image ROC", image_labels, image_scores, image_auroc),
              ("Pixel ROC", pixel_labels, pixel_scores, pixel_auroc)]
    for ax, (name, labels, scores, area) in zip(axes, curves, strict=True):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        if area is not None:
            fpr, tpr, _ = roc_curve(np.ravel(labels).astype(bool), np.ravel(scores))
            ax.plot(fpr, tpr, lw=2, label=f"AUROC = {area:.3f}")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "undefined: the test set\nhas only one class", ha="center", va="center")
        ax.set(title=name, xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def overlay(image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float], alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image blended with the heat map coloured over ``vrange``."""
    lo, hi = vrange
    norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = plt.get_cmap(HEAT_CMAP)(norm)[..., :3]
    blended = np.clip((1 - alpha) * image / 255.0 + alpha * heat, 0, 1)
    return np.rint(blended * 255).astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, vrange: tuple[float, float]) -> Path:
    """Write the heat-map overlay of one image as PNG."""
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(image, amap, vrange)).save(tmp, format="PNG")
    return path


def five_panel(path: Path, image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray,
               threshold: float | None, vrange: tuple[float, float], title: str) -> Path:
    """The seed's per-image figure: image, ground truth, heat map with colour bar, predicted mask,
    segmentation boundary on the image (prediction = map above the stored threshold)."""
    predicted = amap > threshold if threshold is not None else np.zeros(amap.shape, bool)
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(image)
    axes[0].set_title("Image")
    axes[1].imshow(mask if mask is not None else np.zeros(amap.shape), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("Ground truth" if mask is not None else "Ground truth (none)")
    axes[2].imshow(image)
    heat = axes[2].imshow(amap, cmap=HEAT_CMAP, alpha=0.5, vmin=vrange[0], vmax=vrange[1])
    axes[2].set_title("Heat map")
    fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
    axes[3].imshow(predicted, cmap="gray", vmin=0, vmax=1)
    axes[3].set_title("Predicted mask")
    axes[4].imshow(mark_boundaries(image, predicted, color=(1, 0, 0), mode="thick"))
    axes[4].set_title("Segmentation result")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=80)
