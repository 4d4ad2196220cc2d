"""The scoring pipeline as one torch module: uint8 images in, anomaly maps and image scores out
(embedding, Mahalanobis distances, smoothed maps). An export traces the same parts
(:mod:`padim.export.graph`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..params import PadimParams
from .embedding import Embedding, embedding_for
from .factor import factor_rows
from .io import expect_tensor
from .stats import GaussianStats
from .whitening import Whitening


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
    peak over its surroundings; the 2x2 mean keeps one noisy position from deciding alone."""

    def __init__(self, grids: Sequence[tuple[int, int]], image_size: tuple[int, int], sigma: float, top_k: int = 1,
                 score: str = "map"):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if score not in ("map", "levels"):
            raise ValueError(f"score must be 'map' or 'levels', got {score!r}")
        self.score = score
        self.grids = [(int(h), int(w)) for h, w in grids]
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.positions = sum(h * w for h, w in self.grids)
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self._smoothing: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        scores = image_scores(maps, self.top_k) if self.score == "map" else torch.stack(levels).mean(dim=0)
        return scores, maps

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

    def __init__(self, embedding: Embedding, whitening: Whitening, sigma: float, top_k: int = 1, score: str = "map"):
        super().__init__()
        if whitening.layouts != embedding.layouts:
            raise ValueError("the whitening's layout is not the embedding's")
        self.embedding = embedding
        self.extractor = embedding.extractor
        self.whitening = whitening
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
        return self.maps(self.whitening.distances(blocks))

    @property
    def storage(self) -> str:
        """How a model file keeps the whitening: 'cells' or 'positions'."""
        return self.whitening.storage

    def state(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model-file tensors: the whitening's (its factor in ``dtype``) and the channel index."""
        return {**self.whitening.state(dtype), "channels": self.extractor.channels.cpu().contiguous()}

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
        stored = embedding.whitening()
        extra = sorted(set(tensors) - stored.tensor_names() - {"channels"})
        if extra:
            raise ValueError(f"unexpected tensor(s) {', '.join(extra)}; not a file written by 'padim fit'")
        stored.load_state(tensors, getattr(torch, p.factor_dtype))
        return cls(embedding, stored, p.sigma, p.top_k, p.image_score)

    @classmethod
    def fit(cls, embedding: Embedding, stats: GaussianStats, p: PadimParams) -> PadimScorer:
        """The scorer of ``stats`` for ``embedding`` with parameters ``p``: its factor computed cell
        by cell and rounded to ``p.factor_dtype``, the precision a model file keeps, so that a fitted
        model scores exactly as it will once saved and loaded."""
        whitening, dtype = embedding.whitening(), getattr(torch, p.factor_dtype)
        for s, i, cells, rows in factor_rows(stats.to_layouts(embedding.layouts), p.eps, p.covariance):
            whitening.set_rows(s, i, cells, rows.to(dtype))
        whitening.finish(stats.mean())
        return cls(embedding, whitening, p.sigma, p.top_k, p.image_score)
