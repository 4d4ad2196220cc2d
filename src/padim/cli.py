"""Command line: ``padim fit | evaluate | run | predict``.

Exit codes: 0 success; 1 internal error (a bug: please report it); 2 usage error; 3 bad or
missing data; 4 bad or missing model file; 5 backbone weights unavailable or unusable (they give
NaN/inf features); 130 interrupted. Warnings (accepted but doubtful input) go to stderr.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

import click

from . import __version__
from .backbones import BackboneError, list_backbones
from .datasets import LAYOUTS, DatasetError
from .model import ModelFileError, Padim
from .runs import MODEL_FILE, DataArgs, evaluate, fit, predict_files

EXIT_DATA, EXIT_MODEL, EXIT_BACKBONE = 3, 4, 5


def _fail(code: int, message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def handle_errors(func):
    """Turn expected failures into one clear line on stderr and a documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DatasetError as exc:
            _fail(EXIT_DATA, str(exc))
        except ModelFileError as exc:
            _fail(EXIT_MODEL, str(exc))
        except BackboneError as exc:
            _fail(EXIT_BACKBONE, str(exc))
        except FloatingPointError as exc:
            # input images cannot hold NaN; non-finite features come from the backbone's weights
            _fail(EXIT_BACKBONE, f"{exc}; check the backbone weights (--weights)")
        except KeyboardInterrupt:
            _fail(130, "interrupted; files already written are complete, nothing half-written was kept")

    return wrapper


def data_options(func):
    """DATA_ROOT and the options that pick a category's split."""
    decorators = [
        click.argument("data_root", type=click.Path(path_type=Path, file_okay=False)),
        click.option("--category", required=True, help="Category folder under DATA_ROOT, e.g. fryum."),
        click.option("--split", type=click.Choice(["1cls", "seed"]), default="1cls", show_default=True,
                     help="VisA split: '1cls' is the official one; 'seed' trains on the first 100 normal "
                          "images and tests on all anomalous ones (pixel metrics only)."),
        click.option("--layout", type=click.Choice(LAYOUTS), default="auto", show_default=True,
                     help="Data set layout; 'auto' detects VisA, MVTec AD or plain train/test folders."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def model_options(func):
    """Options that define a model to fit."""
    decorators = [
        click.option("--backbone", type=click.Choice(list_backbones()), default="mobilenet_v2", show_default=True,
                     help="Feature extractor. mobilenet_v2 and efficientnet_lite0 ship with their weights; "
                          "resnet18 and wide_resnet50_2 need torchvision weights in the local cache or --weights."),
        click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Backbone weights file to use instead of the default source."),
        click.option("--image-size", type=click.IntRange(32, 2048), default=256, show_default=True,
                     help="Images are resized to this square size (pixels) before the backbone."),
        click.option("--d", "d", type=click.IntRange(1), default=100, show_default=True,
                     help="Feature channels kept (fixed random subset)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the channel subset and the calibration hold-out."),
        click.option("--calibration-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
                     show_default=True,
                     help="Share of training images held out to set the threshold (normal images only)."),
        click.option("--threshold-quantile", type=click.FloatRange(0, 1, min_open=True), default=0.99,
                     show_default=True, help="Threshold = this quantile of held-out normal image scores."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def runtime_options(func):
    """Where and how the computation runs."""
    decorators = [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Run the backbone and scoring on this device."),
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
                     help="Images per backbone batch."),
        click.option("--workers", type=click.IntRange(0), default=None,
                     help="Image decoding processes (default: up to 2)."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def eval_options(func):
    """What an evaluation writes."""
    decorators = [
        click.option("--metrics-resolution", type=click.Choice(["model", "original"]), default="model",
                     show_default=True,
                     help="Compute pixel metrics at the model input size (comparable to anomalib) or at "
                          "each image's original size."),
        click.option("--figures/--no-figures", default=True, show_default=True,
                     help="Write the 5-panel figure of every test image to OUT/figures/."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")


def _print_table(report: dict) -> None:
    def fmt(value):
        return "  n/a" if value is None else f"{value:.3f}"

    overall = report["overall"]
    click.echo("")
    click.echo(f"{'':28s} {'img AUROC':>9s} {'pix AUROC':>9s} {'AUPRO':>7s} {'img F1':>7s} {'n':>4s}")
    rows = [("overall", overall)] + sorted(report["per_defect_type"].items())
    for name, m in rows:
        n = m["n_anomalous"] + (m["n_normal"] if name == "overall" else 0)
        click.echo(f"{name[:28]:28s} {fmt(m['image_auroc']):>9s} {fmt(m['pixel_auroc']):>9s} "
                   f"{fmt(m['aupro']):>7s} {fmt(m['image_f1_max']):>7s} {n:4d}")
    if "at_threshold" in report:
        t = report["at_threshold"]
        click.echo(f"at stored threshold {t['threshold']:.3f}: TP {t['tp']}  FP {t['fp']}  TN {t['tn']}  FN {t['fn']}"
                   f"  F1 {fmt(t['f1'])}")
    for note in report["notes"]:
        click.echo(f"note: {note}")


def _run_evaluation(model: Padim, model_path: Path, data: DataArgs, out: Path, metrics_resolution: str,
                    figures: bool, progress: bool) -> dict:
    split = data.load()
    report = evaluate(model, data, split, out, model_path, metrics_resolution, figures, progress)
    _print_table(report)
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'scores.csv'}, {out / 'roc_curve.png'}"
               + (f", {out / 'figures'}/" if figures else ""))
    return report


class _StderrHandler(logging.Handler):
    """Log records as 'warning: ...' lines on the current stderr (looked up per record, so it
    follows click's test runner and redirections)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.secho(f"{record.levelname.lower()}: {self.format(record)}", fg="yellow", err=True)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def _show_warnings() -> None:
    log = logging.getLogger("padim")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler(logging.WARNING))
    if log.level == logging.NOTSET or log.level > logging.WARNING:
        log.setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="padim")
def main() -> None:
    """PaDiM anomaly detection: learn normal images, score new ones, show where defects are."""
    _show_warnings()


def _new_model(backbone, weights, image_size, d, seed, calibration_fraction, threshold_quantile, device,
               batch_size, workers, progress) -> Padim:
    _check_device(device)
    return Padim(backbone=backbone, image_size=image_size, d=d, seed=seed,
                 calibration_fraction=calibration_fraction, threshold_quantile=threshold_quantile,
                 batch_size=batch_size, num_workers=workers, device=device, weights=weights, progress=progress)


@main.command("fit")
@data_options
@model_options
@runtime_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help=f"Output folder; the model is written to OUT/{MODEL_FILE}.")
@handle_errors
def fit_cmd(data_root, category, split, layout, backbone, weights, image_size, d, seed, calibration_fraction,
            threshold_quantile, device, batch_size, workers, progress, out):
    """Fit a model on the normal training images of a category."""
    model = _new_model(backbone, weights, image_size, d, seed, calibration_fraction, threshold_quantile, device,
                       batch_size, workers, progress)
    _, path, info = fit(DataArgs(data_root, category, split, layout), out, model)
    click.echo(f"fitted on {info['n_train']} images in {info['fit_seconds']:.1f} s; wrote {path} "
               f"(threshold {model.threshold_})")


@main.command("evaluate")
@data_options
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Model file written by 'padim fit'.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Backbone weights file, if the model was fitted with --weights.")
@runtime_options
@eval_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for metrics.json, scores.csv and figures.")
@handle_errors
def evaluate_cmd(data_root, category, split, layout, model_path, weights, device, batch_size, workers, progress,
                 metrics_resolution, figures, out):
    """Score the test split of a category with a fitted model and write metrics and figures."""
    _check_device(device)
    model = Padim.load(model_path, device=device, weights=weights, progress=progress)
    model.batch_size, model.num_workers = batch_size, workers
    _run_evaluation(model, model_path, DataArgs(data_root, category, split, layout), out, metrics_resolution,
                    figures, progress)


@main.command("run")
@data_options
@model_options
@runtime_options
@eval_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help=f"Output folder for {MODEL_FILE}, metrics.json, scores.csv and figures.")
@handle_errors
def run_cmd(data_root, category, split, layout, backbone, weights, image_size, d, seed, calibration_fraction,
            threshold_quantile, device, batch_size, workers, progress, metrics_resolution, figures, out):
    """Fit, then evaluate: the whole job in one command."""
    start = time.perf_counter()
    model = _new_model(backbone, weights, image_size, d, seed, calibration_fraction, threshold_quantile, device,
                       batch_size, workers, progress)
    data = DataArgs(data_root, category, split, layout)
    _, path, info = fit(data, out, model)
    click.echo(f"fitted on {info['n_train']} images in {info['fit_seconds']:.1f} s; wrote {path}")
    _run_evaluation(model, path, data, out, metrics_resolution, figures, progress)
    click.echo(f"total {time.perf_counter() - start:.1f} s")


@main.command("predict")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Model file written by 'padim fit'.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Backbone weights file, if the model was fitted with --weights.")
@runtime_options
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write a heat-map overlay PNG per image to OUT/heatmaps/.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for scores.csv and heatmaps/.")
@handle_errors
def predict_cmd(model_path, paths, weights, device, batch_size, workers, progress, heatmaps, out):
    """Score new images (files, or folders searched recursively)."""
    _check_device(device)
    model = Padim.load(model_path, device=device, weights=weights, progress=progress)
    model.batch_size, model.num_workers = batch_size, workers
    rows = predict_files(model, paths, out, heatmaps)
    flagged = sum(1 for r in rows if r[2] == "anomaly")
    click.echo(f"scored {len(rows)} images, {flagged} above the threshold; wrote {out / 'scores.csv'}")


if __name__ == "__main__":
    main()
