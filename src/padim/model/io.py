"""Model files: tensors in safetensors, metadata as JSON inside the same file. Loading never
unpickles anything and checks every shape, dtype and field before the model is used.

Compatibility policy: a file is read when its ``format`` is the one this version writes and the
package version that wrote it is not newer (by major.minor) than this one; anything else is
refused with a message saying to upgrade or re-fit. The file holds no timestamp, so the same fit
gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..atomic import write_bytes
from ..backbones import BackboneError, get_spec
from ..backbones.blocks import ScaleLayout
from ..backbones.extractor import TAP_RESIZE, channel_index
from ..errors import ModelFileError
from .blocks import BlockWhitening
from .padim import FACTOR_DTYPES, Padim
from .scorer import PadimScorer
from .stats import COVARIANCE_ESTIMATORS, position_chunks

# 2: feature pyramid (scales, grids); 3: channels deepest tap first; 4: the factor per cell where
# scoring runs cell by cell, float16 by default
FORMAT = "visa-padim/4"
TENSORS = ("mean", "factor_tril", "channels")  # "factor_tril" only when stored position by position
STORAGE = ("cells", "positions")
MAX_IMAGE_SIDE = 4096

logger = logging.getLogger(__name__)


CHUNK = 1024  # positions per step of packing and unpacking: the full (P, d, d) factor never exists


def _pack(scorer: PadimScorer, dtype: torch.dtype) -> torch.Tensor:
    """The lower triangles of the scorer's whitening factors, row by row: (P, d(d+1)/2)."""
    positions, d = scorer.mean.shape
    rows, cols = torch.tril_indices(d, d)
    packed = torch.empty(positions, rows.numel(), dtype=dtype)
    for part in position_chunks(positions, CHUNK):
        packed[part] = scorer.factor_of(part).cpu()[:, rows, cols]
    return packed


def _unpack(packed: torch.Tensor, d: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, (p, d, d) float32 factors) chunks of a packed factor, for PadimScorer."""
    rows, cols = torch.tril_indices(d, d)
    for part in position_chunks(packed.shape[0], CHUNK):
        out = torch.zeros(part.stop - part.start, d, d)
        out[:, rows, cols] = packed[part].float()
        yield part, out


def _cell_shapes(layouts: list[ScaleLayout]) -> dict[str, tuple[int, ...]]:
    """The stored cell tensors: for taps j < i of scale s, ``w{s}_{i}_{j}`` as BlockWhitening keeps
    it, (tap-j cells, C_j, t t C_i); for j = i the upper triangle of W_ii^T per tap-i cell (its zero
    half dropped), (tap-i cells, C_i (C_i + 1) / 2)."""
    out = {}
    for s, layout in enumerate(layouts):
        for i, a in enumerate(layout.levels):
            for j, b in enumerate(layout.levels[:i + 1]):
                out[f"w{s}_{i}_{j}"] = ((a.cells, a.channels * (a.channels + 1) // 2) if j == i
                                        else (b.cells, b.channels, layout.step(i, j) ** 2 * a.channels))
    return out


def _pack_cells(blocks: BlockWhitening, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The cell tensors of :func:`_cell_shapes` from a scorer's BlockWhitening."""
    out = {}
    for name, shape in _cell_shapes(blocks.layouts).items():
        w = blocks.get_buffer(name).cpu()
        if len(shape) == 2:  # a diagonal block, (cells, C, C)
            rows, cols = torch.triu_indices(w.shape[1], w.shape[1])
            w = w[:, rows, cols]
        out[name] = w.to(dtype).contiguous()
    return out


def _unpack_cells(path: Path, tensors: dict, layouts: list[ScaleLayout], dtype: torch.dtype,
                  mean: torch.Tensor) -> BlockWhitening:
    """The BlockWhitening of stored cell tensors, with W mean per cell computed from ``mean``."""
    blocks = BlockWhitening(layouts)
    for name, shape in _cell_shapes(layouts).items():
        w = _expect(path, tensors, name, shape, dtype)
        target = blocks.get_buffer(name)
        if len(shape) == 2:
            c = target.shape[1]
            rows, cols = torch.triu_indices(c, c)
            if not bool((w[:, rows == cols] > 0).all()):  # W = L^-1 of a Cholesky factor: positive diagonal
                raise ModelFileError(f"{path}: whitening factor has a non-positive diagonal; the file was "
                                     "altered or damaged; re-run 'padim fit'")
            target[:, rows, cols] = w.float()
        else:
            target.copy_(w)
    blocks.set_bias(mean)
    return blocks


def save_model(model: Padim, path: Path) -> Path:
    """Write a fitted model: mean, packed whitening factor, channel index, and JSON metadata."""
    scorer = model._check_fitted()
    spec = get_spec(model.backbone)
    meta = {
        "format": FORMAT,
        "package_version": __version__,
        "backbone": model.backbone,
        "backbone_source": spec.source,
        "taps": list(spec.taps),
        "image_size": list(model.image_size),
        "scales": list(model.scales),
        "grids": [list(g) for g in scorer.grids],
        "d": model.d,
        "seed": model.seed,
        "eps": model.eps,
        "sigma": model.sigma,
        "pool": model.pool,
        "tap_resize": model.tap_resize,
        "storage": "cells" if scorer.blocks is not None else "positions",
        "factor_dtype": model.factor_dtype,
        "covariance": model.covariance,
        "top_k": model.top_k,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "input": "RGB uint8 / 255"},
        "resize": "bilinear, square" if model.image_size[0] == model.image_size[1] else "bilinear",
        "calibration_fraction": model.calibration_fraction,
        "threshold_quantile": model.threshold_quantile,
        "threshold": model.threshold_,
        **model.info_,
    }
    dtype = getattr(torch, model.factor_dtype)
    tensors = {
        "mean": scorer.mean.cpu().contiguous(),
        **(_pack_cells(scorer.blocks, dtype) if scorer.blocks is not None else {"factor_tril": _pack(scorer, dtype)}),
        "channels": scorer.extractor.channels.cpu().contiguous(),
    }
    for name in set(tensors) - {"channels"}:
        if not bool(torch.isfinite(tensors[name]).all()):
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
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable model file ({exc}); re-run 'padim fit'") from exc
    return meta, tensors


def _version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return (isinstance(v, float) or _is_int(v)) and math.isfinite(v)


def _pair(check: Callable) -> Callable:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(check(x) for x in v)


def _scores(v) -> bool:
    return v is None or (isinstance(v, dict) and set(v) == {"min", "median", "max"}
                         and all(_is_float(x) for x in v.values()) and v["min"] <= v["median"] <= v["max"])


# every metadata field this version writes: (check, what a valid value is)
FIELDS: dict[str, tuple[Callable, str]] = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "package_version": (lambda v: isinstance(v, str) and _version(v) is not None, "a version like '0.1.0'"),
    "backbone": (lambda v: isinstance(v, str), "a backbone name"),
    "backbone_source": (lambda v: isinstance(v, str), "a string"),
    "taps": (lambda v: isinstance(v, list) and len(v) >= 1 and all(isinstance(x, str) for x in v), "layer names"),
    "image_size": (_pair(lambda x: _is_int(x) and 8 <= x <= MAX_IMAGE_SIDE), f"[h, w] in 8..{MAX_IMAGE_SIDE}"),
    "scales": (lambda v: isinstance(v, list) and len(v) >= 1 and all(_is_float(x) and 0 < x <= 1 for x in v)
               and len(set(v)) == len(v), "distinct numbers in (0, 1]"),
    "grids": (lambda v: isinstance(v, list) and len(v) >= 1 and all(_pair(lambda x: _is_int(x) and x >= 1)(g)
                                                                   for g in v), "[[h, w], ...] positive integers"),
    "d": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "eps": (lambda v: _is_float(v) and v >= 0, "a finite number >= 0"),
    "sigma": (lambda v: _is_float(v) and 0 <= v <= MAX_IMAGE_SIDE, f"a number in 0..{MAX_IMAGE_SIDE}"),
    "pool": (lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "tap_resize": (lambda v: v in TAP_RESIZE, " or ".join(TAP_RESIZE)),
    "storage": (lambda v: v in STORAGE, " or ".join(STORAGE)),
    "factor_dtype": (lambda v: v in FACTOR_DTYPES, " or ".join(FACTOR_DTYPES)),
    "covariance": (lambda v: v in COVARIANCE_ESTIMATORS, " or ".join(COVARIANCE_ESTIMATORS)),
    "top_k": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "normalization": (lambda v: isinstance(v, dict) and {"mean", "std"} <= set(v), "{mean, std, input}"),
    "resize": (lambda v: isinstance(v, str), "a string"),
    "calibration_fraction": (lambda v: _is_float(v) and 0 <= v < 1, "a number in [0, 1)"),
    "threshold_quantile": (lambda v: _is_float(v) and 0 < v <= 1, "a number in (0, 1]"),
    "threshold": (lambda v: v is None or _is_float(v), "null or a finite number"),
    "n_train": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "n_calibration": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "calibration_scores": (_scores, "null or {min, median, max} in order"),
    "map_range": (lambda v: v is None or _pair(_is_float)(v), "null or [low, high]"),
}
OPTIONAL = {"created"}  # written by 0.1.0 before byte-identical files; ignored


def check_metadata(path: Path, meta: dict) -> None:
    """Refuse metadata this version cannot use: every field present and valid, a known backbone with
    the same taps and normalization, a file not newer than this package. Unknown fields warn."""
    version = meta.get("package_version")
    found, ours = _version(version) if isinstance(version, str) else None, _version(__version__)
    if found is not None and ours is not None and found > ours:
        raise ModelFileError(f"{path}: written by visa-padim {version}, newer than this {__version__}; upgrade "
                             "visa-padim or re-run 'padim fit' with this version")
    for name, (ok, expected) in FIELDS.items():
        if name not in meta:
            raise ModelFileError(f"{path}: metadata field {name!r} missing; the file is damaged or not written "
                                 "by 'padim fit'; re-run 'padim fit'")
        if not ok(meta[name]):
            raise ModelFileError(f"{path}: metadata field {name!r} is {meta[name]!r}, expected {expected}; "
                                 "the file was altered or damaged; re-run 'padim fit'")
    unknown = sorted(set(meta) - set(FIELDS) - OPTIONAL)
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
    if meta["n_calibration"] >= meta["n_train"]:
        raise ModelFileError(f"{path}: n_calibration {meta['n_calibration']} >= n_train {meta['n_train']}; "
                             "the file was altered; re-run 'padim fit'")


def _expect(path: Path, tensors: dict, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ModelFileError(f"{path}: tensor {name!r} missing")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ModelFileError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ModelFileError(f"{path}: tensor {name!r} holds NaN or inf")
    return t


def load_model(path: Path, device: str = "cpu", weights: str | Path | None = None,
               progress: bool = False) -> Padim:
    """Rebuild a :class:`Padim` from a file written by :func:`save_model`."""
    meta, tensors = read_model_file(path)
    check_metadata(path, meta)
    extra = sorted(set(tensors) - set(TENSORS) - {k for k in tensors if re.fullmatch(r"w\d+_\d+_\d+", k)})
    if extra:
        raise ModelFileError(f"{path}: unexpected tensor(s) {', '.join(extra)}; not a file written by 'padim fit'")
    model = Padim(
        backbone=meta["backbone"], image_size=tuple(meta["image_size"]), d=meta["d"], eps=float(meta["eps"]),
        sigma=float(meta["sigma"]), seed=meta["seed"], calibration_fraction=float(meta["calibration_fraction"]),
        threshold_quantile=float(meta["threshold_quantile"]), pool=meta["pool"], tap_resize=meta["tap_resize"],
        covariance=meta["covariance"], top_k=meta["top_k"], scales=meta["scales"], device=device, weights=weights,
        progress=progress, factor_dtype=meta["factor_dtype"],
    )
    if len(meta["grids"]) != len(meta["scales"]):
        raise ModelFileError(f"{path}: {len(meta['grids'])} grids for {len(meta['scales'])} scales; the file was "
                             "altered; re-run 'padim fit'")
    grids = [(g[0], g[1]) for g in meta["grids"]]
    d, positions = model.d, sum(h * w for h, w in grids)
    mean = _expect(path, tensors, "mean", (positions, d), torch.float32)
    dtype = getattr(torch, meta["factor_dtype"])
    channels = _expect(path, tensors, "channels", (d,), torch.int64)
    total = sum(get_spec(model.backbone).channels)
    if not torch.equal(channels, channel_index(total, d, model.seed)):
        raise ModelFileError(f"{path}: channel index does not match backbone {model.backbone!r}, d={d}, "
                             f"seed={model.seed}")
    try:
        probed = model._grids(positions)  # builds the backbone (BackboneError: weights) and runs one probe
    except ValueError as exc:
        raise ModelFileError(f"{path}: grids {meta['grids']} do not fit image size {meta['image_size']} "
                             f"({exc})") from exc
    if probed != grids:
        raise ModelFileError(f"{path}: grids {meta['grids']} do not match the {probed} of image size "
                             f"{meta['image_size']}; the file was altered; re-run 'padim fit'")
    model.grids_ = grids
    if meta["storage"] == "cells":
        layouts = model.feature_extractor().block_layouts(model.image_size)
        if layouts is None:
            raise ModelFileError(f"{path}: factor stored per cell, but tap_resize {meta['tap_resize']!r} at "
                                 f"{meta['image_size']} has no cells; the file was altered; re-run 'padim fit'")
        extra = sorted(set(tensors) - {"mean", "channels", *_cell_shapes(layouts)})
        if extra:
            raise ModelFileError(f"{path}: unexpected tensor(s) {', '.join(extra)}; not a file written by 'padim fit'")
        cells = _unpack_cells(path, tensors, layouts, dtype, mean)
        # off the CPU the scorer works position by position: the factor is rebuilt from the cells
        factor = cells if model._layouts(model.image_size) is not None else (
            (part, cells.factor_of(part, d)) for part in position_chunks(positions, CHUNK))
    else:
        if len(tensors) != 3:
            raise ModelFileError(f"{path}: unexpected tensor(s) {', '.join(sorted(set(tensors) - set(TENSORS)))}; "
                                 "not a file written by 'padim fit'")
        packed = _expect(path, tensors, "factor_tril", (positions, d * (d + 1) // 2), dtype)
        rows, cols = torch.tril_indices(d, d)
        if not bool((packed[:, rows == cols] > 0).all()):  # W = L^-1 of a Cholesky factor: positive diagonal
            raise ModelFileError(f"{path}: whitening factor has a non-positive diagonal; the file was altered or "
                                 "damaged; re-run 'padim fit'")
        factor = _unpack(packed, d)
    model.scorer_ = model.new_scorer(mean, factor).to(model.device)
    model.threshold_ = None if meta["threshold"] is None else float(meta["threshold"])
    model.info_ = {k: meta.get(k) for k in ("n_train", "n_calibration", "calibration_scores", "map_range")}
    model.meta_ = meta
    return model
