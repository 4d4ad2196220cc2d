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


TAP_RESIZE = ("nearest", "bilinear")
MICRO_BATCH = 1


class FeatureExtractor(nn.Module):
    """uint8 (B, 3, H, W) images -> float32 (B, d, H/4, W/4) embeddings.

    ``channels`` indexes the concatenated taps. ``pool`` > 1 averages each tap over a pool x pool
    neighbourhood at its own resolution (PatchCore's local aggregation; 1 = plain PaDiM).
    ``tap_resize`` is how the deeper taps are brought to the stride-4 grid. The network runs on
    ``micro_batch`` images at a time (None: the whole batch): its activations then stay in the CPU
    caches, several times faster per image than one large batch on CPU (see benchmarks/speed.py).
    """

    def __init__(self, backbone: str, channels: torch.Tensor, weights: Path | None = None, pretrained: bool = True,
                 pool: int = 1, tap_resize: str = "nearest", micro_batch: int | None = MICRO_BATCH):
        super().__init__()
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd size >= 1, got {pool}")
        if tap_resize not in TAP_RESIZE:
            raise ValueError(f"tap_resize must be one of {TAP_RESIZE}, got {tap_resize!r}")
        spec = get_spec(backbone)
        # channels-last lets oneDNN pick its fast depthwise and 1x1 convolution kernels on CPU
        self.net = spec.build(weights, pretrained).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.micro_batch = micro_batch
        self.pool = pool
        self.tap_resize = tap_resize
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("channels", channels.to(torch.long))
        # the subset split per tap, so unused channels are never pooled or resized
        offsets = torch.tensor([0, *spec.channels]).cumsum(0)
        for i in range(len(spec.channels)):
            keep = channels[(channels >= offsets[i]) & (channels < offsets[i + 1])] - offsets[i]
            self.register_buffer(f"tap{i}", keep.to(torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        taps = self._taps(x)
        size = taps[0].shape[-2:]
        # nearest (the PaDiM reference) keeps each deep feature constant over the finer patches
        # it covers; bilinear blends neighbouring deep features
        kwargs = {"align_corners": False} if self.tap_resize == "bilinear" else {}
        maps = []
        for i, tap in enumerate(taps):
            keep = getattr(self, f"tap{i}")
            if keep.numel() == 0:  # a small d may draw no channel from a tap
                continue
            if keep.numel() < tap.shape[1]:
                # index_select returns NCHW; pooling and resizing run several times faster channels-last
                tap = tap.index_select(1, keep).contiguous(memory_format=torch.channels_last)
            m = tap
            if self.pool > 1:
                m = F.avg_pool2d(m, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
            if i > 0:
                m = F.interpolate(m, size=size, mode=self.tap_resize, **kwargs)
            maps.append(m)
        return torch.cat(maps, dim=1)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        step = self.micro_batch
        if step is None or x.shape[0] <= step or x.device.type != "cpu" or torch.jit.is_tracing():
            return self.net(x)
        parts = [self.net(chunk) for chunk in x.split(step)]
        return [torch.cat(maps, dim=0) for maps in zip(*parts, strict=True)]
