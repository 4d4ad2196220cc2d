"""Metrics of one set of binary labels and scores (images or pixels): AUROC, F1-max, confusion."""

from __future__ import annotations

import numpy as np

from .ranks import Group, Ranking


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    return Ranking([Group.of(scores, labels)]).auroc()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """Best F1 over all thresholds (score >= threshold is flagged) and the threshold that gives it
    (an oracle: it sees labels)."""
    return Ranking([Group.of(scores, labels)]).f1_max()


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
