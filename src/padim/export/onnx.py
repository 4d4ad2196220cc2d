"""ONNX export of a fitted model and an onnxruntime runner with the native model's predict surface.

The exported graph is :class:`padim.model.PadimScorer` traced whole (as :class:`ScoringGraph`): uint8 RGB images
(B, 3, H, W) in; ``maps`` (B, H, W) float32 and ``scores`` (B,) float32 out. Normalization,
backbone taps, channel selection, Mahalanobis distance, bilinear upsampling, Gaussian blur and
the max all run inside the graph. The threshold, heat-map range and provenance travel in the
file's ``metadata_props`` (key ``padim``, JSON), so the file alone is a deployable model.

A model that scores cell by cell is traced that way (``CellWhitening.graph_distances``: its
per-cell weights, gathered per cell), so the graph holds the weights the model file holds. Large
float32 weights whose values are all float16 (a float16 model's factor) are stored as float16
and cast back inside the graph. A graph whose weights would pass protobuf's 2 GB limit is written
as ``NAME.onnx`` plus its weights in ``NAME.onnx.data`` (ONNX external data), loaded together.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_path
from ..checksums import sha256_of
from ..datasets.images import ImageFiles, ImageSource
from ..model import ModelFileError, Padim, Prediction
from ..model.padim import decode_workers, gather_prediction, threshold_labels
from .graph import ScoringGraph

OPSET = 17  # ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)
META_KEY = "padim"
ONNX_FORMAT = "visa-padim-onnx/1"
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights above which they go to NAME.onnx.data (limit: 2 GiB)
HALF_MIN_ELEMENTS = 4096  # smaller weights stay float32: a Cast node each would outweigh the saving


def external_data_path(path: Path) -> Path:
    """Where the weights of a large ONNX file ``path`` are: ``path`` + ``.data``."""
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """The files an exported model consists of: the graph, and its weights file if it has one."""
    data = external_data_path(path)
    return [path, data] if data.is_file() else [path]


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


def model_id(sha256: str) -> str:
    """Short model id: the first 12 hex digits of the source model file's sha256."""
    return sha256[:12]


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ModelFileError(
            f"ONNX support needs the optional packages onnx and onnxruntime ({exc.name} missing); "
            "install them with: pip install 'visa-padim[onnx]'"
        ) from None
    return onnx, onnxruntime


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
    onnx, _ = _import_onnx()
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
        "outputs": "maps: float32 (batch, H, W); scores: float32 (batch,) = max of each map",
    })
    example = torch.zeros(1 if dynamic_batch else batch_size, 3, h, w, dtype=torch.uint8)
    graph = ScoringGraph(scorer.to("cpu")).eval()  # traced cell by cell if it keeps cells
    axes = {"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}} if dynamic_batch else None
    out = Path(out)
    data = external_data_path(out)
    with (atomic_path(out) as tmp, warnings.catch_warnings(),
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


class OnnxModel:
    """An exported model run by onnxruntime on the CPU, with :class:`padim.Padim`'s predict surface
    (``iter_predict``, ``predict``, ``labels``, ``image_size_``, ``threshold_``, ``info_``, ``meta_``)."""

    def __init__(self, path: Path, session, meta: dict, batch_size: int = 16, num_workers: int | None = None,
                 progress: bool = False):
        self.path = path
        self.session = session
        self.meta_ = meta
        self.backbone = meta.get("backbone")
        self.image_size_ = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        self.threshold_ = None if meta.get("threshold") is None else float(meta["threshold"])
        self.info_ = {k: meta.get(k) for k in ("n_train", "n_calibration", "calibration_scores", "map_range")}
        fixed = session.get_inputs()[0].shape[0]
        self.fixed_batch = fixed if isinstance(fixed, int) else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, progress: bool = False) -> OnnxModel:
        """Open a file written by :func:`export_onnx`; ModelFileError when it is not one."""
        onnx, ort = _import_onnx()
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelFileError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ModelFileError(f"{path}: ONNX file without padim metadata; export it with 'padim export'")
        try:
            meta = json.loads(raw)
            if meta.get("onnx_format") != ONNX_FORMAT:
                raise ModelFileError(f"{path}: ONNX model format {meta.get('onnx_format')!r}, this version reads "
                                     f"{ONNX_FORMAT!r}; re-export it")
            model = cls(path, session, meta, progress=progress)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ModelFileError(f"{path}: corrupt padim metadata ({exc!r})") from None
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (["images"], ["maps", "scores"]):
            raise ModelFileError(f"{path}: graph has inputs/outputs {names}, expected images -> maps, scores")
        return model

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, H, W) -> (scores (B,), maps (B, H, W)); pads to a fixed graph batch."""
        n = batch.shape[0]
        if self.fixed_batch is None:
            maps, scores = self.session.run(None, {"images": batch})
            return scores, maps
        parts = []
        for start in range(0, n, self.fixed_batch):
            chunk = batch[start:start + self.fixed_batch]
            pad = self.fixed_batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            maps, scores = self.session.run(None, {"images": chunk})
            parts.append((scores[: len(chunk) - pad], maps[: len(chunk) - pad]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def iter_predict(self, images: Sequence[ImageSource] | torch.Tensor, desc: str = "predict",
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (scores (B,), maps (B, H, W)) batch by batch; inputs as for :meth:`Padim.iter_predict`
        (paths, PIL images, HxWx3 arrays, or a uint8 (N, 3, H, W) tensor)."""
        if isinstance(images, torch.Tensor):
            array = np.ascontiguousarray(images.cpu().numpy().astype(np.uint8, copy=False))
            batches = (array[i:i + self.batch_size] for i in range(0, len(array), self.batch_size))
        else:
            workers = decode_workers(self.num_workers, len(images), self.batch_size)
            batches = (b.numpy() for b in torch.utils.data.DataLoader(
                ImageFiles(images, self.image_size_), batch_size=self.batch_size, num_workers=workers))
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
            yield self._run(batch)

    def predict(self, images: Sequence[ImageSource] | torch.Tensor) -> Prediction:
        """Anomaly scores, maps and labels (at the stored threshold) for all images."""
        return gather_prediction(self.iter_predict(images), self.image_size_, self.labels)

    def labels(self, scores: np.ndarray) -> np.ndarray | None:
        """1 where a score exceeds the stored threshold, else 0 (None without a threshold)."""
        return threshold_labels(scores, self.threshold_)
