"""Deployment formats: ONNX export (:mod:`.onnx`, needs torch), its INT8 quantization
(:mod:`.quantize`) and OpenVINO conversion (:mod:`.openvino`), running an exported file
(:mod:`.runtime`, :mod:`.openvino`; no torch), and a loader that opens a model by suffix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from .runtime import ExportedModel, OnnxModel, model_id

if TYPE_CHECKING:
    from ..model import Padim

# export_onnx imports torch: only when it is asked for
__getattr__ = lazy_attributes(__name__, {"export_onnx": ".onnx", "OPSET": ".onnx"})


def open_model(path: str | Path, device: str = "cpu", weights: str | Path | None = None,
               progress: bool = False) -> Padim | ExportedModel:
    """A model from a ``.onnx`` file (run by onnxruntime on the CPU, without torch), a ``.xml``
    OpenVINO IR (OpenVINO on the CPU, without torch) or a native ``.safetensors`` file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxModel.load(path, progress=progress)
    if path.suffix.lower() == ".xml":
        from .openvino import OpenVinoModel

        return OpenVinoModel.load(path, progress=progress)
    from ..model import Padim

    return Padim.load(path, device=device, weights=weights, progress=progress)


EXPORTED_SUFFIXES = (".onnx", ".xml")  # files opened by a runtime other than torch (CPU only)

__all__ = ["EXPORTED_SUFFIXES", "OPSET", "ExportedModel", "OnnxModel", "export_onnx", "model_id", "open_model"]
