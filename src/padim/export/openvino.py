"""OpenVINO: an exported ONNX graph (float or INT8) converted to OpenVINO IR (``NAME.xml`` + ``NAME.bin``),
and run by the OpenVINO runtime on the CPU without torch.

The IR is the ONNX graph as OpenVINO's ONNX reader reads it: the same inputs and outputs, the
weights kept as they are (no float16 compression); an INT8 ONNX graph's QuantizeLinear /
DequantizeLinear pairs become OpenVINO's FakeQuantize, which its CPU plugin runs in INT8. The
``padim`` metadata travels in the IR's ``rt_info`` (key ``padim``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import ModelFileError
from .runtime import META_KEY, ExportedModel, check_graph, import_optional, parse_meta

EXTRA = "openvino"


def bin_path(xml: Path) -> Path:
    """The weights file of an IR ``xml``: same name, suffix ``.bin``."""
    return Path(xml).with_suffix(".bin")


def export_openvino(onnx_path: Path, out: Path) -> Path:
    """Convert the exported ONNX file ``onnx_path`` to OpenVINO IR at ``out`` (``.xml``, with its
    ``.bin`` beside it), both written atomically, the metadata copied with the OpenVINO version added."""
    ov = import_optional("openvino", EXTRA)
    onnx_path, out = Path(onnx_path), Path(out)
    if out.suffix.lower() != ".xml":
        raise ValueError(f"{out}: an OpenVINO model is written as NAME.xml (+ NAME.bin)")
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    props = {p.key: p.value for p in import_optional("onnx").load(str(onnx_path), load_external_data=False)
             .metadata_props}
    meta = parse_meta(onnx_path, props.get(META_KEY))
    meta["runtime"] = f"openvino {ov.__version__.split('-')[0]}"
    model.set_rt_info(json.dumps(meta), [META_KEY])
    with (tempfile.TemporaryDirectory(prefix=".padim-openvino-", dir=out.parent) as scratch,
          atomic_path(out) as tmp):
        staged = Path(scratch) / out.name
        ov.save_model(model, str(staged), compress_to_fp16=False)  # the float numbers as exported
        os.replace(bin_path(staged), bin_path(out))  # the weights first: the .xml names a complete pair
        os.replace(staged, tmp)
    return out


class OpenVinoModel(ExportedModel):
    """An exported model in OpenVINO IR, run by OpenVINO on the CPU (see :class:`ExportedModel`)."""

    def __init__(self, path: Path, compiled, meta: dict, **kwargs):
        super().__init__(path, meta, **kwargs)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = (compiled.output("maps"), compiled.output("scores"))

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, progress: bool = False) -> OpenVinoModel:
        """Open an IR written by :func:`export_openvino`; ModelFileError when it is not one."""
        ov = import_optional("openvino", EXTRA)
        path = Path(path)
        for part in (path, bin_path(path)):
            if not part.is_file():
                raise ModelFileError(f"{part}: model file not found (an OpenVINO model is NAME.xml + NAME.bin)")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line report for bad files
            raise ModelFileError(f"{path}: not a readable OpenVINO model ({_first_line(exc)})") from None
        raw = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
        meta = parse_meta(path, raw)
        try:
            shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
            names = ([i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs])
            check_graph(path, meta, shape, names)
            # float32 arithmetic where the graph is float (the CPU plugin may pick bfloat16 otherwise);
            # the INT8 parts of a quantized graph still run in INT8
            config = {"INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            compiled = core.compile_model(model, "CPU", config)
            return cls(path, compiled, meta, progress=progress)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ModelFileError(f"{path}: corrupt padim metadata ({exc!r})") from None
        except RuntimeError as exc:
            raise ModelFileError(f"{path}: OpenVINO cannot compile this model ({_first_line(exc)})") from None

    def _call(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({"images": batch})
        # copies: the request reuses its output buffers on the next call
        return np.array(result[self.outputs[0]]), np.array(result[self.outputs[1]])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
