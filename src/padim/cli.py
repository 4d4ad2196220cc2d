"""Command line: ``padim fit | evaluate | run | predict | report | download``.

Exit codes: 0 success; 1 internal error (a bug: please report it); 2 usage error; 3 bad or
missing data; 4 bad or missing model file; 5 backbone weights unavailable or unusable (they give
NaN/inf features); 6 download failed (no network, server or disk error); 130 interrupted.
Warnings (accepted but doubtful input) go to stderr.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import re
import sys
import time
from pathlib import Path

import click

# Only click and light modules of this package at import time: --help, --version and usage errors
# answer before torch, scikit-learn or matplotlib load; each command imports its machinery itself.
from . import __version__
from .backbones import list_backbones
from .backbones.weights import TORCHVISION_WEIGHTS, checkpoints_dir, mirrored
from .datasets import LAYOUTS
from .datasets.visa import VISA_SHA256, VISA_URL
from .errors import exit_code
from .params import (
    CONFIGS,
    COVARIANCE_ESTIMATORS,
    FEATURE_DTYPES,
    IMAGE_SCORES,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    MODEL_FILE,
    TAP_RESIZE,
    PadimParams,
    check_param,
    check_scales,
)

DEFAULTS = PadimParams()  # the model options' defaults are the estimator's


def _fail(code: int, message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def handle_errors(func):
    """Turn expected failures into one clear line on stderr and a documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            _fail(130, "interrupted; files already written are complete, nothing half-written was kept")
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            hint = "; check the backbone weights (--weights)" if isinstance(exc, FloatingPointError) else ""
            _fail(code, f"{exc}{hint}")

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
        click.option("--backbone", type=click.Choice(list_backbones()), default=DEFAULTS.backbone, show_default=True,
                     help="Feature extractor. mobilenet_v2 and efficientnet_lite0 ship with their weights; "
                          "resnet18 and wide_resnet50_2 need torchvision's: 'padim download weights NAME' puts "
                          "them in the local torch cache, or pass --weights."),
        click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Backbone weights file to use instead of the default source."),
        click.option("--image-size", type=ImageSize(), default="320", show_default=True,
                     help="Input size: N (the shorter side, see --aspect) or HxW, e.g. 256x384."),
        click.option("--aspect", type=click.Choice(["keep", "square"]), default="keep", show_default=True,
                     help="With --image-size N: 'keep' sizes the longer side from the first training image's "
                          "aspect ratio (VisA 1500x1000 at 320 -> 320x480); 'square' resizes to N x N."),
        click.option("--d", "d", type=click.IntRange(1), default=None,
                     help="Feature channels kept (fixed random subset) [default: all of a backbone with at most "
                          "200 (mobilenet_v2: 152), else 100]."),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
                     help="Seed of the channel subset and of the sample that sets the threshold."),
        click.option("--pool", type=click.IntRange(1), default=DEFAULTS.pool, show_default=True, callback=_odd,
                     help="Average each feature tap over a pool x pool neighbourhood (odd; 1 = plain PaDiM)."),
        click.option("--tap-resize", type=click.Choice(TAP_RESIZE), default=DEFAULTS.tap_resize,
                     show_default=True,
                     help="How deeper feature taps are resized to the stride-4 grid (nearest = plain PaDiM; fit "
                          "and predict then work once per deep cell and the model file stores its factor per cell: "
                          "faster and ~4x smaller, see docs/model-size.md)."),
        click.option("--covariance", type=click.Choice(COVARIANCE_ESTIMATORS), default=DEFAULTS.covariance,
                     show_default=True,
                     help="Covariance estimator: sample covariance + eps*I (PaDiM) or OAS shrinkage + eps*I "
                          "(its coefficient differs at every position: fitted and scored per position)."),
        click.option("--feature-dtype", type=click.Choice(FEATURE_DTYPES), default=DEFAULTS.feature_dtype,
                     show_default=True,
                     help="Precision of the backbone's convolutions; the model keeps it and scores in it. "
                          "bfloat16 is faster on CPUs that compute it natively (AVX512-BF16, AMX; slower "
                          "elsewhere), at about equal accuracy, but an ONNX export computes float32 features: "
                          "its scores then differ from the model's (docs/performance.md)."),
        click.option("--eps", type=click.FloatRange(0, min_open=True), default=DEFAULTS.eps, show_default=True,
                     help="Added to each covariance diagonal."),
        click.option("--sigma", type=click.FloatRange(0), default=None,
                     help="Gaussian blur of the anomaly map, in input pixels (0 = none) [default: 4 per 256 px "
                          "of the shorter side]."),
        click.option("--scales", type=Scales(), default=",".join(f"{s:g}" for s in DEFAULTS.scales),
                     show_default=True,
                     help="Input scales of the feature pyramid, comma-separated in (0, 1]: one Gaussian per "
                          "position of each, maps averaged (1 = plain PaDiM)."),
        click.option("--top-k", type=click.IntRange(1), default=DEFAULTS.top_k, show_default=True,
                     help="Image score = mean of the K largest values (1 = max)."),
        click.option("--image-score", type=click.Choice(IMAGE_SCORES), default=DEFAULTS.image_score,
                     help="What the image score ranks: 'map', the anomaly map (blurred, pyramid levels averaged); "
                          "'levels', each level's own unblurred distances over 2x2 positions, averaged over the "
                          "levels; 'deep', the map's score plus one of a deeper tap (stride 32), each scaled by "
                          "its spread on the training images [default: deep where the backbone has that tap "
                          "(mobilenet_v2) and --calibration-images > 0, else map]."),
        click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=DEFAULTS.target_fpr, show_default=True,
                     help="False-alarm rate the stored threshold aims at on new normal images; set from "
                          "out-of-fold scores of the training images (metrics.json states the interval)."),
        click.option("--calibration-images", type=click.IntRange(0), default=DEFAULTS.calibration_images,
                     show_default=True,
                     help="Training images (at most; a random sample beyond) scored out of fold to set the "
                          "threshold (0 = no threshold)."),
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
                     help="Image decoding processes (default: up to 2, on cores torch's threads leave free; "
                          "without them, a thread per core decodes between the network's calls; 0: one thread)."),
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


def _odd(ctx, param, value: int) -> int:
    try:
        check_param("pool", value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


class ImageSize(click.ParamType):
    """N or HxW, in pixels."""

    name = "N|HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, int | tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            sides = tuple(int(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not N or HxW", param, ctx)
        if len(sides) not in (1, 2) or not all(MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in sides):
            self.fail(f"{value!r}: give N or HxW with sides between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}", param, ctx)
        return sides[0] if len(sides) == 1 else sides


class Scales(click.ParamType):
    """Comma-separated pyramid scales, e.g. 1,0.7."""

    name = "S[,S...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return check_scales([float(p) for p in str(value).split(",")])
        except ValueError:
            self.fail(f"{value!r}: give distinct numbers in (0, 1] separated by commas, e.g. 1,0.7", param, ctx)


def _check_device(device: str) -> None:
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
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
    point = report.get("model", {}).get("operating_point")
    if point:
        low, high = point["fpr_interval"]
        click.echo(f"stored threshold {point['threshold']:.3f}: target {point['target_fpr']:.1%} false alarms on new "
                   f"normal images, expected {point['expected_fpr']:.2%} (90% interval {low:.2%}..{high:.2%}), "
                   f"from {point['n']} {point['method']} scores"
                   + ("; too few images to promise the target: add normal images" if
                      point["expected_fpr"] > point["target_fpr"] else ""))
    if "at_threshold" in report:
        t = report["at_threshold"]
        click.echo(f"on this test set: false alarms {t['fp']}/{t['fp'] + t['tn']}, defects caught {t['tp']}/"
                   f"{t['tp'] + t['fn']}  (TP {t['tp']}  FP {t['fp']}  TN {t['tn']}  FN {t['fn']}  F1 {fmt(t['f1'])})")
    recall = overall.get("recall_at_fpr") or {}
    if any(v is not None for v in recall.values()):
        click.echo("recall at " + ", ".join(f"{float(k):.0%} false alarms {fmt(v)}" for k, v in recall.items())
                   + " (thresholds from the test labels: for evaluation only)")
    for note in report["notes"]:
        click.echo(f"note: {note}")


def _evaluate(model, model_path: Path, data, split, out: Path, metrics_resolution: str, figures: bool,
              progress: bool, stages) -> dict:
    from .runs import evaluate_job

    report = evaluate_job(model, data, split, out, model_path, metrics_resolution, figures, progress, stages)
    _print_table(report)
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'scores.csv'}, {out / 'roc_curve.png'}"
               + (f", {out / 'figures'}/" if figures else "") + f", {out / 'report.html'}")
    return report


def _stages():
    """A stage timer that prints one line per finished stage."""
    from .stages import Stages

    return Stages(echo=lambda line: click.echo(f"stage {line}"))


def _load(data_root: Path, category: str, split: str, layout: str, stages=None):
    """The data arguments and the split, read once for the whole command."""
    from .runs import DataArgs

    data = DataArgs(data_root, category, split, layout)
    if stages is None:
        return data, data.load()
    with stages("data"):
        return data, data.load()


def dask_options(func):
    """--dask and --shard-size: run the command on a Dask cluster (padim.distributed)."""
    func = click.option("--shard-size", type=click.IntRange(1), default=None,
                        help="With --dask: images per task at most, on the --batch-size grid "
                             "[default: 512 for fit, 64 for predict].")(func)
    return click.option("--dask", "dask_address", metavar="ADDRESS", default=None,
                        help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or local:N for N "
                             "local worker processes. Needs 'pip install visa-padim[dask]'; workers read the "
                             "data (and write predict outputs) at the same paths as this machine.")(func)


def _distributed():
    """padim.distributed, or a usage error when the optional Dask extra is not installed."""
    try:
        from . import distributed
    except ImportError as exc:
        _fail(2, f"--dask needs Dask: pip install 'visa-padim[dask]' ({exc})")
    return distributed


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
    _no_final_collection()


def _no_final_collection() -> None:
    """At exit, keep the interpreter's last garbage collections away from the objects alive then.

    After torch is imported, the collections of interpreter shutdown traverse the couple of hundred
    thousand objects it made, which took longer than scoring an image. Frozen at exit (gc.freeze, from an atexit
    handler, so nothing is frozen while a command runs), they are left for the OS to free. Files
    are closed and atexit handlers still run; only cycles' finalizers are skipped at exit.
    """
    atexit.unregister(gc.freeze)  # registered once, however often main() runs in one process (tests)
    atexit.register(gc.freeze)


def _new_model(device: str, workers: int | None, split, aspect: str, image_size: int | tuple[int, int],
               prefetch: bool = False, **params):
    """(a Padim for these options, the :class:`~padim.datasets.prefetch.Prefetch` of the training
    images started before torch is imported, with ``prefetch`` and where it can run, else None);
    with --aspect keep, the input size follows the training images."""
    from .datasets.images import keep_aspect

    _check_device(device)
    if isinstance(image_size, int):
        image_size = keep_aspect(image_size, split.train[0].path) if aspect == "keep" else (image_size,) * 2
    started = None
    if prefetch:
        from .datasets.prefetch import Prefetch, can_prefetch

        started = Prefetch([s.path for s in split.train], image_size) if can_prefetch() else None
    from .model import Padim

    model = Padim(device=device, num_workers=workers, image_size=image_size, **params)
    return model, started


_AUTO = click.option("--auto", is_flag=True,
                     help="Choose the configuration from the training images alone: default, map and plain "
                          "are each fitted on 80% of them and score the rest with synthetic defects pasted "
                          "in (patch, blob, scratch, spot); the best is fitted on all. The choice and its "
                          "scores go into the model file and the report. Takes about three more fits.")


def _auto(device: str, workers: int | None, split, params: dict) -> tuple[dict, dict]:
    """--auto: ``params`` with the chosen named configuration's options, and the choice's record."""
    from .auto import choose_config

    name, record = choose_config([s.path for s in split.train], lambda p: _new_model(device, workers, split, **p)[0],
                                 params, log=click.echo)
    return {**params, **CONFIGS[name]}, record


_STATS = click.option("--stats/--no-stats", "keep_stats", default=True, show_default=True,
                      help="Also write the fit's statistics beside the model (model.stats.safetensors, float32 "
                           "sums, about twice the model's size) so that 'padim update' and 'padim merge' can add "
                           "images later.")


@main.command("fit")
@data_options
@model_options
@runtime_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help=f"Output folder; the model is written to OUT/{MODEL_FILE}.")
@_STATS
@_AUTO
@dask_options
@handle_errors
def fit_cmd(data_root, category, split, layout, device, workers, out, keep_stats, auto, dask_address, shard_size,
            **params):
    """Fit a model on the normal training images of a category."""
    data, loaded = _load(data_root, category, split, layout)
    params, record = _auto(device, workers, loaded, params) if auto else (params, None)
    model, prefetch = _new_model(device, workers, loaded, prefetch=not dask_address, **params)
    if dask_address:
        dist = _distributed()
        _, path, info = dist.fit_job(data, out, model, dask_address, shard_size or dist.FIT_SHARD_SIZE,
                                     params["progress"], click.echo, keep_stats, record)
        seconds, n_train = info["fit_seconds"], info["n_train"]
    else:
        from .runs import fit_job

        stages = _stages()
        path = fit_job(data, loaded, out, model, stages, keep_stats, prefetch, record)
        seconds, n_train = stages.seconds["fit"] + stages.seconds["calibrate"], len(loaded.train)
    click.echo(f"fitted on {n_train} images in {seconds:.1f} s; wrote {path} (threshold {model.threshold_})")


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
    from .model import Padim

    _check_device(device)
    stages = _stages()
    data, loaded = _load(data_root, category, split, layout, stages)
    with stages("load"):
        model = Padim.load(model_path, device=device, weights=weights, progress=progress)
    model.batch_size, model.num_workers = batch_size, workers
    _evaluate(model, model_path, data, loaded, out, metrics_resolution, figures, progress, stages)
    click.echo(f"total {sum(stages.seconds.values()):.1f} s")


@main.command("run")
@data_options
@model_options
@runtime_options
@eval_options
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help=f"Output folder for {MODEL_FILE}, metrics.json, scores.csv and figures.")
@_STATS
@_AUTO
@handle_errors
def run_cmd(data_root, category, split, layout, device, workers, metrics_resolution, figures, out, keep_stats, auto,
            **params):
    """Fit, then evaluate: the whole job in one command."""
    from .runs import fit_job

    start = time.perf_counter()
    stages = _stages()
    data, loaded = _load(data_root, category, split, layout, stages)
    record = None
    if auto:
        with stages("auto"):
            params, record = _auto(device, workers, loaded, params)
    model, prefetch = _new_model(device, workers, loaded, prefetch=True, **params)
    if prefetch is not None:
        # the evaluation's libraries (metrics, figures, report), imported while the prefetch still
        # decodes training images on the other core, rather than between the fit and the evaluation
        from . import evaluation  # noqa: F401
        from .reports import run_folder  # noqa: F401
    path = fit_job(data, loaded, out, model, stages, keep_stats, prefetch, record)
    click.echo(f"fitted on {len(loaded.train)} images; wrote {path}")
    _evaluate(model, path, data, loaded, out, metrics_resolution, figures, params["progress"], stages)
    click.echo(f"total {time.perf_counter() - start:.1f} s")


@main.command("predict")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Model file written by 'padim fit' (.safetensors) or 'padim export' (.onnx, .xml).")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Backbone weights file, if the model was fitted with --weights.")
@runtime_options
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write a heat-map overlay PNG per image to OUT/heatmaps/.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder for scores.csv and heatmaps/.")
@dask_options
@handle_errors
def predict_cmd(model_path, paths, weights, device, batch_size, workers, progress, heatmaps, out, dask_address,
                shard_size):
    """Score new images (files, or folders searched recursively) with a .safetensors or .onnx model."""
    _check_device(device)
    if dask_address:
        dist = _distributed()
        result = dist.predict_job(model_path, paths, out, dask_address, device=device, weights=weights,
                                  batch_size=batch_size, heatmaps=heatmaps,
                                  shard_size=shard_size or dist.PREDICT_SHARD_SIZE, progress=progress, log=click.echo)
        flagged = sum(1 for r in result["rows"] if r[2] == "anomaly")
        click.echo(f"scored {len(result['rows'])} images in {result['shards']} shards ({result['reused']} reused "
                   f"from {out / 'parts'}), {flagged} above the threshold; wrote {out / 'scores.csv'}")
        return
    if model_path.suffix.lower() in (".onnx", ".xml") and device != "cpu":
        raise click.BadParameter("exported models (.onnx, .xml) run on the CPU; use --device cpu",
                                 param_hint="--device")
    from .export import open_model
    from .runs import predict_files

    model = open_model(model_path, device=device, weights=weights, progress=progress)
    model.batch_size, model.num_workers = batch_size, workers
    rows = predict_files(model, paths, out, heatmaps)
    flagged = sum(1 for r in rows if r[2] == "anomaly")
    click.echo(f"scored {len(rows)} images, {flagged} above the threshold; wrote {out / 'scores.csv'}")


def _runtime(device: str, batch_size: int, workers: int | None, progress: bool) -> dict:
    """The runtime options of a job that loads a model."""
    _check_device(device)
    return {"device": device, "progress": progress, "batch_size": batch_size, "num_workers": workers}


_MODEL = click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
                      help="Model file written by 'padim fit' (.safetensors).")
_MODEL_OUT = click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
                          help="Write the new model here [default: replace --model, atomically].")


@main.command("calibrate")
@_MODEL
@click.option("--normal", type=click.Path(path_type=Path, exists=True), multiple=True, required=True,
              help="Normal images of the line today (files or folders; repeat the option for more).")
@click.option("--defective", type=click.Path(path_type=Path, exists=True), multiple=True,
              help="Defective images: report how many the new threshold flags (they do not set it).")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="False-alarm rate to aim at [default: the model's].")
@_MODEL_OUT
@runtime_options
@handle_errors
def calibrate_cmd(model_path, normal, defective, target_fpr, out, device, batch_size, workers, progress):
    """Re-set a model's threshold from normal images, without refitting."""
    from .line_jobs import calibrate_job

    click.echo(calibrate_job(model_path, normal, defective, out, target_fpr,
                             **_runtime(device, batch_size, workers, progress)))


@main.command("update")
@_MODEL
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Weigh the images the model has seen so far by this factor (< 1 for a drifting line).")
@_MODEL_OUT
@runtime_options
@handle_errors
def update_cmd(model_path, paths, decay, out, device, batch_size, workers, progress):
    """Add new normal images (files or folders) to a fitted model, without the old images; the
    threshold is re-set from the new images' out-of-fold scores."""
    from .line_jobs import update_job

    click.echo(update_job(model_path, paths, out, decay, **_runtime(device, batch_size, workers, progress)))


@main.command("merge")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="The merged model file.")
@runtime_options
@handle_errors
def merge_cmd(models, out, device, batch_size, workers, progress):
    """Join models fitted apart with the same settings into the model of all their images."""
    from .line_jobs import merge_job

    if len(models) < 2:
        raise click.BadParameter("give at least two model files", param_hint="MODELS")
    click.echo(merge_job(models, out, **_runtime(device, batch_size, workers, progress)))


@main.group("download")
def download_group() -> None:
    """Download a public data set or backbone weights (the only commands that use the network)."""


def _check_sha256(ctx, param, value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise click.BadParameter("expected 64 hexadecimal digits", ctx, param)
    return value.lower()


def _check_mirror(ctx, param, value: str | None) -> str | None:
    try:
        mirrored("http://x/", value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


@download_group.command("visa")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to unpack into; it becomes the DATA_ROOT of the other commands.")
@click.option("--url", default=VISA_URL, show_default=True, help="Archive URL (for a mirror).")
@click.option("--sha256", default=VISA_SHA256, show_default=True, callback=_check_sha256,
              help="Expected sha256 of the archive (for a mirror that serves another file).")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Retry a failed transfer (resuming it) up to this many times in a row without "
                   "progress; 0 turns retrying off.")
@click.option("--keep-archive", is_flag=True, help="Keep the .tar after unpacking (default: delete it).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@handle_errors
def download_visa_cmd(root, url, sha256, retries, keep_archive, progress):
    """Download VisA (VisA_20220922.tar), verify its sha256, unpack it safely into ROOT.

    A dropped transfer is resumed (also by running the command again); a second run after a
    finished one does nothing.
    """
    from .datasets.download import download_visa

    try:
        download_visa(root, url, sha256, retries=retries, keep_archive=keep_archive, progress=progress,
                      echo=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        _fail(130, "interrupted; run the same command again to go on (a partial download is resumed, "
                   "an unfinished unpack is redone)")
    click.echo(f"VisA is ready in {root}: padim run {root} --category fryum --out runs/fryum")


@download_group.command("weights")
@click.argument("backbone", type=click.Choice([*TORCHVISION_WEIGHTS, "all"]))
@click.option("--mirror", default=None, metavar="URL", callback=_check_mirror,
              help="Fetch from this server instead of download.pytorch.org: it replaces the scheme and host "
                   "(e.g. http://mirror.plant:8080 serves /models/resnet18-f37072fd.pth).")
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder to put the file in [default: torch's cache, $TORCH_HOME/hub/checkpoints, where "
                   "'padim fit' looks for it]; from elsewhere, pass the file with --weights.")
@click.option("--retries", type=click.IntRange(0), default=3, show_default=True,
              help="Retry a failed transfer (resuming it) up to this many times in a row without "
                   "progress; 0 turns retrying off.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@handle_errors
def download_weights_cmd(backbone, mirror, cache, retries, progress):
    """Download torchvision's ImageNet weights of BACKBONE (resnet18, wide_resnet50_2 or all).

    The file is checked as torch.hub checks it (its sha256 starts with the hash in its name) and
    against its published size; a mismatch deletes it. A dropped transfer is resumed (also by
    running the command again); a file already there and checked is kept.
    """
    from .backbones.weights import download_weights

    names = list(TORCHVISION_WEIGHTS) if backbone == "all" else [backbone]
    try:
        for name in names:
            path = download_weights(name, cache, mirror, retries=retries, progress=progress,
                                    echo=lambda line: click.echo(line, err=True))
            use = (f"--backbone {name} finds it" if path.parent.resolve() == checkpoints_dir().resolve()
                   else f"not torch's cache: use it with --backbone {name} --weights {path}")
            click.echo(f"{name} weights ready: {path} ({use})")
    except KeyboardInterrupt:
        _fail(130, "interrupted; run the same command again to go on (a partial download is resumed)")


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@handle_errors
def report_cmd(run_dir):
    """(Re)write RUN_DIR/report.html from the files 'padim evaluate' or 'padim run' left in RUN_DIR."""
    from .reports import write_report

    click.echo(f"wrote {write_report(run_dir)}")


@main.command("export")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Model file written by 'padim fit'.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "openvino"]), default="onnx", show_default=True,
              help="Export format: ONNX (onnxruntime) or OpenVINO IR (NAME.xml + NAME.bin, the openvino extra).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Output file, e.g. model.onnx, model.int8.onnx or model.xml.")
@click.option("--batch", "batch", default="dynamic", show_default=True,
              help="'dynamic' (any batch size) or a fixed number of images per call.")
@click.option("--opset", type=click.IntRange(17, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Backbone weights file, if the model was fitted with --weights.")
@click.option("--int8", is_flag=True,
              help="Quantize the backbone to INT8 (static, calibrated on --calibration); the scoring stays float.")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True), multiple=True,
              help="Normal images (files or folders, repeatable) to calibrate --int8 on, e.g. the training images.")
@click.option("--calibration-images", type=click.IntRange(1), default=32, show_default=True,
              help="Calibrate on at most this many of them (a fixed, evenly drawn sample).")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="How activation ranges are set from the calibration images (percentile and "
                                       "entropy from histograms: slower, no better on the shared data sets).")
@click.option("--quant-format", type=click.Choice(["qdq", "qoperator"]), default="qdq", show_default=True,
              help="INT8 graph form: QuantizeLinear/DequantizeLinear pairs (QDQ; OpenVINO reads it) or "
                   "QLinear operators.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="One INT8 weight scale per output channel, or one per tensor.")
@click.option("--float-blocks", type=click.IntRange(0), default=0, show_default=True,
              help="Keep the backbone's first N blocks float, INT8 from block N on: 3 keeps the default "
                   "mobilenet_v2 model's heat maps (docs/deploy.md).")
@handle_errors
def export_cmd(model_path, fmt, out, batch, opset, weights, int8, calibration, calibration_images,
               calibration_method, quant_format, per_channel, float_blocks):
    """Export the whole scoring pipeline (uint8 images -> maps, scores) as one ONNX graph or OpenVINO IR."""
    from .export.cli import export_command

    click.echo(export_command(model_path, out, batch, opset, weights, fmt=fmt, int8=int8, calibration=calibration,
                              calibration_images=calibration_images, method=calibration_method,
                              quant_format=quant_format, per_channel=per_channel, float_blocks=float_blocks))


@main.command("serve")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Model file: .safetensors (native), .onnx (onnxruntime) or .xml (OpenVINO).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Any but loopback (127.0.0.0/8, ::1, localhost) needs a token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=20.0, show_default=True,
              help="Largest accepted upload (per image).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest accepted image (width x height).")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Backbone weights file, if the model was fitted with --weights.")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File whose first line is the bearer token clients must send (else $PADIM_SERVE_TOKEN; "
                   "there is no option for the token itself: command lines are visible to other users).")
@click.option("--allow-unauthenticated", is_flag=True,
              help="Listen on a non-loopback host without a token (logged as a warning).")
@click.option("--ssl-certfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TLS certificate (PEM), with --ssl-keyfile: serve HTTPS.")
@click.option("--ssl-keyfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TLS private key (PEM, unencrypted), with --ssl-certfile.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM, seconds to let requests in flight finish before cancelling them.")
@click.option("--reload-interval", type=click.FloatRange(0), default=2.0, show_default=True, metavar="SECONDS",
              help="Check the model file this often and load it again when it was replaced; 0: only on SIGHUP.")
@click.option("--window", type=click.IntRange(50), default=500, show_default=True, metavar="N",
              help="The last N scored images make /metrics' flagged share and score quantiles, and the drift "
                   "warning.")
@handle_errors
def serve_cmd(model_path, host, port, max_upload_mb, max_pixels, weights, token_file, allow_unauthenticated,
              ssl_certfile, ssl_keyfile, shutdown_timeout, reload_interval, window):
    """Run the inspection service: HTTP API + a page at / to try images.

    The bearer token comes from $PADIM_SERVE_TOKEN or --token-file. Exit code 2 when the start is
    refused (reachable host without a token, unusable token or TLS files).

    A replaced model file (or SIGHUP) is loaded in the background and swapped in without dropping a
    request; a file that does not load leaves the old model serving, with a warning. The log warns
    when the flagged share of the last N images is far above the model's target false-alarm rate.
    """
    # checked before the model loads or the web framework is imported, so a refusal is immediate
    from .serve.security import ServeConfigError, resolve_security

    try:
        security = resolve_security(host, token_file, allow_unauthenticated, ssl_certfile, ssl_keyfile)
    except ServeConfigError as exc:
        _fail(2, str(exc))
    from .serve.run import serve

    serve(model_path, host, port, int(max_upload_mb * 1024 * 1024), max_pixels, weights, security,
          shutdown_timeout, reload_interval, window)


def _as_args(command: click.Command, values: dict) -> list[str]:
    """The command-line options that give ``command`` these parameter values (parsing's inverse);
    None values are left to the command's defaults."""
    args: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or values.get(param.name) is None:
            continue
        value = values[param.name]
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        if isinstance(value, tuple):  # HxW image sizes, comma-separated scales
            value = ("x" if isinstance(param.type, ImageSize) else ",").join(map(repr, value))
        args += [param.opts[0], repr(value) if isinstance(value, float) else str(value)]
    return args


def _config_names(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(unknown) or 'none'}: choose from {', '.join(CONFIGS)}")
    return names


@main.command("benchmark")
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Output folder: OUT/<data set>/<category>/ run folders, summary.csv/.md/.json, index.html.")
@click.option("--categories", default=None, metavar="A,B,...",
              help="Only these categories (comma-separated) [default: every category found].")
@click.option("--split", type=click.Choice(["1cls", "seed"]), default="1cls", show_default=True,
              help="VisA split of the VisA categories (see 'padim run --help'); other layouts have one split.")
@model_options
@runtime_options
@eval_options
@click.option("--configs", default=None, metavar="NAME,...", callback=_config_names,
              help=f"Run every category under each of these named configurations ({', '.join(CONFIGS)}; "
                   "'plain' is plain PaDiM at anomalib's settings, its options replacing those given) into "
                   "OUT/<config>/<data set>/<category>/, a config column in the summary.")
@click.option("--dask", "dask_address", metavar="ADDRESS", default=None,
              help="Run the categories as tasks on a Dask cluster (tcp://host:8786 or local:N); workers must "
                   "see the data and OUT at the same paths.")
@handle_errors
def benchmark_cmd(roots, out, categories, configs, dask_address, device, progress, **params):
    """Fit and evaluate every category under each ROOT (VisA, MVTec AD or plain folders) and summarize.

    Each category runs as 'padim run' (same options) in its own process into OUT/<data set>/<category>/;
    a category whose run folder is complete with the same options is reused. A failing category is
    recorded in the summary and the others still run; the exit code is then the first failure's.
    """
    from .benchmark import benchmark

    _check_device(device)
    # the children's progress bars would only fill the run logs: the benchmark shows one over categories
    runtime = {"device": device, "progress": False}
    args = (_as_args(run_cmd, {**params, **runtime}) if configs is None else
            {name: _as_args(run_cmd, {**params, **CONFIGS[name], **runtime}) for name in configs})
    wanted = None if categories is None else [c.strip() for c in categories.split(",")]
    rows = benchmark(roots, out, args, wanted, dask_address, progress, click.echo)
    click.echo(f"wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.json'}, {out / 'index.html'}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        _fail(failed[0]["exit_code"], f"{len(failed)} of {len(rows)} categories failed "
                                      f"({', '.join(r['dataset'] + '/' + r['category'] for r in failed)}); "
                                      f"see {out / 'summary.md'}")


if __name__ == "__main__":
    main()
