"""The scoring pipeline as one torch module: uint8 images in, anomaly maps and image scores out
(embedding, Mahalanobis distances, smoothed maps). An export traces the same parts
(:mod:`padim.export.graph`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params import PadimParams, deep_counts
from .embedding import Embedding, embedding_for
from .factor import factor_rows
from .io import expect_tensor
from .stats import DEEP_PREFIX, GaussianStats, JointStats, split_deep
from .whitening import Whitening

# the deep image score (image_score 'deep'): the mean of the DEEP_TOP largest distances of the deep
# tap's positions (one noisy position does not decide alone; a defect covers several at stride 32),
# its covariances with DEEP_EPS times each position's mean variance on the diagonal (deep features'
# variances are far from the shallow taps', so a fixed eps would weigh them differently)
DEEP_TOP = 10
DEEP_EPS = 0.01
MAD_TO_SD = 1.4826  # the median absolute deviation of a normal distribution, in standard deviations


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma (scipy.ndimage.gaussian_filter's default truncation)."""
    return 2 * math.ceil(4.0 * sigma) + 1


def gaussian_kernel_1d(sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized 1-D Gaussian of blur_kernel_size(sigma) taps."""
    k = blur_kernel_size(sigma)
    x = torch.arange(k, dtype=torch.float64) - k // 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def smoothing_matrix(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) linear map along one axis: bilinear upsampling (align_corners=False) followed
    by a Gaussian blur with reflect padding. Both steps are linear and separable, so upsampling and
    blurring a (h, w) map equals A_h @ map @ A_w.T: two small matrix products instead of a large
    upsampled image and two convolutions over it."""
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, None, :]
    out = F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel_1d(sigma, torch.float64)
        pad = kernel.numel() // 2
        out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return out[:, 0, 0, :].T.contiguous().float()


def image_scores(maps: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """(B, H, W) anomaly maps -> (B,) image scores: the maximum, or the mean of the ``top_k`` largest."""
    flat = maps.flatten(1)
    return flat.amax(dim=1) if top_k == 1 else flat.topk(top_k, dim=1).values.mean(dim=1)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps with reflect padding: two 1-D convolutions,
    k times cheaper than the equivalent k x k kernel."""

    def __init__(self, sigma: float):
        super().__init__()
        self.register_buffer("kernel", gaussian_kernel_1d(sigma))
        self.pad = self.kernel.numel() // 2

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        maps = F.pad(maps, (self.pad, self.pad, 0, 0), mode="reflect")
        maps = F.conv2d(maps, k.view(1, 1, 1, -1))
        maps = F.pad(maps, (0, 0, self.pad, self.pad), mode="reflect")
        return F.conv2d(maps, k.view(1, 1, -1, 1))


class AnomalyMaps(nn.Module):
    """(B, P) distances on the ``grids`` of the scales -> (scores (B,), maps (B, H, W)): each scale's
    distances upsampled bilinearly to ``image_size`` and blurred with a Gaussian of ``sigma`` pixels,
    the maps of all scales averaged. Image score (``score``): 'map', the max of the map, or the mean
    of its ``top_k`` largest values; 'levels', the same of each scale's own distances (not
    upsampled, not blurred) averaged over 2x2 neighbouring positions, then averaged over the
    scales: the blur and the pyramid's average serve the pixel map and spread a small defect's
    peak over its surroundings; the 2x2 mean keeps one noisy position from deciding alone.
    'deep': the map's score and the deep tap's (the mean of its DEEP_TOP largest distances), each
    as (score - centre) / spread with the ``fusion`` [centre, spread, centre, spread, deep weight]
    of the training images' out-of-fold scores (:meth:`fit_fusion`), summed."""

    def __init__(self, grids: Sequence[tuple[int, int]], image_size: tuple[int, int], sigma: float, top_k: int = 1,
                 score: str = "map"):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if score not in ("map", "levels", "deep"):
            raise ValueError(f"score must be 'map', 'levels' or 'deep', got {score!r}")
        self.score = score
        if score == "deep":
            self.register_buffer("fusion", torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]))
        self.grids = [(int(h), int(w)) for h, w in grids]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.positions = sum(h * w for h, w in self.grids)
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self._smoothing: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, dist: torch.Tensor, deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deep_scores, maps = self.parts(dist, deep)
        return (scores if deep_scores is None else self.fuse(scores, deep_scores)), maps

    def fuse(self, scores: torch.Tensor, deep_scores: torch.Tensor) -> torch.Tensor:
        """The 'deep' image score of the map's ``scores`` and the deep tap's."""
        f = self.fusion
        # summed by a reduction, not an Add: an INT8 export's histogram calibration (onnxruntime)
        # takes in every Add's inputs, and fails on the nearly constant ones of similar images
        return torch.stack([(scores - f[0]) / f[1], f[4] * (deep_scores - f[2]) / f[3]]).sum(dim=0)

    def fit_fusion(self, scores: np.ndarray, deep_scores: np.ndarray, deep: bool = True) -> None:
        """Centre and spread of each score from normal images' out-of-fold ``scores`` (the map's)
        and ``deep_scores``: the median and 1.4826 median absolute deviations, which one odd
        training image cannot move far (the standard deviation where that is 0). Without ``deep``
        (too few training images for the deep Gaussians) the deep score's weight is 0: the image
        score is the map's alone, standardized."""
        fusion = []
        for x in (np.asarray(scores, np.float64), np.asarray(deep_scores, np.float64)):
            centre = float(np.median(x))
            spread = MAD_TO_SD * float(np.median(np.abs(x - centre))) or float(x.std())
            fusion += [centre, max(spread, 1e-12)]
        self.fusion.copy_(torch.tensor([*fusion, 1.0 if deep else 0.0]))

    def parts(self, dist: torch.Tensor, deep: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(image scores of the map, or of the levels; the deep tap's scores or None; maps)."""
        if dist.shape[-1] != self.positions:
            raise ValueError(f"{dist.shape[-1]} feature positions, the fitted grids {self.grids} have "
                             f"{self.positions}; images must have the model's input size")
        maps = None
        start = 0
        levels = []
        for h, w in self.grids:
            distances = dist[:, start:start + h * w]
            if self.score == "levels":
                pooled = F.avg_pool2d(distances.reshape(-1, 1, h, w), (min(2, h), min(2, w)), stride=1).flatten(1)
                levels.append(image_scores(pooled, min(self.top_k, pooled.shape[1])))
            level = self.smooth(distances.reshape(-1, h, w))
            maps = level if maps is None else maps.add_(level)  # in place: each is a fresh (B, H, W) map
            start += h * w
        if len(self.grids) > 1:
            maps.div_(len(self.grids))
        scores = torch.stack(levels).mean(dim=0) if self.score == "levels" else image_scores(maps, self.top_k)
        if self.score != "deep":
            return scores, None, maps
        if deep is None:
            raise ValueError("the deep image score needs the deep tap's distances")
        return scores, deep.topk(min(DEEP_TOP, deep.shape[1]), dim=1).values.mean(dim=1), maps

    def smooth(self, distances: torch.Tensor) -> torch.Tensor:
        """Upsample (B, h, w) distances bilinearly to the image size and blur them (see smoothing_matrix)."""
        rows, cols = self.smoothing(tuple(distances.shape[-2:]), distances.device)
        return torch.matmul(torch.matmul(rows, distances), cols)

    def smoothing(self, grid: tuple[int, int], device: torch.device | str = "cpu",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols^T) of :meth:`smooth` for a ``grid``, built once and kept."""
        key = (int(grid[0]), int(grid[1]), str(device))
        if key not in self._smoothing:
            (h, w), sigma = self.image_size, self.sigma
            self._smoothing[key] = (smoothing_matrix(key[0], h, sigma).to(device),
                                    smoothing_matrix(key[1], w, sigma).T.contiguous().to(device))
        return self._smoothing[key]


class PadimScorer(nn.Module):
    """What a fitted model runs on images: uint8 (B, 3, H, W) -> its embeddings, their Mahalanobis
    distances to each position's Gaussian (the whitening), image scores and anomaly maps."""

    def __init__(self, embedding: Embedding, whitening: Whitening, sigma: float, top_k: int = 1, score: str = "map",
                 deep: Whitening | None = None):
        super().__init__()
        if whitening.layouts != embedding.layouts:
            raise ValueError("the whitening's layout is not the embedding's")
        if (deep is None) != (score != "deep") or (deep is not None and deep.layouts != [embedding.deep_layout]):
            raise ValueError("the deep image score needs the deep tap's whitening, and only it")
        self.embedding = embedding
        self.extractor = embedding.extractor
        self.whitening = whitening
        self.deep = deep  # the deep tap's Gaussians (image_score 'deep')
        self.maps = AnomalyMaps(embedding.grids, embedding.size, sigma, top_k, score)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images it takes."""
        return self.embedding.size

    def forward(self, images: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (scores (B,), maps (B, H, W)); ``out``: a buffer of the embedding
        (``embedding.buffer``), for loops that score batch after batch."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size != self.image_size:
            raise ValueError(f"images of {size[0]}x{size[1]} pixels; the model takes "
                             f"{self.image_size[0]}x{self.image_size[1]}")
        return self.score(self.embedding(images, out))

    def score(self, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding blocks -> (scores (B,), maps (B, H, W))."""
        return self.maps(*self.distances(blocks))

    def fit_fusion(self, scores: np.ndarray, deep_scores: np.ndarray, count: float) -> np.ndarray:
        """Fit the deep image score's fusion to normal images' out-of-fold map ``scores`` and
        ``deep_scores`` (its deep part weighs 0 unless the ``count`` training images outnumber the
        deep tap's channels, see ``deep_counts``); their fused scores."""
        channels = self.embedding.deep_layout.levels[0].channels
        self.maps.fit_fusion(scores, deep_scores, deep=deep_counts(count, channels))
        return self.maps.fuse(torch.from_numpy(scores), torch.from_numpy(deep_scores)).numpy()

    def distances(self, blocks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedding blocks -> (B, P) Mahalanobis distances of the scales' positions, and (B, P')
        of the deep tap's (None without the deep score)."""
        k = len(self.whitening.layouts)
        return self.whitening.distances(blocks[:k]), None if self.deep is None else self.deep.distances(blocks[k:])

    @property
    def storage(self) -> str:
        """How a model file keeps the whitening: 'cells' or 'positions'."""
        return self.whitening.storage

    def state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model-file tensors: the whitening's (its factor in ``dtype``) and the channel index; with
        the deep score, the deep whitening's (``deep_``) and the ``fusion``."""
        out = {**self.whitening.state(dtype), "channels": self.extractor.channels.cpu().contiguous()}
        if self.deep is not None:
            out.update({DEEP_PREFIX + k: v for k, v in self.deep.state(dtype).items()})
            out["fusion"] = self.maps.fusion.cpu().clone()
        return out

    @classmethod
    def from_state(cls, extractor, p: PadimParams, meta: dict, tensors: dict[str, torch.Tensor]) -> PadimScorer:
        """The scorer of a model file's ``meta`` (its grids and storage) and :meth:`state`'s
        ``tensors`` for ``extractor`` (which must keep the same channels) and parameters ``p``;
        ValueError names a mismatch or a missing, extra or bad tensor."""
        embedding = embedding_for(extractor, p.image_size, storage=meta["storage"])
        if [list(g) for g in embedding.grids] != meta["grids"]:
            raise ValueError(f"grids {meta['grids']} do not match the {embedding.grids} of image size "
                             f"{list(p.image_size)}")
        channels = expect_tensor(tensors, "channels", (embedding.dim,), torch.int64)
        if not torch.equal(channels, extractor.channels.cpu()):
            raise ValueError("channel index does not match the backbone's channel subset (d, seed)")
        stored, dtype = embedding.whitening(), getattr(torch, p.factor_dtype)
        deep = None if p.image_score != "deep" else Whitening([embedding.deep_layout], embedding.device)
        names = stored.tensor_names() | {"channels"}
        if deep is not None:
            names |= {DEEP_PREFIX + k for k in deep.tensor_names()} | {"fusion"}
        extra = sorted(set(tensors) - names)
        if extra:
            raise ValueError(f"unexpected tensor(s) {', '.join(extra)}; not a file written by 'padim fit'")
        stored.load_state(tensors, dtype)
        scorer = cls(embedding, stored, p.sigma, p.top_k, p.image_score, deep)
        if deep is not None:
            deep.load_state(split_deep(tensors)[1], dtype)
            fusion = expect_tensor(tensors, "fusion", (5,), torch.float32)
            if not bool((fusion[1:4:2] > 0).all()) or float(fusion[4]) not in (0.0, 1.0):
                raise ValueError("fusion spreads must be positive and the deep weight 0 or 1")
            scorer.maps.fusion.copy_(fusion)
        return scorer

    @classmethod
    def fit(cls, embedding: Embedding, stats: GaussianStats | JointStats, p: PadimParams) -> PadimScorer:
        """The scorer of ``stats`` for ``embedding`` with parameters ``p``: its factor computed cell
        by cell and rounded to ``p.factor_dtype``, the precision a model file keeps, so that a fitted
        model scores exactly as it will once saved and loaded."""
        stats, dtype = stats.to_layouts(embedding.layouts), getattr(torch, p.factor_dtype)
        if isinstance(stats, JointStats) != (p.image_score == "deep"):
            raise ValueError("statistics with the deep tap's are for the deep image score, and only they")
        main, deep = (stats.main, stats.deep) if isinstance(stats, JointStats) else (stats, None)
        whitening = _factored(embedding.whitening(), main, p.eps, p.covariance, False, dtype)
        if deep is not None:  # its own eps, relative to each position's variance (see DEEP_EPS)
            deep = _factored(Whitening([embedding.deep_layout], embedding.device), deep, DEEP_EPS, "eps", True, dtype)
        return cls(embedding, whitening, p.sigma, p.top_k, p.image_score, deep)


def _factored(whitening: Whitening, stats: GaussianStats, eps: float, estimator: str, relative: bool,
              dtype: torch.dtype) -> Whitening:
    """``whitening`` filled with the factor of ``stats`` (see :func:`factor_rows`), rounded to ``dtype``."""
    for s, i, cells, rows in factor_rows(stats, eps, estimator, relative):
        whitening.set_rows(s, i, cells, rows.to(dtype))
    whitening.finish(stats.mean())
    return whitening
