"""The PaDiM model: streaming Gaussian statistics, the scoring module, the estimator, model files."""

from .io import ModelFileError, load_model, read_model_file, save_model
from .padim import Padim, Prediction
from .scorer import PadimScorer
from .stats import GaussianStats, StreamingStats, whitening_factor

__all__ = [
    "GaussianStats", "ModelFileError", "Padim", "PadimScorer", "Prediction", "load_model",
    "read_model_file", "save_model", "StreamingStats", "whitening_factor",
]
