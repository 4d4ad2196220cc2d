"""Metrics: AUROC, F1-max and AUPRO for images and pixels, overall and per defect type."""

from .binary import auroc, confusion, f1_max
from .evaluate import compute_metrics, metrics_and_curves
from .pro import aupro
from .ranks import Group, Ranking

__all__ = ["Group", "Ranking", "aupro", "auroc", "compute_metrics", "confusion", "f1_max", "metrics_and_curves"]
