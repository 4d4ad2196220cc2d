"""Metrics: AUROC, F1-max and AUPRO for images and pixels, overall and per defect type."""

from .curves import auroc, confusion, f1_max
from .evaluate import compute_metrics
from .pro import aupro, pro_curve

__all__ = ["aupro", "auroc", "compute_metrics", "confusion", "f1_max", "pro_curve"]
