"""Two backbones side by side: their taps at each stride concatenated channel-wise."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import packaged  # noqa: F401  (registers the two backbones combined below)
from .registry import BackboneError, BackboneSpec, get_spec, register


class ConcatTaps(nn.Module):
    """Run two tap modules on the same image; the second gets the input re-normalized for it."""

    def __init__(self, first: nn.Module, second: nn.Module, first_spec: BackboneSpec, second_spec: BackboneSpec):
        super().__init__()
        self.first, self.second = first, second
        m1, s1 = torch.tensor(first_spec.mean), torch.tensor(first_spec.std)
        m2, s2 = torch.tensor(second_spec.mean), torch.tensor(second_spec.std)
        # x2 = (x * s1 + m1 - m2) / s2, as one scale and shift
        self.register_buffer("scale", (s1 / s2).view(1, 3, 1, 1))
        self.register_buffer("shift", ((m1 - m2) / s2).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.first(x)
        b = self.second(x * self.scale + self.shift)
        return [torch.cat([fa, fb], dim=1) for fa, fb in zip(a, b, strict=True)]


def register_concat(first: str, second: str) -> BackboneSpec:
    """Register ``first+second``; it takes ``first``'s input normalization."""
    a, b = get_spec(first), get_spec(second)

    def build(weights: Path | None, pretrained: bool) -> nn.Module:
        if weights is not None:
            raise BackboneError(f"{first}+{second} loads its packaged weights; --weights is not supported")
        return ConcatTaps(a.build(None, pretrained), b.build(None, pretrained), a, b)

    return register(BackboneSpec(
        f"{first}+{second}", build, a.mean, a.std,
        tuple(f"{x} + {y}" for x, y in zip(a.taps, b.taps, strict=True)),
        tuple(x + y for x, y in zip(a.channels, b.channels, strict=True)),
        f"{a.source}; {b.source}",
    ))


register_concat("mobilenet_v2", "efficientnet_lite0")
