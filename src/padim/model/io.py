"""Model files: tensors in safetensors, metadata as JSON inside the same file. Loading never
unpickles anything and checks every shape, dtype and field before the model is used."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .. import __version__
from ..atomic import write_bytes
from ..backbones import BackboneError, get_spec
from ..backbones.extractor import channel_index
from .padim import Padim
from .scorer import PadimScorer

FORMAT = "visa-padim/1"


class ModelFileError(ValueError):
    """A model file is missing, truncated, tampered or from an incompatible version."""


def _pack(factor: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.tril_indices(factor.shape[-1], factor.shape[-1])
    return factor[:, rows, cols].contiguous()


def _unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    rows, cols = torch.tril_indices(d, d)
    out = torch.zeros(packed.shape[0], d, d, dtype=packed.dtype)
    out[:, rows, cols] = packed
    return out


def save_model(model: Padim, path: Path) -> Path:
    """Write a fitted model: mean, packed whitening factor, channel index, and JSON metadata."""
    scorer = model._check_fitted()
    spec = get_spec(model.backbone)
    meta = {
        "format": FORMAT,
        "package_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": model.backbone,
        "backbone_source": spec.source,
        "taps": list(spec.taps),
        "image_size": list(model.image_size),
        "grid": list(scorer.grid),
        "d": model.d,
        "seed": model.seed,
        "eps": model.eps,
        "sigma": model.sigma,
        "pool": model.pool,
        "tap_resize": model.tap_resize,
        "covariance": model.covariance,
        "top_k": model.top_k,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "input": "RGB uint8 / 255"},
        "resize": "bilinear, square" if model.image_size[0] == model.image_size[1] else "bilinear",
        "calibration_fraction": model.calibration_fraction,
        "threshold_quantile": model.threshold_quantile,
        "threshold": model.threshold_,
        **model.info_,
    }
    tensors = {
        "mean": scorer.mean.cpu().contiguous(),
        "factor_tril": _pack(scorer.factor.cpu()),
        "channels": scorer.extractor.channels.cpu().contiguous(),
    }
    write_bytes(path, safetensors_bytes(tensors, metadata={"padim": json.dumps(meta)}))
    return path


def read_model_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, after checking it is one of ours."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("padim")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
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
        raise ModelFileError(f"{path}: model format {found!r}, this version reads {FORMAT!r}; re-run 'padim fit'")
    return meta, tensors


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
    try:
        model = Padim(
            backbone=meta["backbone"], image_size=tuple(meta["image_size"]), d=int(meta["d"]),
            eps=float(meta["eps"]), sigma=float(meta["sigma"]), seed=int(meta["seed"]),
            calibration_fraction=float(meta["calibration_fraction"]),
            threshold_quantile=float(meta["threshold_quantile"]), pool=int(meta["pool"]),
            tap_resize=str(meta["tap_resize"]), covariance=str(meta["covariance"]), top_k=int(meta["top_k"]),
            device=device, weights=weights,
            progress=progress,
        )
        grid = (int(meta["grid"][0]), int(meta["grid"][1]))
    except BackboneError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{path}: missing or invalid metadata field ({exc!r})") from exc
    d, positions = model.d, grid[0] * grid[1]
    mean = _expect(path, tensors, "mean", (positions, d), torch.float32)
    packed = _expect(path, tensors, "factor_tril", (positions, d * (d + 1) // 2), torch.float32)
    channels = _expect(path, tensors, "channels", (d,), torch.int64)
    total = sum(get_spec(model.backbone).channels)
    if not torch.equal(channels, channel_index(total, d, model.seed)):
        raise ModelFileError(f"{path}: channel index does not match backbone {model.backbone!r}, d={d}, "
                             f"seed={model.seed}")
    model.grid_ = grid
    model.scorer_ = PadimScorer(model.feature_extractor(), mean, _unpack(packed, d), grid, model.sigma,
                                model.top_k).to(model.device)
    model.threshold_ = None if meta.get("threshold") is None else float(meta["threshold"])
    model.info_ = {k: meta.get(k) for k in ("n_train", "n_calibration", "calibration_scores", "map_range")}
    model.meta_ = meta
    return model
