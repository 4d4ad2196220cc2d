"""The jobs behind ``padim calibrate``, ``padim update`` and ``padim merge``: a model file in, a
model file out (atomically, the input kept as it was on any error), one summary line back."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import ModelFileError
from .model import Padim
from .model.io import stats_path
from .model.line import load_stats, merge, recalibrate, update
from .runs import collect_images


def _load(path: Path, device: str = "cpu", progress: bool = False, batch_size: int = 16,
          num_workers: int | None = None) -> Padim:
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path}: not a model written by 'padim fit' (.safetensors); calibrate or update that "
                             "one, then export it again")
    return Padim.load(path, device=device, progress=progress).set_params(batch_size=batch_size,
                                                                         num_workers=num_workers)


def _promise(model: Padim) -> str:
    point = model.info_.get("calibration")
    if point is None:
        return "no threshold (no normal images' scores)"
    low, high = point["fpr_interval"]
    return (f"threshold {model.threshold_:.4g} for a false-alarm target of {point['target_fpr']:g} from "
            f"{point['n']} normal images ({point['method']}): expected {point['expected_fpr']:.2%}, 90% interval "
            f"{low:.2%}..{high:.2%}" + (" (too few images to promise the target)" if
                                        point["expected_fpr"] > point["target_fpr"] else ""))


def _copy_stats(source: Path, target: Path) -> None:
    """The statistics of ``source`` beside ``target`` too (a recalibrated copy has the same fit)."""
    if target.resolve() != source.resolve() and stats_path(source).is_file():
        with atomic_path(stats_path(target)) as tmp:
            shutil.copyfile(stats_path(source), tmp)


def calibrate_job(model_path: Path, normal: Sequence[Path], defective: Sequence[Path] = (), out: Path | None = None,
                  target_fpr: float | None = None, **runtime) -> str:
    """Re-set a model's threshold from ``normal`` images (files or folders) of the line today."""
    model = _load(model_path, **runtime)
    before = model.threshold_
    recalibrate(model, [p for p, _ in collect_images(normal)], target_fpr)
    line = f"{_promise(model)} (was {before if before is None else f'{before:.4g}'})"
    if defective:
        scores = np.concatenate([s for s, _ in model.iter_predict([p for p, _ in collect_images(defective)])])
        line += f"; defective images flagged: {int((scores > model.threshold_).sum())} of {scores.size}"
    out = out or model_path
    model.save(out)
    _copy_stats(model_path, out)
    return f"{line}; wrote {out}"


def update_job(model_path: Path, paths: Sequence[Path], out: Path | None = None, decay: float = 1.0,
               **runtime) -> str:
    """Add normal images to a fitted model (its statistics sidecar), the old ones weighed by ``decay``."""
    model = _load(model_path, **runtime)
    stats = load_stats(model, model_path)
    files = [p for p, _ in collect_images(paths)]
    before = stats.count
    update(model, stats, files, decay)
    out = model.save(out or model_path)
    return (f"added {len(files)} images to {before:g}" + (f" (weighed by {decay:g})" if decay != 1 else "")
            + f": the model of {model.stats_.count:g} images; {_promise(model)}; wrote {out} and {stats_path(out)}")


def merge_job(model_paths: Sequence[Path], out: Path, **runtime) -> str:
    """One model from models fitted apart with the same settings (each with its statistics)."""
    models = [_load(p, **runtime) for p in model_paths]
    stats = [load_stats(m, p) for m, p in zip(models, model_paths, strict=True)]
    try:
        model = merge(models, stats)
    except ValueError as exc:
        raise ModelFileError(f"{', '.join(map(str, model_paths))}: {exc}") from exc
    out = model.save(out)
    return f"merged {len(models)} models: the model of {model.stats_.count:g} images; {_promise(model)}; wrote {out}"
