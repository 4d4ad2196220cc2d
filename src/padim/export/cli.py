"""The job behind ``padim export``: load a native model, write the ONNX file, check it runs the same."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from ..model import Padim
from .onnx import export_onnx
from .runtime import OnnxModel, external_data_path, onnx_files


def parse_batch(value: str) -> int | None:
    """'dynamic' -> None, a positive integer -> that fixed batch size."""
    if value.strip().lower() == "dynamic":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}: use 'dynamic' or a positive integer", param_hint="--batch")
    return n


def self_check(model: Padim, onnx_model: OnnxModel, n: int = 2) -> tuple[float, float]:
    """Max abs difference of (scores, maps) between the native model and the ONNX file on ``n``
    random images: a smoke test that the written graph runs and computes the same thing."""
    h, w = model.image_size_
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    native = model.predict(images)
    exported = onnx_model.predict(images)
    return (float(np.abs(native.scores - exported.scores).max()), float(np.abs(native.maps - exported.maps).max()))


def export_command(model_path: Path, out: Path, batch: str, opset: int, weights: Path | None) -> str:
    """Export ``model_path`` to ``out``; returns the line to print."""
    fixed = parse_batch(batch)
    model = Padim.load(model_path, weights=weights)
    export_onnx(model, out, source=model_path, dynamic_batch=fixed is None, batch_size=fixed or 1, opset=opset)
    exported = OnnxModel.load(out)
    score_diff, map_diff = self_check(model, exported, n=fixed or 2)
    size_mb = sum(p.stat().st_size for p in onnx_files(out)) / 1e6
    if len(onnx_files(out)) > 1:
        out = f"{out} + {external_data_path(out).name}"
    return (f"wrote {out} ({size_mb:.1f} MB, opset {opset}, batch {'dynamic' if fixed is None else fixed}, "
            f"model id {exported.meta_['model_id']}); check on random images: max |score diff| {score_diff:.2e}, "
            f"max |map diff| {map_diff:.2e}")
