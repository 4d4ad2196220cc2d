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
from ..params import PadimParams, stored_threshold
from ..prediction import Prediction, gather_prediction, threshold_labels
from .batches import embedding_groups, image_batches
from .calibration import KeptEmbeddings, calibration_info, calibration_sample, out_of_fold
from .embedding import Embedding, embedding_for
from .io import model_metadata, read_model_file, stats_path, write_model_file, write_stats_file
from .scorer import PadimScorer
from .stats import GaussianStats, JointStats

DEFAULTS = PadimParams()
RUNTIME = ("batch_size", "num_workers", "device", "weights", "progress", "pretrained")
Images = Sequence[ImageSource] | torch.Tensor  # paths, PIL images, HxWx3 uint8 arrays, or uint8 (N, 3, H, W)


class Padim:
    """PaDiM (Defard et al., 2021): one Gaussian per patch position over CNN features.

    Parameters: :class:`padim.params.PadimParams`. Runtime (keyword only): ``batch_size``, ``num_workers``
    (decoders, None = auto), ``device``, ``weights`` (a backbone file), ``progress``, ``pretrained``. As a
    scikit-learn estimator, the constructor only stores its arguments; :meth:`fit` checks them
    and resolves ``d`` and ``sigma``. Fitted: ``params_``, ``scorer_``, ``threshold_``, ``info_``
    (training counts, threshold's promise), ``meta_`` (file metadata), ``stats_`` (the sums, or None).
    """

    def __init__(self, backbone: str = DEFAULTS.backbone, image_size: int | Sequence[int] = DEFAULTS.image_size,
                 d: int | None = DEFAULTS.d, eps: float = DEFAULTS.eps, sigma: float | None = DEFAULTS.sigma,
                 seed: int = DEFAULTS.seed, target_fpr: float = DEFAULTS.target_fpr,
                 calibration_images: int = DEFAULTS.calibration_images, pool: int = DEFAULTS.pool,
                 tap_resize: str = DEFAULTS.tap_resize, factor_dtype: str = DEFAULTS.factor_dtype,
                 covariance: str = DEFAULTS.covariance, top_k: int = DEFAULTS.top_k, scales: Sequence[float] =
                 DEFAULTS.scales, image_score: str = DEFAULTS.image_score, feature_dtype: str = DEFAULTS.feature_dtype,
                 *, batch_size: int = 16, num_workers: int | None = None, device: str = "cpu",
                 weights: str | Path | None = None, progress: bool = False, pretrained: bool = True):
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
        key = (p.backbone, p.d, p.seed, p.pool, p.tap_resize, p.scales, p.image_score == "deep", str(self.device),
               self.weights, self.pretrained, p.feature_dtype)
        if getattr(self, "_extractor", (None,))[0] != key:
            channels, weights = channel_index(sum(get_spec(p.backbone).channels), p.d, p.seed), self.weights
            extractor = FeatureExtractor(p.backbone, channels, weights and Path(weights), self.pretrained, p.pool,
                                         p.tap_resize, scales=p.scales, deep=key[6], feature_dtype=p.feature_dtype)
            self._extractor = (key, extractor.to(torch.device(self.device)))
        return self._extractor[1]

    def embedding(self, size: tuple[int, int] | None = None, params: PadimParams | None = None) -> Embedding:
        """The embedding form of ``size`` inputs (default: the model's), per cell where that is exact."""
        p = params or self.model_params()
        return embedding_for(self.feature_extractor(p), size or p.image_size, p.covariance)

    def fit(self, images: Images) -> Padim:
        """Fit on normal images; the threshold from out-of-fold scores of (a sample of) them."""
        kept = KeptEmbeddings(calibration_sample(len(images), self.model_params().calibration_images, self.seed))
        return self.fit_from_stats(self.accumulate(images, kept=kept), kept)

    @torch.inference_mode()
    def accumulate(self, images: Images, desc: str = "fit", kept: KeptEmbeddings | None = None,
                   into: GaussianStats | JointStats | None = None) -> GaussianStats | JointStats:
        """The statistics of ``images`` (added to ``into`` if given); those of disjoint shards add up
        (``a + b``). ``kept`` keeps the embeddings of the images it names, to score them once fitted."""
        embedding = self.embedding(tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None)
        stats = embedding.stats() if into is None else into
        for blocks in embedding_groups(images, embedding, self.batch_size, self.num_workers, desc, self.progress):
            stats.update(blocks)
            if kept is not None:
                kept.offer(blocks, stats.shift)
        if stats.count == 0:
            raise ValueError("no training images")
        return stats

    @torch.inference_mode()
    def fit_from_stats(self, stats: GaussianStats | JointStats, calibration: KeptEmbeddings | Images = (),
                       history: list | None = None, method: str = "out-of-fold", at: str | None = None) -> Padim:
        """Finish a fit from the statistics of all training images (e.g. summed over shards); the
        threshold from the out-of-fold scores of ``calibration`` (training images in ``stats``, or
        their kept embeddings); ``history``, ``method``, ``at``: see :meth:`set_threshold`."""
        embedding = self.embedding(params=(p := self.model_params()))
        self.scorer_ = None  # a refit frees the previous factor before the new one is built
        self.stats_ = stats = stats.to_layouts(embedding.layouts)  # e.g. per-position sums for a per-cell model
        self.scorer_, self.params_ = PadimScorer.fit(embedding, stats, p), p
        self.info_ = {"calibration_history": list(history or [])}
        return self.set_threshold(*out_of_fold(self.scorer_, calibration, stats, self.batch_size), method, at)

    def set_threshold(self, scores: np.ndarray, median_pixel: float | None, parts: tuple | None = None,
                      method: str = "out-of-fold", at: str | None = None) -> Padim:
        """The threshold for the target false-alarm rate from normal images' ``scores`` (their median map
        value: the heat map's low end; ``parts``: calibration_info's); the history notes ``method``, ``at``."""
        p, stats = self.params_, getattr(self, "stats_", None)
        self.threshold_, info = calibration_info(scores, median_pixel, p.target_fpr, method, self.info_.get(
            "calibration_history"), at, parts, self.info_.get("fusion_scores"))
        self.info_ = {"n_train": self.info_["n_train"] if stats is None else round(stats.count), **info}
        self.meta_ = model_metadata(p, self.scorer_.embedding.grids, self.scorer_.storage,
                                    self.scorer_.extractor.weights_files, self.threshold_, self.info_)
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

    def save(self, path: str | Path, stats: bool = True) -> Path:
        """Write the fitted model to a .safetensors file and, with ``stats``, the statistics it was
        fitted from (if it holds them) beside it (:func:`~padim.model.io.stats_path`), atomically."""
        tensors = self.check_fitted().state(getattr(torch, self.params_.factor_dtype))
        path = write_model_file(Path(path), self.meta_, tensors)
        if stats and getattr(self, "stats_", None) is not None:
            write_stats_file(stats_path(path), self.params_, self.stats_.count, self.stats_.state())
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", weights: str | Path | None = None,
             progress: bool = False) -> Padim:
        """Read a model written by :meth:`save`; never executes code from the file."""
        meta, tensors = read_model_file(path := Path(path))
        try:
            p = PadimParams.from_state(meta)
            model = cls(**asdict(p), device=device, weights=weights, progress=progress)  # BackboneError: weights
            model.scorer_ = PadimScorer.from_state(model.feature_extractor(p), p, meta, tensors)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}; the file was altered or damaged; re-run 'padim fit'") from exc
        model.params_, model.meta_, model.stats_ = p, meta, None
        model.threshold_, model.info_ = stored_threshold(meta)
        return model
