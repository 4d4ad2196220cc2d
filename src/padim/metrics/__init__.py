"""Metrics: AUROC, F1-max and AUPRO for images and pixels, overall and per defect type."""

from .binary import auroc, confusion, f1_max
from .binned import BinnedRanking, Bins
from .evaluate import MetricStream, compute_metrics, metrics_and_curves
from .pro import aupro
from .ranks import Group, Ranking

__all__ = ["BinnedRanking", "Bins", "Group", "MetricStream", "Ranking", "aupro", "auroc", "compute_metrics",
           "confusion", "f1_max", "metrics_and_curves"]
