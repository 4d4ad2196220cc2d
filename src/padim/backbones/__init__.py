"""Backbones: ImageNet CNNs that give PaDiM its features, looked up by name.

Importing this package registers the built-in backbones without importing torch; the feature
extractor (which needs it) is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from . import catalog  # noqa: F401  (registers the built-in backbones)
from .registry import BackboneError, BackboneSpec, get_spec, list_backbones, register

if TYPE_CHECKING:
    from .extractor import FeatureExtractor, channel_index

__all__ = [
    "BackboneError", "BackboneSpec", "FeatureExtractor", "channel_index", "get_spec",
    "list_backbones", "register",
]
__getattr__ = lazy_attributes(__name__, {"FeatureExtractor": ".extractor", "channel_index": ".extractor"})
