"""Turn uint8 images into PaDiM embeddings: normalize, run the backbone, resize the three taps to
the finest one, concatenate, keep a fixed random channel subset."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .registry import get_spec


def channel_index(total: int, d: int, seed: int) -> torch.Tensor:
    """Sorted random subset of ``d`` of ``total`` channels, fixed by ``seed`` (PaDiM's reduction)."""
    if not 0 < d <= total:
        raise ValueError(f"d must be in 1..{total} for this backbone, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:d].sort().values


class FeatureExtractor(nn.Module):
    """uint8 (B, 3, H, W) images -> float32 (B, d, H/4, W/4) embeddings."""

    def __init__(self, backbone: str, channels: torch.Tensor, weights: Path | None = None, pretrained: bool = True):
        super().__init__()
        spec = get_spec(backbone)
        self.net = spec.build(weights, pretrained).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("channels", channels.to(torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        maps = self.net(x)
        size = maps[0].shape[-2:]
        # nearest upsampling keeps each deep feature constant over the finer patches it covers,
        # as in the PaDiM reference code
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="nearest") for m in maps[1:]]
        return torch.cat(maps, dim=1).index_select(1, self.channels)
