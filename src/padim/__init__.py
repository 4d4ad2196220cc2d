"""VisA-PaDiM: PaDiM anomaly detection for industrial inspection images."""

__version__ = "0.1.0"

from .model import Padim, Prediction  # noqa: E402

__all__ = ["Padim", "Prediction", "__version__"]
