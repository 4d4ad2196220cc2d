"""The PaDiM estimator: fit on normal images, predict anomaly maps and scores for new ones."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import FeatureExtractor, channel_index, get_spec
from ..datasets.images import ImageFiles, ImageSource
from ..errors import ModelFileError
from ..params import PadimParams
from ..prediction import Prediction, gather_prediction, threshold_labels
from .cells import BlockStats, CellStats
from .embedding import CellEmbedding, PositionEmbedding, embedding_for
from .io import read_model_file, write_model_file
from .scorer import PadimScorer, build_scorer
from .stats import GaussianStats, StreamingStats, whitening_factors

DEFAULTS = PadimParams()
RUNTIME = ("batch_size", "num_workers", "device", "weights", "progress", "pretrained")


# batches per statistics update, written into one buffer: each update reads and writes all the
# float32 sums, so it is bound by memory traffic at one small batch; a buffer of a few batches
# stays smaller than the sums
STATS_GROUP = 4


def decode_workers(requested: int | None, n_images: int, batch_size: int) -> int:
    """Decoding processes: as requested, else up to 2 when there is more than one batch to decode
    and cores that torch's threads leave free (decoders that compete with torch's threads for the
    same cores slow fit and predict down; see docs/performance.md)."""
    if requested is not None:
        return requested
    spare = (os.cpu_count() or 1) - torch.get_num_threads()
    return max(0, min(2, spare)) if n_images > batch_size else 0


def _take(images: Sequence[ImageSource] | torch.Tensor, idx: np.ndarray) -> Sequence[ImageSource] | torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, dtype=torch.long)]
    return [images[i] for i in idx]


def stored_factor(factor: torch.Tensor, dtype: str) -> torch.Tensor:
    """``factor`` rounded to the precision a model file keeps (``dtype``), so that a fitted model
    scores exactly as it will once saved and loaded."""
    target = getattr(torch, dtype)
    return factor if target == factor.dtype else factor.to(target).to(factor.dtype)


class Padim:
    """PaDiM (Defard et al., 2021): one Gaussian per patch position over CNN features.

    Parameters
    ----------
    backbone: registered backbone name (see ``padim.backbones.list_backbones()``).
    image_size: (height, width) in pixels, or N for N x N; the CLI's default keeps the training
        images' aspect ratio at 320 px on the shorter side (VisA: 320x480).
    d: number of feature channels kept (fixed random subset, PaDiM's reduction); None keeps every
        channel of a backbone with at most 200 (MobileNetV2: 152) and 100 of larger ones (PaDiM's
        ResNet-18 setting), since scoring costs d^2 per position.
    eps: added to each covariance diagonal; keeps it invertible with few images.
    sigma: Gaussian blur of the upsampled map, in input pixels (0 = none); None scales PaDiM's
        4 px at 256 px with the input: 4 * shorter side / 256.
    seed: fixes the channel subset and the calibration hold-out.
    calibration_fraction: share of the training images held out to set the threshold; they are
        scored by the model fit without them, then merged into the final statistics.
    threshold_quantile: the threshold is this quantile of the held-out normal image scores.
    pool: average each feature tap over a pool x pool neighbourhood (1 = plain PaDiM; default 3).
    tap_resize: 'nearest' (default, PaDiM's) or 'bilinear' resizing of the deeper taps to the
        stride-4 grid. With 'nearest' on CPU, where each deeper grid divides the finest evenly
        (320x480 and its 0.7 level do), fit and predict work once per deep cell instead of once
        per position, and the model keeps its factor per cell (:mod:`padim.model.cells`): the
        same numbers, faster, in less memory, with fewer stored values.
    factor_dtype: precision of the whitening factor kept and stored, 'float16' (half the model file)
        or 'float32'; scoring runs in float32 either way (see docs/model-size.md).
    covariance: 'eps' (sample covariance + eps*I, PaDiM) or 'oas' (OAS shrinkage + eps*I).
    top_k: image score = mean of the top_k largest map values (1 = max, PaDiM).
    image_score: what the image score ranks: 'map' (default: the smoothed, averaged map, PaDiM) or
        'levels' (each pyramid level's unsmoothed distances over 2x2 positions, averaged over the
        levels; the stored threshold is then in its units, not the map's); see AnomalyMaps.
    scales: input scales of a feature pyramid: one Gaussian per position of each, the maps of all
        scales averaged (default (1.0, 0.7): the coarser level sees more context per patch, which
        helps large defects; (1.0,) = plain PaDiM).

    Runtime settings (keyword only; they do not change the model):
    batch_size, num_workers: batches for the backbone and decoding processes (None = auto).
    device: 'cpu' or 'cuda'. weights: a backbone weights file, if not the default source.
    progress: show progress bars. pretrained=False: random backbone weights (tests only).

    As a scikit-learn estimator, the constructor only stores its arguments; they are checked, and
    ``d`` and ``sigma`` resolved, by :meth:`fit` into ``params_``. Fitted attributes: ``params_``
    (:class:`padim.params.PadimParams`), ``scorer_``, ``threshold_``, ``info_`` (training counts,
    heat-map range) and ``meta_`` (the model file's metadata).
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
        self.backbone = backbone
        self.image_size = image_size
        self.d = d
        self.eps = eps
        self.sigma = sigma
        self.seed = seed
        self.calibration_fraction = calibration_fraction
        self.threshold_quantile = threshold_quantile
        self.pool = pool
        self.tap_resize = tap_resize
        self.factor_dtype = factor_dtype
        self.covariance = covariance
        self.top_k = top_k
        self.scales = scales
        self.image_score = image_score
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.weights = weights
        self.progress = progress
        self.pretrained = pretrained

    # ----------------------------------------------------------------- parameters
    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's contract): the model's, then the runtime ones."""
        return {name: getattr(self, name) for name in (*PadimParams.names(), *RUNTIME)}

    def set_params(self, **params) -> Padim:
        """Change constructor arguments; a fitted model keeps its fit until the next :meth:`fit`."""
        for name, value in params.items():
            if name not in self.get_params():
                raise ValueError(f"unknown parameter {name!r} of Padim")
            setattr(self, name, value)
        return self

    def model_params(self) -> PadimParams:
        """The model's parameters as they stand, checked and resolved (see PadimParams.resolved)."""
        return PadimParams(**{name: getattr(self, name) for name in PadimParams.names()}).resolved()

    # ----------------------------------------------------------------- feature extraction
    def feature_extractor(self, params: PadimParams | None = None) -> FeatureExtractor:
        """The backbone with its channel subset for ``params`` (default: :meth:`model_params`),
        built on first use and kept while the settings it depends on stay the same."""
        p = params or self.model_params()
        key = (p.backbone, p.d, p.seed, p.pool, p.tap_resize, p.scales, str(self.device), self.weights,
               self.pretrained)
        cached = getattr(self, "_extractor", None)
        if cached is None or cached[0] != key:
            channels = channel_index(sum(get_spec(p.backbone).channels), p.d, p.seed)
            weights = Path(self.weights) if self.weights is not None else None
            extractor = FeatureExtractor(p.backbone, channels, weights, self.pretrained, p.pool, p.tap_resize,
                                         scales=p.scales).to(torch.device(self.device))
            self._extractor = cached = (key, extractor)
        return cached[1]

    def embedding(self, size: tuple[int, int] | None = None, params: PadimParams | None = None) -> PositionEmbedding:
        """The embedding form of ``size`` inputs (default: the model's), cell by cell where it can be."""
        p = params or self.model_params()
        return embedding_for(self.feature_extractor(p), size or p.image_size)

    def _batches(self, images: Sequence[ImageSource] | torch.Tensor, embedding: PositionEmbedding, desc: str,
                 fork: bool = True, buffer_images: int | None = None) -> Iterator[tuple[torch.Tensor, object]]:
        """uint8 (B, 3, H, W) batches on the model's device, decoded in worker processes (in this one
        if not ``fork``), each with the one embedding buffer (of ``buffer_images`` images, default
        one batch; None off the CPU or for a lone image) they are all written into."""
        if isinstance(images, torch.Tensor):
            batches = images.split(self.batch_size)
        else:
            workers = decode_workers(self.num_workers, len(images), self.batch_size) if fork else 0
            batches = torch.utils.data.DataLoader(
                ImageFiles(images, embedding.size), batch_size=self.batch_size, num_workers=workers,
            )
        out = None
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
            # no buffer for a lone image: predicting one image runs the network once
            if out is None and embedding.device.type == "cpu" and max(len(batch), buffer_images or 0) > 1:
                out = embedding.buffer(buffer_images or self.batch_size)
            yield batch.to(embedding.device), out

    def _embedding_groups(self, images: Sequence[ImageSource] | torch.Tensor, embedding: PositionEmbedding,
                          desc: str, group: int) -> Iterator[object]:
        """Embeddings of up to ``group`` images at a time (one batch at a time off the CPU): batch
        after batch is written into one buffer, handed on when the next would not fit."""
        filled, out = 0, None
        for batch, out in self._batches(images, embedding, desc, buffer_images=group):
            if out is None:
                yield embedding(batch)
                continue
            if filled + len(batch) > group:
                yield embedding.filled(out, filled)
                filled = 0
            embedding(batch, embedding.window(out, filled, group))
            filled += len(batch)
        if filled:
            yield embedding.filled(out, filled)

    # ----------------------------------------------------------------- fit
    def calibration_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (fit, calibration) of ``n`` training images; the hold-out is fixed by ``seed``."""
        fraction = self.model_params().calibration_fraction
        n_cal = int(round(fraction * n)) if fraction > 0 else 0
        if fraction > 0 and n >= 3:
            n_cal = max(n_cal, 1)
        if n - n_cal < 2:
            raise ValueError(f"need at least {n_cal + 2} training images, got {n}")
        order = np.random.default_rng(self.seed).permutation(n)
        return np.sort(order[n_cal:]), np.sort(order[:n_cal])

    def fit(self, images: Sequence[ImageSource] | torch.Tensor) -> Padim:
        """Fit on normal images (paths, PIL images, HxWx3 uint8 arrays, or a uint8 (N,3,H,W) tensor)."""
        fit_idx, cal_idx = self.calibration_split(len(images))
        return self.fit_from_stats(self.fit_statistics(_take(images, fit_idx)), _take(images, cal_idx),
                                   n_train=len(images))

    @torch.inference_mode()
    def running_stats(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "fit",
                      ) -> StreamingStats | BlockStats:
        """The running sums of ``images``, per cell where the embeddings have cells, else per
        position, before their conversion to float64 statistics (``.stats()``, once)."""
        size = tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None
        embedding = self.embedding(size)
        stats = embedding.running_stats()
        # the embedding buffer is freed on return, before the float64 sums are made
        for emb in self._embedding_groups(images, embedding, desc, STATS_GROUP * self.batch_size):
            stats.update(emb)
        if stats.count == 0:
            raise ValueError("no training images")
        return stats

    def accumulate(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "fit",
                   ) -> GaussianStats | CellStats:
        """Float64 statistics of ``images``; partial results of disjoint shards add up (``a + b``)."""
        return self.running_stats(images, desc).stats()

    def fit_statistics(self, images: Sequence[ImageSource] | torch.Tensor) -> GaussianStats | BlockStats:
        """The statistics of ``images`` in the form :meth:`fit` hands to :meth:`fit_from_stats`."""
        stats = self.running_stats(images)
        # cell sums are used as they are: their float64 form, twice the size, is only for merging
        return stats if isinstance(stats, BlockStats) else stats.stats()

    @torch.inference_mode()
    def fit_from_stats(self, stats: GaussianStats | CellStats | BlockStats,
                       calibration: Sequence[ImageSource] | torch.Tensor = (), n_train: int | None = None) -> Padim:
        """Finish a fit from accumulated statistics (e.g. summed over shards).

        The ``calibration`` images are scored by the model from ``stats`` alone (they set the
        threshold), then their statistics are merged in before the final factor is computed.
        ``stats`` is updated in place (the calibration scorer keeps its own copy of what it needs).
        """
        p = self.model_params()
        embedding = self.embedding(params=p)
        if stats.positions != embedding.positions:
            h, w = p.image_size
            raise ValueError(f"statistics have {stats.positions} positions, the {h}x{w} input at scales "
                             f"{list(p.scales)} gives grids {embedding.grids}")
        if isinstance(stats, CellStats | BlockStats) and not isinstance(embedding, CellEmbedding):
            # e.g. summed on CPU workers, finished on a GPU
            stats = (stats.stats() if isinstance(stats, BlockStats) else stats).expand()
        cal_scores, cal_maps = np.empty(0), np.empty(0)
        if len(calibration):
            scorer = self._scorer(stats, embedding, p)
            # cell sums already in float64 (summed on workers) take the held-out images' running sums
            held_out = embedding.running_stats() if isinstance(stats, CellStats) else stats
            scores, maps = [], []
            # decoded here: with forked decoders alive, each page of the statistics the merge writes
            # would first be copied (copy-on-write)
            for batch, out in self._batches(calibration, embedding, "calibrate", fork=False):
                emb = embedding(batch, out)
                m, s = scorer.score(emb)  # merged after scoring: the scorer has not seen these images
                held_out.update(emb)
                maps.append(m.cpu().numpy())
                scores.append(s.cpu().numpy())
            del scorer  # frees its factor before the final one is built
            if held_out is not stats:
                held_out.stats(into=stats)
            cal_scores, cal_maps = np.concatenate(scores), np.concatenate(maps)
        self.scorer_ = None  # a refit frees the previous factor before the new one is built
        self.scorer_ = self._scorer(stats, embedding, p)
        self.params_ = p
        self._calibrate(cal_scores, cal_maps, stats.count if n_train is None else n_train, p.threshold_quantile)
        self.meta_ = self.metadata()
        return self

    def _scorer(self, stats: GaussianStats | CellStats | BlockStats, embedding: PositionEmbedding,
                p: PadimParams) -> PadimScorer:
        factors = whitening_factors(stats, p.eps, p.covariance)  # chunk by chunk into the whitening
        return build_scorer(embedding, stats.mean(), ((part, stored_factor(f, p.factor_dtype)) for part, f in factors),
                            p.sigma, p.top_k, p.image_score)

    def _calibrate(self, scores: np.ndarray, maps: np.ndarray, n_train: int, quantile: float) -> None:
        self.threshold_ = float(np.quantile(scores, quantile)) if scores.size else None
        low = float(np.median(maps)) if maps.size else None
        high = None
        if self.threshold_ is not None and low is not None:
            high = self.threshold_ + max(self.threshold_ - low, 1e-6)
        self.info_ = {
            "n_train": n_train,
            "n_calibration": int(scores.size),
            "calibration_scores": {
                "min": float(scores.min()), "median": float(np.median(scores)), "max": float(scores.max()),
            } if scores.size else None,
            # colour range for heat maps: the median normal pixel at the bottom, threshold mid-scale
            "map_range": [low, high] if high is not None else None,
        }

    # ----------------------------------------------------------------- predict
    def check_fitted(self) -> PadimScorer:
        """The fitted scorer; RuntimeError when the model is not fitted yet."""
        scorer = getattr(self, "scorer_", None)
        if scorer is None:
            raise RuntimeError("this Padim is not fitted yet; call fit() or Padim.load()")
        return scorer

    @property
    def image_size_(self) -> tuple[int, int]:
        """(height, width) the fitted model takes (and its maps have)."""
        return self.check_fitted().image_size

    @torch.inference_mode()
    def iter_predict(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "predict",
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (scores (B,), maps (B, H, W)) batch by batch, so large sets stream."""
        scorer = self.check_fitted()
        for batch, out in self._batches(images, scorer.embedding, desc):
            maps, scores = scorer(batch, out)
            yield scores.cpu().numpy(), maps.cpu().numpy()

    def predict(self, images: Sequence[ImageSource] | torch.Tensor) -> Prediction:
        """Anomaly scores, maps and labels (at the stored threshold) for all images."""
        return gather_prediction(self.iter_predict(images), self.image_size_, self.labels)

    def labels(self, scores: np.ndarray) -> np.ndarray | None:
        """1 where a score exceeds the stored threshold, else 0 (None without a threshold)."""
        return threshold_labels(scores, self.threshold_)

    # ----------------------------------------------------------------- model files
    def metadata(self) -> dict:
        """What a model file says of this fitted model besides its tensors: its parameters, the
        backbone's taps and normalization, the grids, the threshold and the training counts."""
        scorer, p = self.check_fitted(), self.params_
        spec = get_spec(p.backbone)
        h, w = p.image_size
        return {
            **p.to_state(),
            "backbone_source": spec.source,
            "taps": list(spec.taps),
            "grids": [list(g) for g in scorer.maps.grids],
            "storage": scorer.storage,
            "normalization": {"mean": list(spec.mean), "std": list(spec.std), "input": "RGB uint8 / 255"},
            "resize": "bilinear, square" if h == w else "bilinear",
            "threshold": self.threshold_,
            **self.info_,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a .safetensors file (atomically); returns the path."""
        tensors = self.check_fitted().state(getattr(torch, self.params_.factor_dtype))
        return write_model_file(Path(path), self.metadata(), tensors)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", weights: str | Path | None = None,
             progress: bool = False) -> Padim:
        """Read a model written by :meth:`save`; never executes code from the file."""
        path = Path(path)
        meta, tensors = read_model_file(path)
        try:
            p = PadimParams.from_state(meta)
            model = cls(**asdict(p), device=device, weights=weights, progress=progress)
            embedding = model.embedding(params=p)  # builds the backbone (BackboneError: weights), probes its grids
            if [list(g) for g in embedding.grids] != meta["grids"]:
                raise ValueError(f"grids {meta['grids']} do not match the {embedding.grids} of image size "
                                 f"{list(p.image_size)}")
            model.scorer_ = PadimScorer.from_state(embedding, tensors, meta["storage"],
                                                   getattr(torch, p.factor_dtype), p.sigma, p.top_k,
                                                   p.image_score)
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc}; the file was altered or damaged; re-run 'padim fit'") from exc
        model.params_ = p
        model.threshold_ = None if meta["threshold"] is None else float(meta["threshold"])
        model.info_ = {k: meta.get(k) for k in ("n_train", "n_calibration", "calibration_scores", "map_range")}
        model.meta_ = meta
        return model
