"""Edge deployment: native, float ONNX, INT8 ONNX, OpenVINO float and OpenVINO INT8, side by side.

For each model (a fitted ``.safetensors`` and its data set) it writes the four exports (the INT8
ones calibrated on a fixed sample of the model's own training images), then prints file size and
image AUROC / pixel AUROC / AUPRO of each arm on the test split (the product's ``evaluate``). For
the first model it also times, with the arms taken in turn in every round (the machine is shared,
so a drift hits all arms alike): images/s of the model call on decoded images at batch 16 and
batch 1, and, as fresh processes under ``/usr/bin/time``, ``padim predict`` of one test image (cold
start) and of the whole test split (files in, scores out, no heat maps), with their peak RSS.

    python benchmarks/edge.py --model /tmp/m/fryum/model.safetensors ../shared/data/visa fryum \\
        --model /tmp/m/kolektor/model.safetensors ../shared/data/kolektorsdd kolektor --work /tmp/edge
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from timing import timed_rounds

from padim.datasets import load_split
from padim.evaluation import evaluate
from padim.export import open_model
from padim.export.quantize import quantize_onnx, sample_paths

ARMS = ("native", "onnx", "onnx-int8", "openvino", "openvino-int8")


def export_all(model_path: Path, root: Path, category: str, work: Path, n_calibration: int,
               quantize_options: dict) -> dict[str, Path]:
    """The model's exports in ``work`` (reused when there), by arm."""
    from padim import Padim
    from padim.export import export_onnx
    from padim.export.openvino import export_openvino

    work.mkdir(parents=True, exist_ok=True)
    files = {"native": model_path, "onnx": work / "model.onnx", "onnx-int8": work / "model.int8.onnx",
             "openvino": work / "model.xml", "openvino-int8": work / "model.int8.xml"}
    if not files["onnx"].is_file():
        export_onnx(Padim.load(model_path), files["onnx"], source=model_path)
    if not files["onnx-int8"].is_file():
        train = [s.path for s in load_split(root, category).train]
        start = time.perf_counter()
        quantize_onnx(files["onnx"], files["onnx-int8"], sample_paths(train, n_calibration), **quantize_options)
        print(f"  quantized in {time.perf_counter() - start:.1f} s", flush=True)
    for arm, source in (("openvino", "onnx"), ("openvino-int8", "onnx-int8")):
        if not files[arm].is_file():
            export_openvino(files[source], files[arm])
    return files


def file_mb(path: Path) -> float:
    """Megabytes of a model file with its weights file (OpenVINO's .bin, ONNX external data), if any."""
    extra = [path.with_suffix(".bin")] if path.suffix == ".xml" else [path.with_name(path.name + ".data")]
    return sum(p.stat().st_size for p in [path, *extra] if p.is_file()) / 1e6


def accuracy(files: dict[str, Path], root: Path, category: str, arms: list[str]) -> dict[str, dict]:
    split = load_split(root, category)
    out = {}
    for arm in arms:
        model = open_model(files[arm])
        model.progress = False
        overall = evaluate(model, split).metrics["overall"]
        out[arm] = {k: overall[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(f"  {arm:14s} " + " ".join(f"{k} {v:.4f}" for k, v in out[arm].items()), flush=True)
    return out


def throughput(files: dict[str, Path], root: Path, category: str, repeats: int) -> dict[str, dict]:
    """Images/s of the model call on 16 decoded test images, batch 16 and batch 1, arms in turn."""
    import torch

    from padim.datasets.images import read_image

    models = {arm: open_model(files[arm]) for arm in ARMS}
    size = models["native"].image_size_
    paths = [s.path for s in load_split(root, category).test[:16]]
    images = np.stack([np.asarray(read_image(p, size)).transpose(2, 0, 1) for p in paths])
    tensor = torch.from_numpy(images)
    fns = {}
    for arm, model in models.items():
        data = tensor if arm == "native" else images
        if arm == "native":
            scorer = model.scorer_

            def call(batch, scorer=scorer):
                with torch.inference_mode():
                    scorer(batch)
        else:
            call = model._call
        fns[f"{arm} b16"] = lambda c=call, d=data: c(d)
        fns[f"{arm} b1"] = lambda c=call, d=data: [c(d[i:i + 1]) for i in range(4)]
    times = timed_rounds(fns, repeats)
    return {arm: {"batch16_img_s": 16 / statistics.median(times[f"{arm} b16"]),
                  "batch1_img_s": 4 / statistics.median(times[f"{arm} b1"])} for arm in ARMS}


def process(model: Path, images: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``padim predict`` in a fresh process."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "padim.cli", "predict", "--model", str(model), *images,
           "--out", str(out), "--no-heatmaps", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:8])} failed: {done.stderr[-500:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    return wall, rss


def processes(files: dict[str, Path], root: Path, category: str, work: Path, repeats: int,
              whole: list[str]) -> dict[str, dict]:
    """Cold start (one image) of every arm, and the whole test split for the arms in ``whole``."""
    test = [str(s.path) for s in load_split(root, category).test]
    out: dict[str, dict] = {arm: {"cold": [], "cold_rss": [], "all": [], "all_rss": []} for arm in ARMS}
    for _ in range(repeats):
        for arm in ARMS:  # in turn, so that the machine's drift hits all arms alike
            wall, rss = process(files[arm], test[:1], work / "predict-one")
            out[arm]["cold"].append(wall)
            out[arm]["cold_rss"].append(rss)
            if arm in whole:
                wall, rss = process(files[arm], test, work / "predict-all")
                out[arm]["all"].append(wall)
                out[arm]["all_rss"].append(rss)
    return {arm: {k: statistics.median(v) if v else None for k, v in r.items()} for arm, r in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs=3, action="append", required=True, metavar=("MODEL", "DATA_ROOT", "CATEGORY"),
                        help="a fitted model and its data set (repeatable; the first one is also timed)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the exports and predict outputs")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--quant-format", default="qdq")
    parser.add_argument("--per-tensor", action="store_true")
    parser.add_argument("--float-blocks", type=int, default=0,
                        help="keep the first N backbone blocks float, INT8 from block N on (skip_blocks)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the model calls")
    parser.add_argument("--process-repeats", type=int, default=2, help="rounds of fresh predict processes")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--accuracy-arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--whole-arms", nargs="+", default=["onnx", "onnx-int8"], choices=ARMS,
                        help="arms whose predict of the whole test split is timed as a process")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    options = {"method": args.method, "quant_format": args.quant_format, "per_channel": not args.per_tensor,
               "skip_blocks": args.float_blocks}
    print(f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f} (shared machine: timings are rough); "
          f"INT8 {options}, {args.calibration_images} calibration images", flush=True)
    results = {}
    for i, (model, root, category) in enumerate(args.model):
        root = Path(root)
        print(f"{category}:", flush=True)
        files = export_all(Path(model), root, category, args.work / category, args.calibration_images, options)
        entry = {"size_mb": {arm: file_mb(files[arm]) for arm in ARMS}}
        if not args.no_accuracy:
            entry["accuracy"] = accuracy(files, root, category, args.accuracy_arms)
        if i == 0 and not args.no_speed:
            entry["throughput"] = throughput(files, root, category, args.repeats)
            entry["process"] = processes(files, root, category, args.work / category, args.process_repeats,
                                         args.whole_arms)
        results[category] = entry
        print_table(category, entry)
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"options": options, "calibration_images": args.calibration_images,
                                         "results": results}, indent=1))


def print_table(category: str, entry: dict) -> None:
    print(f"| {category} | size MB | image AUROC | pixel AUROC | AUPRO | b16 img/s | b1 img/s | cold start s "
          f"| cold RSS MB | predict all s | RSS MB |")
    print("|---|" + "---|" * 10)
    for arm in ARMS:
        acc = entry.get("accuracy", {}).get(arm, {})
        thr = entry.get("throughput", {}).get(arm, {})
        proc = entry.get("process", {}).get(arm, {})

        def f(d, k, fmt):
            return format(d[k], fmt) if d.get(k) is not None else "-"
        print(f"| {arm} | {entry['size_mb'][arm]:.1f} | {f(acc, 'image_auroc', '.4f')} "
              f"| {f(acc, 'pixel_auroc', '.4f')} "
              f"| {f(acc, 'aupro', '.4f')} | {f(thr, 'batch16_img_s', '.1f')} | {f(thr, 'batch1_img_s', '.1f')} "
              f"| {f(proc, 'cold', '.2f')} | {f(proc, 'cold_rss', '.0f')} | {f(proc, 'all', '.1f')} "
              f"| {f(proc, 'all_rss', '.0f')} |", flush=True)


if __name__ == "__main__":
    main()
