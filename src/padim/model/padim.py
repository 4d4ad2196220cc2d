"""The PaDiM estimator: fit on normal images, predict anomaly maps and scores for new ones."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones import FeatureExtractor, channel_index, get_spec
from ..backbones.blocks import ScaleLayout
from ..datasets.images import ImageFiles, ImageSource
from ..params import check_scales
from .blocks import BlockStats, CellStats
from .scorer import PadimScorer
from .stats import COVARIANCE_ESTIMATORS, GaussianStats, StreamingStats, whitening_factors


@dataclass
class Prediction:
    """Result of :meth:`Padim.predict` for N images.

    scores: (N,) image scores (max of the map); maps: (N, H, W) anomaly maps at the model input
    size; labels: (N,) 1 = anomalous at the model's stored threshold (None when it has none).
    """

    scores: np.ndarray
    maps: np.ndarray
    labels: np.ndarray | None


FACTOR_DTYPES = ("float16", "float32")


def threshold_labels(scores: np.ndarray, threshold: float | None) -> np.ndarray | None:
    """1 where a score exceeds ``threshold``, else 0 (None without a threshold)."""
    if threshold is None:
        return None
    return (np.asarray(scores) > threshold).astype(np.int64)


# batches per statistics update, written into one buffer: each update reads and writes all the
# (P, d, d) float32 sums, so at one batch of 16 it was bound by memory traffic (1.4 -> 1.0 ms per
# image at 64); the (P, 64, d) buffer stays smaller than the sums for d above 64
STATS_GROUP = 4


def decode_workers(requested: int | None, n_images: int, batch_size: int) -> int:
    """Decoding processes: as requested, else up to 2 when there is more than one batch to decode
    and cores that torch's threads leave free. On 2 cores, decoders that compete with torch's 2
    threads made fit and predict from files 13-25% slower than decoding in the main process."""
    if requested is not None:
        return requested
    spare = (os.cpu_count() or 1) - torch.get_num_threads()
    return max(0, min(2, spare)) if n_images > batch_size else 0


def gather_prediction(parts: Iterable[tuple[np.ndarray, np.ndarray]], image_size: tuple[int, int],
                      labels: Callable[[np.ndarray], np.ndarray | None]) -> Prediction:
    """One Prediction from the (scores, maps) batches of an ``iter_predict``."""
    parts = list(parts)
    if not parts:
        h, w = image_size
        return Prediction(np.empty(0, np.float32), np.empty((0, h, w), np.float32), None)
    scores = np.concatenate([p[0] for p in parts])
    return Prediction(scores, np.concatenate([p[1] for p in parts]), labels(scores))


def _take(images: Sequence[ImageSource] | torch.Tensor, idx: np.ndarray) -> Sequence[ImageSource] | torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, dtype=torch.long)]
    return [images[i] for i in idx]


def _images(out: torch.Tensor | list, start: int, stop: int, blocks: bool, permuted: bool = True,
            ) -> torch.Tensor | list:
    """Images [start, stop) of an embedding buffer: a (P, B, d) one as (B, d, P) embeddings (as it
    is if not ``permuted``), or every tensor of a block buffer."""
    if blocks:
        return [[t[:, start:stop] for t in scale] for scale in out]
    return out[:, start:stop].permute(1, 2, 0) if permuted else out[:, start:stop]


def default_d(backbone: str) -> int:
    """Every channel of a small backbone (<= 200), else PaDiM's 100."""
    total = sum(get_spec(backbone).channels)
    return total if total <= 200 else 100


def default_sigma(image_size: tuple[int, int]) -> float:
    """PaDiM's blur of 4 px at 256 px, scaled with the shorter input side."""
    return 4.0 * min(image_size) / 256


def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


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
        per position, and the model keeps its factor per cell (:mod:`padim.model.blocks`): the
        same numbers, faster, a quarter of the fit's memory and 2.55x fewer stored values.
    factor_dtype: precision of the whitening factor kept and stored, 'float16' (half the model file)
        or 'float32'; scoring runs in float32 either way (see docs/model-size.md).
    covariance: 'eps' (sample covariance + eps*I, PaDiM) or 'oas' (OAS shrinkage + eps*I).
    top_k: image score = mean of the top_k largest map values (1 = max, PaDiM).
    scales: input scales of a feature pyramid: one Gaussian per position of each, the maps of all
        scales averaged (default (1.0, 0.7): the coarser level sees more context per patch, which
        helps large defects; (1.0,) = plain PaDiM).
    batch_size, num_workers: batches for the backbone and decoding processes (None = auto).
    device: 'cpu' or 'cuda'. weights: a backbone weights file, if not the default source.
    progress: show progress bars. pretrained=False: random backbone weights (tests only).
    """

    def __init__(self, backbone: str = "mobilenet_v2", image_size: int | Sequence[int] = (320, 480),
                 d: int | None = None,
                 eps: float = 0.01, sigma: float | None = None, seed: int = 0, calibration_fraction: float = 0.1,
                 threshold_quantile: float = 0.99, pool: int = 3, tap_resize: str = "nearest",
                 factor_dtype: str = "float16",
                 covariance: str = "eps", top_k: int = 1, scales: Sequence[float] = (1.0, 0.7),
                 batch_size: int = 16, num_workers: int | None = None,
                 device: str = "cpu", weights: str | Path | None = None, progress: bool = False,
                 pretrained: bool = True):
        get_spec(backbone)  # fail early on an unknown name
        if not 0.0 <= calibration_fraction < 1.0:
            raise ValueError("calibration_fraction must be in [0, 1)")
        if not 0.0 < threshold_quantile <= 1.0:
            raise ValueError("threshold_quantile must be in (0, 1]")
        if covariance not in COVARIANCE_ESTIMATORS:
            raise ValueError(f"covariance must be one of {COVARIANCE_ESTIMATORS}, got {covariance!r}")
        self.backbone = backbone
        self.image_size = _as_size(image_size)
        self.d = default_d(backbone) if d is None else int(d)
        self.eps = eps
        self.sigma = default_sigma(self.image_size) if sigma is None else float(sigma)
        self.seed = seed
        self.calibration_fraction = calibration_fraction
        self.threshold_quantile = threshold_quantile
        self.pool = pool
        self.tap_resize = tap_resize
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be one of {FACTOR_DTYPES}, got {factor_dtype!r}")
        # fp16 holds |W_ij| <= ||W|| <= 1/sqrt(eps) (cov >= eps I) only for eps >= 1e-8
        self.factor_dtype = "float32" if factor_dtype == "float16" and eps < 1e-8 else factor_dtype
        self.covariance = covariance
        self.top_k = top_k
        self.scales = check_scales(scales)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.weights = Path(weights) if weights is not None else None
        self.progress = progress
        self.pretrained = pretrained
        self.extractor_: FeatureExtractor | None = None
        self.grids_: list[tuple[int, int]] | None = None
        self.scorer_: PadimScorer | None = None
        self.threshold_: float | None = None
        self.info_: dict = {}

    # ----------------------------------------------------------------- feature extraction
    def feature_extractor(self) -> FeatureExtractor:
        """The backbone with its channel subset, built on first use and kept (loaded once)."""
        if self.extractor_ is None:
            total = sum(get_spec(self.backbone).channels)
            channels = channel_index(total, self.d, self.seed)
            self.extractor_ = FeatureExtractor(self.backbone, channels, self.weights, self.pretrained,
                                               self.pool, self.tap_resize, scales=self.scales).to(self.device)
        return self.extractor_

    def _batches(self, images: Sequence[ImageSource] | torch.Tensor, desc: str, fork: bool = True,
                 buffer_images: int | None = None, blocks: bool = False,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | list | None]]:
        """uint8 (B, 3, H, W) batches on the model's device, decoded in worker processes (in this one
        if not ``fork``), each with the one embedding buffer (FeatureExtractor.buffer, or its
        block_buffer if ``blocks``, of ``buffer_images`` images, default one batch; None off the
        CPU) they are all written into."""
        if isinstance(images, torch.Tensor):
            batches = images.split(self.batch_size)
        else:
            workers = decode_workers(self.num_workers, len(images), self.batch_size) if fork else 0
            batches = torch.utils.data.DataLoader(
                ImageFiles(images, self.image_size), batch_size=self.batch_size, num_workers=workers,
            )
        out = None
        extractor = self.feature_extractor()
        make = extractor.block_buffer if blocks else extractor.buffer
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
            # no buffer for a lone image: predicting one image runs the network once
            if out is None and self.device.type == "cpu" and max(len(batch), buffer_images or 0) > 1:
                out = make(buffer_images or self.batch_size, tuple(batch.shape[-2:]))
            yield batch.to(self.device), out

    def _layouts(self, size: tuple[int, int]) -> list[ScaleLayout] | None:
        """The extractor's block layouts for ``size`` inputs when fit and scoring run cell by cell
        (on CPU, with nearest tap resizing and evenly dividing grids), else None."""
        return self.feature_extractor().block_layouts(size) if self.device.type == "cpu" else None

    def accumulate(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "fit",
                   ) -> GaussianStats | CellStats:
        """Partial statistics of ``images``, per cell (CellStats) where fit runs cell by cell, else
        per position; partial results of disjoint shards add up (``a + b``)."""
        return self.running_stats(images, desc).stats()

    @torch.inference_mode()
    def running_stats(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "fit",
                      ) -> StreamingStats | BlockStats:
        """The streaming part of :meth:`accumulate`: the running sums of ``images``, before their
        conversion to float64 statistics (``.stats()``, once)."""
        size = tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else self.image_size
        layouts = self._layouts(size)
        stats = None
        # the embedding buffer is freed on return, before the float64 sums are made
        for emb in self._embedding_groups(images, desc, STATS_GROUP * self.batch_size, layouts is not None):
            if stats is None:
                stats = (BlockStats(layouts, self.device) if layouts is not None
                         else StreamingStats(emb.shape[2], emb.shape[1], self.device))
            stats.update(emb)
        if stats is None:
            raise ValueError("no training images")
        return stats

    def _embedding_groups(self, images: Sequence[ImageSource] | torch.Tensor, desc: str, group: int,
                          blocks: bool = False) -> Iterator[torch.Tensor | list]:
        """Embeddings of up to ``group`` images at a time (one batch at a time off the CPU): (B, d, P),
        or FeatureExtractor.blocks if ``blocks``. Batch after batch is written into one buffer,
        handed on when the next would not fit."""
        extractor = self.feature_extractor()
        embed = extractor.blocks if blocks else extractor
        filled = 0
        for batch, out in self._batches(images, desc, buffer_images=group, blocks=blocks):
            if out is None:
                yield embed(batch)
                continue
            if filled + len(batch) > group:
                yield _images(out, 0, filled, blocks)
                filled = 0
            embed(batch, _images(out, filled, group, blocks, permuted=False))
            filled += len(batch)
        if filled:
            yield _images(out, 0, filled, blocks)

    def _scorer(self, stats: GaussianStats | CellStats) -> PadimScorer:
        factors = whitening_factors(stats, self.eps, self.covariance)  # chunk by chunk into the scorer's blocks
        return self.new_scorer(stats.mean(), ((part, self.stored_factor(f)) for part, f in factors))

    def stored_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """``factor`` rounded to the precision the model file keeps (``factor_dtype``), so that a
        fitted model scores exactly as it will once saved and loaded."""
        dtype = getattr(torch, self.factor_dtype)
        return factor if dtype == factor.dtype else factor.to(dtype).to(factor.dtype)

    def new_scorer(self, mean: torch.Tensor, factor: torch.Tensor | Iterable[tuple[slice, torch.Tensor]],
                   ) -> PadimScorer:
        """The scorer of this model's settings for a (P, d) mean and whitening factor (see PadimScorer)."""
        return PadimScorer(self.feature_extractor(), mean, factor, self.grids_, self.image_size, self.sigma,
                           self.top_k, layouts=self._layouts(self.image_size))

    def _grids(self, positions: int) -> list[tuple[int, int]]:
        """The stride-4 feature grid of each scale for the model's input size."""
        grids = self.feature_extractor().grids(self.image_size)
        if sum(h * w for h, w in grids) != positions:
            h, w = self.image_size
            raise ValueError(f"statistics have {positions} positions, the {h}x{w} input at scales "
                             f"{list(self.scales)} gives grids {grids}")
        return grids

    # ----------------------------------------------------------------- public API
    def calibration_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (fit, calibration) of ``n`` training images; the hold-out is fixed by ``seed``."""
        n_cal = int(round(self.calibration_fraction * n)) if self.calibration_fraction > 0 else 0
        if self.calibration_fraction > 0 and n >= 3:
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
        self.grids_ = self._grids(stats.positions)
        cells = isinstance(stats, CellStats | BlockStats)
        if cells and self._layouts(self.image_size) is None:  # e.g. summed on CPU workers, finished on a GPU
            stats, cells = (stats.stats() if isinstance(stats, BlockStats) else stats).expand(), False
        cal_scores, cal_maps = np.empty(0), np.empty(0)
        if len(calibration):
            scorer = self._scorer(stats)
            scores, maps = [], []
            held_out = BlockStats(stats.layouts, self.device) if isinstance(stats, CellStats) else None
            # decoded here: with forked decoders alive, each page of the statistics the merge writes
            # would first be copied (copy-on-write), ~1 s per GB of statistics
            for batch, out in self._batches(calibration, "calibrate", fork=False, blocks=cells):
                # merged after scoring: the scorer has not seen these images
                if cells:
                    blocks = scorer.extractor.blocks(batch, out)
                    m, s = scorer.score_distances(scorer.blocks.distances(blocks), self.image_size)
                    (stats if held_out is None else held_out).update(blocks)
                else:
                    emb = scorer.extractor(batch, out)
                    m, s = scorer.score_embeddings(emb, self.image_size)
                    stats.update(emb)
                maps.append(m.cpu().numpy())
                scores.append(s.cpu().numpy())
            del scorer  # frees its factor before the final one is built
            if held_out is not None:
                held_out.stats(into=stats)
            cal_scores, cal_maps = np.concatenate(scores), np.concatenate(maps)
        self.scorer_ = None  # a refit frees the previous factor before the new one is built
        self.scorer_ = self._scorer(stats)
        self._calibrate(cal_scores, cal_maps, stats.count if n_train is None else n_train)
        return self

    def _calibrate(self, scores: np.ndarray, maps: np.ndarray, n_train: int) -> None:
        self.threshold_ = float(np.quantile(scores, self.threshold_quantile)) if scores.size else None
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

    def _check_fitted(self) -> PadimScorer:
        if self.scorer_ is None:
            raise RuntimeError("this Padim is not fitted yet; call fit() or Padim.load()")
        return self.scorer_

    @torch.inference_mode()
    def iter_predict(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "predict",
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (scores (B,), maps (B, H, W)) batch by batch, so large sets stream."""
        scorer = self._check_fitted()
        for batch, out in self._batches(images, desc, blocks=scorer.blocks is not None):
            maps, scores = scorer(batch, out)
            yield scores.cpu().numpy(), maps.cpu().numpy()

    def predict(self, images: Sequence[ImageSource] | torch.Tensor) -> Prediction:
        """Anomaly scores, maps and labels (at the stored threshold) for all images."""
        return gather_prediction(self.iter_predict(images), self.image_size, self.labels)

    def labels(self, scores: np.ndarray) -> np.ndarray | None:
        """1 where a score exceeds the stored threshold, else 0 (None without a threshold)."""
        return threshold_labels(scores, self.threshold_)

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a .safetensors file (atomically); returns the path."""
        from .io import save_model
        return save_model(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", weights: str | Path | None = None,
             progress: bool = False) -> Padim:
        """Read a model written by :meth:`save`; never executes code from the file."""
        from .io import load_model
        return load_model(Path(path), device=device, weights=weights, progress=progress)
