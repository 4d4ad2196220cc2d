"""Threshold-free detection metrics: AUROC and F1-max, for images or pixels."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < int(labels.sum()) < labels.size


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    labels = np.asarray(labels).ravel().astype(bool)
    if not _both_classes(labels):
        return None
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """Best F1 over all thresholds and the threshold that gives it (an oracle: it sees labels)."""
    labels = np.asarray(labels).ravel().astype(bool)
    if not _both_classes(labels):
        return None, None
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int | float | None]:
    """TP/FP/TN/FN counts with precision, recall and F1 of binary predictions."""
    labels = np.asarray(labels).astype(bool).ravel()
    predicted = np.asarray(predicted).astype(bool).ravel()
    tp = int(np.sum(labels & predicted))
    fp = int(np.sum(~labels & predicted))
    fn = int(np.sum(labels & ~predicted))
    tn = int(np.sum(~labels & ~predicted))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall, "f1": f1}
