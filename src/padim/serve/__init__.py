"""The inspection service: an HTTP API and a page for scoring images with a fitted model."""

from .inspector import ImageRejected, Inspector, Limits, decode

__all__ = ["ImageRejected", "Inspector", "Limits", "decode"]
