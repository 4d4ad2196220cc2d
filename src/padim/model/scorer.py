"""The scoring pipeline as one torch module: uint8 images in, anomaly maps and image scores out.
Everything a deployed model runs lives here, so it can be traced or exported in one piece."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FeatureExtractor
from ..backbones.blocks import ScaleLayout
from .blocks import Blocks, BlockWhitening
from .stats import position_chunks

DISTANCE_CHUNK = 64  # positions per batched product when scoring on CPU


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


def head_size(d: int) -> int:
    """Split of a (d, d) triangular factor into a (h, h) head and a (d, d - h) tail block: about
    7/12 of d (d / 2 minimizes the work, a wider head runs at a better rate on CPU), a multiple of
    8 (unaligned blocks run ~10% slower); no split below 16 channels."""
    return d if d < 16 else 8 * round(d * 7 / 96)


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


class PadimScorer(nn.Module):
    """Mahalanobis distance of each patch embedding to its position's Gaussian; each scale's map
    upsampled bilinearly to the input size and blurred with a Gaussian of ``sigma`` pixels; the
    maps of all scales averaged. Image score = max of the map, or the mean of its ``top_k`` largest
    values. ``grids`` are the (h, w) feature grids of the extractor's scales for ``image_size``."""

    def __init__(self, extractor: FeatureExtractor, mean: torch.Tensor,
                 factor: torch.Tensor | Iterable[tuple[slice, torch.Tensor]] | BlockWhitening,
                 grids: Sequence[tuple[int, int]], image_size: tuple[int, int], sigma: float, top_k: int = 1,
                 layouts: list[ScaleLayout] | None = None):
        """``mean`` (P, d); ``factor``: the (P, d, d) lower-triangular whitening factor W, or its
        (positions, (p, d, d) chunk) pieces in order, so that all of it never has to exist at once.
        ``layouts``: the extractor's block layouts for ``image_size`` (FeatureExtractor.block_layouts),
        to keep W per cell and score cell by cell (CPU); W must then have their block structure,
        as a fit on the extractor's embeddings gives it; or ``factor`` is a filled BlockWhitening of
        these layouts, kept as it is."""
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.extractor = extractor
        self.grids = [(int(h), int(w)) for h, w in grids]
        if len(self.grids) != len(extractor.scales):
            raise ValueError(f"{len(self.grids)} grids for {len(extractor.scales)} scales")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self._smoothing: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for grid in self.grids:  # built now so a traced export sees constants
            self._smoothing_for(grid, self.image_size, torch.device("cpu"))
        extractor.prepare_trace(self.image_size)
        self.register_buffer("mean", mean.float().contiguous())
        positions, d = self.mean.shape
        if isinstance(factor, BlockWhitening):  # already filled (a model file's cells)
            if layouts is None or factor.layouts != layouts:
                raise ValueError("a BlockWhitening factor needs the scorer's block layouts")
            self.blocks = factor.to(self.mean.device)
            return
        pieces = [(slice(0, positions), factor)] if isinstance(factor, torch.Tensor) else factor
        self.blocks = BlockWhitening(layouts, self.mean.device) if layouts is not None else None
        if self.blocks is not None:
            if sum(lay.positions for lay in layouts) != positions:
                raise ValueError(f"the block layouts have {sum(lay.positions for lay in layouts)} positions, "
                                 f"the mean {positions}")
            filled = 0
            for part, w in pieces:
                self.blocks.fill(part, w)
                filled += w.shape[0]
            self._check_filled(filled, positions)
            self.blocks.set_bias(self.mean)
            return
        # W^T is upper triangular: of its columns [:h] only rows [:h] are nonzero, so it is kept as
        # two contiguous blocks (zeros dropped: ~3/4 of the memory, reads and products). Contiguous,
        # because a batched matmul runs markedly faster than on a transposed view.
        h = self.head = head_size(d)
        head = self.mean.new_empty(positions, h, h)
        tail = self.mean.new_empty(positions, d, d - h)
        filled = 0
        for part, w in pieces:
            weight_t = w.transpose(1, 2)
            head[part] = weight_t[:, :h, :h]
            tail[part] = weight_t[:, :, h:]
            filled += weight_t.shape[0]
        self._check_filled(filled, positions)
        self.register_buffer("weight_head", head)
        self.register_buffer("weight_tail", tail)
        # z = W x - W mean: precompute W mean once so scoring is one product per block
        self.register_buffer("bias_head", torch.bmm(self.mean[:, None, :h], head).squeeze(1))
        self.register_buffer("bias_tail", torch.bmm(self.mean.unsqueeze(1), tail).squeeze(1))

    @staticmethod
    def _check_filled(filled: int, positions: int) -> None:
        if filled != positions:
            raise ValueError(f"the factor covers {filled} positions, the mean {positions}")

    def without_blocks(self) -> PadimScorer:
        """The same scorer kept position by position (what an export traces)."""
        if self.blocks is None:
            return self
        pieces = ((part, self.factor_of(part)) for part in position_chunks(self.mean.shape[0], 1024))
        return PadimScorer(self.extractor, self.mean, pieces, self.grids, self.image_size, self.sigma, self.top_k)

    @property
    def factor(self) -> torch.Tensor:
        """The lower-triangular whitening factor W, rebuilt from the stored blocks of W^T."""
        return self.factor_of(slice(None))

    def factor_of(self, positions: slice) -> torch.Tensor:
        """W of ``positions`` only, rebuilt from the stored blocks of W^T (or cells)."""
        if self.blocks is not None:
            return self.blocks.factor_of(slice(*positions.indices(self.mean.shape[0])[:2]), self.mean.shape[1])
        head, tail = self.weight_head[positions], self.weight_tail[positions]
        p, d, h = tail.shape[0], tail.shape[1], self.head
        weight_t = tail.new_zeros(p, d, d)
        weight_t[:, :h, :h] = head
        weight_t[:, :, h:] = tail
        return weight_t.transpose(1, 2)

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D, P) embeddings -> (B, P) Mahalanobis distances ((B, D, h, w) -> (B, h, w))."""
        shape = embeddings.shape
        if self.blocks is not None:
            if torch.jit.is_tracing():
                return self.blocks.graph_distances(embeddings.flatten(2)).reshape(shape[0], *shape[2:])
            return self.blocks.distances(self.blocks.gather(embeddings.flatten(2))).reshape(shape[0], *shape[2:])
        # contiguous: a no-op for the extractor's position-major output; a strided view is legal
        # for bmm but an order of magnitude slower on CPU
        x = embeddings.flatten(2).permute(2, 0, 1).contiguous()
        if torch.jit.is_tracing() or x.device.type != "cpu":
            dist = self._norms(x, slice(None))  # one product: one node in an exported graph
        else:
            # a few positions at a time: each product is normed while it is still in cache
            dist = torch.cat([self._norms(x, part) for part in position_chunks(x.shape[0], DISTANCE_CHUNK)])
        return dist.T.reshape(shape[0], *shape[2:])

    def _norms(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """|W x - W mean| of the (P, B, D) embeddings ``x`` at the positions ``part``: (p, B)."""
        x = x[part]
        head = torch.baddbmm(-self.bias_head[part].unsqueeze(1), x[:, :, :self.head], self.weight_head[part])
        tail = torch.baddbmm(-self.bias_tail[part].unsqueeze(1), x, self.weight_tail[part])
        return (head.square().sum(dim=2) + tail.square().sum(dim=2)).sqrt()

    def smooth(self, distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample (B, h, w) distances bilinearly to ``size`` and blur them (see smoothing_matrix)."""
        rows, cols = self._smoothing_for(tuple(distances.shape[-2:]), size, distances.device)
        return torch.matmul(torch.matmul(rows, distances), cols)

    def _smoothing_for(self, grid: tuple[int, int], size: tuple[int, int], device: torch.device,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(grid[0]), int(grid[1]), int(size[0]), int(size[1]), str(device))
        if key not in self._smoothing:
            self._smoothing[key] = (smoothing_matrix(key[0], key[2], self.sigma).to(device),
                                    smoothing_matrix(key[1], key[3], self.sigma).T.contiguous().to(device))
        return self._smoothing[key]

    def score_embeddings(self, embeddings: torch.Tensor, size: tuple[int, int],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, P) embeddings -> (maps (B, *size), scores (B,)); the maps of the scales averaged."""
        positions = sum(h * w for h, w in self.grids)
        if embeddings.shape[-1] != positions:
            raise ValueError(f"{embeddings.shape[-1]} feature positions, the fitted grids {self.grids} have "
                             f"{positions}; images must have the model's input size")
        return self.score_distances(self.distances(embeddings), size)

    def score_distances(self, dist: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) distances -> (maps (B, *size), scores (B,)); the maps of the scales averaged."""
        maps = None
        start = 0
        for h, w in self.grids:
            level = self.smooth(dist[:, start:start + h * w].reshape(-1, h, w), size)
            maps = level if maps is None else maps.add_(level)  # in place: each is a fresh (B, H, W) map
            start += h * w
        if len(self.grids) > 1:
            maps.div_(len(self.grids))
        return maps, image_scores(maps, self.top_k)

    def forward(self, images: torch.Tensor, out: torch.Tensor | Blocks | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (maps (B, H, W), scores (B,)); ``out``: the extractor's embedding
        buffer (FeatureExtractor.buffer, or block_buffer when the scorer keeps cells), for loops
        that score batch after batch."""
        size = tuple(images.shape[-2:])
        if self.blocks is not None and not torch.jit.is_tracing():
            return self.score_distances(self.blocks.distances(self.extractor.blocks(images, out)), size)
        return self.score_embeddings(self.extractor(images, out), size)
