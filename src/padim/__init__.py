"""VisA-PaDiM: PaDiM anomaly detection for industrial inspection images.

``from padim import Padim`` loads the model (and torch) on first use, so importing the package,
or its command line, stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .model import Padim, Prediction

__all__ = ["Padim", "Prediction", "__version__"]
__getattr__ = lazy_attributes(__name__, {"Padim": ".model", "Prediction": ".model"})
