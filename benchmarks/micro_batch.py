"""The backbone's milliseconds per image on the CPU against the images per network call, at several
input sizes: what ``padim.backbones.extractor.MICRO_PIXELS`` (the pixels per call the tool aims
for) rests on.

    python benchmarks/micro_batch.py [--out benchmarks/results/micro-batch.json] [--repeats 5]

Runs the default backbone (MobileNetV2 to its last tap, batch norms folded, channels-last, as the
tool runs it) on 16 random images per size, in calls of 1, 2, 4 and 8 images, size after size and
call size after call size in turn, and keeps the best of ``--repeats`` rounds (the shared machine's
speed drifts). Prints each size's row and the call size the tool picks for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from padim.backbones.extractor import MICRO_PIXELS, fold_batch_norms, micro_batch_for
from padim.backbones.packaged import mobilenet_v2

SIZES = [(192, 192), (224, 336), (256, 256), (320, 480), (512, 512)]
CALLS = [1, 2, 4, 8]
IMAGES = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    net = fold_batch_norms(mobilenet_v2(None, True).eval()).to(memory_format=torch.channels_last)
    inputs = {hw: torch.randn(IMAGES, 3, *hw).contiguous(memory_format=torch.channels_last) for hw in SIZES}
    best = {(hw, n): float("inf") for hw in SIZES for n in CALLS}
    with torch.inference_mode():
        for x in inputs.values():
            net(x[:max(CALLS)])  # warm-up: oneDNN's kernels for each shape
        for _ in range(args.repeats):
            for hw, x in inputs.items():
                for n in CALLS:
                    start = time.perf_counter()
                    for chunk in x.split(n):
                        net(chunk)
                    best[hw, n] = min(best[hw, n], (time.perf_counter() - start) / IMAGES * 1000)
    rows = []
    for hw in SIZES:
        ms = {n: round(best[hw, n], 2) for n in CALLS}
        fastest = min(ms, key=ms.get)
        rows.append({"size": list(hw), "pixels": hw[0] * hw[1], "ms_per_image": ms, "fastest": fastest,
                     "picked": micro_batch_for(hw)})
        print(f"{hw[0]}x{hw[1]}: " + "  ".join(f"{n}/call {v:.2f} ms" for n, v in ms.items())
              + f"  | fastest {fastest}, picked {micro_batch_for(hw)}")
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                        "torch": torch.__version__, "micro_pixels": MICRO_PIXELS,
                                        "repeats": args.repeats, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
