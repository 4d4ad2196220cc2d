"""Running an exported model: onnxruntime on the CPU behind :class:`padim.Padim`'s predict surface,
without torch, so that a fresh process scoring a few images starts in about the time onnxruntime
takes to open the file (see :mod:`padim.export.onnx` for the export and the graph)."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..datasets.images import ImageSource, read_image
from ..errors import ModelFileError
from ..params import stored_threshold
from ..prediction import Prediction, gather_prediction, threshold_labels

META_KEY = "padim"
ONNX_FORMAT = "visa-padim-onnx/1"


def external_data_path(path: Path) -> Path:
    """Where the weights of a large ONNX file ``path`` are: ``path`` + ``.data``."""
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """The files an exported model consists of: the graph, and its weights file if it has one."""
    data = external_data_path(path)
    return [path, data] if data.is_file() else [path]


def model_id(sha256: str) -> str:
    """Short model id: the first 12 hex digits of the source model file's sha256."""
    return sha256[:12]


EXTRAS = {"onnx": "onnx and onnxruntime", "openvino": "openvino"}


def import_optional(name: str, extra: str = "onnx"):
    """The module ``name`` of an optional extra (``onnx``: onnx to write a file, onnxruntime to run
    one; ``openvino``); ModelFileError says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelFileError(
            f"{'ONNX' if extra == 'onnx' else 'OpenVINO'} support needs the optional packages {EXTRAS[extra]} "
            f"({exc.name} missing); install them with: pip install 'visa-padim[{extra}]'"
        ) from None


def parse_meta(path: Path, raw: str | None) -> dict:
    """The ``padim`` metadata JSON of an exported file, checked for its format; ModelFileError if not."""
    if raw is None:
        raise ModelFileError(f"{path}: exported file without padim metadata; export it with 'padim export'")
    try:
        meta = json.loads(raw)
        fmt = meta.get("onnx_format")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: corrupt padim metadata ({exc!r})") from None
    if fmt != ONNX_FORMAT:
        raise ModelFileError(f"{path}: ONNX model format {fmt!r}, this version reads {ONNX_FORMAT!r}; re-export it")
    return meta


def check_graph(path: Path, meta: dict, input_shape: list, names: tuple[list[str], list[str]]) -> None:
    """The graph's inputs, outputs and image size are the ones its metadata describes (a file whose
    metadata belongs to another model, or whose quantization record names another model, is refused)."""
    if names != (["images"], ["maps", "scores"]):
        raise ModelFileError(f"{path}: graph has inputs/outputs {names}, expected images -> maps, scores")
    size = [int(v) for v in meta["image_size"]]
    dims = [d if isinstance(d, int) else None for d in input_shape[2:]]
    if len(input_shape) != 4 or dims != size:
        raise ModelFileError(f"{path}: graph input {input_shape} does not match the metadata's image size "
                             f"{size}: the file's metadata belongs to another model; re-export it")
    quantization = meta.get("quantization")
    if quantization is not None and quantization.get("source_model_id") != meta.get("model_id"):
        raise ModelFileError(f"{path}: quantized for model {quantization.get('source_model_id')!r} but labelled "
                             f"{meta.get('model_id')!r}; quantize this model's own export")


class ExportedModel:
    """An exported model run without torch, with :class:`padim.Padim`'s predict surface
    (``iter_predict``, ``predict``, ``labels``, ``image_size_``, ``threshold_``, ``info_``, ``meta_``);
    a runtime supplies ``_call`` (one graph call) and ``fixed_batch`` (None: any batch size)."""

    fixed_batch: int | None = None

    def __init__(self, path: Path, meta: dict, batch_size: int = 16, num_workers: int | None = None,
                 progress: bool = False):
        self.path = path
        self.meta_ = meta
        self.backbone = meta.get("backbone")
        self.image_size_ = (int(meta["image_size"][0]), int(meta["image_size"][1]))
        self.threshold_, self.info_ = stored_threshold(meta)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def _call(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, H, W) -> (maps (B, H, W), scores (B,)): one run of the graph."""
        raise NotImplementedError

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 3, H, W) -> (scores (B,), maps (B, H, W)); pads to a fixed graph batch."""
        n = batch.shape[0]
        if self.fixed_batch is None:
            maps, scores = self._call(batch)
            return scores, maps
        parts = []
        for start in range(0, n, self.fixed_batch):
            chunk = batch[start:start + self.fixed_batch]
            pad = self.fixed_batch - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            maps, scores = self._call(chunk)
            parts.append((scores[: len(chunk) - pad], maps[: len(chunk) - pad]))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def iter_predict(self, images, desc: str = "predict") -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (scores (B,), maps (B, H, W)) batch by batch; inputs as for :meth:`Padim.iter_predict`
        (paths, PIL images, HxWx3 arrays, or a uint8 (N, 3, H, W) array or tensor)."""
        if hasattr(images, "shape"):  # a uint8 (N, 3, H, W) numpy array or torch tensor
            array = np.ascontiguousarray(np.asarray(images).astype(np.uint8, copy=False))
            batches = (array[i:i + self.batch_size] for i in range(0, len(array), self.batch_size))
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress, leave=False):
                yield self._run(batch)
            return
        sources = list(images)
        chunks = [sources[i:i + self.batch_size] for i in range(0, len(sources), self.batch_size)]
        workers = self.num_workers if self.num_workers is not None else (min(2, os.cpu_count() or 1)
                                                                         if len(chunks) > 1 else 0)
        bar = tqdm(total=len(chunks), desc=desc, unit="batch", disable=not self.progress, leave=False)
        if not workers:
            for chunk in chunks:
                yield self._run(np.stack([self._decode(s) for s in chunk]))
                bar.update()
            bar.close()
            return
        # threads (PIL decodes and resizes without holding the GIL; no torch needed) decode the
        # next batch while onnxruntime scores this one
        with ThreadPoolExecutor(workers) as pool:
            pending = [pool.submit(self._decode, s) for s in chunks[0]] if chunks else []
            for following in [*chunks[1:], None]:
                ready = pending
                pending = [pool.submit(self._decode, s) for s in following] if following else []
                yield self._run(np.stack([f.result() for f in ready]))
                bar.update()
        bar.close()

    def _decode(self, source: ImageSource) -> np.ndarray:
        """uint8 (3, H, W) of one image at the model's input size."""
        return np.asarray(read_image(source, self.image_size_), dtype=np.uint8).transpose(2, 0, 1)

    def predict(self, images) -> Prediction:
        """Anomaly scores, maps and labels (at the stored threshold) for all images."""
        return gather_prediction(self.iter_predict(images), self.image_size_, self.labels)

    def labels(self, scores: np.ndarray) -> np.ndarray | None:
        """1 where a score exceeds the stored threshold, else 0 (None without a threshold)."""
        return threshold_labels(scores, self.threshold_)


class OnnxModel(ExportedModel):
    """An exported model run by onnxruntime on the CPU (see :class:`ExportedModel`)."""

    def __init__(self, path: Path, session, meta: dict, **kwargs):
        super().__init__(path, meta, **kwargs)
        self.session = session
        fixed = session.get_inputs()[0].shape[0]
        self.fixed_batch = fixed if isinstance(fixed, int) else None

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, progress: bool = False) -> OnnxModel:
        """Open a file written by :func:`export_onnx` (float or INT8); ModelFileError when it is not one."""
        ort = import_optional("onnxruntime")  # not onnx: its import costs more than opening a model
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimizer notes (unused initializers) are noise
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelFileError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        meta = parse_meta(path, session.get_modelmeta().custom_metadata_map.get(META_KEY))
        try:
            check_graph(path, meta, session.get_inputs()[0].shape,
                        ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]))
            return cls(path, session, meta, progress=progress)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, ModelFileError):
                raise
            raise ModelFileError(f"{path}: corrupt padim metadata ({exc!r})") from None

    def _call(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(None, {"images": batch})
        return maps, scores
