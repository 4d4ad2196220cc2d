"""The seed's ResNet backbones from torchvision. Weights come from the local torch hub cache (where
``padim download weights`` puts them) or a file the user names; nothing is downloaded here."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ..checksums import sha256_of
from .packaged import load_state
from .registry import BackboneError, with_weights
from .weights import cached_path, hash_prefix


class ResNetTaps(nn.Module):
    """layer1, layer2, layer3 of a torchvision ResNet (strides 4, 8, 16)."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        return [f1, f2, self.layer3(f2)]


def weights_path(name: str, weights: Path | None) -> tuple[Path, str]:
    """The weights file to load for backbone ``name`` (``weights``, else the torch hub cache's) and
    its sha256, hashed once here. BackboneError when it is missing, or when the cached file's hash
    does not start with the prefix in its name (as torch.hub checks a download)."""
    if weights is not None:
        if not weights.is_file():
            raise BackboneError(f"{weights}: weights file not found (--weights)")
        return weights, sha256_of(weights)
    path = cached_path(name)
    if not path.is_file():
        raise BackboneError(f"ImageNet weights for {name} not found at {path}; run 'padim download weights {name}' "
                            "(--mirror URL for a local mirror), or pass --weights FILE. Nothing downloads at run time")
    digest = sha256_of(path)
    if not digest.startswith(hash_prefix(path.name)):
        raise BackboneError(f"{path}: sha256 {digest} does not start with {hash_prefix(path.name)}, the hash in its "
                            f"name: the file is damaged; delete it and run 'padim download weights {name}'")
    return path, digest


def _resnet_builder(factory):
    def build(weights: Path | None, pretrained: bool) -> nn.Module:
        net = factory()
        if not pretrained:
            return ResNetTaps(net)
        path, digest = weights_path(factory.__name__, weights)
        state = load_state(path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"{path}: not {factory.__name__} weights ({exc})") from exc
        return with_weights(ResNetTaps(net), path, digest)

    return build


resnet18 = _resnet_builder(torchvision.models.resnet18)
wide_resnet50_2 = _resnet_builder(torchvision.models.wide_resnet50_2)
