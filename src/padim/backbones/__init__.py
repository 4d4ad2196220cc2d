"""Backbones: ImageNet CNNs that give PaDiM its features, looked up by name."""

from . import ensemble, packaged, torchvision_resnet  # noqa: F401  (register the built-in backbones)
from .extractor import FeatureExtractor, channel_index
from .registry import BackboneError, BackboneSpec, get_spec, list_backbones, register

__all__ = [
    "BackboneError", "BackboneSpec", "FeatureExtractor", "channel_index", "get_spec",
    "list_backbones", "register",
]
