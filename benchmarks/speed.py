"""Speed and memory benchmark on real VisA images: prints a table and writes JSON.

Figures (each the median of --repeats runs):
  backbone_ips        the backbone alone (network forward to the last tap at every pyramid scale, as
                      fit and predict run it: channels-last, one image at a time) on the 4 batches of
                      B images that predict_ips scores, images/s
  backbone_plain_ips  the same network called once per NCHW batch of B images (the usual way)
  fit_ips[N]          Padim.fit from JPEG files (decode + backbone + statistics + calibration)
  fit_peak_rss_mb[N]  peak resident memory of a fresh process that fits on N images
  fit_stream_ips      Padim.accumulate from decoded uint8 tensors, batch B: the streaming part of
                      a fit (network + statistics update), without decoding and the fixed costs (the
                      marginal rate: 4B images more, divided by the extra time; the float64
                      conversion at the end, ~1 s of fixed cost, is left out, as its noise swamped it)
  predict_ips         Padim.iter_predict from decoded uint8 tensors (4B images, batch B): maps + image
                      scores, as predict runs batch after batch
  *_vs_backbone       fit_stream_ips and predict_ips over backbone_ips: the median of the ratios of
                      rounds that time the three in turn (the machine's drift cancels out)
  predict_latency_ms  the scorer on one image
  predict_files_ips   Padim.predict from JPEG files, batch 16
  model_file_mb       size of the saved model

    .venv/bin/python benchmarks/speed.py ../shared/data/visa --category fryum \
        --out benchmarks/results/speed-fryum.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed, timed_rounds

from padim import Padim
from padim.backbones import get_spec
from padim.datasets import load_split, read_image
from padim.datasets.images import to_tensor


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn, repeats))


def fit_child(args: argparse.Namespace) -> None:
    """Fit on the first N training files in this (fresh) process; print seconds and peak RSS."""
    split = load_split(args.data_root, args.category)
    paths = [s.path for s in split.train[: args.n]]
    model = Padim(backbone=args.backbone, image_size=args.image_size, d=args.d, scales=args.scales,
                  batch_size=args.batch_size, tap_resize=args.tap_resize)
    model.feature_extractor()  # load weights before timing, like the backbone figure
    start = time.perf_counter()
    model.fit(paths)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        size = model.save(Path(tmp) / "m.safetensors").stat().st_size
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "model_bytes": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image-size", type=lambda v: tuple(int(x) for x in v.split("x")) * (2 if "x" not in v else 1),
                        default=(256, 256), help="N or HxW")
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--scales", type=lambda v: tuple(float(x) for x in v.split(",")), default=(1.0, 0.7),
                        help="pyramid scales, comma-separated (the model default: 1,0.7)")
    parser.add_argument("--tap-resize", default="bilinear", choices=["bilinear", "nearest"],
                        help="nearest: fit and predict run cell by cell where the grids allow it")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-sizes", type=int, nargs="+", default=[50, 150, 450])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fit-child", type=int, default=None, dest="n", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n is not None:
        fit_child(args)
        return

    split = load_split(args.data_root, args.category)
    size = args.image_size
    test_paths = [s.path for s in split.test][: args.batch_size * 8]
    more = torch.stack([to_tensor(read_image(p, size)) for p in test_paths])
    images, test_paths = more[: args.batch_size * 4], test_paths[: args.batch_size * 4]
    batch = images[: args.batch_size]
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                    "torch": torch.__version__, "backbone": args.backbone, "image_size": args.image_size,
                    "d": args.d, "scales": list(args.scales), "tap_resize": args.tap_resize,
                    "batch_size": args.batch_size,
                    "repeats": args.repeats}

    fitted = Padim(backbone=args.backbone, image_size=args.image_size, d=args.d, scales=args.scales,
                   batch_size=args.batch_size, tap_resize=args.tap_resize).fit(
        [s.path for s in split.train[:40]])
    extractor = fitted.feature_extractor()
    normalized = extractor.normalize(images)  # the 4 batches that predict_ips scores
    levels = [F.interpolate(normalized, size=hw, mode="bilinear", antialias=True)
              .contiguous(memory_format=torch.channels_last) for hw in extractor.level_sizes(size)]
    with torch.inference_mode():
        step = extractor.step(size) or args.batch_size
        # in turn, round after round: the VM's speed drifts by up to a third within minutes
        t = timed_rounds({
            "backbone": lambda: [extractor.net(c) for x in levels for c in x.split(step)],
            "predict": lambda: list(fitted.iter_predict(images)),
            "fit_more": lambda: fitted.accumulate(more),
            "fit": lambda: fitted.accumulate(images),
        }, args.repeats)
        backbone = [len(images) / s for s in t["backbone"]]
        predict = [len(images) / s for s in t["predict"]]
        stream = [(len(more) - len(images)) / (a - b) for a, b in zip(t["fit_more"], t["fit"], strict=True)]
        result["backbone_ips"] = statistics.median(backbone)
        result["predict_ips"] = statistics.median(predict)
        result["fit_stream_ips"] = statistics.median(stream)
        result["predict_vs_backbone"] = statistics.median(p / b for p, b in zip(predict, backbone, strict=True))
        result["fit_stream_vs_backbone"] = statistics.median(f / b for f, b in zip(stream, backbone, strict=True))
        plain = get_spec(args.backbone).build(None, True).eval()
        plain_levels = [x.contiguous() for x in levels]
        t = median_time(lambda: [plain(b) for x in plain_levels for b in x.split(args.batch_size)], args.repeats)
        result["backbone_plain_ips"] = len(images) / t
        one = batch[:1]
        result["predict_latency_ms"] = 1000 * median_time(lambda: fitted.scorer_(one), args.repeats * 3)
    fitted.progress = False
    t = median_time(lambda: fitted.predict(test_paths), args.repeats)
    result["predict_files_ips"] = len(test_paths) / t

    result["fit"] = {}
    for n in args.fit_sizes:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, __file__, str(args.data_root), "--category", args.category, "--backbone",
                 args.backbone, "--image-size", "x".join(map(str, args.image_size)), "--d", str(args.d),
                 "--scales", ",".join(map(str, args.scales)), "--batch-size", str(args.batch_size),
                 "--tap-resize", args.tap_resize,
                 "--fit-child", str(n)],
                check=True, capture_output=True, text=True,
            ).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        result["fit"][n] = {
            "fit_ips": n / statistics.median(r["seconds"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        }
        result["model_file_mb"] = runs[-1]["model_bytes"] / 1e6

    fits = result["fit"]
    print(f"machine: {result['machine']}; {args.backbone} {'x'.join(map(str, args.image_size))} px d={args.d} "
          f"scales {','.join(map(str, args.scales))} tap resize {args.tap_resize}"
          f"{' (cell by cell)' if fitted.scorer_.storage == 'cells' else ''}; "
          f"median of {args.repeats}")
    print(f"backbone only (batch {args.batch_size}) {result['backbone_ips']:8.1f} img/s "
          f"(plain NCHW batch call: {result['backbone_plain_ips']:.1f} img/s)")
    for n, f in fits.items():
        print(f"fit N={n:<4d} from files          {f['fit_ips']:8.1f} img/s "
              f"({f['fit_ips'] / result['backbone_ips']:.2f}x backbone)  peak RSS {f['peak_rss_mb']:7.0f} MB")
    print(f"fit streaming, tensors      {result['fit_stream_ips']:8.1f} img/s "
          f"({result['fit_stream_vs_backbone']:.2f}x backbone, same rounds)")
    print(f"predict, tensors, batch {args.batch_size}  {result['predict_ips']:8.1f} img/s "
          f"({result['predict_vs_backbone']:.2f}x backbone, same rounds)")
    print(f"predict, tensors, batch 1   {result['predict_latency_ms']:8.1f} ms")
    print(f"predict, JPEG files         {result['predict_files_ips']:8.1f} img/s")
    print(f"model file                  {result['model_file_mb']:8.1f} MB")
    sizes = sorted(fits)
    ratio = fits[sizes[-1]]["peak_rss_mb"] / fits[sizes[0]]["peak_rss_mb"]
    print(f"peak RSS N={sizes[-1]} / N={sizes[0]}: {ratio:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
