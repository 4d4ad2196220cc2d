"""Model files: a file <-> (metadata, tensors). Tensors in safetensors, metadata as JSON inside the
same file. Reading never unpickles anything and checks every metadata field; the estimator
(:meth:`padim.Padim.load`) checks each tensor's shape and dtype before the model is used.

Compatibility policy: a file is read when its ``format`` is the one this version writes and the
package version that wrote it is not newer (by major.minor) than this one; anything else is
refused with a message saying to upgrade or re-fit. The file holds no timestamp, so the same fit
gives the same bytes (only a calibration after the fit is dated).

The sufficient statistics of a fit (for ``padim update`` and ``padim merge``) go to a sidecar file
beside the model, ``<stem>.stats.safetensors`` (:func:`write_stats_file`), in float32.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_path, write_bytes
from ..backbones.registry import get_spec
from ..errors import BackboneError, ModelFileError
from ..params import CHECKS, OLDER_FILES, RETIRED, PadimParams, is_int, is_number

# 2: feature pyramid (scales, grids); 3: channels deepest tap first; 4: the factor per cell where
# scoring runs cell by cell, float16 by default
FORMAT = "visa-padim/4"
STORAGE = ("cells", "positions")
STATS_FORMAT = "visa-padim-stats/1"

logger = logging.getLogger(__name__)


def write_model_file(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``meta`` (with this format and package version added) as one
    safetensors file, atomically, after checking that loading would accept them; returns ``path``."""
    meta = {"format": FORMAT, "package_version": __version__, **meta}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"model tensor {name!r} holds NaN or inf; refusing to write {path}")
    check_metadata(path, meta)  # never write a file that loading would refuse
    write_bytes(path, safetensors_bytes(tensors, metadata={"padim": json.dumps(meta)}))
    return path


def read_model_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, after checking it is one of ours (the metadata first:
    an old or foreign file is refused without reading its tensors)."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("padim")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable model file ({exc}); re-run 'padim fit'") from exc
    if raw is None:
        raise ModelFileError(f"{path}: safetensors file without padim metadata; not a model of this tool")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelFileError(f"{path}: model format {found!r}, this version reads {FORMAT!r} (the whitening "
                             "factor is now stored per cell); re-run 'padim fit'")
    for name, value in OLDER_FILES.items():  # parameters added since the file was written: its behaviour
        meta.setdefault(name, value)
    check_metadata(path, meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable model file ({exc}); re-run 'padim fit'") from exc
    return meta, tensors


def _version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else None


def _pair(check: Callable) -> Callable:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(check(x) for x in v)


def _scores(v) -> bool:
    return v is None or (isinstance(v, dict) and set(v) == {"min", "median", "max"}
                         and all(is_number(x) for x in v.values()) and v["min"] <= v["median"] <= v["max"])


# every metadata field this version writes besides the model's parameters (PadimParams):
# (check, what a valid value is)
FILE_FIELDS: dict[str, tuple[Callable, str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "package_version": (lambda v: isinstance(v, str) and _version(v) is not None, "a version like '0.1.0'"),
    "backbone_source": (lambda v: isinstance(v, str), "a string"),
    "taps": (lambda v: isinstance(v, list) and len(v) >= 1 and all(isinstance(x, str) for x in v), "layer names"),
    "grids": (lambda v: isinstance(v, list) and len(v) >= 1 and all(_pair(lambda x: is_int(x) and x >= 1)(g)
                                                                   for g in v), "[[h, w], ...] positive integers"),
    "storage": (lambda v: v in STORAGE, " or ".join(STORAGE)),
    "normalization": (lambda v: isinstance(v, dict) and {"mean", "std"} <= set(v), "{mean, std, input}"),
    "resize": (lambda v: isinstance(v, str), "a string"),
    "threshold": (lambda v: v is None or is_number(v), "null or a finite number"),
    "n_train": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "n_calibration": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "calibration_scores": (_scores, "null or {min, median, max} in order"),
    "map_range": (lambda v: v is None or _pair(is_number)(v), "null or [low, high]"),
}


def _calibration(v) -> bool:
    keys = {"method", "threshold", "target_fpr", "n", "rank", "expected_fpr", "fpr_interval", "scores"}
    return v is None or (isinstance(v, dict) and set(v) == keys and is_int(v["n"]) and is_int(v["rank"])
                         and 1 <= v["rank"] <= v["n"] == len(v["scores"]) and all(is_number(x) for x in v["scores"])
                         and _pair(is_number)(v["fpr_interval"]) and is_number(v["threshold"]))
FIELDS = {**{name: CHECKS[name] for name in PadimParams.names()}, **FILE_FIELDS}


def model_metadata(params: PadimParams, grids: list[tuple[int, int]], storage: str, weights: list[dict] | None,
                   threshold: float | None, info: dict) -> dict:
    """What a model file says of a fitted model besides its tensors: its parameters, the backbone's
    taps, normalization and weights files, the grids, how the factor is stored, the threshold and
    the training counts."""
    spec = get_spec(params.backbone)
    h, w = params.image_size
    return {
        **params.to_state(),
        "backbone_source": spec.source,
        "backbone_weights": weights,
        "taps": list(spec.taps),
        "grids": [list(g) for g in grids],
        "storage": storage,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "input": "RGB uint8 / 255"},
        "resize": "bilinear, square" if h == w else "bilinear",
        "threshold": threshold,
        **info,
    }


def _weights(v) -> bool:
    return v is None or (isinstance(v, list) and all(
        isinstance(e, dict) and set(e) == {"file", "sha256"} and isinstance(e["file"], str)
        and isinstance(e["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) is not None for e in v))


# fields checked when present: files written before them still load
CHECKED_OPTIONAL: dict[str, tuple[Callable, str]] = {
    "backbone_weights": (_weights, "null or [{file, sha256}, ...]"),
    "calibration": (_calibration, "null or {method, threshold, target_fpr, n, rank, expected_fpr, fpr_interval, "
                                  "scores}"),
    "calibration_history": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
                            "a list of {method, n, target_fpr, threshold}"),
    "map_threshold": (lambda v: v is None or is_number(v), "null or a finite number"),
    "auto": (lambda v: isinstance(v, dict) and isinstance(v.get("chosen"), str)
             and isinstance(v.get("synthetic"), dict), "{chosen, synthetic, ...}: the record of --auto"),
    "fusion_scores": (lambda v: v is None or (isinstance(v, dict) and set(v) == {"map", "deep"}
                                              and len(v["map"]) == len(v["deep"]) >= 2
                                              and all(is_number(x) for x in v["map"] + v["deep"])),
                      "null or {map, deep}: equally many numbers"),
}


def check_metadata(path: Path, meta: dict) -> None:
    """Refuse metadata this version cannot use: every field present and valid, a known backbone with
    the same taps and normalization, a file not newer than this package. Unknown fields warn."""
    version = meta.get("package_version")
    found, ours = _version(version) if isinstance(version, str) else None, _version(__version__)
    if found is not None and ours is not None and found > ours:
        raise ModelFileError(f"{path}: written by visa-padim {version}, newer than this {__version__}; upgrade "
                             "visa-padim or re-run 'padim fit' with this version")
    for name, (ok, expected) in [*FIELDS.items(), *CHECKED_OPTIONAL.items()]:
        if name not in meta:
            if name in CHECKED_OPTIONAL:
                continue
            raise ModelFileError(f"{path}: metadata field {name!r} missing; the file is damaged or not written "
                                 "by 'padim fit'; re-run 'padim fit'")
        if not ok(meta[name]):
            raise ModelFileError(f"{path}: metadata field {name!r} is {meta[name]!r}, expected {expected}; "
                                 "the file was altered or damaged; re-run 'padim fit'")
    unknown = sorted(set(meta) - set(FIELDS) - set(CHECKED_OPTIONAL) - set(RETIRED))
    if unknown:
        logger.warning("%s: ignoring unknown metadata field(s) %s", path, ", ".join(unknown))
    try:
        spec = get_spec(meta["backbone"])
    except BackboneError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    norm = meta["normalization"]
    if tuple(meta["taps"]) != spec.taps or [list(spec.mean), list(spec.std)] != [norm["mean"], norm["std"]]:
        raise ModelFileError(f"{path}: taps or normalization differ from backbone {spec.name!r} in this version; "
                             "the model's features would not match; re-run 'padim fit'")
    if meta["d"] > sum(spec.channels):
        raise ModelFileError(f"{path}: d={meta['d']} exceeds the {sum(spec.channels)} channels of {spec.name!r}")
    if meta["backbone_source"] != spec.source:
        logger.warning("%s: fitted with backbone weights %r, this version uses %r", path, meta["backbone_source"],
                       spec.source)
    if len(meta["grids"]) != len(meta["scales"]):
        raise ModelFileError(f"{path}: {len(meta['grids'])} grids for {len(meta['scales'])} scales; the file was "
                             "altered; re-run 'padim fit'")


def expect_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``tensors[name]`` if it has this shape and dtype and is finite, else ValueError naming it."""
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"tensor {name!r} missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    # NaN and inf propagate through abs and max: one reduction, fast on float16 too, unlike isfinite
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.abs().amax())):
        raise ValueError(f"tensor {name!r} holds NaN or inf")
    return t


def stats_path(model_path: Path) -> Path:
    """The statistics sidecar of a model file: ``model.safetensors`` -> ``model.stats.safetensors``."""
    return model_path.with_name(f"{model_path.stem}.stats.safetensors")


def write_stats_file(path: Path, params: PadimParams, count: float, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a fit's statistics (:meth:`GaussianStats.state`) for ``params`` atomically; returns ``path``."""
    meta = {"format": STATS_FORMAT, "package_version": __version__, "count": count, "params": params.model_state()}
    with atomic_path(path) as tmp:  # written tensor by tensor: no second copy of the sums in memory
        save_file(tensors, tmp, metadata={"padim": json.dumps(meta)})
    return path


def read_stats_file(path: Path, params: PadimParams) -> tuple[float, dict[str, torch.Tensor]]:
    """(count, tensors) of a statistics file written for a model of ``params``; ModelFileError
    names a missing, foreign or mismatched file."""
    if not path.is_file():
        raise ModelFileError(f"{path}: statistics file not found; 'padim fit' writes it beside the model "
                             "(unless --no-stats); re-run 'padim fit'")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("padim", "null"))
            if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
                raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                 f"expected {STATS_FORMAT!r}")
            # an older file's params lack those added since: they hold the values that file behaved by
            written = meta.get("params")
            if not isinstance(written, dict) or {**OLDER_FILES, **written} != {**OLDER_FILES, **params.model_state()}:
                raise ValueError("written for a model of other parameters")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelFileError(f"{path}: not the statistics of this model ({exc}); re-run 'padim fit'") from exc
    return meta["count"], tensors
