"""How fast the whitening factor is computed, against what the CPU does on the same shapes.

    python benchmarks/factor.py [--image-size 320x480] [--scales 1,0.7] [--repeats 3] [--out FILE]

Fills the statistics of the default layout (MobileNetV2, all 152 channels, nearest tap resizing:
per cell) with random embeddings, then times :func:`padim.model.factor.factor_rows` (every cell of
every tap) and, for the same shapes, the batched float64 matrix products that dominate it. Prints
the work in GFLOP, the seconds and GFLOP/s of each, and the per-position LAPACK route (Cholesky and
triangular inverse of each full d x d covariance) on a sample of positions, extrapolated.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from padim.backbones import FeatureExtractor, channel_index
from padim.model.factor import factor_rows, whitening_factor
from padim.model.stats import GaussianStats


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", default="320x480")
    parser.add_argument("--scales", default="1,0.7")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    scales = tuple(float(v) for v in args.scales.split(","))
    extractor = FeatureExtractor("mobilenet_v2", channel_index(152, 152, 0), pretrained=False, pool=3,
                                 tap_resize="nearest", scales=scales)
    layouts = extractor.block_layouts(size)
    stats = GaussianStats(layouts)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # 256 random images: full-rank covariances
        stats.update([[torch.randn(lv.cells, 64, lv.channels, generator=generator) for lv in lay.levels]
                      for lay in layouts])

    # the work of factor_rows per cell of tap i, c = C_i channels, p = channels of deeper taps
    flop, shapes = 0.0, []
    for lay in layouts:
        p = 0
        for lv in lay.levels:
            c = lv.channels
            flop += lv.cells * (4 * c * p * p + 4 * c * c * p + 4 * c ** 3 / 3)
            if p:
                shapes.append((lv.cells, c, p))
            p += c
    blocked = timed(lambda: sum(1 for _ in factor_rows(stats, 0.01)), args.repeats)

    # the dominant products alone: (n, c, p) @ (n, p, p) twice per tap, float64
    operands = [(torch.randn(n, c, p, dtype=torch.float64), torch.randn(n, p, p, dtype=torch.float64))
                for n, c, p in shapes]
    matmul_flop = sum(4 * n * c * p * p for n, c, p in shapes)
    matmul = timed(lambda: [torch.bmm(torch.bmm(a, b), b) for a, b in operands], args.repeats)

    # the per-position LAPACK route on a sample of positions, extrapolated to all of them
    d, positions, sample = stats.dim, stats.positions, 512
    cov = stats.covariance(0.01, positions=slice(0, sample))
    per_position = timed(lambda: whitening_factor(cov), args.repeats) * positions / sample
    lapack_flop = positions * (d ** 3 / 3 + d ** 3)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "image_size": list(size), "scales": list(scales), "positions": positions, "d": d,
        "blocked": {"gflop": flop / 1e9, "seconds": blocked, "gflops": flop / 1e9 / blocked},
        "matmul_same_shapes": {"gflop": matmul_flop / 1e9, "seconds": matmul, "gflops": matmul_flop / 1e9 / matmul},
        "per_position_lapack": {"gflop": lapack_flop / 1e9, "seconds": per_position,
                                "gflops": lapack_flop / 1e9 / per_position},
    }
    for name in ("blocked", "matmul_same_shapes", "per_position_lapack"):
        r = result[name]
        print(f"{name:<22s}{r['gflop']:8.1f} GFLOP {r['seconds']:8.2f} s {r['gflops']:8.1f} GFLOP/s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
