"""The PaDiM model: streaming Gaussian statistics, their whitening, the scoring module, the
estimator, model files."""

from ..errors import ModelFileError
from .factor import whitening_factor
from .io import read_model_file, write_model_file
from .padim import Padim, Prediction
from .scorer import PadimScorer
from .stats import GaussianStats
from .whitening import Whitening

__all__ = [
    "GaussianStats", "ModelFileError", "Padim", "PadimScorer", "Prediction", "Whitening", "read_model_file",
    "whitening_factor", "write_model_file",
]
