"""Throughput of the native (torch) and exported (onnxruntime) scoring paths on the CPU.

Times the model call only, on images already decoded and resized (uint8 tensors), so both paths
get identical input: images/s at batch 16 and the latency of one image at batch 1.

    python benchmarks/export.py --model runs/fryum/model.safetensors --onnx runs/fryum/model.onnx \\
        --data ../shared/data/visa --category fryum
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from timing import timed

from padim import Padim
from padim.datasets import load_split
from padim.datasets.images import ImageFiles
from padim.export import OnnxModel, export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="native .safetensors model")
    parser.add_argument("--onnx", type=Path, default=None, help="its ONNX export (default: export to a temp file)")
    parser.add_argument("--data", type=Path, default=None, help="DATA_ROOT; default: random images")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--repeats", type=int, default=5, help="timed batch-16 calls per path")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed batch-1 calls per path")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="intra-op thread counts to time (torch.set_num_threads, onnxruntime intra_op)")
    args = parser.parse_args()

    native = Padim.load(args.model)
    h, w = native.image_size_
    if args.data is not None:
        paths = [s.path for s in load_split(args.data, args.category).test[:16]]
        images = torch.stack([ImageFiles(paths, native.image_size_)[i] for i in range(len(paths))])
    else:
        images = torch.randint(0, 256, (16, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    onnx_path = args.onnx
    tmp = None
    if onnx_path is None:
        tmp = tempfile.TemporaryDirectory()
        onnx_path = export_onnx(native, Path(tmp.name) / "model.onnx", source=args.model)
    scorer = native.scorer_

    def run_native(batch):
        with torch.inference_mode():
            scorer(batch)

    print(f"image size {h}x{w}, {len(images)} {'real' if args.data else 'random'} images, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'path':8s} {'threads':>7s} {'batch 16 img/s':>15s} {'batch 1 p50 ms':>15s} {'batch 1 p90 ms':>15s}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        session = OnnxModel.load(onnx_path, threads=threads).session

        def run_onnx(batch, session=session):
            session.run(None, {"images": batch})

        for name, fn, batch16, batch1 in (("native", run_native, images, images[:1]),
                                          ("onnx", run_onnx, images.numpy(), images[:1].numpy())):
            t16 = timed(lambda f=fn, b=batch16: f(b), args.repeats)
            t1 = sorted(timed(lambda f=fn, b=batch1: f(b), args.latency_repeats))
            p90 = t1[min(len(t1) - 1, int(0.9 * len(t1)))]
            print(f"{name:8s} {threads:7d} {len(images) / statistics.median(t16):15.1f} "
                  f"{1000 * statistics.median(t1):15.1f} {1000 * p90:15.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
