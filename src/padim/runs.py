"""The jobs behind the command line: fit on a category, evaluate a model on its test split, score
new files. Each reads the data, calls the model and writes the output files; the split is read
once per job and handed along."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import csv_text, write_text
from .backbones.registry import get_spec
from .datasets import DatasetError, Split, load_split, read_image
from .datasets.folders import IMAGE_SUFFIXES, is_image_name
from .params import MODEL_FILE, deep_counts
from .reports.overlay import map_range, save_overlay
from .stages import Stages

if TYPE_CHECKING:  # the jobs get a model; scoring with an ONNX one needs no torch
    from .datasets.prefetch import Prefetch
    from .export import ExportedModel
    from .model import Padim

__all__ = ["MODEL_FILE", "DataArgs", "Stages", "check_training_set", "collect_images", "csv_text",
           "evaluate_job", "fit_job", "predict_files", "score_files"]

logger = logging.getLogger(__name__)


@dataclass
class DataArgs:
    """Where the data is: DATA_ROOT, category, split and layout."""

    root: Path
    category: str
    split: str = "1cls"
    layout: str = "auto"

    def load(self) -> Split:
        """The category's train/test split."""
        return load_split(self.root, self.category, self.split, self.layout)

    @property
    def where(self) -> Path:
        """The category's folder, for messages."""
        return self.root / self.category


def fit_job(data: DataArgs, split: Split, out_dir: Path, model: Padim, stages: Stages | None = None,
            keep_stats: bool = True, prefetch: Prefetch | None = None, auto: dict | None = None) -> Path:
    """Fit ``model`` on the training images and write ``out_dir/model.safetensors`` (and, with
    ``keep_stats``, the statistics beside it, for ``padim update``); returns the model's path.
    ``prefetch``: the training images being decoded since the command started, at the model's size;
    ``auto``: the record of ``--auto``'s choice, kept in the model file.

    Stages: 'fit' (the statistics of the training images and the factor), 'calibrate' (the
    out-of-fold scores that set the threshold), 'save'.
    """
    from .model.calibration import KeptEmbeddings, calibration_sample, out_of_fold

    stages = stages if stages is not None else Stages()
    paths = [s.path for s in split.train]
    try:
        check_training_set(data, len(paths), model)
        p = model.model_params()
    except BaseException:
        if prefetch is not None:  # no decoding process outlives a command that stops here
            prefetch.close()
        raise
    kept = KeptEmbeddings(calibration_sample(len(paths), p.calibration_images, model.seed))
    with stages("fit"):
        images = paths if prefetch is None else prefetch.take(p.image_size)
        model.fit_from_stats(model.accumulate(images, kept=kept))
        del images  # the decoded images: freed before the calibration
    with stages("calibrate"):
        model.set_threshold(*out_of_fold(model.scorer_, kept, model.stats_, model.batch_size))
    kept.close()
    if auto is not None:
        model.meta_["auto"] = auto
    with stages("save"):
        path = model.save(out_dir / MODEL_FILE, stats=keep_stats)
    model.stats_ = None  # the sums are on disk: free them before the test images are scored
    return path


def operating_point(calibration: dict | None) -> dict | None:
    """What the stored threshold promises (the model's calibration without its scores)."""
    return None if calibration is None else {k: v for k, v in calibration.items() if k != "scores"}


def check_training_set(data: DataArgs, n: int, model: Padim) -> None:
    """Refuse too few training images for ``model`` (naming the data); warn when there are no more
    images than feature channels."""
    if n < 3:
        raise DatasetError(f"{data.where}: {n} training image(s); need at least 3 (a covariance and out-of-fold "
                           "scores); add normal training images")
    p = model.model_params()
    if n <= p.d:
        logger.warning("%d training images for %d feature channels: each covariance is rank-deficient and "
                       "only eps=%g on its diagonal keeps it invertible; expect weak results, use at least %d "
                       "images or a smaller --d", n, p.d, p.eps, p.d + 1)
    deep = get_spec(p.backbone).deep_channels
    if p.image_score == "deep" and not deep_counts(n, deep):
        logger.warning("%d training images for the deep image score's %d channels: its Gaussians would be "
                       "rank-deficient, so the image score is the map's alone; use at least %d images for "
                       "the deep part", n, deep, deep + 1)


def evaluate_job(model: Padim, data: DataArgs, split: Split, out_dir: Path, model_path: Path | None = None,
                 resolution: str = "model", figures: bool = True, progress: bool = True,
                 stages: Stages | None = None) -> dict:
    """Score the test split and write the run folder (metrics.json, scores.csv, roc_curve.png,
    figures, report.html with curves.npz and tiles/); returns metrics.json's content."""
    from .evaluation import evaluate  # the metrics' libraries: only for evaluations

    if not split.test:
        raise DatasetError(f"{data.where}: the test split is empty")
    header = {
        "dataset": {"root": str(data.root), "category": data.category, "layout": split.layout, "split": split.name},
        "model": {"path": str(model_path) if model_path else None, "backbone": model.meta_["backbone"],
                  "image_size": list(model.image_size_), "scales": list(model.meta_["scales"]),
                  "d": model.meta_["d"], "threshold": model.threshold_, "n_train": model.info_.get("n_train"),
                  "operating_point": operating_point(model.info_.get("calibration")),
                  "auto": model.meta_.get("auto"),
                  "weights": model.meta_.get("backbone_weights")},
        "notes": list(split.notes),
    }
    from .reports.run_folder import write_run_folder  # matplotlib and jinja2: only for evaluations

    # the maps and masks wait on disk beside the run (in files without a name) for the figures
    with evaluate(model, split, resolution, stages, spill=out_dir) as ev:
        return write_run_folder(out_dir, ev, header, f"{data.category} ({split.name})", figures, progress)


def collect_images(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Image files named directly or found (recursively) in folders, with a unique output name each."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for p in sorted(q for q in path.rglob("*") if q.is_file() and is_image_name(q)):
                found.append((p, "__".join(p.relative_to(path).with_suffix("").parts)))
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise DatasetError(f"{path}: no such file or folder")
    if not found:
        raise DatasetError(f"no images found in {', '.join(map(str, paths))} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, int] = {}
    unique = []
    for p, name in found:
        seen[name] = seen.get(name, 0) + 1
        unique.append((p, name if seen[name] == 1 else f"{name}_{seen[name]}"))
    return unique


PREDICT_HEADER = ("path", "score", "predicted_label")


def score_files(model: Padim | ExportedModel, files: Sequence[tuple[Path | str, str]], heatmap_dir: Path | None,
                ) -> list[tuple]:
    """Score (path, output name) pairs; write a heat-map overlay PNG per image into ``heatmap_dir``
    (None: none). Returns one (path, score, predicted label) row per image."""
    vrange = None
    rows = []
    offset = 0
    for scores, maps in model.iter_predict([p for p, _ in files]):
        labels = model.labels(scores)
        if vrange is None:
            vrange = map_range(model.info_.get("map_range"), maps)
        for i, (score, amap) in enumerate(zip(scores, maps, strict=True)):
            path, name = files[offset + i]
            label = "" if labels is None else ("anomaly" if labels[i] else "normal")
            rows.append((str(path), f"{score:.6g}", label))
            if heatmap_dir is not None:
                image = np.asarray(read_image(path, model.image_size_))
                save_overlay(Path(heatmap_dir) / f"{name}.png", image, amap, vrange)
        offset += len(scores)
    return rows


def predict_files(model: Padim | ExportedModel, paths: Sequence[Path], out_dir: Path,
                  heatmaps: bool = True) -> list[tuple]:
    """Score images; write scores.csv and a heat-map overlay PNG per image. Returns the CSV rows."""
    rows = score_files(model, collect_images(paths), out_dir / "heatmaps" if heatmaps else None)
    write_text(out_dir / "scores.csv", csv_text(PREDICT_HEADER, rows))
    return rows
