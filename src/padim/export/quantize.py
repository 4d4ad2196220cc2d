"""Static INT8 quantization of an exported graph's backbone with ONNX Runtime's quantization tools.

Only the feature network (the nodes the exporter names ``/net/...``: its convolutions, their
clipped activations and residual additions) is quantized, with scales calibrated on normal images.
The normalization and pyramid resizing before it, and the tap pooling, Mahalanobis distances,
upsampling, blur and max after it stay float32: they are where the anomaly score's resolution lives,
and on this graph they are matrix products that INT8 would coarsen for little speed.

No torch: the float graph comes from :func:`padim.export.onnx.export_onnx`; this module reads and
writes ONNX files and decodes the calibration images with PIL.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..datasets.images import read_image
from ..errors import ModelFileError
from .runtime import META_KEY, import_optional, onnx_files

BACKBONE_PREFIX = "/net/"  # the exporter names the feature network's nodes after its module path
QUANTIZED_OPS = ("Conv", "Clip", "Relu", "Add")  # the backbone's op types that INT8 speeds up or carries through
CALIBRATION_BATCH = 4  # images per calibration run (its intermediate tensors are kept per batch)
METHODS = ("minmax", "percentile", "entropy")
FORMATS = ("qdq", "qoperator")


class CalibrationImages:
    """onnxruntime's CalibrationDataReader over image files: uint8 (B, 3, H, W) batches at the model size.

    Its length and ``set_range`` (in batches) let the quantizer calibrate one batch at a time
    (``CalibStridedMinMax``), folding each batch into the ranges or histograms before the next."""

    def __init__(self, paths: Sequence[Path | str], size: tuple[int, int], batch: int = CALIBRATION_BATCH):
        self.paths, self.size, self.batch = list(paths), size, batch
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index * self.batch, min(end_index * self.batch, len(self.paths))

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def get_next(self) -> dict | None:
        chunk = self.paths[self._next:self._end]
        chunk = chunk[:self.batch]
        if not chunk:
            return None
        self._next += len(chunk)
        images = [np.asarray(read_image(p, self.size), dtype=np.uint8).transpose(2, 0, 1) for p in chunk]
        return {"images": np.ascontiguousarray(np.stack(images))}


@contextmanager
def _quiet():
    """The quantizer logs advice (run its pre-processing) on the root logger at WARNING for every
    call, and its histogram calibrations print a line per batch: noise for a user of ``padim
    export``, whose graph it does not concern."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def backbone_nodes(proto, op_types: Sequence[str] = QUANTIZED_OPS, depthwise: bool = True,
                   blocks: int | None = None, skip_blocks: int = 0) -> list[str]:
    """Names of the feature network's nodes of ``op_types`` in an exported graph; without the
    depthwise (grouped) convolutions unless ``depthwise``; only those of its blocks K (named
    ``/net/blocks.K...``) with skip_blocks <= K < blocks (blocks None: to the end)."""
    out = []
    for n in proto.graph.node:
        if not n.name.startswith(BACKBONE_PREFIX) or n.op_type not in op_types:
            continue
        if not depthwise and n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute):
            continue
        block = re.match(rf"{BACKBONE_PREFIX}blocks\.(\d+)", n.name)
        k = int(block.group(1)) if block else None
        limited = blocks is not None or skip_blocks > 0
        if limited and (k is None or k < skip_blocks or (blocks is not None and k >= blocks)):
            continue
        out.append(n.name)
    return out


def _float_outside_backbone(proto) -> None:
    """Give a float consumer outside the backbone the float tensor back where the quantizer made it
    share the INT8 copy that feeds the backbone (the normalized image is both the first convolution's
    input and the pyramid resizing's): only the backbone sees quantized activations it did not make."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.name.startswith(BACKBONE_PREFIX) or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            source = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if source is not None and not source.name.startswith(BACKBONE_PREFIX):
                node.input[k] = q.input[0]


def tap_nodes(proto, depth: int) -> set[str]:
    """The backbone nodes within ``depth`` steps upstream of a feature tap (a backbone output that a
    node outside the backbone reads): the nodes whose rounding reaches the features most directly."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    frontier = {producers[i].name: producers[i] for n in proto.graph.node if not n.name.startswith(BACKBONE_PREFIX)
                for i in n.input if i in producers and producers[i].name.startswith(BACKBONE_PREFIX)}
    found: set[str] = set()
    for _ in range(depth):
        found |= set(frontier)
        frontier = {producers[i].name: producers[i] for n in frontier.values() for i in n.input
                    if i in producers and producers[i].name.startswith(BACKBONE_PREFIX)}
    return found


def sample_paths(paths: Sequence[Path | str], limit: int, seed: int = 0) -> list[Path]:
    """At most ``limit`` of ``paths``, an evenly spread, fixed sample (sorted order kept)."""
    paths = [Path(p) for p in paths]
    if len(paths) <= limit:
        return paths
    keep = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
    return [paths[i] for i in sorted(keep)]


def quantize_onnx(float_path: Path, out: Path, calibration: Sequence[Path | str], method: str = "minmax",
                  quant_format: str = "qdq", per_channel: bool = True, op_types: Sequence[str] = QUANTIZED_OPS,
                  activation: str = "uint8", float_taps: int = 0, depthwise: bool = True,
                  blocks: int | None = None, skip_blocks: int = 0) -> Path:
    """Write ``float_path`` (an exported float graph) with its backbone quantized to INT8, calibrated on
    the ``calibration`` image files, to ``out`` (atomically). Its ``padim`` metadata gains a
    ``quantization`` record: what was quantized, how, and on how many images. float_taps: how many
    backbone nodes deep, counted back from each feature tap, stay float (0: none). activation:
    "uint8" (the default), "int8", or "uint16" (16-bit activations: a precision probe, no faster)."""
    onnx = import_optional("onnx")
    q = import_optional("onnxruntime.quantization")
    if method not in METHODS or quant_format not in FORMATS:
        raise ValueError(f"method {method!r} / format {quant_format!r}: use one of {METHODS} / {FORMATS}")
    if not calibration:
        raise ValueError("INT8 quantization needs calibration images")
    float_path, out = Path(float_path), Path(out)
    proto = onnx.load(str(float_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[META_KEY])
    if meta.get("quantization"):
        raise ModelFileError(f"{float_path}: already quantized; quantize the float export")
    # the deep image score's head (blocks after the last tap, traced outside /net/) is not selected: it stays float
    kept_float = tap_nodes(proto, float_taps)
    nodes = [n for n in backbone_nodes(proto, op_types, depthwise, blocks, skip_blocks) if n not in kept_float]
    if not backbone_nodes(proto, ("Conv",)):
        raise ModelFileError(f"{float_path}: no backbone convolutions named {BACKBONE_PREFIX}... in the graph")
    if not nodes:  # an empty selection would read as "quantize everything" to onnxruntime
        raise ValueError(f"{float_path}: no backbone nodes left to quantize (blocks {skip_blocks} to {blocks}, "
                         f"{float_taps} float tap steps)")
    del proto
    h, w = (int(v) for v in meta["image_size"])
    reader = CalibrationImages(calibration, (h, w))
    external = len(onnx_files(float_path)) > 1
    with (atomic_path(out) as tmp, _quiet(),
          tempfile.TemporaryDirectory(prefix=".padim-quantize-", dir=out.parent) as scratch):
        staged = Path(scratch) / out.name
        # the quantizer writes its shape-inferred copy beside its input: a link in the scratch folder
        # keeps that out of the float model's folder (and two quantizations of one file apart)
        source = Path(scratch) / "float" / float_path.name
        source.parent.mkdir()
        for part in onnx_files(float_path):
            (source.parent / part.name).symlink_to(part.resolve())
        q.quantize_static(
            str(source), str(staged), reader,
            quant_format=q.QuantFormat.QDQ if quant_format == "qdq" else q.QuantFormat.QOperator,
            nodes_to_quantize=nodes, per_channel=per_channel,
            # ranges only for what can be quantized: a histogram calibration fails on the scores of
            # similar images (a nearly constant tensor), which no quantized node reads
            op_types_to_quantize=list(op_types),
            activation_type={"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8,
                             "uint16": q.QuantType.QUInt16}[activation],
            weight_type=q.QuantType.QInt8,
            calibrate_method={"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                              "entropy": q.CalibrationMethod.Entropy}[method],
            use_external_data_format=external,
            # one batch at a time, folded into the ranges (MinMax) or histograms (percentile, entropy):
            # collected whole, a histogram method keeps every activation of every image (32 images of
            # the default model: over 14 GB). Not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops
            # (does not fold) what it collected each time that count is reached
            extra_options={"CalibStridedMinMax": 1},
        )
        quantized = onnx.load(str(staged))
        _float_outside_backbone(quantized)
        meta["quantization"] = {
            "dtype": "int8",
            "scheme": "static",
            "format": quant_format.upper() if quant_format == "qdq" else "QOperator",
            "per_channel_weights": per_channel,
            "activations": activation,
            "calibration_method": method,
            "calibration_images": len(reader.paths),
            "quantized": f"backbone ({'/'.join(op_types)} nodes named {BACKBONE_PREFIX}...), {len(nodes)} nodes",
            "float_taps": float_taps,
            "depthwise": depthwise,
            "blocks": [skip_blocks, blocks],
            "float": "input normalization, pyramid resizing, tap pooling, Mahalanobis distance, upsampling, blur",
            "source_model_id": meta.get("model_id"),
        }
        props[META_KEY] = json.dumps(meta)
        props["quantization"] = "int8 static (backbone)"
        del quantized.metadata_props[:]
        onnx.helper.set_model_props(quantized, props)
        if external:
            data_name = f"{out.name}.data"
            onnx.save_model(quantized, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staged.with_name(data_name), out.with_name(data_name))
        else:
            onnx.save(quantized, str(staged))
        os.replace(staged, tmp)
    return out
