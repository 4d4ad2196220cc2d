"""Deployment formats: ONNX export (:mod:`.onnx`, needs torch), running an exported file
(:mod:`.runtime`, no torch), and a loader that opens a native or an exported model by suffix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from .runtime import OnnxModel, model_id

if TYPE_CHECKING:
    from ..model import Padim

# export_onnx imports torch: only when it is asked for
__getattr__ = lazy_attributes(__name__, {"export_onnx": ".onnx", "OPSET": ".onnx"})


def open_model(path: str | Path, device: str = "cpu", weights: str | Path | None = None,
               progress: bool = False) -> Padim | OnnxModel:
    """A model from a ``.onnx`` file (run by onnxruntime on the CPU, without torch) or a native
    ``.safetensors`` file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxModel.load(path, progress=progress)
    from ..model import Padim

    return Padim.load(path, device=device, weights=weights, progress=progress)


__all__ = ["OPSET", "OnnxModel", "export_onnx", "model_id", "open_model"]
