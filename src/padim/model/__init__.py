"""The PaDiM model: streaming Gaussian statistics, their whitening, the scoring module, the
estimator, model files."""

from ..errors import ModelFileError
from .io import read_model_file, write_model_file
from .padim import Padim, Prediction
from .scorer import PadimScorer
from .stats import GaussianStats, StreamingStats, whitening_factor
from .whitening import CellWhitening, PositionWhitening

__all__ = [
    "CellWhitening", "GaussianStats", "ModelFileError", "Padim", "PadimScorer", "PositionWhitening", "Prediction",
    "read_model_file", "StreamingStats", "whitening_factor", "write_model_file",
]
