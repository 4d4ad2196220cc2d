"""ONNX export of a fitted model and an onnxruntime runner with the native model's predict surface.

The exported graph is :class:`padim.model.PadimScorer` traced whole (as :class:`ScoringGraph`): uint8 RGB images
(B, 3, H, W) in; ``maps`` (B, H, W) float32 and ``scores`` (B,) float32 out. Normalization,
backbone taps, channel selection, Mahalanobis distance, bilinear upsampling, Gaussian blur and
the max all run inside the graph. The threshold, heat-map range and provenance travel in the
file's ``metadata_props`` (key ``padim``, JSON), so the file alone is a deployable model.

A model that scores cell by cell is traced that way (``Whitening.graph_distances``: its
per-cell weights, gathered per cell), so the graph holds the weights the model file holds. Large
float32 weights whose values are all float16 (a float16 model's factor) are stored as float16
and cast back inside the graph. A graph whose weights would pass protobuf's 2 GB limit is written
as ``NAME.onnx`` plus its weights in ``NAME.onnx.data`` (ONNX external data), loaded together.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_path
from ..checksums import sha256_of
from ..model import Padim
from .graph import ScoringGraph
from .runtime import META_KEY, ONNX_FORMAT, external_data_path, import_optional, model_id

logger = logging.getLogger(__name__)
OPSET = 17  # ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights above which they go to NAME.onnx.data (limit: 2 GiB)
HALF_MIN_ELEMENTS = 4096  # smaller weights stay float32: a Cast node each would outweigh the saving


def _half_weights(proto) -> None:
    """Store each large float32 initializer whose values are all exactly float16 as float16, cast
    back to float32 by a Cast node at the top of the graph: half the bytes, the same numbers."""
    from onnx import TensorProto, helper, numpy_helper
    casts = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < HALF_MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}.float16"))
        casts.append(helper.make_node("Cast", [f"{name}.float16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}.cast"))
    for node in reversed(casts):
        proto.graph.node.insert(0, node)


def _weight_bytes(proto) -> int:
    return sum(len(init.raw_data) or 4 * int(np.prod(init.dims)) for init in proto.graph.initializer)


def _set_shape(value, dims: Sequence[int | str]) -> None:
    """Overwrite a graph input/output shape (the tracer's names for derived dims are noise)."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def export_onnx(model: Padim, out: Path, source: Path | None = None, dynamic_batch: bool = True,
                batch_size: int = 1, opset: int = OPSET) -> Path:
    """Write ``model``'s whole scoring pipeline as one ONNX graph to ``out`` (atomically).

    dynamic_batch: the batch dimension is free; otherwise the graph takes exactly ``batch_size``
    images. source: the .safetensors file the model came from (its sha256 goes in the metadata).
    """
    onnx = import_optional("onnx")
    import_optional("onnxruntime")  # the self-check runs the file
    scorer = model.check_fitted()
    h, w = model.image_size_
    meta = dict(model.meta_)
    sha = sha256_of(source) if source is not None else None
    meta.update({
        "onnx_format": ONNX_FORMAT,
        "opset": opset,
        "exported_with": __version__,
        "source_model": source.name if source is not None else None,
        "source_sha256": sha,
        "model_id": model_id(sha) if sha else None,
        "batch": "dynamic" if dynamic_batch else batch_size,
        "input": "images: uint8 (batch, 3, H, W) RGB, already resized to image_size",
        "outputs": f"maps: float32 (batch, H, W); scores: float32 (batch,), the image score "
                   f"'{scorer.maps.score}' (see padim.model.scorer.AnomalyMaps)",
    })
    example = torch.zeros(1 if dynamic_batch else batch_size, 3, h, w, dtype=torch.uint8)
    graph = ScoringGraph(scorer.to("cpu")).eval()  # traced cell by cell if it keeps cells
    axes = {"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}} if dynamic_batch else None
    out = Path(out)
    data = external_data_path(out)
    if model.params_.feature_dtype != "float32":
        logger.warning("the model was fitted on %s features; the exported graph computes them in float32 (ONNX "
                       "runtimes have no %s convolutions), so its scores differ from the model's (the export's check "
                       "prints by how much) and its threshold may not keep its promise; fit with --feature-dtype "
                       "float32 for a model to export",
                       model.params_.feature_dtype, model.params_.feature_dtype)
    # ONNX runtimes have no bfloat16 convolutions: the graph is traced in float32
    with (atomic_path(out) as tmp, warnings.catch_warnings(), scorer.extractor.float32(),
          tempfile.TemporaryDirectory(prefix=".padim-export-", dir=out.parent) as scratch):
        # the TorchScript exporter is deprecated in favour of torch.export, but it handles this
        # module as is and gives a plain static graph; its warnings are not actionable here
        warnings.simplefilter("ignore")
        # into a folder of its own: over 2 GB the exporter writes one weights file per tensor beside it
        traced = Path(scratch) / "model.onnx"
        torch.onnx.export(graph, (example,), str(traced), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["maps", "scores"], dynamic_axes=axes,
                          do_constant_folding=True)
        proto = onnx.load(str(traced))
        _half_weights(proto)
        b = "batch" if dynamic_batch else batch_size
        _set_shape(proto.graph.input[0], [b, 3, h, w])
        _set_shape(proto.graph.output[0], [b, h, w])
        _set_shape(proto.graph.output[1], [b])
        flat = {
            META_KEY: json.dumps(meta),
            "model_id": meta["model_id"] or "",
            "threshold": "" if model.threshold_ is None else repr(float(model.threshold_)),
            "image_size": f"{h}x{w}",
            "backbone": meta["backbone"],
            "package_version": __version__,
        }
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, flat)
        proto.producer_name, proto.producer_version = "visa-padim", __version__
        external = _weight_bytes(proto) > EXTERNAL_DATA_ABOVE
        if external:
            # written in the scratch folder (onnx appends to an existing weights file), under the
            # final name the graph refers to, then moved beside the graph
            staged = Path(scratch) / out.name
            onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            del proto
            onnx.checker.check_model(str(staged))  # by path: checked with its weights file
            os.replace(staged.with_name(data.name), data)
            os.replace(staged, tmp)
        else:
            onnx.save(proto, str(tmp))
            del proto
            onnx.checker.check_model(str(tmp))
    if not external and data.is_file():
        os.remove(data)  # a stale weights file of an earlier, larger export
    scorer.to(model.device)
    return out
