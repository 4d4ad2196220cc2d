"""The scoring pipeline as one torch module: uint8 images in, anomaly maps and image scores out.
Everything a deployed model runs lives here, so it can be traced or exported in one piece."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FeatureExtractor


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel covering +-4 sigma (scipy.ndimage.gaussian_filter's default truncation)."""
    return 2 * math.ceil(4.0 * sigma) + 1


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps with reflect padding: two 1-D convolutions,
    k times cheaper than the equivalent k x k kernel."""

    def __init__(self, sigma: float):
        super().__init__()
        k = blur_kernel_size(sigma)
        x = torch.arange(k, dtype=torch.float64) - k // 2
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float())
        self.pad = k // 2

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        maps = F.pad(maps, (self.pad, self.pad, 0, 0), mode="reflect")
        maps = F.conv2d(maps, k.view(1, 1, 1, -1))
        maps = F.pad(maps, (0, 0, self.pad, self.pad), mode="reflect")
        return F.conv2d(maps, k.view(1, 1, -1, 1))


class PadimScorer(nn.Module):
    """Mahalanobis distance of each patch embedding to its position's Gaussian, upsampled
    bilinearly to the input size, blurred with a Gaussian of ``sigma`` pixels. Image score = max
    of the map, or the mean of its ``top_k`` largest values."""

    def __init__(self, extractor: FeatureExtractor, mean: torch.Tensor, factor: torch.Tensor,
                 grid: tuple[int, int], sigma: float, top_k: int = 1):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.extractor = extractor
        self.grid = grid
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self.blur = GaussianBlur(self.sigma) if self.sigma > 0 else nn.Identity()
        self.register_buffer("mean", mean.float().contiguous())
        # W^T stored contiguous: the batched matmul runs markedly faster than on a transposed view
        self.register_buffer("weight_t", factor.float().transpose(1, 2).contiguous())
        # z = W x - W mean: precompute W mean once so scoring is a single batched matmul
        bias = torch.bmm(self.weight_t.transpose(1, 2), self.mean.unsqueeze(2)).squeeze(2)
        self.register_buffer("bias", bias)

    @property
    def factor(self) -> torch.Tensor:
        """The lower-triangular whitening factor W (a view of the stored W^T)."""
        return self.weight_t.transpose(1, 2)

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) embeddings -> (B, h, w) Mahalanobis distances."""
        b, d, h, w = embeddings.shape
        # contiguous: the permuted view is legal for bmm but an order of magnitude slower on CPU
        x = embeddings.permute(2, 3, 0, 1).reshape(h * w, b, d).contiguous()
        z = torch.baddbmm(-self.bias.unsqueeze(1), x, self.weight_t)
        return z.square().sum(dim=2).clamp_min(0).sqrt().reshape(h, w, b).permute(2, 0, 1)

    def smooth(self, distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample (B, h, w) distances to ``size`` and blur them."""
        maps = F.interpolate(distances.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return self.blur(maps).squeeze(1)

    def score_embeddings(self, embeddings: torch.Tensor, size: tuple[int, int],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) embeddings -> (maps (B, *size), scores (B,))."""
        if tuple(embeddings.shape[-2:]) != self.grid:
            raise ValueError(f"feature grid {tuple(embeddings.shape[-2:])} != fitted grid {self.grid}; "
                             "images must have the model's input size")
        maps = self.smooth(self.distances(embeddings), size)
        flat = maps.flatten(1)
        scores = flat.amax(dim=1) if self.top_k == 1 else flat.topk(self.top_k, dim=1).values.mean(dim=1)
        return maps, scores

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (maps (B, H, W), scores (B,))."""
        return self.score_embeddings(self.extractor(images), tuple(images.shape[-2:]))
