"""MobileNetV2's convolutional trunk (Sandler et al., 2018) in plain ``torch.nn``.

The default backbone needs only these layers; building them here keeps ``torchvision`` out of the
process (``import torchvision.models`` pulls in ``torch._dynamo``, which costs more than the rest
of a one-image prediction's imports). Module names and parameter order are those of
``torchvision.models.mobilenet_v2().features``, so the same state dicts load with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion t, output channels c, repeats n, stride s of the first repeat), as in the paper's Table 2
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class ConvBNReLU6(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU6: state-dict keys ``0.weight`` and ``1.*``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise, 1x1 linear projection; the input is added
    back when the block keeps both resolution and width. One Sequential ``conv`` holds the layers,
    so that fold_batch_norms finds each BatchNorm right after its convolution."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        expand = [ConvBNReLU6(cin, hidden, kernel=1)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """The 19 blocks of MobileNetV2 (width 1.0), randomly initialized as torchvision does: stem
    (stride 2), 17 inverted residual blocks, the final 1x1 convolution to 1280 channels."""
    blocks: list[nn.Module] = [ConvBNReLU6(3, STEM_CHANNELS, stride=2)]
    cin = STEM_CHANNELS
    for t, c, n, s in SETTINGS:
        for i in range(n):
            blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    blocks.append(ConvBNReLU6(cin, LAST_CHANNELS, kernel=1))
    features = nn.Sequential(*blocks)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return features
