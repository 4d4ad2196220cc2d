"""Deployment formats: ONNX export and a loader that opens a native or an exported model by suffix."""

from __future__ import annotations

from pathlib import Path

from ..model import Padim
from .onnx import OPSET, OnnxModel, export_onnx, model_id


def open_model(path: str | Path, device: str = "cpu", weights: str | Path | None = None,
               progress: bool = False) -> Padim | OnnxModel:
    """A model from a ``.onnx`` file (run by onnxruntime on the CPU) or a native ``.safetensors`` file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxModel.load(path, progress=progress)
    return Padim.load(path, device=device, weights=weights, progress=progress)


__all__ = ["OPSET", "OnnxModel", "export_onnx", "model_id", "open_model"]
