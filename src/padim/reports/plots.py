"""The report's plots as PNG bytes: ROC curves, precision-recall curves and the score histogram."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

NORMAL_COLOR, ANOMALY_COLOR, THRESHOLD_COLOR = "#2b83ba", "#d7191c", "#222222"


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)  # each plot is laid out tight already: no second crop pass
    plt.close(fig)
    return buffer.getvalue()


def _undefined(ax: plt.Axes, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.35")


def roc_plot(image: dict | None, pixel: dict | None, image_auroc: float | None, pixel_auroc: float | None,
             title: str = "") -> bytes:
    """Image and pixel ROC side by side, AUROC in each legend, ``title`` above; each dict holds 'fpr'
    and 'tpr' (None: undefined, and the plot says so)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, name, c, area in ((axes[0], "Image ROC", image, image_auroc), (axes[1], "Pixel ROC", pixel, pixel_auroc)):
        ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls="--")
        if c is None:
            _undefined(ax, "undefined: the test set\nhas only one class")
        else:
            ax.plot(c["fpr"], c["tpr"], lw=2, label=f"AUROC = {area:.3f}" if area is not None else None)
            ax.legend(loc="lower right")
        ax.set(title=name, xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def pr_plot(image: dict | None, pixel: dict | None) -> bytes:
    """Image and pixel precision-recall curves; each dict holds 'recall', 'precision', 'ap'."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, name, c in ((axes[0], "Image precision-recall", image), (axes[1], "Pixel precision-recall", pixel)):
        if c is None:
            _undefined(ax, "undefined: the test set\nhas only one class")
        else:
            ax.plot(c["recall"], c["precision"], lw=2, color="#7b3294", label=f"AP = {float(c['ap']):.3f}")
            ax.legend(loc="lower left")
        ax.set(title=name, xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def histogram_plot(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> bytes:
    """Image scores of normal and anomalous test images in shared bins, the stored threshold as a line."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    values = scores if threshold is None else np.r_[scores, threshold]
    bins = np.histogram_bin_edges(values, bins=min(40, max(10, scores.size // 4)))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for label, name, color in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALY_COLOR)):
        part = scores[labels == label]
        if part.size:
            ax.hist(part, bins=bins, color=color, alpha=0.6, label=f"{name} ({part.size})")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOR, ls="--", lw=2, label=f"stored threshold {threshold:.2f}")
    ax.set(title="Image scores of the test set", xlabel="Image anomaly score", ylabel="Images")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)
