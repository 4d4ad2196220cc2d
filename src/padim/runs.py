"""The jobs behind the command line: fit on a category, evaluate a model on its test split, score
new files. Each reads data, calls the model, computes metrics and writes the output files."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import write_text
from .datasets import DatasetError, Sample, Split, image_size, load_split, read_image, read_mask
from .datasets.mvtec import IMAGE_SUFFIXES, is_image_name
from .metrics import compute_metrics
from .model import Padim
from .reports import five_panel, roc_figure, save_overlay, save_pixel_curves, write_galleries, write_report

MODEL_FILE = "model.safetensors"

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


def fit(data: DataArgs, out_dir: Path, model: Padim) -> tuple[Padim, Path, dict]:
    """Fit ``model`` on the training images and write ``out_dir/model.safetensors``."""
    split = data.load()
    check_training_set(data, len(split.train), model)
    start = time.perf_counter()
    model.fit([s.path for s in split.train])
    seconds = time.perf_counter() - start
    path = model.save(out_dir / MODEL_FILE)
    return model, path, {"fit_seconds": seconds, "n_train": len(split.train), "split": split}


def check_training_set(data: DataArgs, n: int, model: Padim) -> None:
    """Refuse too few training images for ``model`` (naming the data); warn when there are no more
    images than feature channels."""
    try:
        model.calibration_split(n)
    except ValueError as exc:
        raise DatasetError(f"{data.root / data.category}: {exc}; add normal training images") from exc
    if n <= model.d:
        logger.warning("%d training images for %d feature channels: each covariance is rank-deficient and "
                       "only eps=%g on its diagonal keeps it invertible; expect weak results, use at least %d "
                       "images or a smaller --d", n, model.d, model.eps, model.d + 1)


def csv_text(header: Sequence[str], rows: list[Sequence]) -> str:
    """A CSV document: the header line, then the rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _figure_name(sample: Sample) -> str:
    return f"{sample.path.parent.name}_{sample.path.stem}.png"


def _pixel_data(test: list[Sample], maps: np.ndarray, resolution: str, size: tuple[int, int],
                ) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Per image: ground truth (None for an anomaly without a mask) and map, both at the model
    input size or, with resolution='original', at the image's own size."""
    masks, out = [], []
    for s, m in zip(test, maps, strict=True):
        hw = size if resolution == "model" else image_size(s.path)
        masks.append(read_mask(s.mask, hw) if (s.mask is not None or s.label == 0) else None)
        if hw != tuple(m.shape):
            m = F.interpolate(torch.from_numpy(m)[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]
            m = m.numpy()
        out.append(m)
    return masks, out


def evaluate(model: Padim, data: DataArgs, split: Split, out_dir: Path, model_path: Path | None = None,
             resolution: str = "model", figures: bool = True, progress: bool = True) -> dict:
    """Score the test split; write metrics.json, scores.csv, roc_curve.png, per-image figures and
    report.html (with what it needs: curves.npz and the gallery tiles in tiles/).

    resolution: 'model' computes pixel metrics at the model input size (as anomalib does),
    'original' upsamples each map to its image's own size.
    """
    test = split.test
    if not test:
        raise DatasetError(f"{data.root / data.category}: the test split is empty")
    start = time.perf_counter()
    prediction = model.predict([s.path for s in test])
    predict_seconds = time.perf_counter() - start
    labels = np.array([s.label for s in test])
    masks, maps = _pixel_data(test, prediction.maps, resolution, model.image_size)
    metrics = compute_metrics(labels, prediction.scores, [s.defects for s in test], masks, maps,
                              model.threshold_)
    report = {
        "dataset": {"root": str(data.root), "category": data.category, "layout": split.layout,
                    "split": split.name, "n_test": len(test), "n_test_normal": int((labels == 0).sum()),
                    "n_test_anomalous": int((labels == 1).sum()),
                    "n_pixel_images": sum(m is not None for m in masks)},
        "model": {"path": str(model_path) if model_path else None, "backbone": model.backbone,
                  "image_size": list(model.image_size), "scales": list(model.scales), "d": model.d,
                  "threshold": model.threshold_,
                  "n_train": model.info_.get("n_train")},
        "metrics_resolution": resolution,
        "notes": list(split.notes),
        "predict_seconds": round(predict_seconds, 3),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **metrics,
    }
    write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    predicted = prediction.labels if prediction.labels is not None else [None] * len(test)
    rows = [
        (str(s.path), "anomaly" if s.label else "normal", s.defect_type, f"{score:.6g}",
         "" if pl is None else ("anomaly" if pl else "normal"))
        for s, score, pl in zip(test, prediction.scores, predicted, strict=True)
    ]
    write_text(out_dir / "scores.csv", csv_text(["path", "label", "defect_type", "score", "predicted_label"], rows))
    keep = [i for i, m in enumerate(masks) if m is not None]
    overall = metrics["overall"]
    pixel_labels = np.concatenate([masks[i].ravel() for i in keep]) if keep else None
    pixel_scores = np.concatenate([maps[i].ravel() for i in keep]) if keep else None
    roc_figure(out_dir / "roc_curve.png", labels, prediction.scores, pixel_labels, pixel_scores,
               overall["image_auroc"], overall["pixel_auroc"], title=f"{data.category} ({split.name})")
    if figures:
        write_figures(model, test, prediction.maps, prediction.scores, out_dir / "figures", progress)
    save_pixel_curves(out_dir, pixel_labels, pixel_scores)
    _write_gallery_tiles(model, test, prediction.scores, prediction.maps, out_dir, figures)
    write_report(out_dir)
    return report


def _write_gallery_tiles(model: Padim, test: list[Sample], scores: np.ndarray, maps: np.ndarray, out_dir: Path,
                         figures: bool) -> None:
    """The report's gallery tiles; without figures/, the full figures of the gallery images only."""
    names = [_figure_name(s) for s in test]
    vrange = _vrange(model, maps)

    def figure(i: int) -> str:
        if figures:
            return f"figures/{names[i]}"
        write_figures(model, [test[i]], maps[i:i + 1], scores[i:i + 1], out_dir / "tiles" / "figures", False, vrange)
        return f"tiles/figures/{names[i]}"

    write_galleries(out_dir, names, np.array([s.label for s in test]), scores, [s.defect_type for s in test], maps,
                    model.threshold_, vrange, lambda i: _picture(model, test[i]), figure)


def _picture(model: Padim, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """The sample's image (uint8 RGB) and mask (None without one) at the model input size."""
    mask = read_mask(sample.mask, model.image_size) if sample.mask is not None else None
    return np.asarray(read_image(sample.path, model.image_size)), mask


def _vrange(model: Padim, maps: np.ndarray) -> tuple[float, float]:
    stored = model.info_.get("map_range")
    if stored:
        return float(stored[0]), float(stored[1])
    return float(maps.min()), float(maps.max())  # no calibration: fall back to this batch


def write_figures(model: Padim, samples: list[Sample], maps: np.ndarray, scores: np.ndarray, folder: Path,
                  progress: bool, vrange: tuple[float, float] | None = None) -> None:
    """The 5-panel figure for every sample, in one folder, titled with its image score; the colour
    scale is ``vrange`` or the model's."""
    vrange = vrange or _vrange(model, maps)
    for s, amap, score in tqdm(list(zip(samples, maps, scores, strict=True)), desc="figures", unit="img",
                               disable=not progress):
        image, mask = _picture(model, s)
        title = f"{s.path.name}  {s.defect_type}  score {score:.2f}"
        if model.threshold_ is not None:
            title += f"  (threshold {model.threshold_:.2f})"
        five_panel(folder / _figure_name(s), image, mask, amap, model.threshold_, vrange, title)


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


def score_files(model: Padim, files: Sequence[tuple[Path | str, str]], heatmap_dir: Path | None) -> list[tuple]:
    """Score (path, output name) pairs; write a heat-map overlay PNG per image into ``heatmap_dir``
    (None: none). Returns one (path, score, predicted label) row per image."""
    vrange = None
    rows = []
    offset = 0
    for scores, maps in model.iter_predict([p for p, _ in files]):
        labels = model.labels(scores)
        if vrange is None:
            vrange = _vrange(model, maps)
        for i, (score, amap) in enumerate(zip(scores, maps, strict=True)):
            path, name = files[offset + i]
            label = "" if labels is None else ("anomaly" if labels[i] else "normal")
            rows.append((str(path), f"{score:.6g}", label))
            if heatmap_dir is not None:
                image = np.asarray(read_image(path, model.image_size))
                save_overlay(Path(heatmap_dir) / f"{name}.png", image, amap, vrange)
        offset += len(scores)
    return rows


def predict_files(model: Padim, paths: Sequence[Path], out_dir: Path, heatmaps: bool = True) -> list[tuple]:
    """Score images; write scores.csv and a heat-map overlay PNG per image. Returns the CSV rows."""
    rows = score_files(model, collect_images(paths), out_dir / "heatmaps" if heatmaps else None)
    write_text(out_dir / "scores.csv", csv_text(PREDICT_HEADER, rows))
    return rows
