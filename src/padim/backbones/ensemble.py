"""Two backbones side by side: their taps at each stride concatenated channel-wise."""

from __future__ import annotations

import torch
from torch import nn

from .registry import BackboneSpec


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
