"""The inspection service: an HTTP API and a page for scoring images with a fitted model.

The names below load on first use, so ``padim.serve.security`` (the start-up checks) imports
neither the model code nor the web framework.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inspector import ImageRejected, Inspector, Limits, decode

__all__ = ["ImageRejected", "Inspector", "Limits", "decode"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(".inspector", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
