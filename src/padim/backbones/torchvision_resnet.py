"""The seed's ResNet backbones from torchvision. Weights come from the local torch hub cache or a
file the user names; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .packaged import load_state
from .registry import BackboneError


def cached_weights(url: str) -> Path:
    """Where torchvision would cache the weights at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


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


def _resnet_builder(factory, weights_enum):
    def build(weights: Path | None, pretrained: bool) -> nn.Module:
        net = factory()
        if pretrained:
            path = weights if weights is not None else cached_weights(weights_enum.url)
            if not path.is_file():
                raise BackboneError(
                    f"ImageNet weights for {factory.__name__} not found at {path}. This tool never "
                    f"downloads at run time: fetch {weights_enum.url} on a machine with network, "
                    f"then put it at {cached_weights(weights_enum.url)} or pass --weights FILE"
                )
            state = load_state(path)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise BackboneError(f"{path}: not {factory.__name__} weights ({exc})") from exc
        return ResNetTaps(net)

    return build


resnet18 = _resnet_builder(torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
wide_resnet50_2 = _resnet_builder(torchvision.models.wide_resnet50_2,
                                  torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1)
