"""A run folder on disk from an :class:`~padim.evaluation.Evaluation`: metrics.json, scores.csv,
roc_curve.png, curves.npz, the per-image figures, the gallery tiles and report.html."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..atomic import csv_text, write_bytes, write_text
from ..datasets import Sample, read_image
from ..metrics import Group, Ranking
from ..spill import release_freed_memory
from .curves import save_pixel_curves
from .figures import FivePanel
from .gallery import save_tile, select, write_galleries
from .html import ROC_FILE, write_report
from .plots import roc_plot

if TYPE_CHECKING:
    from ..evaluation import Evaluation

FIGURES_DIR = "figures"
METRICS_FILE = "metrics.json"
SCORES_HEADER = ("path", "label", "defect_type", "score", "predicted_label")


def figure_name(sample: Sample) -> str:
    """A test image's figure file name, unique within a split (its folder and stem)."""
    return f"{sample.path.parent.name}_{sample.path.stem}.png"


def figure_title(sample: Sample, score: float, threshold: float | None) -> str:
    """The title over an image's figure: file, defect type, image score (and the threshold)."""
    title = f"{sample.path.name}  {sample.defect_type}  score {score:.2f}"
    return title if threshold is None else f"{title}  (threshold {threshold:.2f})"


def write_pictures(out_dir: Path, ev: Evaluation, figures: bool = True, progress: bool = True) -> None:
    """The 5-panel figure of every test image in ``out_dir/figures/`` (only those of the gallery
    images, in ``tiles/figures/``, without ``figures``) and the report's gallery tiles; each image
    is decoded once for all its pictures, on two threads per core (up to 2 cores)."""
    names = [figure_name(s) for s in ev.test]
    labels = ev.labels
    gallery = {i for chosen in select(labels, ev.scores).values() for i in chosen}
    todo = range(len(ev.test)) if figures else sorted(gallery)
    folder = FIGURES_DIR if figures else f"tiles/{FIGURES_DIR}"
    size = tuple(ev.maps.shape[1:])
    panel = FivePanel(size, ev.threshold if ev.map_threshold is None else ev.map_threshold, ev.vrange)

    def draw(i: int) -> None:
        s = ev.test[i]
        image, mask, amap = np.asarray(read_image(s.path, size)), ev.mask(i), ev.maps[i]
        panel.save(out_dir / folder / names[i], image, mask, amap, figure_title(s, ev.scores[i], ev.threshold))
        if i in gallery:
            save_tile(out_dir, names[i], image, amap, mask, ev.vrange)

    # decoding, resizing and PNG encoding release the GIL: threads share the one figure frame; one map
    # at a time is read back from disk per thread. Two threads per core: each picture ends in an fsync
    # (padim.atomic) that waits on the disk, and the disk commits the fsyncs of waiting threads together
    with ThreadPoolExecutor(max_workers=2 * max(1, min(2, os.cpu_count() or 1))) as pool:
        for n, _ in enumerate(tqdm(pool.map(draw, todo), total=len(todo), desc="figures", unit="img",
                                   disable=not progress)):
            if n % 16 == 15:
                release_freed_memory()
    write_galleries(out_dir, names, labels, ev.scores, [s.defect_type for s in ev.test], ev.threshold,
                    lambda i: f"{folder}/{names[i]}")


def metrics_document(ev: Evaluation, header: dict) -> dict:
    """metrics.json's content: ``header`` (data set, model), then the evaluation's metrics and the
    seconds of each stage so far."""
    labels = ev.labels
    return {
        **header,
        "dataset": {**header.get("dataset", {}), "n_test": len(ev.test), "n_test_normal": int((labels == 0).sum()),
                    "n_test_anomalous": int((labels == 1).sum()),
                    "n_pixel_images": sum(ev.has_mask)},
        "metrics_resolution": ev.resolution,
        "predict_seconds": round(ev.stages.seconds.get("predict", 0.0), 3),
        "timings": ev.stages.rounded(),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **ev.metrics,
    }


def write_run_folder(out_dir: Path, ev: Evaluation, header: dict, title: str = "", figures: bool = True,
                     progress: bool = True) -> dict:
    """Write the whole run folder of ``ev`` (stages 'figures' and 'report'); returns metrics.json's
    content. ``header`` holds the data set's and the model's description for metrics.json."""
    out_dir = Path(out_dir)
    stages = ev.stages
    with stages("figures"):
        write_pictures(out_dir, ev, figures, progress)
    with stages("report"):
        predicted = ev.predicted if ev.predicted is not None else [None] * len(ev.test)
        rows = [(str(s.path), "anomaly" if s.label else "normal", s.defect_type, f"{score:.6g}",
                 "" if p is None else ("anomaly" if p else "normal"))
                for s, score, p in zip(ev.test, ev.scores, predicted, strict=True)]
        write_text(out_dir / "scores.csv", csv_text(SCORES_HEADER, rows))
        save_pixel_curves(out_dir, ev.pixel_curves)
        overall = ev.metrics["overall"]
        write_bytes(out_dir / ROC_FILE, roc_plot(Ranking([Group.of(ev.scores, ev.labels)]).curves(), ev.pixel_curves,
                                                 overall["image_auroc"], overall["pixel_auroc"], title))
        write_text(out_dir / METRICS_FILE, json.dumps(metrics_document(ev, header), indent=2))
        write_report(out_dir)
    document = metrics_document(ev, header)  # again, with the report's own seconds
    write_text(out_dir / METRICS_FILE, json.dumps(document, indent=2))
    return document
