"""INT8 schemes side by side: quantize one float export several ways, evaluate each, time them.

``accuracy``: each named scheme (keyword arguments of ``quantize_onnx``, plus ``calibration_images``)
is quantized from WORK/model.onnx (calibrated on a fixed sample of the data set's training images),
written to WORK/NAME.onnx (reused when there) and evaluated on the test split (image AUROC, pixel
AUROC, AUPRO); then, with ``--rounds``, the model call on 16 decoded test images at batch 16 is timed
for the float export and every scheme, arms in turn in each round. ``speed``: batch-16 calls and
``padim predict`` of the whole test split as fresh processes (no heat maps) for the given files, arms
in turn (a ``.onnx`` is also written as OpenVINO IR NAME.xml when ``--openvino`` names it).

    python benchmarks/edge_schemes.py accuracy ../shared/data/visa fryum --work /tmp/sch \\
        --schemes '{"float3": {"skip_blocks": 3}, "pct": {"method": "percentile"}}' --rounds 2 --json out.json
    python benchmarks/edge_schemes.py speed ../shared/data/visa fryum --arm onnx /tmp/sch/model.onnx \\
        --arm float3 /tmp/sch/float3.onnx --openvino float3 --rounds 5 --process-rounds 3 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from edge import process
from timing import timed_rounds

from padim.datasets import load_split
from padim.datasets.images import read_image
from padim.evaluation import evaluate
from padim.export import open_model
from padim.export.quantize import quantize_onnx, sample_paths


def metrics(path: Path, split) -> dict[str, float]:
    model = open_model(path)
    model.progress = False
    overall = evaluate(model, split).metrics["overall"]
    return {k: overall[k] for k in ("image_auroc", "pixel_auroc", "aupro")}


def batch16(files: dict[str, Path], split, rounds: int) -> dict[str, float]:
    """Images/s of each file's model call on the first 16 decoded test images, arms in turn."""
    models = {name: open_model(path) for name, path in files.items()}
    size = next(iter(models.values())).image_size_
    images = np.stack([np.asarray(read_image(s.path, size)).transpose(2, 0, 1) for s in split.test[:16]])
    times = timed_rounds({name: (lambda c=m._call: c(images)) for name, m in models.items()}, rounds)
    return {name: 16 / statistics.median(t) for name, t in times.items()}


def accuracy_command(args, split, out: dict) -> None:
    train = [s.path for s in split.train]
    for name, options in json.loads(args.schemes).items():
        options = dict(options)
        n = options.pop("calibration_images", 32)
        path = args.work / f"{name}.onnx"
        entry = out.setdefault(name, {"options": options, "calibration_images": n})
        if not path.is_file():
            start = time.perf_counter()
            quantize_onnx(args.work / "model.onnx", path, sample_paths(train, n), **options)
            entry["quantize_s"] = time.perf_counter() - start
        if "accuracy" not in entry:
            entry["accuracy"] = metrics(path, split)
        print(f"{args.category} {name:18s} " + " ".join(f"{k} {v:.4f}" for k, v in entry["accuracy"].items()),
              flush=True)
        save(args, out)
    if args.rounds:
        names = [n for n in out if (args.work / f"{n}.onnx").is_file()]
        speed = batch16({"onnx": args.work / "model.onnx", **{n: args.work / f"{n}.onnx" for n in names}}, split,
                        args.rounds)
        for name in names:
            out[name]["b16_img_s"], out[name]["b16_vs_onnx"] = speed[name], speed[name] / speed["onnx"]
            print(f"{name:18s} b16 {speed[name]:.2f} img/s = {speed[name] / speed['onnx']:.2f}x float onnx", flush=True)
        out["_onnx_b16_img_s"] = speed["onnx"]


def speed_command(args, split, out: dict) -> None:
    from padim.export.openvino import export_openvino

    files = {name: Path(path) for name, path in args.arm}
    for name in args.openvino:
        xml = files[name].with_suffix(".xml")
        if not xml.is_file():
            export_openvino(files[name], xml)
        files[f"openvino-{name}"] = xml
        if args.evaluate_openvino and f"openvino-{name}" not in out.get("accuracy", {}):
            out.setdefault("accuracy", {})[f"openvino-{name}"] = metrics(xml, split)
            print(f"openvino-{name}", out["accuracy"][f"openvino-{name}"], flush=True)
    out["b16_img_s"] = batch16(files, split, args.rounds)
    print({k: round(v, 2) for k, v in out["b16_img_s"].items()}, flush=True)
    save(args, out)
    test = [str(s.path) for s in split.test]
    runs: dict[str, list] = {name: [] for name in files}
    for r in range(args.process_rounds):
        for name, path in files.items():  # in turn, so that the machine's drift hits all arms alike
            wall, rss = process(path, test, args.work / "predict-all")
            runs[name].append([wall, rss])
            print(r, name, f"{wall:.1f} s", f"{rss:.0f} MB", flush=True)
            out["process_all"] = runs
            save(args, out)


def save(args, out: dict) -> None:
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["accuracy", "speed"])
    parser.add_argument("data_root", type=Path)
    parser.add_argument("category")
    parser.add_argument("--work", type=Path, required=True, help="folder with the float model.onnx (accuracy)")
    parser.add_argument("--schemes", default="{}", help="accuracy: JSON {name: quantize_onnx keyword arguments}")
    parser.add_argument("--arm", nargs=2, action="append", default=[], metavar=("NAME", "FILE"),
                        help="speed: a file to time (repeatable)")
    parser.add_argument("--openvino", nargs="*", default=[], help="speed: arms also timed as OpenVINO IR")
    parser.add_argument("--evaluate-openvino", action="store_true", help="speed: evaluate those IR files first")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds of the batch-16 call")
    parser.add_argument("--process-rounds", type=int, default=2, help="speed: rounds of whole predict processes")
    parser.add_argument("--json", type=Path, default=None, help="results file (read first, so reruns resume)")
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f} (shared machine: timings are rough)", flush=True)
    out = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    split = load_split(args.data_root, args.category)
    (accuracy_command if args.command == "accuracy" else speed_command)(args, split, out)
    save(args, out)
    print(f"load avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
