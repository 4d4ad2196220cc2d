"""``RUN_DIR/report.html``: one self-contained page (plots and tiles embedded, no network) built from
the files an evaluation leaves in RUN_DIR: metrics.json, scores.csv, curves.npz, tiles/."""

from __future__ import annotations

import base64
import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np

from .. import __version__
from ..atomic import write_text
from ..errors import ReportError
from ..metrics import Group, Ranking
from . import plots
from .curves import CURVES_FILE, load_pixel_curves
from .gallery import MANIFEST, TILES_DIR

REPORT_FILE = "report.html"
ROC_FILE = "roc_curve.png"  # the run folder's ROC plot, which the report shows as it is


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; is this a folder written by 'padim evaluate' or 'padim run'?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def _read_scores(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; is this a folder written by 'padim evaluate' or 'padim run'?") from None
    need = {"path", "label", "defect_type", "score", "predicted_label"}
    if not rows or not need <= set(rows[0]):
        raise ReportError(f"{path}: expected a header with {', '.join(sorted(need))} and one row per test image")
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(part: int, whole: int) -> str:
    return "n/a" if whole == 0 else f"{100 * part / whole:.0f}%"


def _defect_rows(metrics: dict, rows: list[dict]) -> list[dict]:
    """Per defect type: anomalous images, how many the stored threshold flags, pixel/image metrics."""
    out = []
    for name, m in sorted(metrics.get("per_defect_type", {}).items()):
        mine = [r for r in rows if r["label"] == "anomaly" and name in r["defect_type"].split("+")]
        judged = [r for r in mine if r["predicted_label"]]
        hit = sum(r["predicted_label"] == "anomaly" for r in judged)
        out.append({"name": name, "count": len(mine), "detected": hit if judged else None,
                    "rate": _pct(hit, len(judged)) if judged else "n/a", "pixel_auroc": _fmt(m.get("pixel_auroc")),
                    "image_auroc": _fmt(m.get("image_auroc")), "aupro": _fmt(m.get("aupro"))})
    return out


def _auto_fact(auto: dict) -> str:
    """--auto's choice and each configuration's image AUROC on the synthetic defects."""
    scores = ", ".join(f"{name} {s['image_auroc']:.3f}" for name, s in auto["synthetic"].items())
    return (f"{auto['chosen']}, chosen from the training images alone (image AUROC on "
            f"{auto.get('held_out')} held-out images with synthetic defects: {scores})")


def _threshold_fact(threshold: float | None, point: dict | None) -> str:
    """The stored threshold and what it promises on new normal images."""
    if threshold is None or not point:
        return _fmt(threshold)
    low, high = point["fpr_interval"]
    return (f"{_fmt(threshold)}: aims at {point['target_fpr']:.1%} false alarms on new normal images; expected "
            f"{point['expected_fpr']:.2%}, 90% interval {low:.2%} to {high:.2%} (from {point['n']} {point['method']} "
            "scores of normal images)" + ("; too few images to promise the target" if
                                          point["expected_fpr"] > point["target_fpr"] else ""))


def _confusion(metrics: dict) -> dict | None:
    t = metrics.get("at_threshold")
    if not t:
        return None
    return {**t, "threshold": _fmt(t["threshold"]), "precision": _fmt(t["precision"]), "recall": _fmt(t["recall"]),
            "f1": _fmt(t["f1"]), "n_anomalous": t["tp"] + t["fn"], "n_normal": t["tn"] + t["fp"],
            "detected_pct": _pct(t["tp"], t["tp"] + t["fn"]), "false_alarm_pct": _pct(t["fp"], t["tn"] + t["fp"])}


def _galleries(run_dir: Path) -> list[dict] | None:
    path = run_dir / TILES_DIR / MANIFEST
    if not path.is_file():
        return None
    manifest = _read_json(path)
    out = []
    for key, g in manifest.get("galleries", {}).items():
        tiles = []
        for e in g["images"]:
            tile = run_dir / e["tile"]
            if not tile.is_file():
                raise ReportError(f"{tile}: listed in {path} but missing")
            figure = e.get("figure") or ""
            tiles.append({**e, "src": _data_uri(tile.read_bytes()), "score": _fmt(e["score"]),
                          "figure": figure if figure and (run_dir / figure).is_file() else ""})
        out.append({"key": key, "title": g["title"], "what": g["what"], "tiles": tiles})
    return out


def _evaluated_at(metrics: dict, metrics_path: Path) -> str:
    stamp = metrics.get("evaluated_at")
    if stamp:
        return stamp.replace("T", " ").replace("+00:00", " UTC")
    mtime = datetime.fromtimestamp(metrics_path.stat().st_mtime, UTC)
    return mtime.strftime("%Y-%m-%d %H:%M:%S UTC")


def report_context(run_dir: Path) -> dict:
    """Everything the template shows, read from the files in ``run_dir``."""
    metrics_path = run_dir / "metrics.json"
    metrics = _read_json(metrics_path)
    rows = _read_scores(run_dir / "scores.csv")
    try:
        overall, dataset, model = metrics["overall"], metrics["dataset"], metrics["model"]
    except KeyError as exc:
        raise ReportError(f"{metrics_path}: no {exc.args[0]!r} entry; was it written by 'padim evaluate'?") from None
    labels = np.array([r["label"] == "anomaly" for r in rows], dtype=np.int64)
    scores = np.array([float(r["score"]) for r in rows])
    threshold = model.get("threshold")
    image = Ranking([Group.of(scores, labels)]).curves()
    pixel = load_pixel_curves(run_dir / CURVES_FILE)
    roc = run_dir / ROC_FILE
    size = model.get("image_size") or []
    headline = [("Image AUROC", overall.get("image_auroc"), "How well the image score ranks defective above good "
                 "images (1 = perfect, 0.5 = chance)."),
                ("Pixel AUROC", overall.get("pixel_auroc"), "The same for single pixels: does the heat map rank "
                 "defect pixels above good ones?"),
                ("AUPRO", overall.get("aupro"), f"Share of each defect region found, averaged over regions, for "
                 f"false-positive rates up to {metrics.get('fpr_limit', 0.3)} (normalized)."),
                ("Image F1-max", overall.get("image_f1_max"), "Best F1 over all thresholds: an optimistic figure "
                 "(it sees the test labels).")]
    return {
        "title": f"PaDiM report: {dataset.get('category', '?')}",
        "headline": [{"name": n, "value": _fmt(v), "help": h} for n, v, h in headline],
        "facts": [
            ("Data set", f"{dataset.get('category')} ({dataset.get('layout')} layout) in {dataset.get('root')}"),
            ("Split", str(dataset.get("split"))),
            ("Backbone", f"{model.get('backbone')}, d = {model.get('d')} channels"),
            ("Backbone weights", _weights_fact(model.get("weights"))),
            ("Image size", (" x ".join(str(s) for s in size) + " px" if size else "n/a")
             + (f", pyramid scales {', '.join(f'{x:g}' for x in model['scales'])}"
                if len(model.get("scales") or []) > 1 else "")),
            ("Training images", str(model.get("n_train", "n/a"))),
            *([("Configuration (--auto)", _auto_fact(model["auto"]))] if model.get("auto") else []),
            ("Test images", f"{dataset.get('n_test')} ({dataset.get('n_test_normal')} normal, "
                            f"{dataset.get('n_test_anomalous')} anomalous)"),
            ("Stored threshold", _threshold_fact(threshold, model.get("operating_point"))),
            ("Model file", str(model.get("path"))),
            ("Evaluated", _evaluated_at(metrics, metrics_path)),
            ("Pixel metrics at", f"{metrics.get('metrics_resolution', 'model')} resolution"),
        ],
        "notes": metrics.get("notes", []),
        "roc_png": _data_uri(roc.read_bytes() if roc.is_file()
                             else plots.roc_plot(image, pixel, overall.get("image_auroc"), overall.get("pixel_auroc"))),
        "pr_png": _data_uri(plots.pr_plot(image, pixel)),
        "hist_png": _data_uri(plots.histogram_plot(scores, labels, threshold)),
        "pixel_curves_missing": pixel is None and overall.get("pixel_auroc") is not None,
        "defects": _defect_rows(metrics, rows),
        "confusion": _confusion(metrics),
        "galleries": _galleries(run_dir),
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _weights_fact(files: list[dict] | None) -> str:
    """The backbone's weights files, each with its sha256; 'not recorded' for a model file written
    before they were recorded, or with random weights."""
    if not files:
        return "not recorded"
    return "; ".join(f"{f.get('file')} (sha256 {f.get('sha256')})" for f in files)


def render(context: dict) -> str:
    """The report page for ``context`` (see :func:`report_context`)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("padim.reports", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from the evaluation files in ``run_dir``; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such folder")
    path = run_dir / REPORT_FILE
    write_text(path, render(report_context(run_dir)))
    return path
