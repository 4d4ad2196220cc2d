"""The PaDiM estimator: fit on normal images, predict anomaly maps and scores for new ones."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..backbones import FeatureExtractor, channel_index, get_spec
from ..datasets.images import ImageSource
from ..errors import ModelFileError
from ..params import PadimParams
from ..prediction import Prediction, gather_prediction, threshold_labels
from .batches import embedding_groups, image_batches
from .calibration import calibrate, calibration_split, score_and_add
from .embedding import Embedding, embedding_for
from .io import model_metadata, read_model_file, write_model_file
from .scorer import PadimScorer
from .stats import GaussianStats

DEFAULTS = PadimParams()
RUNTIME = ("batch_size", "num_workers", "device", "weights", "progress", "pretrained")
Images = Sequence[ImageSource] | torch.Tensor  # paths, PIL images, HxWx3 uint8 arrays, or uint8 (N, 3, H, W)


def _take(images: Images, idx: np.ndarray) -> Images:
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, dtype=torch.long)]
    return [images[i] for i in idx]


class Padim:
    """PaDiM (Defard et al., 2021): one Gaussian per patch position over CNN features.

    Parameters and their meaning: :class:`padim.params.PadimParams`. Runtime settings (keyword only,
    not part of the model): ``batch_size``, ``num_workers`` (decoding processes, None = auto),
    ``device``, ``weights`` (a backbone file), ``progress``, ``pretrained=False`` (tests only).

    As a scikit-learn estimator, the constructor only stores its arguments; :meth:`fit` checks them
    and resolves ``d`` and ``sigma`` into ``params_``. Fitted attributes: ``params_``, ``scorer_``,
    ``threshold_``, ``info_`` (training counts, heat-map range) and ``meta_`` (the model file's metadata).
    """

    def __init__(self, backbone: str = DEFAULTS.backbone, image_size: int | Sequence[int] = DEFAULTS.image_size,
                 d: int | None = DEFAULTS.d, eps: float = DEFAULTS.eps, sigma: float | None = DEFAULTS.sigma,
                 seed: int = DEFAULTS.seed, calibration_fraction: float = DEFAULTS.calibration_fraction,
                 threshold_quantile: float = DEFAULTS.threshold_quantile, pool: int = DEFAULTS.pool,
                 tap_resize: str = DEFAULTS.tap_resize, factor_dtype: str = DEFAULTS.factor_dtype,
                 covariance: str = DEFAULTS.covariance, top_k: int = DEFAULTS.top_k,
                 scales: Sequence[float] = DEFAULTS.scales, image_score: str = DEFAULTS.image_score,
                 *, batch_size: int = 16, num_workers: int | None = None,
                 device: str = "cpu", weights: str | Path | None = None, progress: bool = False,
                 pretrained: bool = True):
        self.set_params(**{name: value for name, value in locals().items() if name in (*PadimParams.names(), *RUNTIME)})

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's contract): the model's, then the runtime ones."""
        return {name: getattr(self, name) for name in (*PadimParams.names(), *RUNTIME)}

    def set_params(self, **params) -> Padim:
        """Change constructor arguments; a fitted model keeps its fit until the next :meth:`fit`."""
        for name, value in params.items():
            if name not in (*PadimParams.names(), *RUNTIME):
                raise ValueError(f"unknown parameter {name!r} of Padim")
            setattr(self, name, value)
        return self

    def model_params(self) -> PadimParams:
        """The model's parameters as they stand, checked and resolved (see PadimParams.resolved)."""
        return PadimParams(**{name: getattr(self, name) for name in PadimParams.names()}).resolved()

    def feature_extractor(self, params: PadimParams | None = None) -> FeatureExtractor:
        """The backbone with its channel subset for ``params`` (default: :meth:`model_params`),
        built on first use and kept while the settings it depends on stay the same."""
        p = params or self.model_params()
        key = (p.backbone, p.d, p.seed, p.pool, p.tap_resize, p.scales, str(self.device), self.weights, self.pretrained)
        if getattr(self, "_extractor", (None,))[0] != key:
            channels = channel_index(sum(get_spec(p.backbone).channels), p.d, p.seed)
            weights = Path(self.weights) if self.weights is not None else None
            self._extractor = (key, FeatureExtractor(p.backbone, channels, weights, self.pretrained, p.pool,
                                                     p.tap_resize, scales=p.scales).to(torch.device(self.device)))
        return self._extractor[1]

    def embedding(self, size: tuple[int, int] | None = None, params: PadimParams | None = None) -> Embedding:
        """The embedding form of ``size`` inputs (default: the model's), per cell where that is exact."""
        p = params or self.model_params()
        return embedding_for(self.feature_extractor(p), size or p.image_size, p.covariance)

    def calibration_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (fit, calibration) of ``n`` training images; the hold-out is fixed by ``seed``."""
        return calibration_split(n, self.model_params().calibration_fraction, self.seed)

    def fit(self, images: Images) -> Padim:
        """Fit on normal images."""
        fit_idx, cal_idx = self.calibration_split(len(images))
        return self.fit_from_stats(self.accumulate(_take(images, fit_idx)), _take(images, cal_idx), len(images))

    @torch.inference_mode()
    def accumulate(self, images: Images, desc: str = "fit") -> GaussianStats:
        """The statistics of ``images``; partial results of disjoint shards add up (``a + b``)."""
        size = tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None
        embedding = self.embedding(size)
        stats = embedding.stats()
        for blocks in embedding_groups(images, embedding, self.batch_size, self.num_workers, desc, self.progress):
            stats.update(blocks)
        if stats.count == 0:
            raise ValueError("no training images")
        return stats

    @torch.inference_mode()
    def fit_from_stats(self, stats: GaussianStats, calibration: Images = (), n_train: int | None = None) -> Padim:
        """Finish a fit from accumulated statistics (e.g. summed over shards), updated in place: the
        ``calibration`` images are scored by the model of ``stats`` alone (they set the threshold),
        then added to ``stats`` before the final factor is computed."""
        p = self.model_params()
        embedding = self.embedding(params=p)
        if stats.positions != embedding.positions:
            raise ValueError(f"statistics have {stats.positions} positions, the {p.image_size} input at scales "
                             f"{list(p.scales)} gives grids {embedding.grids}")
        stats = stats.to_layouts(embedding.layouts)  # e.g. per-position sums for a per-cell model
        scores, maps = np.empty(0), np.empty(0)
        if len(calibration):
            scores, maps = score_and_add(PadimScorer.fit(embedding, stats, p), stats, calibration, self.batch_size,
                                         self.progress)
        self.scorer_ = None  # a refit frees the previous factor before the new one is built
        self.scorer_ = PadimScorer.fit(embedding, stats, p)
        self.params_ = p
        self.threshold_, self.info_ = calibrate(scores, maps, n_train or stats.count, p.threshold_quantile)
        self.meta_ = model_metadata(p, embedding.grids, self.scorer_.storage, embedding.extractor.weights_files,
                                    self.threshold_, self.info_)
        return self

    def check_fitted(self) -> PadimScorer:
        """The fitted scorer; RuntimeError when the model is not fitted yet."""
        if getattr(self, "scorer_", None) is None:
            raise RuntimeError("this Padim is not fitted yet; call fit() or Padim.load()")
        return self.scorer_

    @property
    def image_size_(self) -> tuple[int, int]:
        """(height, width) the fitted model takes (and its maps have)."""
        return self.check_fitted().image_size

    @torch.inference_mode()
    def iter_predict(self, images: Images, desc: str = "predict") -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (scores (B,), maps (B, H, W)) batch by batch, so large sets stream."""
        scorer = self.check_fitted()
        for batch, out in image_batches(images, scorer.embedding, self.batch_size, self.num_workers, desc,
                                        self.progress):
            yield tuple(t.cpu().numpy() for t in scorer(batch, out))

    def predict(self, images: Images) -> Prediction:
        """Anomaly scores, maps and labels (at the stored threshold) for all images."""
        return gather_prediction(self.iter_predict(images), self.image_size_, self.labels)

    def labels(self, scores: np.ndarray) -> np.ndarray | None:
        """1 where a score exceeds the stored threshold, else 0 (None without a threshold)."""
        return threshold_labels(scores, self.threshold_)

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a .safetensors file (atomically); returns the path."""
        tensors = self.check_fitted().state(getattr(torch, self.params_.factor_dtype))
        return write_model_file(Path(path), self.meta_, tensors)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", weights: str | Path | None = None,
             progress: bool = False) -> Padim:
        """Read a model written by :meth:`save`; never executes code from the file."""
        path = Path(path)
        meta, tensors = read_model_file(path)
        try:
            p = PadimParams.from_state(meta)
            model = cls(**asdict(p), device=device, weights=weights, progress=progress)
            # builds the backbone (BackboneError: weights)
            model.scorer_ = PadimScorer.from_state(model.feature_extractor(p), p, meta, tensors)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}; the file was altered or damaged; re-run 'padim fit'") from exc
        model.params_, model.meta_ = p, meta
        model.threshold_ = None if meta["threshold"] is None else float(meta["threshold"])
        model.info_ = {k: meta.get(k) for k in ("n_train", "n_calibration", "calibration_scores", "map_range")}
        return model
