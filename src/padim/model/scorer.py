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


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalized 2-D Gaussian (k, k), k = blur_kernel_size(sigma): torchvision's gaussian_blur kernel.

    Built from Python floats so a traced graph holds it as a constant (ONNX needs a known kernel)."""
    k = blur_kernel_size(sigma)
    g = [math.exp(-0.5 * ((i - k // 2) / sigma) ** 2) for i in range(k)]
    g1 = torch.tensor([v / sum(g) for v in g], dtype=torch.float32)
    return g1[:, None] * g1[None, :]


class PadimScorer(nn.Module):
    """Mahalanobis distance of each patch embedding to its position's Gaussian, upsampled
    bilinearly to the input size, blurred with a Gaussian of ``sigma`` pixels; image score = max."""

    def __init__(self, extractor: FeatureExtractor, mean: torch.Tensor, factor: torch.Tensor,
                 grid: tuple[int, int], sigma: float):
        super().__init__()
        self.extractor = extractor
        self.grid = grid
        self.sigma = float(sigma)
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("factor", factor.float().contiguous())
        # z = W x - W mean: precompute W mean once so scoring is a single batched matmul
        bias = torch.bmm(factor.double(), mean.double().unsqueeze(2)).squeeze(2)
        self.register_buffer("bias", bias.float())

    def distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) embeddings -> (B, h, w) Mahalanobis distances."""
        b, d, h, w = embeddings.shape
        # contiguous: the permuted view is legal for bmm but an order of magnitude slower on CPU
        x = embeddings.permute(2, 3, 0, 1).reshape(h * w, b, d).contiguous()
        z = torch.baddbmm(-self.bias.unsqueeze(1), x, self.factor.transpose(1, 2))
        return z.square().sum(dim=2).clamp_min(0).sqrt().reshape(h, w, b).permute(2, 0, 1)

    def smooth(self, distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample (B, h, w) distances to ``size`` and blur them."""
        maps = F.interpolate(distances.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            # reflect padding + one convolution, as torchvision's gaussian_blur, with a fixed kernel
            kernel = gaussian_kernel(self.sigma).to(maps)
            pad = kernel.shape[-1] // 2
            maps = F.conv2d(F.pad(maps, [pad, pad, pad, pad], mode="reflect"), kernel[None, None])
        return maps.squeeze(1)

    def score_embeddings(self, embeddings: torch.Tensor, size: tuple[int, int],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) embeddings -> (maps (B, *size), scores (B,))."""
        if tuple(embeddings.shape[-2:]) != self.grid:
            raise ValueError(f"feature grid {tuple(embeddings.shape[-2:])} != fitted grid {self.grid}; "
                             "images must have the model's input size")
        maps = self.smooth(self.distances(embeddings), size)
        return maps, maps.flatten(1).amax(dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (maps (B, H, W), scores (B,))."""
        return self.score_embeddings(self.extractor(images), tuple(images.shape[-2:]))
