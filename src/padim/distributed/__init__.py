"""Scale out on Dask (``pip install 'visa-padim[dask]'``): sharded fit by summing partial
statistics in a tree, and resumable distributed batch scoring.

Workers read images (and the model file) from paths they all see; only file names travel in the
task graph. Each worker keeps the models it has built in a small cache held by a
:class:`ModelCache` worker plugin, so a backbone is loaded once per worker, not once per task.
"""

from .cluster import FIT_SHARD_SIZE, PREDICT_SHARD_SIZE, ClusterError, ModelCache, connect, prepare
from .fit import fit_distributed, fit_job
from .predict import predict_distributed, predict_job

__all__ = [
    "FIT_SHARD_SIZE", "PREDICT_SHARD_SIZE", "ClusterError", "ModelCache", "connect",
    "fit_distributed", "fit_job", "predict_distributed", "predict_job", "prepare",
]
