"""The job behind ``padim export``: load a native model, write the ONNX (or OpenVINO) file, float or with an
INT8 backbone, and check it runs the same."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from ..model import Padim
from .onnx import export_onnx
from .openvino import bin_path
from .runtime import ExportedModel, OnnxModel, onnx_files


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


def self_check(model: Padim, exported: ExportedModel, images=None, n: int = 2) -> tuple[float, float]:
    """Max abs difference of (scores, maps) between the native model and an exported one on
    ``images`` (default: ``n`` random images): a smoke test that the written graph runs and computes
    the same thing (an INT8 graph is checked on real images: random ones are far outside its calibration)."""
    if images is None:
        h, w = model.image_size_
        images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    native = model.predict(images)
    other = exported.predict(images)
    return (float(np.abs(native.scores - other.scores).max()), float(np.abs(native.maps - other.maps).max()))


def export_command(model_path: Path, out: Path, batch: str, opset: int, weights: Path | None, fmt: str = "onnx",
                   int8: bool = False, calibration: tuple[Path, ...] = (), calibration_images: int = 32,
                   method: str = "minmax", quant_format: str = "qdq", per_channel: bool = True,
                   float_blocks: int = 0) -> str:
    """Export ``model_path`` to ``out`` (ONNX or OpenVINO IR, float or with an INT8 backbone
    calibrated on ``calibration`` images); returns the line to print."""
    fixed = parse_batch(batch)
    if fmt == "openvino" and out.suffix.lower() != ".xml":
        raise click.BadParameter(f"{out}: an OpenVINO model is written as NAME.xml (+ NAME.bin)", param_hint="--out")
    if int8 and not calibration:
        raise click.BadParameter("--int8 needs --calibration PATH (normal images: files or folders)",
                                 param_hint="--calibration")
    if calibration and not int8:
        raise click.BadParameter("--calibration is for --int8", param_hint="--calibration")
    if float_blocks and not int8:
        raise click.BadParameter("--float-blocks is for --int8", param_hint="--float-blocks")
    files = []
    if int8:
        from ..runs import collect_images
        from .quantize import sample_paths

        files = sample_paths([p for p, _ in collect_images(calibration)], calibration_images)
    model = Padim.load(model_path, weights=weights)
    with tempfile.TemporaryDirectory(prefix=".padim-export-", dir=Path(out).parent) as scratch:
        onnx_out = out if fmt == "onnx" and not int8 else Path(scratch) / "model.onnx"
        export_onnx(model, onnx_out, source=model_path, dynamic_batch=fixed is None, batch_size=fixed or 1,
                    opset=opset)
        if int8:
            from .quantize import quantize_onnx

            quantized = out if fmt == "onnx" else Path(scratch) / "model.int8.onnx"
            try:
                onnx_out = quantize_onnx(onnx_out, quantized, files, method=method, quant_format=quant_format,
                                         per_channel=per_channel, skip_blocks=float_blocks)
            except ValueError as exc:  # the options left nothing to quantize
                raise click.BadParameter(str(exc), param_hint="--float-blocks") from None
        if fmt == "openvino":
            from .openvino import OpenVinoModel, export_openvino

            export_openvino(onnx_out, out)
            exported = OpenVinoModel.load(out)
        else:
            exported = OnnxModel.load(out)
    check = files[: max(2, fixed or 2)] if int8 else None
    score_diff, map_diff = self_check(model, exported, images=check, n=fixed or 2)
    parts = [out, bin_path(out)] if fmt == "openvino" else onnx_files(out)
    size_mb = sum(p.stat().st_size for p in parts) / 1e6
    written = " + ".join([str(out), *(p.name for p in parts[1:])])
    kind = "INT8 backbone" if int8 else "float"
    detail = (f", calibrated on {len(files)} images ({method}, {quant_format.upper()}, "
              f"{'per-channel' if per_channel else 'per-tensor'} weights"
              f"{f', blocks 0-{float_blocks - 1} float' if float_blocks else ''})" if int8 else "")
    on = f"{len(check)} calibration images" if int8 else "random images"
    return (f"wrote {written} ({fmt}, {kind}{detail}; {size_mb:.1f} MB, opset {opset}, batch "
            f"{'dynamic' if fixed is None else fixed}, model id {exported.meta_['model_id']}); check on {on}: "
            f"max |score diff| {score_diff:.2e}, max |map diff| {map_diff:.2e}")
